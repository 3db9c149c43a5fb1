"""SFT: completion-only loss, micro-batch invariance, every parameter learns."""

import itertools
import json

import pytest
import torch

from posttrain.data.sft import Example, env_examples, length_order, read_pairs
from posttrain.envs import make_env
from posttrain.errors import UserError
from posttrain.train.learner import Learner, Sequences
from posttrain.train.losses import SFTLoss


def batch_of(tok, n=12):
    env = make_env("arithmetic", {"digits": [1, 3]})
    return list(itertools.islice(env_examples(env, tok, seed=0, chat_template=True, max_len=512), n))


def seqs_of(examples):
    return Sequences([e.prompt for e in examples], [e.completion for e in examples])


def grads_for(model, examples, size, total):
    """One SFT train step's loss and its accumulated gradient (read by a hook as the last micro-batch's backward
    finishes, before clipping and the step; lr 1e-12 keeps the weights the same for the next call)."""
    learner = Learner(model, lr=1e-12, total_updates=1, micro_batch_size=size, pad_id=0)
    grads = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad.clone()))
             for n, p in model.named_parameters()]
    result = learner.train_step(seqs_of(examples), SFTLoss(total), rows=torch.tensor(length_order(examples)))
    for h in hooks:
        h.remove()
    return result.loss, [grads[n] for n, _ in model.named_parameters()]


def test_loss_and_gradient_do_not_depend_on_the_micro_batch_split(tiny):
    model, tok = tiny
    examples = batch_of(tok)
    total = sum(len(e.completion) for e in examples)
    full, g_full = grads_for(model, examples, len(examples), total)
    for size in (1, 5):
        split, g_split = grads_for(model, examples, size, total)
        assert split == pytest.approx(full, rel=1e-5)
        for a, b in zip(g_full, g_split):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def sft_value(model, examples, total):
    learner = Learner(model, lr=1e-12, total_updates=1, micro_batch_size=8, pad_id=0)
    return learner.train_step(seqs_of(examples), SFTLoss(total)).loss


def test_loss_is_the_mean_nll_of_completion_tokens_only(tiny):
    model, _tok = tiny
    ex = Example(prompt=[10, 11, 12, 13], completion=[20, 2])
    # by hand: the model's logprobs of 20 after the prompt and of 2 after prompt + 20, unpadded
    with torch.no_grad():
        logp = model(torch.tensor([[10, 11, 12, 13, 20]])).logits[0].log_softmax(-1)
    expected = -(logp[3, 20] + logp[4, 2]) / 2
    assert sft_value(model, [ex], 2) == pytest.approx(float(expected), rel=1e-5)
    # a prompt token is context, never a target: another prompt changes the loss only through the context, and a
    # completion token's change changes it directly
    other_completion = sft_value(model, [Example([10, 11, 12, 13], [30, 2])], 2)
    assert other_completion != pytest.approx(sft_value(model, [ex], 2))


def test_one_step_changes_every_trainable_parameter(tiny):
    model, tok = tiny
    examples = batch_of(tok, 16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = Learner(model, lr=1e-3, total_updates=1, micro_batch_size=8, pad_id=0)
    result = learner.train_step(seqs_of(examples), SFTLoss(sum(len(e.completion) for e in examples)))
    assert result.skipped is None and torch.isfinite(torch.tensor(result.loss))
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach())]
    assert unchanged == []




def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
    with pytest.raises(UserError, match=r"d.jsonl:2"):
        read_pairs(p)
    p.write_text("\n")
    with pytest.raises(UserError, match="empty"):
        read_pairs(p)
    with pytest.raises(UserError, match="not found"):
        read_pairs(tmp_path / "missing.jsonl")


def test_an_sft_stage_that_misses_its_accuracy_target_says_so(tmp_path):
    """stop_at_accuracy is there so the next stage starts from a model that sometimes succeeds; a stage that runs
    out of steps first must say so in run.log (the quickstart's seed 1 on an fp32 CPU), and one that gets there
    must not."""
    from posttrain.config import validate
    from posttrain.runner import run

    def cfg(name: str, target: float):
        return validate({
            "recipe": "sft", "name": name, "output_dir": str(tmp_path), "seed": 0, "threads": 1,
            "model": {"path": "tiny-test"}, "env": {"name": "arithmetic", "args": {"digits": 1}},
            "sft": {"steps": 3, "batch_size": 8, "eval_every": 1, "stop_at_accuracy": target},
            "eval": {"problems": 4, "samples": 1, "ks": [1], "max_new_tokens": 3, "at_start": False},
        }, "test")

    run(cfg("missed", 1.0))
    log = (tmp_path / "missed" / "run.log").read_text()
    assert "warning: sft used all 3 steps without reaching stop_at_accuracy = 1.0" in log
    summary = json.loads((tmp_path / "missed" / "summary.json").read_text())
    assert summary["evals"]["sft"]["eval/greedy_acc"] < 1.0
    run(cfg("reached", 1e-9))  # any accuracy reaches it... unless it is exactly 0
    reached = (tmp_path / "reached" / "run.log").read_text()
    assert ("accuracy reached" in reached) != ("without reaching" in reached)


def test_packed_sft_trains_the_same_run_as_padded_sft(tmp_path):
    """sft.pack_tokens through the whole stage, in fp32: every step's loss equals the padded run's (to float
    summation order; the weights then drift apart by rounding only, so later steps are held to 1e-4)."""
    from tiny_recipes import tiny_recipe

    from posttrain.config import validate
    from posttrain.runner import run

    losses = {}
    for pack_tokens in (None, 48):
        cfg = validate(tiny_recipe(name=f"pack{pack_tokens}", output_dir=str(tmp_path), model={"bf16": False},
                                   sft={"steps": 3, "batch_size": 8, "micro_batch_size": 4,
                                        "pack_tokens": pack_tokens}), "test")
        run(cfg)
        rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[pack_tokens] = [r["sft/loss"] for r in rows if "sft/loss" in r]
    assert len(losses[None]) == 3
    assert abs(losses[48][0] - losses[None][0]) < 1e-6
    assert losses[48] == pytest.approx(losses[None], abs=1e-4)
