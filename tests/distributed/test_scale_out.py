"""Scale-out on CPU with the real packages: Ray rollout workers and asynchronous RL with bounded staleness.

- RL under Ray (2 rollout actors) with max_staleness = 0 reproduces the single-process run's metrics.jsonl row for
  row: a sample's random draws depend only on (seed, batch row), wherever it is generated.
- max_staleness = k: every trained sample is at most k policy versions old, and some are older than 0.
- a rollout actor killed mid-generation is restarted and its prompts re-issued: the batch is exactly the one an
  undisturbed run returns, nothing lost or duplicated.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from posttrain.config import validate
from posttrain.records import SamplingParams
from posttrain.runner import run

ray = pytest.importorskip("ray")  # a dev dependency of `make test` (the ray extra): present in CI

# Metrics that are measurements of time or of this machine, not of the run's numbers
TIMING = ("time/", "perf/")


def rl_config(tmp_path, name, *, distributed=None, rollout=None, steps=3):
    return validate({
        "recipe": "rl", "name": name, "output_dir": str(tmp_path), "seed": 0, "threads": 1,
        "model": {"path": "tiny-test"}, "env": {"name": "arithmetic", "args": {"digits": 1}},
        "rl": {"steps": steps, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, "lr": 1e-2,
               "micro_batch_size": 8, "entropy_coef": 0.01},
        "eval": {"problems": 4, "samples": 2, "ks": [1, 2], "max_new_tokens": 4, "at_start": False},
        **({"distributed": distributed} if distributed else {}),
        **({"rollout": rollout} if rollout else {}),
    }, "test")


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(row):
    return {k: v for k, v in row.items() if not k.startswith(TIMING) and k != "time/elapsed_s"}


def test_ray_workers_in_step_reproduce_the_single_process_run(tmp_path):
    single = rl_config(tmp_path, "single")
    run(single)
    on_ray = rl_config(tmp_path, "ray", distributed={"backend": "ray", "num_rollout_workers": 2, "num_cpus": 2})
    run(on_ray)
    a, b = rows(single.run_dir), rows(on_ray.run_dir)
    assert len(a) == len(b) and any("pg/loss" in r for r in a)
    for ra, rb in zip(a, b, strict=True):
        ra, rb = comparable(ra), comparable(rb)
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):  # batch composition differs between one engine and two: float rounding
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), k
            else:
                assert rb[k] == ra[k], k
    assert not ray.is_initialized()  # the run started Ray and shut it down


@pytest.mark.parametrize("k", [1, 2])
def test_asynchronous_rl_trains_on_samples_exactly_min_step_k_versions_old_and_repeats(tmp_path, k):
    cfg = rl_config(tmp_path, f"async{k}", rollout={"max_staleness": k}, steps=5)
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if "rollout/staleness_max" in r]
    assert len(train) == 5
    # step i samples with version max(v0, v0 + i - k): the first k steps are fresher, then always k behind
    assert [r["rollout/staleness_max"] for r in train] == [min(i, k) for i in range(5)]
    assert [r["rollout/staleness_mean"] for r in train] == [min(i, k) for i in range(5)]
    assert (cfg.run_dir / "final" / "model.safetensors").exists()
    # the prompt history holds the steps that trained, not the ones the producer generated past the end
    history = [json.loads(x) for x in (cfg.run_dir / "prompts.jsonl").read_text().splitlines()]
    assert {step for h in history for step, _ in h["visits"]} == {1, 2, 3, 4, 5}
    # which weights a step samples with does not depend on thread timing: a second run is the same run
    again = rl_config(tmp_path, f"async{k}-again", rollout={"max_staleness": k}, steps=5)
    run(again)
    assert [comparable(r) for r in rows(again.run_dir)] == [comparable(r) for r in rows(cfg.run_dir)]
    # and it is not the synchronous run: from the second step on, other weights sampled
    sync = rl_config(tmp_path, f"sync{k}", steps=5)
    run(sync)
    losses = [[r["pg/loss"] for r in rows(c.run_dir) if "pg/loss" in r] for c in (sync, cfg)]
    assert losses[0][0] == losses[1][0] and losses[0][1:] != losses[1][1:]


def test_a_killed_rollout_actor_is_restarted_and_its_prompts_reissued(tiny_dir):
    from posttrain.config import DistributedConfig
    from posttrain.dist import RayEngine
    from posttrain.models import load_model, load_tokenizer

    model, tok = load_model(tiny_dir), load_tokenizer(tiny_dir)
    engine = RayEngine(DistributedConfig(backend="ray", num_rollout_workers=2, num_cpus=2), engine="local",
                       engine_args={}, model=model, tokenizer=tok, bf16=False, stop_ids={tok.eos_token_id},
                       version=0)
    notes = []
    engine.on_note = notes.append
    try:
        prompts = [tok.encode(f"{i}+{i}=") for i in range(16) for _ in range(4)]
        params = SamplingParams(temperature=1.0, max_new_tokens=200, seed=3)  # long enough to kill mid-way
        t0 = time.time()
        undisturbed = engine.generate(prompts, params)
        took = time.time() - t0
        victim = engine.worker_pids()[1]
        killer = threading.Timer(took / 3, os.kill, args=(victim, signal.SIGKILL))  # a third of the way in
        killer.start()
        disturbed = engine.generate(prompts, params)
        killer.join()
        # restarted during that call: had the kill come after the actor's chunk was done, nothing would restart
        assert engine.restarts == 1 and victim not in engine.worker_pids()
        assert any("rollout worker 1 died" in n for n in notes)
        assert [c.token_ids for c in disturbed] == [c.token_ids for c in undisturbed]
        assert [c.prompt_ids for c in disturbed] == [tuple(p) for p in prompts]
        # the restarted actor samples from the latest weights
        engine.update_weights({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, version=1)
        assert {c.policy_version for c in engine.generate(prompts[:8], params)} == {1}
    finally:
        engine.close()
    assert not ray.is_initialized()


def test_group_chunks_cut_only_between_groups():
    from posttrain.dist import group_chunks

    prompts = [[1]] * 4 + [[2]] * 4 + [[3]] * 4
    assert group_chunks(prompts, 2) == [(0, 8), (8, 12)]
    assert group_chunks(prompts, 3) == [(0, 4), (4, 8), (8, 12)]
    assert group_chunks(prompts, 5) == [(0, 4), (4, 8), (8, 12)]
    assert group_chunks(prompts[:4], 2) == [(0, 4)]


def test_ray_scoring_runs_the_verifiers_as_ray_tasks_and_scores_as_here():
    import itertools

    from posttrain.config import DistributedConfig
    from posttrain.dist import RayScoring, start_ray
    from posttrain.envs import make_env
    from posttrain.envs.scoring import Scorer

    env = make_env("arithmetic", {"digits": 2})
    tasks = list(itertools.islice(env.tasks("train", 0), 24))
    texts = [t.answer if i % 3 else "wrong" for i, t in enumerate(tasks)]
    here = Scorer(env)(tasks, texts)
    remote = RayScoring(parts=3)
    assert Scorer(env, score_fn=remote)(tasks, texts) == here and remote.remote_calls == 0  # no Ray yet: here
    started = start_ray(DistributedConfig(backend="ray", num_cpus=2))
    try:
        assert Scorer(env, score_fn=remote)(tasks, texts) == here
        assert remote.remote_calls == 1
        assert [s.correct for s in here] == [bool(i % 3) for i in range(24)]
    finally:
        if started:
            ray.shutdown()
