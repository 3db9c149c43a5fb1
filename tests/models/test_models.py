import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.errors import UserError
from posttrain.models import load_tokenizer, resolve_model_path
from posttrain.models.presets import build_preset


def test_preset_build_is_deterministic_for_a_seed(tmp_path):
    build_preset("tiny-test", 3, tmp_path / "a")
    build_preset("tiny-test", 3, tmp_path / "b")
    build_preset("tiny-test", 4, tmp_path / "c")
    a, b, c = (AutoModelForCausalLM.from_pretrained(tmp_path / x) for x in "abc")
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_preset_weights_are_drawn_at_its_init_std(tmp_path):
    """init_std reaches the saved weights (tiny-3m's plateau depends on it), and 0.02 stays transformers' default."""
    from posttrain.models import presets

    presets.build_spec(dataclasses.replace(presets.PRESETS["tiny-test"], init_std=0.06), 0, tmp_path / "wide")
    build_preset("tiny-test", 0, tmp_path / "default")
    wide, default = (AutoModelForCausalLM.from_pretrained(tmp_path / x) for x in ("wide", "default"))
    assert wide.config.initializer_range == 0.06 and default.config.initializer_range == 0.02
    for model, std in ((wide, 0.06), (default, 0.02)):
        q = model.model.layers[0].self_attn.q_proj.weight  # 4,096 draws: the sample std is within ~2% of std
        assert abs(q.std().item() - std) < 0.1 * std
    assert presets.PRESETS["tiny-3m"].init_std == 0.06


def test_preset_loads_through_the_ordinary_hf_path(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "12+34="}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<|user|>12+34=<|end|><|assistant|>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == 3 + 6  # three special tokens, one token per character
    assert tok.decode(ids, skip_special_tokens=True) == "12+34="
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id


def test_char_tokenizer_round_trips_ascii_and_newlines(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    text = "def f(x):\n    return x * 2  # ok!"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_bad_model_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a directory and not a preset"):
        resolve_model_path(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))


def test_tokenizer_without_chat_template_is_reported(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(UserError, match="no chat template"):
        load_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path, require_chat_template=False).eos_token_id == tok.eos_token_id
