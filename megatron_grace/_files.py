"""Safe file I/O: atomic writes and pickle-free loading.

Files are never left half-written: writers produce a temporary file in the target's folder,
verify it by reading it back, then rename it over the target (``os.replace`` is atomic on
POSIX). Loaders never unpickle (``np.load(..., allow_pickle=False)``, ``json``).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from megatron_grace.errors import GraceInputError

PathLike = str | os.PathLike[str]


@contextmanager
def atomic_path(target: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it onto ``target``.

    On any exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    if target.is_dir():
        raise GraceInputError("is a directory, expected a file name to write", target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    except OSError as exc:
        raise GraceInputError(f"cannot write here ({exc.strerror or exc})", target) from None
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # the bytes reach the disk before the rename makes them visible
            os.fsync(fh.fileno())
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise GraceInputError(f"cannot write here ({exc.strerror or exc})", target) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def save_npz_atomic(target: PathLike, arrays: dict[str, np.ndarray], verify: Callable[[Path], Any] | None = None) -> None:
    """Write ``arrays`` to a compressed ``.npz`` atomically, then check it loads back.

    Args:
        target: destination path (``.npz`` is not appended).
        arrays: name -> array; no object arrays (they would need pickle).
        verify: optional loader run on the temporary file before the rename; it should
            raise if the file is not what was meant to be written.
    """
    for name, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise TypeError(f"array {name!r} has dtype object, which cannot be saved without pickle")
    with atomic_path(target, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        if verify is not None:
            verify(tmp)


def load_npz(path: PathLike) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` without pickle; corrupt files raise GraceInputError."""
    path = Path(path)
    if not path.exists():
        raise GraceInputError("file not found", path)
    if path.is_dir():
        raise GraceInputError("is a directory, expected an .npz file", path)
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise GraceInputError("not an .npz file (no zip signature; empty, truncated or a different format)", path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except ValueError as exc:  # object arrays need pickle
        raise GraceInputError(f"not a pickle-free .npz file ({exc})", path) from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise GraceInputError(f"not a readable .npz file (truncated or corrupt: {exc})", path) from None


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so that it is strict JSON (RFC 8259)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {key: strict_json(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(value) for value in obj]
    return obj


def save_json_atomic(target: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON atomically (NaN and infinities become null) and check it parses back."""
    with atomic_path(target, suffix=".json") as tmp:
        tmp.write_text(json.dumps(strict_json(obj), indent=1, allow_nan=False) + "\n")
        json.loads(tmp.read_text(), parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def load_json(path: PathLike) -> Any:
    """Parse a JSON file; a missing, empty or malformed file raises GraceInputError."""
    path = Path(path)
    if not path.exists():
        raise GraceInputError("file not found", path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise GraceInputError(f"cannot read as text ({exc})", path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise GraceInputError(f"invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); truncated or corrupt?", path) from None
