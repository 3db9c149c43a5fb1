"""Reading a run directory never runs code: its pickles are read by unpicklers that build plain data only.

A run directory is data that someone may have edited or handed over, and two things in it are pickles, which can
name any Python callable: trainer_state.pt (torch.save) and a sharded learner's learner_shards/
(torch.distributed.checkpoint: a pickled `.metadata` index, and torch.save'd non-tensor values such as the
optimizer's hyperparameters). `load_plain` reads the first with torch.load(weights_only=True), which admits only
tensors, containers, numbers and strings, plus the numpy globals the numpy RNG state needs (NUMPY_RNG).
`SafeReader` / `SafePlanner` read the second: the index with an Unpickler that admits only DCP's own metadata
records (torch.distributed.checkpoint's FileSystemReader uses plain pickle.load), the values with weights_only.
A refusal is a one-line UserError naming the file and the callable it would have run.
"""

from __future__ import annotations

import io
import itertools
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.errors import UserError

_reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
# np.random.get_state()'s uint32 key array; pickled as numpy._core.* by numpy 2, numpy.core.* by numpy 1.
NUMPY_RNG: list[Any] = [(_reconstruct, "numpy._core.multiarray._reconstruct"),
                        (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
                        type(np.dtype(np.uint32))]
NUMPY_RNG_NAMES = frozenset({"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
                             "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType"})
_AGAIN = "delete it (a checkpoint: resume from the one before) or start again with --fresh"


def refusal(path: Path, e: Exception) -> UserError:
    """One line for an unpickling failure: the callable refused, or the unpickler's own reason."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return UserError(f"{path}: refused: it would call {found.group(1)}, which is not training state (nothing "
                         f"in a run directory is run when it is read); {_AGAIN}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    after = [b for a, b in itertools.pairwise(lines) if a.endswith("WeightsUnpickler error:")]
    detail = (after or lines or [""])[0][:200]  # torch's reason, without its advice to load unsafely
    return UserError(f"{path}: cannot read it ({type(e).__name__}: {detail}); {_AGAIN}")


def load_plain(path: Path) -> Any:
    """torch.load of tensors and plain data (and numpy RNG arrays), or a UserError naming the file."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(NUMPY_RNG):
            warnings.simplefilter("ignore")  # e.g. "pickle protocol 4": the error below says what matters
            return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a refused, truncated or foreign file: say which, in one line
        raise refusal(path, e) from None


def unsafe_globals(path: Path) -> list[str]:
    """The callables a torch.save'd file names that load_plain would refuse (read from its opcodes, not run)."""
    return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in NUMPY_RNG_NAMES]


# ---- torch.distributed.checkpoint (a sharded learner's learner_shards/) ---------------------------------------

def _dcp_records() -> frozenset[tuple[str, str]]:
    from torch.distributed.checkpoint import metadata

    own = {(metadata.__name__, n) for n, v in vars(metadata).items()
           if isinstance(v, type) and v.__module__ == metadata.__name__}
    return frozenset(own | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                            ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
                            ("torch", "Size"), ("torch.serialization", "_get_layout"),
                            ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                            ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")})


class _RecordsOnly(pickle.Unpickler):
    """Admits DCP's metadata dataclasses, torch.Size, dtypes and layouts: constructors that only store values."""

    allowed = _dcp_records()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def _reader_and_planner() -> tuple[type, type]:
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            path = Path(self._get_metadata_path(kwargs.get("rank")))
            try:
                with path.open("rb") as f:
                    metadata = _RecordsOnly(f).load()
            except Exception as e:  # noqa: BLE001 - refused or damaged: one line naming the file
                raise refusal(path, e) from None
            if not isinstance(metadata, Metadata):
                raise UserError(f"{path}: not a checkpoint index (holds {type(metadata).__name__}); {_AGAIN}")
            for info in (metadata.storage_data or {}).values():  # shard files live beside the index
                rel = getattr(info, "relative_path", "")
                if not isinstance(rel, str) or Path(rel).name != rel or rel in ("", ".", ".."):
                    raise UserError(f"{path}: names a shard file outside its directory ({rel!r}); {_AGAIN}")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def __init__(self, where: Path) -> None:
            super().__init__()
            self.where = where

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    obj = torch.load(value, weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise refusal(self.where / read_item.dest_index.fqn, e) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeReader, SafePlanner


def dcp_load(state: dict[str, Any], path: Path, *, no_dist: bool) -> None:
    """torch.distributed.checkpoint.load into `state`, reading `path` without unpickling anything but data."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader, planner = _reader_and_planner()
    reader(str(path)).read_metadata()  # a refused index is our UserError here, not folded into DCP's report
    try:
        dcp.load(state, storage_reader=reader(str(path)), planner=planner(path), no_dist=no_dist)
    except CheckpointException as e:  # DCP wraps each rank's error; ours is already one line naming the file
        ours = [exc for exc, _ in e.failures.values() if isinstance(exc, UserError)]
        if ours:
            raise ours[0] from None
        raise
