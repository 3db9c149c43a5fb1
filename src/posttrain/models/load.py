"""Load a policy from a built-in preset name or a local Hugging Face checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from posttrain.errors import UserError
from posttrain.models.presets import PRESETS, ensure_preset
from posttrain.models.sources import SOURCES, ensure_source


def resolve_model_path(path: str, seed: int = 0, *, key: str = "model.path") -> Path:
    """A preset name becomes its (built) cache dir, a model source's name (models/sources.py) its downloaded and
    converted cache dir; anything else must be a local HF checkpoint directory. `key` names the recipe key in
    errors."""
    if path in PRESETS:
        return ensure_preset(path, seed)
    if path in SOURCES:
        return ensure_source(path)
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"{key}={path!r}: not a directory and not a preset ({', '.join(PRESETS)}) or model "
                        f"source ({', '.join(SOURCES)})")
    if not (p / "config.json").is_file():
        raise UserError(f"{key}={path!r}: no config.json in that directory (not a Hugging Face checkpoint)")
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"model.device={name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device={name!r} but torch sees no CUDA device (torch {torch.__version__})")
    return device


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matrix multiplies run in hardware here. On CPUs without AMX or AVX512-BF16 torch emulates them
    (measured: 0.3 vs 165 GFLOP/s fp32 on a 2-core AVX2 EPYC), so bf16 autocast would be a large slowdown."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})
    return False


def resolve_bf16(choice: bool | str, device: torch.device) -> bool:
    return bf16_is_fast(device) if choice == "auto" else bool(choice)


def explain_bf16(choice: bool | str, device: torch.device) -> tuple[bool, str]:
    """(whether bf16 autocast is on, why), for the run log and config.json: `auto` is a decision about this
    machine, and the numbers differ between the two."""
    bf16 = resolve_bf16(choice, device)
    if choice != "auto":
        return bf16, f"model.bf16 = {str(bool(choice)).lower()}"
    if device.type == "cpu":
        units = sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"})
        return bf16, (f"model.bf16 = auto and this CPU has {' and '.join(units)}" if units else
                      "model.bf16 = auto and this CPU has no bf16 units (no avx512_bf16 or amx_bf16), where bf16 "
                      "would be emulated")
    return bf16, f"model.bf16 = auto on {device.type}: bf16 {'supported' if bf16 else 'not supported'}"


def load_model(path: Path, dtype: torch.dtype = torch.float32, attention: str | None = None) -> PreTrainedModel:
    kwargs = {"attn_implementation": attention} if attention else {}
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        hint = ("; it is a checkpoint of a run: delete it to resume from the one before"
                if path.parent.name == "checkpoints" else "")
        raise UserError(f"cannot load a model from {path}: {type(e).__name__}: {first}{hint}") from e


def attention_for(device: torch.device, choice: str = "auto") -> str:
    """'auto': eager attention on CPU, where for the short sequences of RL on small models it measured about 2x
    faster than SDPA's flash kernel for forward+backward (docs/performance.md); SDPA on GPUs."""
    if choice != "auto":
        return choice
    return "eager" if device.type == "cpu" else "sdpa"


def load_tokenizer(path: Path, *, require_chat_template: bool = True) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from e
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer in {path} has no eos_token; generation would never stop")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if require_chat_template and not tok.chat_template:
        raise UserError(f"the tokenizer in {path} has no chat template; add one, or set "
                        "model.chat_template = false to feed prompts as raw text")
    return tok


def check_same_tokenizer(policy: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, where: str) -> None:
    """A teacher scores the policy's token ids, so both must map ids to the same strings: a UserError naming the
    first difference (vocabulary size, a token id, the EOS or PAD id, the chat template) otherwise."""
    pv, tv = policy.get_vocab(), teacher.get_vocab()
    if len(pv) != len(tv):
        raise UserError(f"{where}: the teacher's tokenizer has {len(tv)} tokens, the policy's {len(pv)}; distillation "
                        "needs the same tokenizer (train the teacher from the same model.path family)")
    by_id = {i: t for t, i in tv.items()}
    for token, i in sorted(pv.items(), key=lambda kv: kv[1]):
        if by_id.get(i) != token:
            raise UserError(f"{where}: token id {i} is {token!r} for the policy but {by_id.get(i)!r} for the "
                            "teacher; distillation needs the same tokenizer")
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(policy, name) != getattr(teacher, name):
            raise UserError(f"{where}: {name} is {getattr(policy, name)} for the policy but "
                            f"{getattr(teacher, name)} for the teacher")
    if (policy.chat_template or "") != (teacher.chat_template or ""):
        raise UserError(f"{where}: the teacher's chat template differs from the policy's; prompts would be "
                        "rendered differently for the two")
