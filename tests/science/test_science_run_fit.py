"""`posttrain fit` end to end on run dirs written here: JSON output, the PNG, and the errors a user can cause."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from posttrain.commands.fit import run_fit
from posttrain.errors import UserError
from posttrain.science.curves import sigmoid

TRUE = {"R0": 0.2, "A": 0.6, "B": 1.8, "C_mid": 2500.0}


def write_run(run_dir: Path, seed: int, *, steps: int = 400, eval_every: int = 10, flops_per_step: float = 40.0):
    """A fake training run: a train row every step, an eval row (with eval/pass@1) every `eval_every` steps."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    rows = []
    for step in range(steps + 1):
        C = step * flops_per_step
        row = {"step": step, "compute/flops": C, "train/loss": 1.0 / (1 + step)}
        if step % eval_every == 0:
            row["eval/pass@1"] = float(sigmoid(C, **TRUE) + rng.normal(0, 0.01))
        rows.append(json.dumps(row))
    (run_dir / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    return rows


def kwargs(**over):
    base = {"x": "compute/flops", "y": "eval/pass@1", "form": "sigmoid", "fit_until": None, "exclude_frac": 0.0,
            "out": None, "as_json": True, "n_boot": 100}
    return {**base, **over}


def test_run_fit_end_to_end_json_and_png(tmp_path, capsys):
    a, b = tmp_path / "seed0", tmp_path / "seed1"
    write_run(a, 0)
    write_run(b, 1)
    result = run_fit([a, b], **kwargs(fit_until=0.5, exclude_frac=0.05))
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result))

    assert printed["runs"] == [{"dir": str(a), "n_points": 41}, {"dir": str(b), "n_points": 41}]
    assert printed["n_points"] == 82 and printed["n_excluded_warmup"] == 2 * 2  # x in {0, 400} < 0.05 * 16000
    assert printed["bounded"] is True
    # R0 is held at the mean of the two step-0 evals (x = 0), ScaleRL's start value
    step0 = [json.loads((d / "metrics.jsonl").read_text().splitlines()[0])["eval/pass@1"] for d in (a, b)]
    assert printed["R0_fixed_from_x0"] == pytest.approx(np.mean(step0))
    fit = printed["fit"]
    assert fit["fixed"] == ["R0"] and fit["n_points"] == 78 and fit["fitted_range"] == [800.0, 16000.0]
    assert fit["params"]["A"] == pytest.approx(0.6, abs=0.02)
    assert fit["params"]["C_mid"] == pytest.approx(2500.0, rel=0.1)
    assert fit["ci"]["A"][0] < fit["params"]["A"] < fit["ci"]["A"][1]

    pred = printed["predictivity"]
    assert pred["cutoff_x"] == 8000.0 and pred["n_holdout"] == 2 * 20 and pred["n_fit"] == 2 * 19  # 800 <= x <= 8000
    assert pred["final_C"] == 16000.0
    assert pred["mae"] < 0.02  # noise sd is 0.01: the extrapolation is about as good as the data
    assert abs(pred["final_predicted"] - sigmoid(16000.0, **TRUE)) < 0.02

    png = a / "fit_eval_pass@1_vs_compute_flops_sigmoid.png"  # default: first run dir, one file per y, x, form
    assert printed["plot"] == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from matplotlib.image import imread

    img = imread(str(png))
    assert img.shape[0] > 300 and img.shape[1] > 500
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_run_fit_table_output_and_custom_path(tmp_path, capsys):
    write_run(tmp_path / "run", 2)
    out = tmp_path / "plots" / "curve.png"
    result = run_fit([tmp_path / "run"], **kwargs(as_json=False, out=out, fit_until=0.5))
    text = capsys.readouterr().out
    assert "R = R0 + (A - R0) / (1 + (C_mid / C)^B)" in text
    assert f"{result['fit']['params']['A']:.4g}" in text and "fixed" in text  # A's value, R0 held fixed
    assert "predictivity: fit on compute/flops <= 8000" in text
    assert out.is_file() and out.stat().st_size > 20_000


def test_power_form_drops_the_x0_rows(tmp_path, capsys):
    write_run(tmp_path / "run", 3)
    result = run_fit([tmp_path / "run"], **kwargs(form="power"))
    assert result["n_dropped_nonpositive_x"] == 1 and result["fit"]["n_points"] == 40
    assert result["R0_fixed_from_x0"] is None


def test_missing_column_lists_available_ones(tmp_path):
    write_run(tmp_path / "run", 0)
    with pytest.raises(UserError) as e:
        run_fit([tmp_path / "run"], **kwargs(y="eval/pass@8"))
    msg = str(e.value)
    assert "metrics.jsonl: no column 'eval/pass@8'" in msg
    assert "available: compute/flops, eval/pass@1, step, train/loss" in msg
    assert "\n" not in msg


def test_user_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r"nowhere/metrics.jsonl: not found"):
        run_fit([tmp_path / "nowhere"], **kwargs())
    write_run(tmp_path / "short", 0, steps=30)  # evals at x = 0, 400, 800, 1200; x = 0 is warm-up
    with pytest.raises(UserError, match="too few points to fit the sigmoid form .* 3 \\(x, y\\) pairs .*short; it needs at least 4"):
        run_fit([tmp_path / "short"], **kwargs(exclude_frac=0.1))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"compute/flops": 1, "eval/pass@1": 0.1}\n'
                                       '{"compute/flops": 1, "eval/pass@1": 0.2}\n')
    with pytest.raises(UserError, match=r"bad/metrics.jsonl:2: compute/flops = 1 does not increase"):
        run_fit([bad], **kwargs())
    with pytest.raises(UserError, match="--form 'cubic' is not a curve form; known: sigmoid, power, saturating"):
        run_fit([bad], **kwargs(form="cubic"))
