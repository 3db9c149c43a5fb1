"""A preference run judged afresh: every pair of the file scored by the trained policy against the reference, in fp32,
with the project's own pieces (file_pairs, FrozenModel.logprobs, PREFERENCE_LOSSES). The per-step `dpo/*` metrics
see 32 pairs each under a moving policy; this sees all of them under the final one.

    python tests/helpers/preference_check.py RUN_DIR PAIRS.jsonl     # one JSON line; β from the run's config.toml
"""

from __future__ import annotations

import itertools
import json
import sys
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from posttrain.algos import PREFERENCE_LOSSES, PreferenceInputs
from posttrain.data.preference import file_pairs, read_preference_rows
from posttrain.data.prompts import context_length
from posttrain.models.load import load_model, load_tokenizer
from posttrain.train.learner import FrozenModel, Sequences

COLUMNS = {"prompt": "question", "chosen": "better", "rejected": "worse"}  # examples/preference_pairs/pairs.jsonl


@dataclass(frozen=True)
class PairScores:
    pairs: int
    dpo_loss: float  # mean over pairs of the DPO loss, policy against reference: ln 2 = 0.6931 when they are equal
    reward_accuracy: float  # pairs whose implicit reward margin β h is > 0 (0 when policy = reference)
    reward_margin: float  # mean β h
    policy_accuracy: float  # pairs where the policy gives the chosen answer the higher log-likelihood
    reference_accuracy: float  # the same for the reference
    policy_chosen_logp: float  # mean Σ_t log π(chosen)
    reference_chosen_logp: float
    policy_rejected_logp: float
    reference_rejected_logp: float


def sequence_logps(model, pad_id: int, seqs: Sequences) -> torch.Tensor:
    """(N,) Σ_t log π(completion | prompt) of each row, in fp32 (no autocast, whatever the run used)."""
    lps, _ = FrozenModel(model, micro_batch_size=64, pad_id=pad_id, bf16=False).logprobs(seqs)
    return torch.stack([lp.sum() for lp in lps])


def score(policy_dir: Path, reference_dir: Path, pairs_path: Path, *, beta: float, seed: int = 0,
          columns: dict[str, str] = COLUMNS) -> PairScores:
    """Every pair of pairs_path (one epoch of the dpo stage's own stream) under the policy and the reference."""
    tok = load_tokenizer(policy_dir)
    policy, reference = load_model(policy_dir).eval(), load_model(reference_dir).eval()
    n = len(read_preference_rows(pairs_path, columns))
    pairs = list(itertools.islice(file_pairs(pairs_path, tok, seed=seed, chat_template=True,
                                             max_len=context_length(policy), columns=columns), n))
    seqs = Sequences([p.prompt for p in pairs for _ in range(2)], [a for p in pairs for a in (p.chosen, p.rejected)])
    pol = sequence_logps(policy, tok.pad_token_id, seqs)  # (2P,): rows 2i, 2i+1 are pair i's chosen, rejected
    ref = sequence_logps(reference, tok.pad_token_id, seqs)
    tokens = torch.tensor([len(c) for c in seqs.completions], dtype=torch.float32)
    x = PreferenceInputs(pol[0::2], pol[1::2], tokens[0::2], tokens[1::2], ref[0::2], ref[1::2])
    loss, parts = PREFERENCE_LOSSES.get("dpo")(x, beta=beta)
    margin = parts["chosen_reward"] - parts["rejected_reward"]  # (P,) β h
    return PairScores(pairs=n, dpo_loss=float(loss.mean()), reward_accuracy=float((margin > 0).float().mean()),
                      reward_margin=float(margin.mean()),
                      policy_accuracy=float((pol[0::2] > pol[1::2]).float().mean()),
                      reference_accuracy=float((ref[0::2] > ref[1::2]).float().mean()),
                      policy_chosen_logp=float(pol[0::2].mean()), reference_chosen_logp=float(ref[0::2].mean()),
                      policy_rejected_logp=float(pol[1::2].mean()), reference_rejected_logp=float(ref[1::2].mean()))


def reference_dir(run_dir: Path) -> Path:
    """The checkpoint the dpo stage started from: the one the sft stage saved at its last step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir / "checkpoints" / f"step_{max(r['step'] for r in rows if 'sft/loss' in r)}"


if __name__ == "__main__":
    run, path = Path(sys.argv[1]), Path(sys.argv[2])
    beta = tomllib.loads((run / "config.toml").read_text())["dpo"]["loss_args"]["beta"]
    print(json.dumps(asdict(score(run / "final", reference_dir(run), path, beta=beta))))
