"""posttrain report: the HTML opens offline and references only PNGs that exist and are real images; several runs
overlay; damaged or partial run directories still report; pass@k-vs-k numbers match hand computation."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from fake_runs import write_fake_run

from posttrain.errors import UserError
from posttrain.report import load_run, passk_curve, write_report
from posttrain.report.figures import crossing_verdict, smooth, tag_colors

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def fake_run(tmp_path):
    return write_fake_run(tmp_path / "runs" / "grpo-seed0")


def _images(html_path: Path) -> list[Path]:
    text = html_path.read_text()
    return [html_path.parent / src for src in re.findall(r'<img src="([^"]+)"', text)]


def _check_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert len(data) > 5_000, f"{path.name} is only {len(data)} bytes"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert 500 <= width <= 3000 and 300 <= height <= 3000, (path.name, width, height)
    assert pixels[..., :3].std() > 0.01, f"{path.name} is blank"
    return width, height


def _check_html(html_path: Path) -> str:
    text = html_path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "<script" not in text and "http://" not in text and "https://" not in text  # opens offline
    assert '<link rel="stylesheet"' not in text
    for img in _images(html_path):
        assert img.is_file(), f"report.html references missing {img.name}"
        _check_png(img)
    return text


def test_single_run_report(fake_run):
    path = write_report([fake_run])
    assert path == fake_run / "report.html"
    text = _check_html(path)
    names = {p.name for p in _images(path)}
    assert names == {"report_training_steps.png", "report_training_compute.png", "report_sft_loss.png",
                     "report_eval_steps.png", "report_passk.png", "report_difficulty.png"}
    assert "grpo-seed0" in text
    # key settings and final eval numbers, not intermediate evals
    assert "ppo_clip" in text and "token_mean" in text and "sft → rl" in text
    result = json.loads((fake_run / "eval" / "rl.json").read_text())
    assert f"{result['pass@8']['mean']:.3f}" in text and f"{result['greedy_acc']:.3f}" in text
    assert "<td>rl-step30</td>" not in text
    # every figure has a caption saying what to look for
    assert text.count("<figcaption>") == 6
    # the pass@k caption compares the final RL eval with the model RL started from (sft), which the fake run
    # makes sharper: above at k = 1, below at k = 16
    verdict = text.split("<b>Here:</b>")[1].split("</figcaption>")[0]
    assert "&#x27;rl&#x27; beats &#x27;sft&#x27;" in verdict and "falls behind from k = " in verdict


def test_two_runs_overlay_into_out_dir(tmp_path):
    a = write_fake_run(tmp_path / "runs" / "grpo-seed0", seed=0)
    b = write_fake_run(tmp_path / "runs" / "dapo-seed1", seed=1, rl_gain=0.4)
    out = tmp_path / "reports" / "cmp"
    path = write_report([a, b], out_dir=out)
    assert path == out / "report.html"
    text = _check_html(path)
    assert "grpo-seed0" in text and "dapo-seed1" in text
    assert "class=differs" in text  # the presets / clip-high differ and are highlighted
    assert len(_images(path)) == 6
    assert not (a / "report.html").exists()


def test_runs_with_the_same_directory_name_get_distinct_labels(tmp_path):
    a = write_fake_run(tmp_path / "sweepA" / "seed0", seed=0)
    b = write_fake_run(tmp_path / "sweepB" / "seed0", seed=1)
    text = _check_html(write_report([a, b], out_dir=tmp_path / "out"))
    assert "sweepA/seed0" in text and "sweepB/seed0" in text


def test_partial_and_damaged_run_still_reports(tmp_path):
    run = write_fake_run(tmp_path / "unfinished", evals=False)
    (run / "summary.json").unlink()
    (run / "config.json").unlink()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[5]["sft/loss"] = None  # NaN is written as null
    rows[40]["rollout/reward_mean"] = None
    rows[41]["pg/entropy"] = 1e308  # +inf is written as 1e308
    rows[42]["kl/value"] = "oops"
    lines = [json.dumps(r) for r in rows] + ['{"step": 999, "stage": "rl", "rollout/rew']  # crash mid-line
    (run / "metrics.jsonl").write_text("\n".join(lines))
    path = write_report([run])
    text = _check_html(path)
    names = {p.name for p in _images(path)}
    assert "report_passk.png" not in names and "report_difficulty.png" not in names  # need eval/*.json
    assert {"report_training_steps.png", "report_sft_loss.png", "report_eval_steps.png"} <= names
    assert "unfinished (no summary.json)" in text and "last line is incomplete" in text
    assert "numbers from metrics.jsonl" in text


def test_run_with_only_a_config_and_odd_eval_files(tmp_path):
    run = tmp_path / "empty"
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {"recipe": ["rl"], "rl": {"preset": "grpo"}}}))
    (run / "eval" / "broken.json").write_text("{not json")
    (run / "eval" / "rl.json").write_text(json.dumps(
        {"tag": "rl", "step": None, "greedy_acc": None, "pass@1": {"mean": None},
         "per_problem": [{"id": "x", "n": 4}, {"id": "y", "n": 2, "c": 5}], "by_difficulty": {"1": {}}}))
    text = _check_html(write_report([run]))
    assert _images(run / "report.html") == []
    assert "Nothing to plot" in text and "grpo" in text and "broken.json: unreadable" in text


def test_missing_run_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nope"):
        write_report([tmp_path / "nope"])


# ---------------------------------------------------------------------------------------------------------------
# the numbers behind the pass@k-vs-k figure


def test_passk_curve_hand_computed():
    ks, means = passk_curve([{"n": 4, "c": 1}, {"n": 4, "c": 4}])
    assert ks.tolist() == [1, 2, 3, 4]
    # (n=4, c=1): pass@k = 1 - C(3, k) / C(4, k) = 1/4, 1/2, 3/4, 1; (n=4, c=4): always 1
    np.testing.assert_allclose(means, [0.625, 0.75, 0.875, 1.0])


def test_passk_curve_matches_combinatorial_definition():
    rng = np.random.default_rng(0)
    problems = [{"n": 12, "c": int(c)} for c in rng.integers(0, 13, size=25)]
    problems.append({"n": 12, "c": 0})
    ks, means = passk_curve(problems)
    assert ks.tolist() == list(range(1, 13))
    for k, m in zip(ks, means, strict=True):
        expect = np.mean([1 - math.comb(p["n"] - p["c"], k) / math.comb(p["n"], k) for p in problems])
        assert m == pytest.approx(expect, abs=1e-12)


def test_passk_curve_mixed_n_and_unusable_rows():
    # k stops at the smallest n; rows without usable counts are skipped, not fatal
    problems = [{"n": 2, "c": 1}, {"n": 8, "c": 0}, {"n": 3}, {"n": 2, "c": 3}, {"n": None, "c": None}]
    ks, means = passk_curve(problems)
    assert ks.tolist() == [1, 2]
    np.testing.assert_allclose(means, [(0.5 + 0) / 2, (1.0 + 0) / 2])
    assert passk_curve([])[0].size == 0


def test_loaded_eval_file_curve_ends_at_pass_at_n(fake_run):
    run = load_run(fake_run)
    result = next(r for r in run.evals if r["tag"] == "rl")
    ks, means = passk_curve(result["per_problem"])
    assert ks[-1] == result["samples"]
    assert means[0] == pytest.approx(result["pass@1"]["mean"])  # the stored summary agrees at k = 1 and k = 8
    assert means[7] == pytest.approx(result["pass@8"]["mean"])
    assert np.all(np.diff(means) >= -1e-12)  # pass@k is non-decreasing in k
    assert [r["tag"] for r in run.evals] == ["base", "sft", "rl-step30", "rl"]  # ordered by step


def test_crossing_verdict_detects_sharpening():
    ks = np.arange(1, 5)
    base, rl = np.array([0.3, 0.5, 0.65, 0.8]), np.array([0.5, 0.6, 0.62, 0.64])
    text = crossing_verdict({"tag": "base"}, ks, base, {"tag": "rl"}, ks, rl)
    assert "falls behind from k = 3" in text and "sharpened" in text
    dip = crossing_verdict({"tag": "sft"}, ks, base, {"tag": "rl"}, ks, np.array([0.4, 0.45, 0.6, 0.8]))
    assert "falls behind at k = 2-3" in dip
    wider = crossing_verdict({"tag": "base"}, ks, base, {"tag": "rl"}, ks, base + 0.1)
    assert "grew" in wider
    noisy = crossing_verdict({"tag": "base"}, ks, base, {"tag": "rl"}, ks, base + 0.1, noise=0.2)
    assert "within the 95% CI" in noisy and "no clear change" in noisy


def test_smoothing_does_not_lag():
    y = np.arange(50, dtype=float)
    np.testing.assert_allclose(smooth(y, 7)[3:-3], y[3:-3])  # a centred mean of a line is the line
    np.testing.assert_allclose(smooth(np.full(9, 2.0), 5), 2.0)


def test_tag_colours_are_shared_between_runs(tmp_path):
    a = load_run(write_fake_run(tmp_path / "a", seed=0))
    b = load_run(write_fake_run(tmp_path / "b", seed=1))
    colours = tag_colors([a, b])
    assert list(colours) == ["base", "sft", "rl-step30", "rl"]
    assert len({str(c) for c in colours.values()}) == 4


def test_a_comparison_shows_what_separates_the_runs_their_machines_timing_and_samples(tmp_path):
    a = write_fake_run(tmp_path / "runs" / "a", seed=0)
    b = write_fake_run(tmp_path / "runs" / "b", seed=1)
    for d, precision, lora, staleness in ((a, "fp32", None, 0), (b, "bf16", {"r": 8}, 1)):
        saved = json.loads((d / "config.json").read_text())
        saved["config"].setdefault("model", {})["lora"] = lora
        saved["config"].setdefault("rollout", {})["max_staleness"] = staleness
        saved["config"].setdefault("rl", {})["some_new_knob"] = staleness  # not a key setting: listed all the same
        (d / "config.json").write_text(json.dumps(saved))
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        summary.update({"precision": precision, "cpu": "AMD EPYC", "peak_rss_mb": 512.0})
        (d / "summary.json").write_text(json.dumps(summary))
        (d / "samples.jsonl").write_text(json.dumps({"step": 5, "prompt": "1+1", "completion": f"answer-{precision}",
                                                     "reward": 1.0}) + "\n")
    text = _check_html(write_report([a, b], out_dir=tmp_path / "cmp"))
    for shown in ("LoRA", "max staleness", "rl.some_new_knob", "precision (ran)", "bf16", "fp32",
                  "peak memory (MB)", "median s / step", "answer-fp32", "answer-bf16"):
        assert shown in text, shown
