"""Is the posttrain that is running the posttrain that was installed? Checked at the start of every run.

A wheel install lists every file with its sha256 in the distribution's RECORD: each of posttrain's Python files is
hashed and compared. An editable install (a git checkout) has no hashes to compare, so git says which files of the
package differ from the commit. The result goes to run.log and config.json; a verifier that rewrote the package
(as a sandbox escape once did, in an older version: an always-pass checker appended to sandbox.py) shows up at the
next start instead of silently "resuming" with a poisoned reward.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def modified_files() -> tuple[str, list[str]]:
    """(how it was checked, the package's files that differ from what was installed or committed)."""
    try:
        files = [f for f in distribution("posttrain").files or [] if f.hash is not None
                 and str(f).startswith("posttrain/") and str(f).endswith(".py")]
    except PackageNotFoundError:
        files = []
    if files:
        changed = []
        for f in files:
            path = Path(f.locate())
            try:
                digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
            except OSError:
                changed.append(str(f))
                continue
            if f.hash.mode != "sha256" or digest != f.hash.value:
                changed.append(str(f))
        return "the wheel's RECORD", changed
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=5,
                             check=False, cwd=PACKAGE)
    except (OSError, subprocess.SubprocessError):
        return "nothing (no RECORD hashes, no git)", []
    if out.returncode != 0:
        return "nothing (no RECORD hashes, not a git checkout)", []
    return "git", sorted(line[3:] for line in out.stdout.splitlines() if line.endswith(".py"))
