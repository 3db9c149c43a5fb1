"""The sharded learner as a recipe drives it (train/learner_group.py): 2 local gloo ranks behind the Learner
interface. On the same batch the group's loss, gradient norm, logprobs and streamed weights equal a single-process
Learner's (fp32; tolerances as in tests/test_sharding.py), and its checkpoint resumes in one process."""

from __future__ import annotations

import pytest
import torch
from sharding_helpers import SummedNLL, batch

from posttrain.models import load_model
from posttrain.train.learner import Learner
from posttrain.train.learner_group import LearnerSpec, launch_group

ARGS = {"lr": 1e-2, "total_updates": 3, "micro_batch_size": 3, "pad_id": 0}


def update_gap(start: dict, got: dict, want: dict) -> tuple[float, float]:
    update = torch.cat([(want[k] - start[k]).flatten() for k in want])
    gap = torch.cat([(got[k] - want[k]).flatten() for k in want])
    return float(gap.norm()) / float(update.norm()), float(update.norm())


@pytest.mark.slow
def test_a_group_of_two_ranks_steps_logprobs_and_syncs_like_one_learner(tiny_dir, tmp_path):
    seqs, total = batch()
    plain_model = load_model(tiny_dir).float()
    start = {k: v.clone() for k, v in plain_model.state_dict().items()}
    plain = Learner(plain_model, **ARGS)
    policy = load_model(tiny_dir).float()
    group = launch_group(policy, LearnerSpec(type(policy), policy.config, ARGS), world_size=2, launch="local",
                         scratch=tmp_path / "shards", threads=1)
    try:
        want_lp, want_flops = plain.logprobs(seqs)
        got_lp, got_flops = group.logprobs(seqs)
        assert got_flops == pytest.approx(want_flops)  # every rank's share counted once
        for g, w in zip(got_lp, want_lp, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        for _ in range(2):
            want = plain.train_step(seqs, SummedNLL(total))
            got = group.train_step(seqs, SummedNLL(total))
            assert got.loss == pytest.approx(want.loss, rel=1e-5)
            assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-5)
            assert (got.tokens, got.flops) == (want.tokens, pytest.approx(want.flops))
            assert got.metrics["nll_sum"] == pytest.approx(want.metrics["nll_sum"], rel=1e-5)
        synced = {k: v.clone() for k, v in group.weights().items()}
        assert synced.keys() == start.keys()
        assert group.last_sync_s > 0
        rel_gap, moved = update_gap(start, synced, dict(plain_model.state_dict()))
        assert moved > 0.1 and rel_gap < 1e-4
        assert all(policy.state_dict()[k].data_ptr() == v.data_ptr() for k, v in group.weights().items())

        state = group.state_dict()  # shards of 2 ranks -> one process, then one more step each
        resumed_model = load_model(tiny_dir).float()
        resumed_model.load_state_dict(synced)
        resumed = Learner(resumed_model, **ARGS)
        resumed.load_state_dict(state)
        want = plain.train_step(seqs, SummedNLL(total))
        got = resumed.train_step(seqs, SummedNLL(total))
        assert got.lr == want.lr and got.loss == pytest.approx(want.loss, rel=1e-5)
        assert update_gap(start, dict(resumed_model.state_dict()), dict(plain_model.state_dict()))[0] < 1e-4
    finally:
        group.close()
