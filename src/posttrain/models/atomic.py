"""Build a cache directory once, atomically: into a temp dir beside it, then one rename. A crash mid-build leaves
no half-written directory under the real name, and two processes building at once both end with the same one."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def build_dir_once(target: Path, build: Callable[[Path], None], *, done_file: str) -> Path:
    """`target`, built by `build(tmp_dir)` unless `target/done_file` already exists."""
    if (target / done_file).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            if not (target / done_file).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
