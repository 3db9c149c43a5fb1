"""The Learner: one optimizer update per train_step, what happened returned (not logged), resumable state."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.errors import UserError
from posttrain.train.learner import ForwardOut, Learner, Sequences, micro_batches
from posttrain.train.losses import SFTLoss

SEQS = Sequences([[5, 6, 7], [5, 6, 7], [9, 10]], [[11, 12], [13], [14, 15, 16]])


def learner_for(model, **kw):
    return Learner(model, **{"lr": 1e-3, "total_updates": 10, "micro_batch_size": 2, "pad_id": 0, **kw})


def test_train_step_updates_the_model_and_reports_what_it_did(tiny):
    model, _ = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = learner_for(model)
    result = learner.train_step(SEQS, SFTLoss(6))
    assert result.skipped is None and math.isfinite(result.loss) and result.grad_norm > 0
    assert result.rows == 3 and result.tokens == 6 and result.lr == pytest.approx(1e-3)
    # the FLOPs of what ran: the first two rows share their prompt (one prompt pass), x3 for the backward
    fm = learner.flop_model
    expected = 3 * (fm.forward_shared_prefix(3, [2, 1]) + fm.forward_shared_prefix(2, [3]))
    assert result.flops == pytest.approx(expected)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_non_finite_loss_skips_the_update_and_says_why(tiny):
    model, _ = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = learner_for(model, max_bad_steps=2)

    def nan_loss(out: ForwardOut):
        return out.logprobs.sum() * float("nan"), {}

    result = learner.train_step(SEQS, nan_loss, where="rl step 4")
    assert result.skipped is not None and "rl step 4: non-finite loss" in result.skipped
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert learner.scheduler.last_epoch == 1  # the schedule advanced anyway
    with pytest.raises(UserError, match="2 consecutive bad updates"):
        learner.train_step(SEQS, nan_loss, where="rl step 5")


def test_rows_that_are_all_skipped_still_step_the_optimizer(tiny):
    """Forwarding no rows is a zero gradient, not no step: Adam's moments from earlier steps still move weights."""
    model, _ = tiny
    learner = learner_for(model)
    learner.train_step(SEQS, SFTLoss(6))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = learner.train_step(SEQS, SFTLoss(6), rows=torch.zeros(0, dtype=torch.long))
    assert result.rows == 0 and result.tokens == 0 and result.grad_norm == 0 and result.skipped is None
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_micro_batch_size_does_not_change_the_update(tiny_dir):
    from posttrain.models import load_model

    finals = []
    for size, tokens in ((1, None), (3, None), (3, 8)):  # 8 tokens: rows 0-1 (2 x (3 + 2)) exceed it -> 3 passes
        model = load_model(tiny_dir)
        learner = Learner(model, lr=1e-2, total_updates=2, micro_batch_size=size, pad_id=0, micro_batch_tokens=tokens)
        for _ in range(2):
            learner.train_step(SEQS, SFTLoss(6))
        finals.append(model.state_dict())
    for other in finals[1:]:
        for name, tensor in finals[0].items():
            torch.testing.assert_close(tensor, other[name], atol=1e-4, rtol=1e-4)  # Adam: see test_rl.py


def test_activation_checkpointing_recomputes_each_block_and_leaves_the_step_unchanged(tiny_dir):
    """Each decoder block runs twice per micro-batch (forward, then again inside the backward), the loss and the
    gradient norm are the plain learner's, and generation with the same module is untouched (eval mode)."""
    from posttrain.models import load_model

    results, calls = [], []
    for checkpointing in (False, True):
        model = load_model(tiny_dir).float()
        counted = [0]
        proj = model.model.layers[0].mlp.down_proj  # counted by wrapping its forward: hooks do not fire on replay
        proj.forward = lambda x, f=proj.forward, n=counted: (n.__setitem__(0, n[0] + 1), f(x))[1]
        learner = Learner(model, lr=1e-2, total_updates=1, micro_batch_size=3, pad_id=0,
                          activation_checkpointing=checkpointing)
        results.append(learner.train_step(SEQS, SFTLoss(6)))
        calls.append(counted[0])
        with torch.no_grad():
            out = model.eval().generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 6)
    # plain: rows 0-1 share a prompt, so a prompt pass and a completion pass; checkpointed: the rows run whole in
    # one pass, which the backward replays
    assert calls == [2, 2]
    plain, checkpointed = results
    assert checkpointed.loss == pytest.approx(plain.loss, rel=1e-5)
    assert checkpointed.grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), max_size=30), st.integers(1, 8),
       st.one_of(st.none(), st.integers(1, 60)))
def test_micro_batches_cover_the_rows_in_order_within_both_budgets(lengths, max_rows, max_tokens):
    seqs = Sequences([[1] * p for p, _ in lengths], [[2] * c for _, c in lengths])
    rows = torch.randperm(len(lengths))
    chunks = micro_batches(rows, seqs, max_rows, max_tokens)

    def padded(chunk):
        ids = chunk.tolist()
        return len(ids) * (max(len(seqs.prompts[i]) for i in ids) + max(len(seqs.completions[i]) for i in ids))

    assert torch.cat(chunks).tolist() == rows.tolist() if chunks else len(rows) == 0
    assert all(1 <= len(ch) <= max_rows for ch in chunks)
    if max_tokens is not None:
        assert all(len(ch) == 1 or padded(ch) <= max_tokens for ch in chunks)
    for ch, nxt in itertools.pairwise(chunks):  # greedy: the next row would have broken a budget
        grown = torch.cat([ch, nxt[:1]])
        assert len(grown) > max_rows or (max_tokens is not None and padded(grown) > max_tokens)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=12), st.integers(1, 8), st.integers(4, 60))
def test_micro_batches_never_split_rows_kept_together(pair_lengths, max_rows, max_tokens):
    # rows 2i and 2i+1 are a preference pair: no micro-batch may hold only one of them
    lengths = [n for n in pair_lengths for _ in range(2)]
    seqs = Sequences([[1] * 3 for _ in lengths], [[2] * n for n in lengths])
    together = torch.arange(len(lengths)) // 2
    chunks = micro_batches(torch.arange(len(lengths)), seqs, max_rows, max_tokens, together)
    assert torch.cat(chunks).tolist() == list(range(len(lengths)))
    for ch in chunks:
        assert len(ch) % 2 == 0 and (together[ch[0::2]] == together[ch[1::2]]).all()
        assert len(ch) == 2 or len(ch) <= max_rows  # a pair alone may exceed a budget, a run of pairs may not


def test_state_dict_round_trip_continues_identically(tiny_dir):
    from posttrain.models import load_model

    a = learner_for(load_model(tiny_dir))
    a.train_step(SEQS, SFTLoss(6))
    b_model = load_model(tiny_dir)
    b_model.load_state_dict(a.model.state_dict())
    b = learner_for(b_model)
    b.load_state_dict(a.state_dict())
    ra, rb = a.train_step(SEQS, SFTLoss(6)), b.train_step(SEQS, SFTLoss(6))
    assert ra.loss == rb.loss and ra.lr == rb.lr
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_logprobs_and_a_frozen_copy(tiny):
    model, _ = tiny
    learner = learner_for(model)
    lp, flops = learner.logprobs(SEQS)
    assert [len(x) for x in lp] == [2, 1, 3] and flops > 0
    ref = learner.frozen_copy()
    learner.train_step(SEQS, SFTLoss(6))
    after, _ = learner.logprobs(SEQS)
    frozen, _ = ref.logprobs(SEQS)
    assert all(torch.equal(x, y) for x, y in zip(lp, frozen))  # the copy did not move
    assert any(not torch.equal(x, y) for x, y in zip(lp, after))  # the policy did
    ref.load_weights(learner.weights())
    again, _ = ref.logprobs(SEQS)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(after, again))


def test_learner_code_never_reaches_into_a_run():
    """It can move into another process (a Ray actor) unchanged: it imports no run context, console or log."""
    import ast
    from pathlib import Path

    import posttrain.train.learner as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.startswith(("posttrain.runtime", "posttrain.runner", "posttrain.tracking.metrics", "rich"))
                   for m in imported), imported
