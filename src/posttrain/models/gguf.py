"""GGUF (llama.cpp's file format, how many small models are shared) into a plain Hugging Face checkpoint directory.

`convert_gguf(file, out_dir)` (and `posttrain models convert FILE.gguf OUT/`) writes what `AutoModelForCausalLM`,
`posttrain run` and `posttrain eval` load: model.safetensors, config.json, the tokenizer with the chat template
stored in the GGUF, generation_config.json, and conversion.json saying where the weights came from.

How: transformers' GGUF loader (needs the `gguf` and `accelerate` packages, the `models` extra) reads the config,
the tokenizer and the tensors, dequantizing every quantized tensor to fp32. A model loaded that way keeps a GGUF
quantizer attached and `save_pretrained` refuses it, so the weights go into a model built from the same config
and that one is saved, in fp32: a Q4_1 or Q8_0 value (a scale times a small integer plus an offset) is exact in
fp32, so the saved weights are bit for bit what the loader dequantized.

What the result is not: the weights of a quantized GGUF are the original checkpoint rounded to a few bits, and
dequantizing does not undo the rounding. conversion.json records the file type and the tensor types; say so
wherever the model's scores are reported.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from posttrain.errors import MissingExtraError, UserError

MAGIC = b"GGUF"
CONVERSION_FILE = "conversion.json"
UNQUANTIZED = {"F32", "F16", "BF16", "F64"}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_gguf_file(path: Path) -> None:
    """One line naming the file when it is missing or not a GGUF file."""
    if not path.is_file():
        raise UserError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    with path.open("rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise UserError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")


def _need_extras() -> None:
    for package in ("gguf", "accelerate"):  # transformers' GGUF loader needs both and says so less plainly
        try:
            __import__(package)
        except ImportError:
            raise MissingExtraError(package, "models") from None


def describe_gguf(path: Path) -> dict[str, Any]:
    """What the file says about itself: architecture, name, llama.cpp file type, tensor types with counts."""
    check_gguf_file(path)
    _need_extras()
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # a truncated or damaged file
        raise UserError(f"{path}: cannot read it as GGUF: {type(e).__name__}: {_first_line(e)}") from e

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    file_type = field("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(int(file_type)).name if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {"architecture": field("general.architecture"), "name": field("general.name"),
            "file_type": file_type_name, "tensor_types": dict(types.most_common()),
            "quantized": any(t not in UNQUANTIZED for t in types)}


def convert_gguf(gguf_file: Path | str, out_dir: Path | str, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert `gguf_file` into a new Hugging Face checkpoint directory `out_dir` (fp32 safetensors, tokenizer and
    chat template, generation config, conversion.json). Atomic: built beside `out_dir` and renamed into place, so
    `out_dir` is whole or absent. `out_dir` must not exist or be an empty directory. `extra` is merged into
    conversion.json. Returns what conversion.json holds."""
    gguf_file, out_dir = Path(gguf_file).expanduser(), Path(out_dir).expanduser()
    check_gguf_file(gguf_file)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: already exists and is not an empty directory; give a new one")
    if out_dir.resolve() == gguf_file.resolve().parent or gguf_file.resolve().is_relative_to(out_dir.resolve()):
        raise UserError(f"{out_dir}: holds the GGUF file {gguf_file}; give a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        record = write_checkpoint(gguf_file, tmp, extra=extra)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def write_checkpoint(gguf_file: Path, directory: Path, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The conversion itself, into an existing empty `directory` (not atomic: see convert_gguf)."""
    info = describe_gguf(gguf_file)
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_file.parent), gguf_file.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, OSError, RuntimeError) as e:
        raise UserError(f"{gguf_file}: transformers {transformers.__version__} cannot convert it "
                        f"({info['architecture']}): {type(e).__name__}: {_first_line(e)}") from e
    state = loaded.state_dict()
    generation_config = loaded.generation_config
    del loaded
    with torch.random.fork_rng(devices=[]):  # the random init below is overwritten; the caller's RNG is not touched
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{gguf_file}: its tensors do not fit the {type(model).__name__} built from its config: "
                        f"{_first_line(e)}") from e
    del state
    model.generation_config = generation_config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    record = {
        "gguf": name, "gguf_sha256": sha256_of(gguf_file), **info, "dtype": "float32",
        "parameters": sum(p.numel() for p in model.parameters()), "model_class": type(model).__name__,
        "converted_by": f"posttrain models convert (transformers {transformers.__version__})",
        "note": quantization_note(info), **(extra or {}),
    }
    (directory / CONVERSION_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def quantization_note(info: dict[str, Any]) -> str:
    if not info["quantized"]:
        return "converted from an unquantized GGUF file"
    kinds = ", ".join(f"{k} x{n}" for k, n in info["tensor_types"].items())
    return (f"weights dequantized from a quantized GGUF ({info['file_type']}; tensors {kinds}): the rounded "
            "weights, not the original unquantized checkpoint")


def conversion_of(model_dir: Path | str) -> dict[str, Any] | None:
    """conversion.json of a directory written by convert_gguf, None for any other checkpoint."""
    path = Path(model_dir) / CONVERSION_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
