"""Loading framework files without executing untrusted pickles.

- :func:`load_torch_file`: ``torch.load(..., weights_only=True, mmap=True)`` (tensors stay on
  disk until touched); ``argparse.Namespace`` (Megatron's ``args``) and plain numpy arrays
  (Megatron's RNG state) are the only extra classes allowed. Anything else the file would need is refused with one line naming the file and the
  class, never unpickled.
- :func:`load_torch_bytes`: the same for one in-memory ``torch.save`` blob (a DCP item).
- :func:`load_dcp_metadata`: PyTorch distributed checkpoint ``.metadata`` files are plain
  pickles (``pickle.dump`` of dataclasses); they are read with an unpickler whose
  ``find_class`` admits only the DCP metadata dataclasses, ``torch.Size``, torch dtypes and
  layouts: no other callable can run.
"""

from __future__ import annotations

import argparse
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from megatron_grace.errors import GraceInputError

_ZIP = b"PK\x03\x04"


def _refusal(exc: Exception) -> str:
    text = str(exc).replace("\n", " ")
    for marker in ("Unsupported global:", "Unsupported operand", "GLOBAL "):
        at = text.find(marker)
        if at >= 0:
            return text[at: at + 200].split(". Please use")[0].strip()
    return text[:200]


def _safe_globals() -> list[Any]:
    """Classes a weights_only load may build besides tensors: Megatron's ``args`` namespace and plain
    numpy arrays (Megatron's RNG state), under the names numpy 1.x and 2.x pickle them with."""
    import numpy as np

    allowed: list[Any] = [argparse.Namespace, np.ndarray, np.dtype]
    core = getattr(np, "_core", None) or np.core
    rec = core.multiarray._reconstruct
    allowed += [(rec, "numpy.core.multiarray._reconstruct"), (rec, "numpy._core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def load_torch_file(path: Path) -> Any:
    """``torch.load`` a framework file safely (weights_only, memory-mapped); clear errors.

    Raises:
        GraceInputError: missing, empty, truncated or corrupt file, or one that needs classes
            beyond tensors, containers, primitives and ``argparse.Namespace`` (it is refused,
            not unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise GraceInputError("file not found", path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != _ZIP:
        raise GraceInputError("not a torch.save zip file (empty, truncated, or a legacy/other format); refused", path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise GraceInputError("cannot be loaded with weights_only=True (it needs arbitrary code to unpickle; refused): "
                              + _refusal(exc), path) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise GraceInputError(f"unreadable torch file (truncated or corrupt: {_refusal(exc)})", path) from None


def load_torch_bytes(blob: bytes, what: str) -> Any:
    """``torch.load(weights_only=True)`` of one ``torch.save`` blob held in memory."""
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise GraceInputError(f"{what}: cannot be loaded with weights_only=True (refused): {_refusal(exc)}") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise GraceInputError(f"{what}: unreadable tensor record (truncated or corrupt: {_refusal(exc)})") from None


def _dcp_allowed() -> dict[tuple[str, str], Any]:
    from torch.distributed.checkpoint import filesystem, metadata, planner
    from torch.serialization import _get_layout  # noqa: F401 - pickled by torch.layout's __reduce__

    allowed: dict[tuple[str, str], Any] = {("torch", "Size"): torch.Size,
                                           ("torch.serialization", "_get_layout"): torch.serialization._get_layout}
    for name in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
                 "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(metadata, name)
    for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"):
        if hasattr(planner, name):
            allowed[("torch.distributed.checkpoint.planner", name)] = getattr(planner, name)
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


class _DcpUnpickler(pickle.Unpickler):
    allowed: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not a DCP metadata class") from None


def load_dcp_metadata(path: Path) -> Any:
    """Parse a DCP ``.metadata`` file with the restricted unpickler (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise GraceInputError("file not found (not a torch_dist checkpoint?)", path)
    if not _DcpUnpickler.allowed:
        _DcpUnpickler.allowed = _dcp_allowed()
    try:
        with open(path, "rb") as fh:
            md = _DcpUnpickler(fh).load()
    except pickle.UnpicklingError as exc:
        raise GraceInputError(f"refused: {exc}", path) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise GraceInputError(f"unreadable DCP metadata (truncated or corrupt: {type(exc).__name__}: {exc})", path) from None
    if type(md).__name__ != "Metadata" or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise GraceInputError("not a DCP metadata record", path)
    return md
