"""Resuming a run directory never runs code, and a tampered or hand-edited state file is one line naming it.

trainer_state.pt is read with torch.load(weights_only=True) and every field checked (train/checkpoint.py); a
sharded learner's learner_shards/ through an index reader that admits only DCP's records (train/safe_load.py);
the offline-distillation teacher cache carries a sha256 of its content (train/teacher_cache.py). Each payload
below is first shown to be live (plain pickle runs it), then shown not to run when posttrain reads it.
"""

import dataclasses
import pickle
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny_recipes import tiny_recipe, write_recipe

from posttrain.config import validate
from posttrain.errors import UserError
from posttrain.train.checkpoint import STATE_FILE, TrainerState, load_state, rng_state, save_checkpoint
from posttrain.train.safe_load import load_plain

ROOT = Path(__file__).resolve().parents[2]
TINY = tiny_recipe(checkpoint={"every": 1, "keep_last_n": 5})


class Payload:
    """Unpickling this creates `marker`: what a hostile trainer_state.pt or cache would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def live(payload: Payload) -> bytes:
    """The payload's pickle, after checking that plain pickle really runs it (so a test below is not vacuous)."""
    data = pickle.dumps(payload)
    probe = payload.marker.with_name(payload.marker.name + ".probe")
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.is_file()
    probe.unlink()
    return data


def posttrain(*args):
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args)], capture_output=True, text=True,
                          check=False, cwd=ROOT, timeout=600)


def one_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny SFT run with checkpoints step_1 and step_2 (copied per test)."""
    from posttrain.runner import run

    out = tmp_path_factory.mktemp("finished")
    run(validate({**TINY, "output_dir": str(out)}, "test"))
    return out / "t"


@pytest.fixture()
def resumable(tmp_path):
    """(recipe, the checkpoint a resume would load): a finished run, its DONE marker removed (its own: the run
    directory records its output_dir, so it cannot be a copy)."""
    from posttrain.runner import run

    run(validate({**TINY, "output_dir": str(tmp_path)}, "test"))
    (tmp_path / "t" / "DONE").unlink()
    recipe = write_recipe(tmp_path / "t.toml", {**TINY, "output_dir": str(tmp_path)})
    return recipe, tmp_path / "t" / "checkpoints" / "step_2"


def edit_state(ckpt: Path, edit) -> None:
    data = load_plain(ckpt / STATE_FILE)
    edit(data)
    torch.save(data, ckpt / STATE_FILE)


# ---- trainer_state.pt ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("form", ["torch.save", "raw pickle"])
def test_a_pickle_payload_in_the_trainer_state_does_not_run(resumable, tmp_path, form):
    recipe, ckpt = resumable
    marker = tmp_path / "pwned"
    payload = Payload(marker)
    if form == "torch.save":
        live(payload)
        torch.save({"format": 2, "global_step": payload}, ckpt / STATE_FILE)
    else:
        (ckpt / STATE_FILE).write_bytes(live(payload))
    line = one_line(posttrain("run", recipe))
    # torch's unpickler names the refused callable; a raw pickle (protocol 5) already fails at its FRAME opcode
    why = "refused: it would call exec," if form == "torch.save" else "cannot read it (UnpicklingError"
    assert str(ckpt / STATE_FILE) in line and why in line
    assert not marker.exists()
    with pytest.raises(UserError, match="trainer_state.pt: ") as e:
        load_state(ckpt)
    assert "\n" not in str(e.value) and not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize(("edit", "says"), [
    (lambda d: d.update(stage_index=99), "stage_index: expected 0..0 (the recipe has 1 stage(s)), got 99"),
    (lambda d: d.update(global_step="two"), "global_step: expected an integer >= 0, got 'two'"),
])
def test_a_hand_edited_trainer_state_is_one_line_exit_2(resumable, edit, says):
    recipe, ckpt = resumable
    edit_state(ckpt, edit)
    line = one_line(posttrain("run", recipe))
    assert str(ckpt / STATE_FILE) in line and says in line


def drop(key):
    return lambda d: d.pop(key)


@pytest.mark.parametrize(("edit", "says"), [
    (drop("global_step"), "no field 'global_step'"),
    (drop("rng"), "no field 'rng'"),
    (lambda d: d.update(stage_index=-1), "stage_index: expected an integer >= 0"),
    (lambda d: d.update(stage_step=2.5), "stage_step: expected an integer >= 0"),
    (lambda d: d.update(stage_done="yes"), "stage_done: expected true or false"),
    (lambda d: d.update(elapsed_s=float("nan")), "elapsed_s: expected seconds >= 0"),
    (lambda d: d.update(totals={"compute/flops": "many"}), "totals: expected a table of numbers"),
    (lambda d: d.update(evals=[1]), "evals: expected a table of evaluation results"),
    (lambda d: d["stage"].update(cursor="ten"), "stage.cursor: expected an integer >= 0, got 'ten'"),
    (lambda d: d["learner"].pop("optimizer"), "learner.optimizer: expected a table"),
    (lambda d: d["learner"].update(bad_steps="0"), "learner.bad_steps: expected an integer >= 0"),
    (lambda d: d.update(learner={"shards": "/elsewhere"}), "learner.shards: expected 'learner_shards'"),
    (lambda d: d["rng"].update(torch=torch.zeros(3)), "rng.torch: expected a torch random-generator state"),
    (lambda d: d["rng"].update(numpy=("MT19937", "text", 0, 0, 0.0)), "rng.numpy: expected a numpy"),
    (lambda d: d["rng"].pop("python"), "rng.python: expected a python random-generator state"),
])
def test_hand_edited_fields_are_a_user_error_naming_the_file(finished, tmp_path, edit, says):
    ckpt = tmp_path / "step_2"
    shutil.copytree(finished / "checkpoints" / "step_2", ckpt)
    assert load_state(ckpt, stages=1).global_step == 2  # untouched, it loads
    edit_state(ckpt, edit)
    with pytest.raises(UserError, match=str(ckpt / STATE_FILE)) as e:
        load_state(ckpt, stages=1)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_the_rng_states_come_back_exactly(finished, tmp_path):
    """weights_only loading keeps every RNG state the resume restores (torch, numpy's uint32 key, python)."""
    import numpy as np

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = TrainerState(global_step=1, stage_index=0, stage_step=1, stage_done=False, learner=None,
                         stage={"cursor": 4}, rng=rng_state(), totals={}, elapsed_s=0.0, evals={}, metrics_offset=0)
    want = (torch.rand(3), np.random.rand(3), random.random())
    shutil.copytree(finished / "checkpoints" / "step_2", tmp_path / "step_1")
    torch.save(state.to_dict(), tmp_path / "step_1" / STATE_FILE)
    from posttrain.train.checkpoint import set_rng_state

    set_rng_state(load_state(tmp_path / "step_1").rng)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


class Opaque:
    pass


def test_a_stage_state_that_could_not_be_read_back_is_refused_when_saved(tiny, tmp_path):
    model, tok = tiny
    state = TrainerState(global_step=1, stage_index=0, stage_step=1, stage_done=False, learner=None,
                         stage={"thing": Opaque()}, rng=rng_state(), totals={}, elapsed_s=0.0, evals={},
                         metrics_offset=0)
    with pytest.raises(UserError, match=r"step_1: the trainer state holds .*Opaque.*plain data"):
        save_checkpoint(tmp_path, 1, model, tok, state)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


# ---- a sharded learner's learner_shards/ (torch.distributed.checkpoint) ------------------------------------

@pytest.fixture()
def shards(tmp_path):
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.arange(4.0)}, "optimizer": {"param_groups": [{"lr": 0.5, "betas": (0.9, 0.99)}]}}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "learner_shards"), no_dist=True)
    return tmp_path / "learner_shards"


def empty():
    return {"model": {"w": torch.zeros(4)}, "optimizer": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0)}]}}


def test_learner_shards_load_back(shards):
    from posttrain.train.safe_load import dcp_load

    state = empty()
    dcp_load(state, shards, no_dist=True)
    assert torch.equal(state["model"]["w"], torch.arange(4.0))
    assert state["optimizer"]["param_groups"][0] == {"lr": 0.5, "betas": (0.9, 0.99)}


def test_a_pickle_payload_in_the_shard_index_does_not_run(shards, tmp_path):
    from posttrain.train.safe_load import dcp_load

    marker = tmp_path / "pwned"
    (shards / ".metadata").write_bytes(live(Payload(marker)))
    with pytest.raises(UserError, match=r"learner_shards/\.metadata: refused: it would call builtins\.exec,"):
        dcp_load(empty(), shards, no_dist=True)
    assert not marker.exists()


def test_a_pickle_payload_in_a_shard_value_does_not_run(shards, tmp_path):
    """The index points the optimizer's lr at a torch.save'd payload (DCP itself would torch.load it unsafely)."""
    from posttrain.train.safe_load import dcp_load

    marker = tmp_path / "pwned"
    live(Payload(marker))
    torch.save(Payload(marker), shards / "evil.distcp")
    with (shards / ".metadata").open("rb") as f:
        index = pickle.load(f)  # written by the fixture just now
    key = next(k for k in index.storage_data if k.fqn.endswith("lr"))
    index.storage_data[key] = dataclasses.replace(index.storage_data[key], relative_path="evil.distcp", offset=0,
                                                  length=(shards / "evil.distcp").stat().st_size)
    (shards / ".metadata").write_bytes(pickle.dumps(index))
    with pytest.raises(UserError, match=r"learner_shards/optimizer\.param_groups\.0\.lr: refused") as e:
        dcp_load(empty(), shards, no_dist=True)
    assert "would call exec," in str(e.value) and not marker.exists()


def test_a_shard_index_naming_a_file_elsewhere_is_refused(shards):
    from posttrain.train.safe_load import dcp_load

    with (shards / ".metadata").open("rb") as f:
        index = pickle.load(f)
    for key, info in index.storage_data.items():
        index.storage_data[key] = dataclasses.replace(info, relative_path="../../etc/passwd")
    (shards / ".metadata").write_bytes(pickle.dumps(index))
    with pytest.raises(UserError, match=r"\.metadata: names a shard file outside its directory"):
        dcp_load(empty(), shards, no_dist=True)


# ---- the offline-distillation teacher cache --------------------------------------------------------------------

ROWS = 12  # more than the 8 spot-checked rows, so an edit past them is caught only by the content hash


@pytest.fixture()
def cache_setup(tiny, tmp_path):
    """(teacher, samples, the samples file, the cache path), the cache computed once."""
    from posttrain.train.learner import FrozenModel, Sequences
    from posttrain.train.teacher_cache import teacher_logprobs

    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    seqs = Sequences([torch.randint(0, vocab, (5,), generator=g).tolist() for _ in range(ROWS)],
                     [torch.randint(0, vocab, (3 + i % 4,), generator=g).tolist() for i in range(ROWS)])
    samples = tmp_path / "samples.jsonl"
    samples.write_text("stands in for the sample file\n")
    teacher = FrozenModel(model, micro_batch_size=ROWS, pad_id=tok.pad_token_id)
    cache = tmp_path / "teacher_cache.pt"
    first, _, built = teacher_logprobs(cache, teacher, seqs, samples_file=samples, temperature=1.0)
    assert built
    again, _, built = teacher_logprobs(cache, teacher, seqs, samples_file=samples, temperature=1.0)
    assert not built and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    return teacher, seqs, samples, cache


def edit_cache(cache: Path, edit) -> None:
    stored = torch.load(cache, weights_only=True)
    edit(stored)
    torch.save(stored, cache)


def set_rows(rows, value):
    def edit(stored):
        for i in rows:
            stored["logprobs"][i] = torch.full_like(stored["logprobs"][i], value)
    return edit


@pytest.mark.parametrize(("edit", "says"), [
    (set_rows(range(8, ROWS), 0.0), "edited or damaged after it was computed (its content does not match its sha256)"),
    (set_rows(range(ROWS), float("nan")), "row 0 of the cache differs from the teacher by nan"),
    (set_rows(range(ROWS), 0.0), "row 0 of the cache differs from the teacher by"),
    (lambda s: s.pop("fingerprint"), "not a teacher cache of this version ('fingerprint' is missing)"),
    (lambda s: s.pop("sha256"), "not a teacher cache of this version ('sha256' is missing)"),
    (lambda s: s["logprobs"].pop(), f"holds {ROWS - 1} rows, the samples have {ROWS}"),
    (lambda s: s["logprobs"].__setitem__(3, torch.zeros(1)), "row 3 is (1,) torch.float32, not"),
    (lambda s: s.update(flops="lots"), "('flops' is a str, not a float)"),
])
def test_an_edited_teacher_cache_is_a_user_error_naming_it(cache_setup, edit, says):
    from posttrain.train.teacher_cache import teacher_logprobs

    teacher, seqs, samples, cache = cache_setup
    edit_cache(cache, edit)
    with pytest.raises(UserError) as e:
        teacher_logprobs(cache, teacher, seqs, samples_file=samples, temperature=1.0)
    assert str(e.value).startswith(f"{cache}: ") and says in str(e.value) and "\n" not in str(e.value)


def test_a_pickle_payload_in_the_teacher_cache_does_not_run(cache_setup, tmp_path):
    from posttrain.train.teacher_cache import teacher_logprobs

    teacher, seqs, samples, cache = cache_setup
    marker = tmp_path / "pwned"
    live(Payload(marker))
    torch.save({"fingerprint": Payload(marker)}, cache)
    with pytest.raises(UserError, match="teacher_cache.pt: not a readable teacher cache"):
        teacher_logprobs(cache, teacher, seqs, samples_file=samples, temperature=1.0)
    assert not marker.exists()
