"""G-Vendi and the data tools (data/diversity.py): the Vendi score's limits, the seeded sketch, gradient features of
a real proxy model, selection, and `posttrain data diversity / select` as a user runs them."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.commands.diversity import quality_filter
from posttrain.data.diversity import (
    count_sketch,
    distinct_n,
    kmeans,
    nearest_centre,
    ngram_vendi,
    select_diverse,
    shortfall,
    sketch,
    vendi_score,
)
from posttrain.envs import make_env
from posttrain.records import Task

ROOT = Path(__file__).resolve().parents[2]


def test_vendi_of_identical_items_is_one_and_of_orthogonal_items_is_n():
    assert vendi_score(torch.ones(7, 5) * 3) == pytest.approx(1.0)
    assert vendi_score(torch.eye(6)) == pytest.approx(6.0)
    assert vendi_score(torch.eye(40, 8)[:8]) == pytest.approx(8.0)  # d > n and the d x d path agree
    wide = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    assert vendi_score(wide) == pytest.approx(vendi_score(wide.T.contiguous().T))
    # two clusters of equal size, orthogonal to each other: two effective items
    assert vendi_score(torch.tensor([[1.0, 0]] * 5 + [[0, 2.0]] * 5)) == pytest.approx(2.0)
    # unequal clusters 3 : 1: exp(entropy of (0.75, 0.25))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert vendi_score(torch.tensor([[1.0, 0]] * 6 + [[0, 1.0]] * 2)) == pytest.approx(math.exp(h))


def test_count_sketch_is_seed_deterministic_and_keeps_inner_products_on_average():
    b1, s1 = count_sketch(5000, 256, seed=3)
    b2, s2 = count_sketch(5000, 256, seed=3)
    assert torch.equal(b1, b2) and torch.equal(s1, s2)
    assert not torch.equal(count_sketch(5000, 256, seed=4)[0], b1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5000, generator=g), torch.randn(5000, generator=g)
    y = 0.6 * x + 0.8 * y  # cosine 0.6 with x
    cos = []
    for seed in range(20):
        b, s = count_sketch(5000, 256, seed)
        cos.append(float(torch.nn.functional.cosine_similarity(sketch(x, b, s, 256), sketch(y, b, s, 256), dim=0)))
    assert sum(cos) / len(cos) == pytest.approx(0.6, abs=0.03)
    # the sketch of a vector is sign-weighted bucket sums
    assert sketch(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]), torch.tensor([1.0, -1.0, 1.0]),
                  2).tolist() == [-1.0, 3.0]


def test_ngram_baselines():
    assert distinct_n(["aaaa"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["ab", "ab"], 2) == pytest.approx(1 / 2)
    assert distinct_n(["a"], 2) == 0.0
    assert ngram_vendi(["abab", "abab"]) == pytest.approx(1.0)
    assert ngram_vendi(["ab", "cd", "ef"]) == pytest.approx(3.0)


def test_greedy_selection_raises_the_vendi_score():
    x = torch.tensor([[1.0, 0, 0]] * 20 + [[0, 1.0, 0]] * 3 + [[0, 0, 1.0]] * 2)
    picked = select_diverse(x, 6, seed=0, rounds=6)
    assert len(picked) == 6 == len(set(picked))
    assert vendi_score(x[picked]) == pytest.approx(3.0)  # two of each direction: the most a subset of 6 can have
    # on anisotropic data (a few strong directions, many weak ones) it beats every random subset of its size
    g = torch.Generator().manual_seed(0)
    data = torch.randn(600, 64, generator=g) * torch.linspace(3, 0.1, 64)
    picked = select_diverse(data, 100, seed=0, rank=32)
    random_subsets = [vendi_score(data[torch.randperm(600, generator=g)[:100]]) for _ in range(20)]
    assert vendi_score(data[picked]) > max(random_subsets)
    assert select_diverse(data, 100, seed=0, rank=32) == picked  # deterministic



def test_clusters_and_their_shortfall():
    x = torch.tensor([[1.0, 0, 0]] * 20 + [[0, 1.0, 0]] * 3 + [[0, 0, 1.0]] * 2)
    labels, centres = kmeans(x, 3, seed=0)
    assert torch.equal(nearest_centre(x, centres), labels)
    assert len(set(labels[:20].tolist())) == 1 and len(set(labels.tolist())) == 3
    # an even subset of 9 over 3 clusters needs 3 each: the clusters of 3 and 2 rows are short by 0 and 1
    _, need = shortfall(x, 9, clusters=3, seed=0)
    assert need == {int(labels[-1]): 1}


def test_quality_filters():
    rows = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "1+2=", "completion": "3"},
            {"prompt": "1+2=", "completion": "4"}, {"prompt": "2+2=", "completion": "5", "answer": "4"}]
    assert quality_filter(rows, "majority", None) == [True, True, False, True]
    assert quality_filter(rows, "none", None) == [True] * 4
    env = make_env("arithmetic", {"digits": 1})
    checked = [dict(r, answer="3") for r in rows[:3]] + rows[3:]
    assert quality_filter(checked, "verifier", env) == [True, True, False, False]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def posttrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, check=False)


def g_vendi(proc: subprocess.CompletedProcess) -> float:
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("G-Vendi: "))
    return float(line.split()[1])


@pytest.mark.slow
def test_data_diversity_and_select_from_the_command_line(tmp_path):
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "12+34=", "completion": "46"}] * 12)
    mixed_rows = [{"prompt": f"{a}{op}{b}=", "completion": str(eval(f"{a}{op}{b}")), "answer": str(eval(f"{a}{op}{b}"))}
                  for a, b, op in [(12, 34, "+"), (97, 5, "-"), (6, 7, "*"), (450, 21, "+"), (3, 3, "-"),
                                   (88, 11, "*"), (1, 2, "+"), (640, 333, "-"), (25, 4, "*"), (9, 99, "+"),
                                   (71, 70, "-"), (13, 13, "*")]]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", mixed_rows)
    args = ["--model", "tiny-test", "--dim", "256"]
    assert g_vendi(posttrain("data", "diversity", str(same), *args)) == pytest.approx(1.0, abs=1e-3)
    varied = g_vendi(posttrain("data", "diversity", str(mixed), *args))
    assert 1.5 < varied <= 12
    again = json.loads(posttrain("data", "diversity", str(mixed), *args, "--json").stdout)
    assert again["g_vendi"] == pytest.approx(varied, abs=1e-4) and again["examples"] == 12
    assert json.loads(posttrain("data", "diversity", str(mixed), *args, "--json").stdout) == again  # deterministic
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "x"}])
    proc = posttrain("data", "diversity", str(bad), *args)
    assert proc.returncode == 2 and "bad.jsonl:1" in proc.stderr and "prompt" in proc.stderr
    # selection: a wrong answer is filtered out by the verifier, 6 of the 11 left are written
    mixed_rows[0]["completion"] = "47"
    write_jsonl(mixed, mixed_rows)
    out = tmp_path / "subset.jsonl"
    proc = posttrain("data", "select", str(mixed), "-n", "6", "-o", str(out), "--filter", "verifier",
                     "--env", "arithmetic", *args)
    assert g_vendi(proc) > 0 and "(of 11 that pass --filter verifier, of 12)" in proc.stdout, proc.stdout
    chosen = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(chosen) == 6 and all(r["completion"] != "47" for r in chosen)
    # over-generation: new tasks from the environment fill the clusters the file leaves short (over the last
    # subset: an existing --out needs --overwrite)
    proc = posttrain("data", "select", str(mixed), "-n", "16", "-o", str(out), "--filter", "verifier",
                     "--env", "arithmetic", "--env-arg", "ops=+-*", "--generate", "64", "--overwrite", *args)
    assert proc.returncode == 0, proc.stderr
    chosen = [json.loads(x) for x in out.read_text().splitlines()]
    made = [r for r in chosen if r.get("generated")]
    kept = int(proc.stdout.split(" kept of up to")[0].rsplit("(", 1)[1])
    assert made and len(chosen) == min(16, 11 + kept) and f"{len(made)} of them generated" in proc.stdout
    env = make_env("arithmetic", {"ops": "+-*"})
    for r in made:  # gold solutions of real training tasks, none a copy of a file row
        assert env.score(Task("x", r["prompt"], r["answer"], ""), r["completion"]).correct
        assert r["prompt"] not in {m["prompt"] for m in mixed_rows}
