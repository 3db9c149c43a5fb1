"""The pinned-metric regression (scripts/pin_metrics.py): a short fixed-seed SFT -> RL run whose every number
(metrics less wall times, samples, evaluations, final weights) equals the checked-in tests/pinned/sft_rl_tiny.json.
A refactor that claims to change no number a user sees proves it here; a change meant to alter them regenerates
the file with `python scripts/pin_metrics.py --write` and says why in its commit."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_pinned_run_repeats_every_number_bit_for_bit():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "pin_metrics.py")], capture_output=True,
                          text=True, cwd=ROOT, timeout=900, check=False)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "pinned metrics equal" in done.stdout
