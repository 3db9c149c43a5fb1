"""Atomic, resumable checkpoints in Hugging Face format.

checkpoints/step_N/ = model (config.json + model.safetensors; with LoRA the adapter: adapter_config.json +
adapter_model.safetensors) + tokenizer + trainer_state.pt + COMPLETE; a sharded learner's weights and optimizer
state also as learner_shards/ (torch.distributed.checkpoint, loadable by any number of ranks).
Written to a hidden temp dir, fsynced, then renamed: a crash mid-write leaves a temp dir that is never loaded
(and is cleaned up on the next start), and the previous checkpoint is untouched. trainer_state.pt holds one
TrainerState record: where the run is, the learner's optimizer state and the stage's own resumable state.

Resuming never runs code from the run directory: trainer_state.pt is plain data (tensors, containers, numbers,
strings; train/safe_load.py reads it with torch.load(weights_only=True)), a save refuses state that could not be
read back that way, and every field is checked on load, so a tampered or hand-edited file is one UserError naming it.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from posttrain.errors import UserError
from posttrain.tracking.heartbeat import fault_point
from posttrain.train.safe_load import load_plain, unsafe_globals

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FORMAT = 2  # bump when TrainerState changes incompatibly
LEARNER_SHARDS = "learner_shards"  # a sharded learner's state, inside step_N/ (TrainerState.learner["shards"])


@dataclass(frozen=True)
class TrainerState:
    """Everything a checkpoint holds besides the model: enough to continue the run exactly."""

    global_step: int  # optimizer steps of the whole run (all stages)
    stage_index: int  # which entry of `recipe` was running
    stage_step: int  # that stage's own step count
    stage_done: bool  # the stage had finished (the next one starts on resume)
    learner: dict[str, Any] | None  # Learner.state_dict(): optimizer, schedule, bad-update count
    stage: dict[str, Any]  # the stage's own state (data cursor or task sampler, controllers, reference weights)
    rng: dict[str, Any]  # torch, numpy and python RNG states
    totals: dict[str, float]  # cumulative counters (compute ledger, tokens)
    elapsed_s: float  # wall-clock seconds of the run so far
    evals: dict[str, dict]  # headline metrics of every evaluation so far, by tag
    metrics_offset: int  # bytes of metrics.jsonl that belong to the run up to here
    format: int = STATE_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: Path, stages: int | None = None) -> TrainerState:
        """The record, every field checked (a hand-edited or damaged file is a UserError naming it and the field);
        `stages`: the recipe's number of stages, which stage_index must fall within."""
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise UserError(f"{where}: trainer state of another format (written by another version of posttrain); "
                            "start the run again with --fresh")
        state = cls(**{f.name: _field(data, f.name, where) for f in fields(cls)})
        if stages is not None and state.stage_index >= stages:
            _bad(where, "stage_index", f"0..{stages - 1} (the recipe has {stages} stage(s))", state.stage_index)
        return state


def _bad(where: Path, name: str, expected: str, value: Any) -> NoReturn:
    shown = repr(value)
    raise UserError(f"{where}: {name}: expected {expected}, got {shown[:80] + '...' if len(shown) > 80 else shown} "
                    "(hand-edited or damaged; delete this checkpoint to resume from the one before, or --fresh)")


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _real(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _number(x: Any) -> bool:
    return _real(x) and math.isfinite(x)


def _field(data: dict[str, Any], name: str, where: Path) -> Any:
    if name not in data:
        raise UserError(f"{where}: no field {name!r} (hand-edited or damaged; delete this checkpoint to resume from "
                        "the one before, or --fresh)")
    x = data[name]
    if name in ("global_step", "stage_index", "stage_step", "metrics_offset") and not _count(x):
        _bad(where, name, "an integer >= 0", x)
    elif name == "stage_done" and not isinstance(x, bool):
        _bad(where, name, "true or false", x)
    elif name == "elapsed_s" and not (_number(x) and x >= 0):
        _bad(where, name, "seconds >= 0", x)
    elif name == "totals" and not (isinstance(x, dict) and all(_real(v) for v in x.values())):
        _bad(where, name, "a table of numbers", x)
    elif name == "evals" and not (isinstance(x, dict) and all(isinstance(v, dict) for v in x.values())):
        _bad(where, name, "a table of evaluation results", x)
    elif name == "stage" and not isinstance(x, dict):
        _bad(where, name, "a table", x)
    elif name == "stage" and "cursor" in x and not _count(x["cursor"]):  # the data cursor most stages keep
        _bad(where, "stage.cursor", "an integer >= 0", x["cursor"])
    elif name == "learner":
        _check_learner(x, where)
    elif name == "rng":
        _check_rng(x, where)
    return x


def _check_learner(x: Any, where: Path) -> None:
    if x is None:
        return
    if not isinstance(x, dict):
        _bad(where, "learner", "a table", x)
    if "shards" in x:  # written as its name inside the checkpoint (save_checkpoint): never a path elsewhere
        if x["shards"] != LEARNER_SHARDS:
            _bad(where, "learner.shards", repr(LEARNER_SHARDS), x["shards"])
        return
    for key, ok, expected in (("optimizer", lambda v: isinstance(v, dict), "a table"),
                              ("scheduler", lambda v: isinstance(v, dict), "a table"),
                              ("bad_steps", _count, "an integer >= 0")):
        if key not in x or not ok(x[key]):
            _bad(where, f"learner.{key}", expected, x.get(key, "(missing)"))


def _check_rng(x: Any, where: Path) -> None:
    """Each state is tried on a throwaway generator of its kind, so what set_rng_state will accept is exactly
    what passes."""
    if not isinstance(x, dict):
        _bad(where, "rng", "a table of torch, numpy and python states", x)
    for key, trial in (("torch", lambda s: torch.Generator().set_state(s)),
                       ("numpy", lambda s: np.random.RandomState().set_state(s)),
                       ("python", lambda s: random.Random().setstate(s))):
        try:
            trial(x[key])
        except Exception:  # noqa: BLE001 - missing, of the wrong type or shape: all the same problem
            _bad(where, f"rng.{key}", f"a {key} random-generator state", x.get(key, "(missing)"))


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_model_dir(path: Path, model, tokenizer) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def save_checkpoint(root: Path, step: int, model, tokenizer, state: TrainerState) -> Path:
    """A sharded learner's state ({"shards": a directory its ranks wrote}) is moved inside the checkpoint and
    recorded by its name there, so the checkpoint directory is whole on its own (and can be moved)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_model_dir(tmp, model, tokenizer)
        if state.learner is not None and "shards" in state.learner:
            shutil.move(state.learner["shards"], tmp / LEARNER_SHARDS)
            state = replace(state, learner={**state.learner, "shards": LEARNER_SHARDS})
        fault_point("checkpoint_write", step)
        torch.save(state.to_dict(), tmp / STATE_FILE)
        refused = unsafe_globals(tmp / STATE_FILE)
        if refused:  # a stage kept an object, not data: resuming would refuse it, so say so now
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"checkpoint {final}: the trainer state holds {', '.join(refused)}, which a resume "
                            "cannot read back (a stage's state must be plain data: tables, lists, numbers, "
                            "strings, tensors)")
        (tmp / COMPLETE).write_text(f"step {step}\n")
        _fsync_tree(tmp)
    except OSError as e:  # disk full, quota, permissions: the previous checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {final} ({e.strerror or e}); the previous checkpoint is "
                        "intact, free space and re-run to resume") from e
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_tree(root)
    return final


def is_complete(path: Path) -> bool:
    """COMPLETE, the trainer state and a model: full weights (config.json) or a LoRA adapter (adapter_config.json)."""
    has_model = (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    return (path / COMPLETE).is_file() and (path / STATE_FILE).is_file() and has_model


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    for p in list(root.glob(".tmp-step_*")) if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)  # half-written by a crash: never loaded
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def rotate(root: Path, keep_last_n: int) -> None:
    for _, path in list_checkpoints(root)[:-keep_last_n]:
        shutil.rmtree(path, ignore_errors=True)


def load_state(path: Path, *, stages: int | None = None) -> TrainerState:
    """The checkpoint's TrainerState, read without running anything in it; `stages`: the recipe's stage count."""
    if not is_complete(path):
        raise UserError(f"{path}: not a complete checkpoint (missing {COMPLETE}, {STATE_FILE} or config.json)")
    data = load_plain(path / STATE_FILE)  # a refused, truncated or foreign file: a UserError naming it
    state = TrainerState.from_dict(data, where=path / STATE_FILE, stages=stages)
    if state.learner is not None and "shards" in state.learner:  # stored relative to its checkpoint
        state = replace(state, learner={**state.learner, "shards": str(path / state.learner["shards"])})
    return state


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
