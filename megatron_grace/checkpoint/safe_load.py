"""Loading framework files without executing untrusted pickles.

- :func:`load_torch_file`: ``torch.load(..., weights_only=True, mmap=True)`` (tensors stay on
  disk until touched); ``argparse.Namespace`` (Megatron's ``args``) and plain numpy arrays
  (Megatron's RNG state) are the only extra classes allowed. Anything else the file would need
  is refused with one line naming the file and the class, never unpickled. Before loading, the
  file goes through the project's input checks (``_files.check_input_file``: a readable regular
  file) and every zip member through the archive limits (``limits.check_zip_member``).
- :func:`load_torch_file_located`: the same, plus a :class:`SpanLocator` that gives each loaded
  tensor's byte range in the file (:class:`~megatron_grace.checkpoint.source.FileSpan`), so its
  bytes can be copied with ``pread`` without touching the memory map.
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
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from megatron_grace import limits
from megatron_grace._files import check_input_file
from megatron_grace.checkpoint.source import FileSpan
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


def _member_kind(name: str) -> str:
    """What a member of a ``torch.save`` zip is, for messages: ``ARCHIVE/data/KEY`` holds one tensor storage's bytes."""
    parts = name.split("/")
    return "torch storage record" if len(parts) == 3 and parts[1] == "data" else "torch file member"


def zip_records(path: Path) -> dict[str, tuple[int, int, bool]]:
    """Every member of a ``torch.save`` zip file: name -> ``(data offset, bytes, stored uncompressed)``.

    Each member passes ``limits.check_zip_member`` (no zip bombs, nothing beyond the memory limit).

    Raises:
        GraceInputError: not a zip file, a corrupt directory or local header, or a member over the limits.
    """
    out: dict[str, tuple[int, int, bool]] = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
            for info in zf.infolist():
                limits.check_zip_member(info.filename, info.file_size, info.compress_size, path, kind=_member_kind(info.filename))
                fh.seek(info.header_offset)
                local = fh.read(30)
                if len(local) < 30 or local[:4] != _ZIP:
                    raise GraceInputError(f"corrupt zip member {info.filename!r} (bad local header; truncated?)", path)
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                out[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size,
                                      info.compress_type == zipfile.ZIP_STORED)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise GraceInputError(f"unreadable torch file (truncated or corrupt: {_refusal(exc)})", path) from None
    return out


def load_torch_file(path: Path) -> Any:
    """``torch.load`` a framework file safely (weights_only, memory-mapped); clear errors.

    Raises:
        GraceInputError: missing, empty, non-regular, truncated or corrupt file, a zip member over
            the limits, or one that needs classes beyond tensors, containers, primitives,
            ``argparse.Namespace`` and numpy arrays (it is refused, not unpickled).
    """
    return load_torch_file_located(path, locate=False)[0]


def load_torch_file_located(path: Path, locate: bool = True) -> tuple[Any, SpanLocator]:
    """:func:`load_torch_file` and a :class:`SpanLocator` for the loaded tensors (an empty one without ``locate``)."""
    path = check_input_file(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != _ZIP:
        raise GraceInputError("not a torch.save zip file (empty, truncated, or a legacy/other format); refused", path)
    records = zip_records(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise GraceInputError("cannot be loaded with weights_only=True (it needs arbitrary code to unpickle; refused): "
                              + _refusal(exc), path) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise GraceInputError(f"unreadable torch file (truncated or corrupt: {_refusal(exc)})", path) from None
    return state, SpanLocator(path, records if locate else {}, state)


def _tensors_in(obj: Any, out: list[torch.Tensor], depth: int = 0) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif depth < 64 and isinstance(obj, dict):
        for v in obj.values():
            _tensors_in(v, out, depth + 1)
    elif depth < 64 and isinstance(obj, list | tuple):
        for v in obj:
            _tensors_in(v, out, depth + 1)
    elif depth < 64 and isinstance(obj, argparse.Namespace):
        _tensors_in(vars(obj), out, depth + 1)


class SpanLocator:
    """Where each tensor of a memory-mapped ``torch.load`` lies in its file.

    ``torch.load(weights_only=True, mmap=True)`` (:func:`load_torch_file`) maps the whole file once and gives every storage record
    ``.../data/<key>`` (stored uncompressed) as a slice of that mapping, so a storage's address
    minus its record's data offset is the same for all of them. The locator pairs the distinct
    storages (by address) with the data records (by offset), both sorted, and enables itself only
    when that difference is one constant and every storage's size equals its record's: then a
    contiguous tensor's bytes are ``[record offset + storage_offset * itemsize, + nbytes)``.
    Otherwise (another writer, a big-endian file, an unreferenced record) :meth:`span` returns
    None and callers use the tensor itself. Addresses are only compared, never dereferenced.
    """

    def __init__(self, path: Path, records: dict[str, tuple[int, int, bool]], state: Any) -> None:
        self.path = path
        self._offset: dict[int, tuple[int, int]] = {}  # storage address -> (file offset, bytes)
        order = [r for name, r in records.items() if name.rsplit("/", 2)[-2:-1] == ["data"] and r[1] > 0]
        byteorder = [name for name in records if name.rsplit("/", 1)[-1] == "byteorder"]
        if not order or sys.byteorder != "little" or any(not stored for _, _, stored in order):
            return
        if byteorder:
            off, n, _ = records[byteorder[0]]
            with open(path, "rb") as fh:
                fh.seek(off)
                if fh.read(n) != b"little":
                    return
        tensors: list[torch.Tensor] = []
        _tensors_in(state, tensors)
        storages = {}
        for t in tensors:
            st = t.untyped_storage()
            if st.nbytes() > 0 and st.device.type == "cpu":
                storages[st.data_ptr()] = st.nbytes()
        order.sort()
        ptrs = sorted(storages)
        if len(ptrs) != len(order):
            return
        base = ptrs[0] - order[0][0]
        if any(p - off != base or storages[p] != n for p, (off, n, _) in zip(ptrs, order, strict=True)):
            return
        self._offset = {p: (off, n) for p, (off, n, _) in zip(ptrs, order, strict=True)}

    @property
    def enabled(self) -> bool:
        return bool(self._offset)

    def span(self, t: torch.Tensor) -> FileSpan | None:
        """The file byte range of ``t`` (contiguous, non-empty, from this file), else None."""
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or not t.is_contiguous():
            return None
        st = t.untyped_storage()
        hit = self._offset.get(st.data_ptr())
        if hit is None:
            return None
        start = t.storage_offset() * t.element_size()
        nbytes = t.numel() * t.element_size()
        if start + nbytes > hit[1]:
            return None
        return FileSpan(self.path, hit[0] + start, nbytes)

    def data(self, t: torch.Tensor) -> torch.Tensor | FileSpan:
        """``span(t)`` when there is one, else ``t``."""
        return self.span(t) or t


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
    if not path.exists():
        raise GraceInputError("file not found (not a torch_dist checkpoint?)", path)
    check_input_file(path)
    limits.check_bytes(path.stat().st_size * 10, "parsing the DCP metadata", path)
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
