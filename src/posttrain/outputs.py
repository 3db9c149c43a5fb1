"""The files a command writes (`--out`): checked before any work starts, then written whole or not at all.

    out = check_output(args.out, inputs=[data_file], overwrite=args.overwrite)   # before loading a model
    with atomic_file(out) as f:                                                 # OUT.tmp, renamed at the end
        f.write(...)

check_output refuses, as one line naming the flag and the path: a path that is one of the command's inputs or
lies inside an input directory (even with --overwrite: the input would be gone before it was read), a directory
where a file goes (or a file where a directory goes), a path under an existing file, and an existing file unless
the command was given --overwrite. atomic_file writes OUT.tmp beside the target and renames it over the target
at the end, so a reader never sees half a file; an error or a SIGTERM on the way deletes OUT.tmp and leaves an
existing target as it was, and SIGTERM then ends the command with exit status 143 (errors.RunStopped).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from posttrain.errors import RunStopped, Terminated, UserError


def check_output(path: Path, *, flag: str = "--out", inputs: Sequence[Path] = (), overwrite: bool = False,
                 directory: bool = False) -> Path:
    """`path` if a command may write it (a file, or with directory=True a directory of files); else UserError."""
    path = Path(path)
    for source in inputs:
        if _same_or_inside(path, Path(source)):
            raise UserError(f"{flag} {path}: that is the input {source}; writing it would destroy the data being "
                            "read; choose another path")
    for parent in path.parents:  # the nearest ancestor that exists must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
            break
    if directory:
        if path.exists() and not path.is_dir():
            raise UserError(f"{flag} {path}: is a file; give a directory (it gets several files)")
        return path
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file name")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UserError(f"{flag} {path}: exists; pass --overwrite to replace it")
    return path


def _same_or_inside(path: Path, source: Path) -> bool:
    target, real = path.resolve(), source.resolve()
    if target == real or (source.is_dir() and real in target.parents):
        return True
    try:  # a hard link, or two spellings resolve() does not unify
        return path.exists() and source.exists() and os.path.samefile(path, source)
    except OSError:
        return False


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """An open OUT.tmp that becomes `path` when the block ends; on an error or SIGTERM, no OUT.tmp is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    on_main = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main else None
    try:
        with tmp.open(mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        tmp.replace(path)
    except Terminated:
        raise RunStopped(f"stopped by SIGTERM before {path} was complete; nothing was written to it") from None
    finally:
        tmp.unlink(missing_ok=True)
        if on_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def write_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def _raise_terminated(signum, frame) -> None:
    """SIGTERM while a file is being written: raise where the program is (as Ctrl-C raises KeyboardInterrupt), so
    the temp file is deleted on the way out."""
    raise Terminated
