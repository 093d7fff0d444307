"""Streaming safetensors files: header first, tensors written one at a time at their offsets.

The safetensors format is an 8-byte little-endian header length, a JSON header
(``{key: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``,
offsets relative to the data start) and the raw little-endian data. :class:`SafetensorsLayout`
computes the header and every tensor's place from shapes and dtypes alone, so a writer
(:mod:`~megatron_grace.checkpoint.stream_copy`) can write the header first and ``pwrite`` each
tensor when it streams past (no file ever held whole in memory). Reading (:func:`read_header`,
:func:`read_tensor`) uses ``pread`` of exactly the
requested byte ranges, so callers can count the bytes they read. Files are readable by the
``safetensors`` library.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from megatron_grace.checkpoint.source import TensorSpec
from megatron_grace.errors import GraceInputError

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
           torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_FROM_CODE = {v: k for k, v in _DTYPES.items()}
MAX_HEADER = 100 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: spec and absolute byte range ``[begin, end)``."""

    spec: TensorSpec
    begin: int
    end: int


class SafetensorsLayout:
    """Header and byte ranges of a safetensors file with the given tensors, in the given order."""

    def __init__(self, tensors: list[tuple[str, TensorSpec]], metadata: dict[str, str] | None = None) -> None:
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        pos, rel = 0, {}
        for key, spec in tensors:
            if spec.dtype not in _DTYPES:
                raise GraceInputError(f"{key}: dtype {spec.dtype} has no safetensors code")
            if key in rel:
                raise ValueError(f"duplicate key {key!r}")
            n = spec.nbytes
            header[key] = {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": [pos, pos + n]}
            rel[key] = (spec, pos, pos + n)
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(len(raw) + 8) % 8)  # data starts 8-byte aligned
        self.head = struct.pack("<Q", len(raw)) + raw
        start = len(self.head)
        self.entries = {k: Entry(s, start + b, start + e) for k, (s, b, e) in rel.items()}
        self.size = start + pos


def in_file_order(pieces: Iterable[tuple[tuple[int, int], T]]) -> list[T]:
    """The items of ``((begin, end), item)`` pairs in file order: by byte range ``[begin, end)``,
    an empty tensor before the one that starts at its offset (equal ranges keep their order).

    The one ordering of a file's tensors for :func:`tree_sha256`, used by the writer (its
    per-tensor digests) and by the scan (the entries it reads).
    """
    return [item for _, item in sorted(pieces, key=_byte_range)]


def _byte_range(piece: tuple[tuple[int, int], object]) -> tuple[int, int]:
    return piece[0]


def tree_sha256(head: bytes, tensor_digests: list[bytes]) -> str:
    """A safetensors file's tree digest: sha256 of its header bytes (length prefix, JSON, padding)
    followed by the 32-byte sha256 of each tensor's bytes, in file order (:func:`in_file_order`).

    For a file whose tensors tile the data section (no gaps, nothing after the last one; the
    readers check that separately) it covers every byte, so any changed byte changes it; it
    costs one hash of the data, shared with the per-tensor hashes of the manifest.
    """
    h = hashlib.sha256(head)
    for d in tensor_digests:
        h.update(d)
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` (made contiguous), as a buffer without copying when possible."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str], int]:
    """Parse a safetensors header: ``(entries, metadata, header bytes)``; bad files raise GraceInputError."""
    path = Path(path)
    if not path.is_file():
        raise GraceInputError("file not found", path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        first = fh.read(8)
        if len(first) < 8:
            raise GraceInputError("truncated safetensors file (no header)", path)
        (n,) = struct.unpack("<Q", first)
        if n > min(MAX_HEADER, size - 8):
            raise GraceInputError(f"corrupt or truncated safetensors header (says {n} bytes)", path)
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise GraceInputError(f"corrupt safetensors header ({exc})", path) from None
    if not isinstance(header, dict):
        raise GraceInputError("corrupt safetensors header (not an object)", path)
    metadata = header.pop("__metadata__", {}) or {}
    entries, start = {}, 8 + n
    try:
        for key, d in header.items():
            spec = TensorSpec(tuple(int(x) for x in d["shape"]), _FROM_CODE[d["dtype"]])
            b, e = (int(x) for x in d["data_offsets"])
            if e - b != spec.nbytes or b < 0:
                raise ValueError(f"{key}: byte range {b}..{e} does not hold {spec.shape} {spec.dtype}")
            entries[key] = Entry(spec, start + b, start + e)
    except (KeyError, TypeError, ValueError) as exc:
        raise GraceInputError(f"corrupt safetensors header ({type(exc).__name__}: {exc})", path) from None
    end = max((en.end for en in entries.values()), default=start)
    if end > size:
        raise GraceInputError(f"truncated: {size} bytes, the header needs {end}", path)
    return entries, dict(metadata), start


def read_tensor(fd: int, entry: Entry) -> torch.Tensor:
    """``pread`` one tensor (exactly its bytes) into a new CPU tensor."""
    n = entry.end - entry.begin
    buf = bytearray(n)
    view, done = memoryview(buf), 0
    while done < n:
        got = os.preadv(fd, [view[done:]], entry.begin + done)
        if got <= 0:
            raise GraceInputError("truncated while reading a tensor")
        done += got
    if n == 0:
        return torch.empty(entry.spec.shape, dtype=entry.spec.dtype)
    return torch.frombuffer(buf, dtype=entry.spec.dtype).reshape(entry.spec.shape)
