"""Safe file I/O: atomic writes and pickle-free loading.

Files are never left half-written: writers produce a temporary file in the target's folder,
verify it by reading it back, then rename it over the target (``os.replace`` is atomic on
POSIX). Loaders never unpickle (``np.load(..., allow_pickle=False)``, ``json``).

Hostile inputs: only regular files are read (FIFOs and devices are refused unopened); array
headers are checked against the bytes that follow them and against the memory limit, and
``.npz`` members against zip bombs, before anything is allocated (:mod:`megatron_grace.limits`);
only a new path or a regular file is ever replaced; temporaries of killed writers are removed
by the next write to the same target.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from megatron_grace import limits
from megatron_grace.errors import GraceInputError

PathLike = str | os.PathLike[str]


_TMP_TAG = re.compile(r"grace(\d+)h([0-9a-f]{8})\.[a-z0-9_]{8}")
"""Middle of our temp names, ``.{target}.grace{pid}h{host}.{random}.tmp{suffix}`` (see :func:`atomic_path`)."""
_LEGACY_TMP_TAG = re.compile(r"[a-z0-9_]{8}")
"""Middle of the temp names of earlier versions, ``.{target}.{random}.tmp{suffix}`` (no owner recorded)."""
_STALE_OTHER_HOST_S = 24 * 3600
_STALE_LEGACY_S = 3600


def _tmp_head(target: Path) -> str:
    """Start of the temporaries' names for ``target``; long names are cut so the temporary's name fits in 255 bytes."""
    name = target.name
    while len(name.encode()) > 200:
        name = name[:-1]
    return f".{name}."


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process (or unknowable): keep its file
    return True


def temporary_prefix(target: PathLike) -> str:
    """Start of the name of this process's temporaries for ``target``: ``.{name}.grace{pid}h{host}.``."""
    return f"{_tmp_head(Path(target))}grace{os.getpid()}h{_host_tag()}."


def remove_stale_temporaries(target: PathLike, suffix: str = "", directories: bool = False) -> list[Path]:
    """Remove temporaries a killed writer of ``target`` left behind; returns what was removed.

    Only regular files (with ``directories``: only directories, removed with their contents)
    named like this module's own temporaries for this very target are considered: ``.{name}.grace{pid}h{host}.{random}.tmp{suffix}`` is removed when ``host`` is
    this machine and process ``pid`` is gone, or when it is more than a day old (a writer on
    another machine of a shared file system); the owner-less names of earlier versions,
    ``.{name}.{random}.tmp{suffix}``, when more than an hour old.
    """
    target = Path(target)
    head, tail = _tmp_head(target), f".tmp{suffix}"
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    now, host = time.time(), _host_tag()
    for entry in entries:
        name = entry.name
        if not (name.startswith(head) and name.endswith(tail)) or len(name) <= len(head) + len(tail):
            continue
        middle = name[len(head):-len(tail)]
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not (stat.S_ISDIR(st.st_mode) if directories else stat.S_ISREG(st.st_mode)):
            continue
        age = now - st.st_mtime
        m = _TMP_TAG.fullmatch(middle)
        if m:
            stale = (m.group(2) == host and not _pid_alive(int(m.group(1)))) or age > _STALE_OTHER_HOST_S
        else:
            stale = _LEGACY_TMP_TAG.fullmatch(middle) is not None and age > _STALE_LEGACY_S
        if stale:
            try:
                shutil.rmtree(entry.path) if directories else os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def check_output_path(target: PathLike, folder_ok: bool = False) -> Path:
    """The path a writer may replace: a new path or an existing regular file (symlinks followed).

    Directories (unless ``folder_ok``: an output folder such as ``--plot DIR``), FIFOs, sockets and
    device nodes are refused (renaming a file over ``/dev/null`` would replace it), as are names
    the file system cannot hold. The CLI checks its output flags with it before any work.
    """
    target = Path(target)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return Path(os.path.realpath(target)) if os.path.islink(target) else target
    except OSError as exc:
        raise GraceInputError(f"cannot write here ({exc.strerror or exc})", target) from None
    if stat.S_ISDIR(st.st_mode):
        if folder_ok:
            return target
        raise GraceInputError("is a directory, expected a file name to write", target)
    if not stat.S_ISREG(st.st_mode):
        raise GraceInputError(f"is a {_kind(st.st_mode)}, not a regular file: give a new path or a regular file to replace", target)
    return Path(os.path.realpath(target)) if os.path.islink(target) else target


@contextmanager
def atomic_path(target: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it onto ``target``.

    On any exception the temporary file is removed and ``target`` is left untouched. Stale
    temporaries of killed earlier writes to the same target are removed first
    (:func:`remove_stale_temporaries`). ``target`` must be a new path or a regular file.
    """
    target = check_output_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target, suffix)
        fd, tmp_name = tempfile.mkstemp(prefix=temporary_prefix(target), suffix=f".tmp{suffix}",
                                        dir=target.parent)
    except OSError as exc:
        raise GraceInputError(f"cannot write here ({exc.strerror or exc})", target) from None
    os.close(fd)
    tmp = Path(tmp_name)
    chmod_as_created(tmp, 0o666)  # mkstemp makes 0600; give the file the mode a plain open() would
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


DISK_SLACK_BYTES = 16 << 20
"""Free space asked for beyond what a write needs, besides 1% of it (file-system blocks, directory entries)."""


def check_disk_space(target: PathLike, nbytes: int, what: str) -> None:
    """Refuse, before any work, to write about ``nbytes`` to ``target`` when its file system has less free space.

    The package's one up-front disk check (trace synthesis, checkpoint patch and unpatch). It asks
    for ``nbytes`` plus a slack of 1% + :data:`DISK_SLACK_BYTES`, measured on the nearest existing
    folder above ``target`` (which need not exist; nothing is created). Where the free space
    cannot be known the write itself reports a full disk.

    Raises:
        GraceInputError: one line naming ``what``, the bytes needed, the bytes free and the folder.
    """
    folder = Path(target).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # unknowable here; the write itself reports a full disk
    slack = nbytes // 100 + DISK_SLACK_BYTES
    if nbytes + slack > free:
        raise GraceInputError(f"not enough disk space: {what} needs up to {format_bytes(nbytes)} of disk (+{format_bytes(slack)} slack "
                              f"for the file system), {format_bytes(free)} are free in {folder}", target)


def chmod_as_created(path: Path, mode: int) -> None:
    """Give ``path`` the permissions ``open()`` / ``mkdir()`` would have (``mode`` less the umask), not a temp file's 0600/0700."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def format_bytes(nbytes: float) -> str:
    """``nbytes`` for a message: ``"384.0 GB"``, ``"16.8 MB"``, ``"1.0 kB"``, ``"999 bytes"`` (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} bytes"


FULL_VERIFY_BYTES = 256 << 20
"""Files whose arrays hold fewer bytes are verified by ``verify`` (a full semantic read-back);
larger ones structurally (see :func:`save_npz_atomic`), so that a big write does not need twice
its size in memory again."""

_CHUNK_BYTES = 16 << 20
_COMPRESS_LEVEL = 1  # deflate level 1: about 5x faster than numpy's default 6 on trace ids, files about 5% larger


@dataclass(frozen=True)
class StreamedArray:
    """An array written to an ``.npz`` from an iterable of blocks, never held whole.

    Attributes:
        shape: the full array's shape; the blocks are consecutive slices along axis 0.
        dtype: the dtype on disk (each block is cast to it; values must fit).
        blocks: arrays of shape ``[n_i, *shape[1:]]`` with ``sum n_i == shape[0]``, consumed once.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Iterable[np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def save_npz_atomic(target: PathLike, arrays: dict[str, np.ndarray | StreamedArray], verify: Callable[[Path], Any] | None = None,
                    dtypes: dict[str, np.dtype | type] | None = None) -> None:
    """Write ``arrays`` to a compressed ``.npz`` atomically, then check it.

    Members are streamed in chunks of about 16 MB (no whole-array copy, also when ``dtypes`` asks
    for a narrower type on disk) and deflated at level 1; a :class:`StreamedArray` member is
    written block by block as its iterable yields them. The result reads back with ``np.load``.

    Args:
        target: destination path (``.npz`` is not appended).
        arrays: name -> array or :class:`StreamedArray`; no object arrays (they would need pickle).
        verify: optional loader run on the temporary file before the rename; it should raise if
            the file is not what was meant to be written. Run when the arrays hold fewer than
            :data:`FULL_VERIFY_BYTES` and none is streamed; otherwise the file is verified
            structurally instead: every member's header matches its size and every member's
            CRC-32 matches its bytes, read back in a stream (the arrays themselves were validated
            before the write, or are valid by construction when streamed).
        dtypes: name -> dtype to store that array as (e.g. int8 ids), a plain array or a
            :class:`StreamedArray` alike (its blocks are cast to it instead of to its own dtype);
            integer values must fit it (ValueError otherwise: a narrowing cast would wrap them).
    """
    dtypes = dtypes or {}
    arrays = {name: arr if isinstance(arr, StreamedArray) else np.asarray(arr) for name, arr in arrays.items()}
    disk = {name: np.dtype(dtypes.get(name, arr.dtype)) for name, arr in arrays.items()}
    for name, arr in arrays.items():
        if np.dtype(arr.dtype) == object or disk[name] == object:
            raise TypeError(f"array {name!r} has dtype object, which cannot be saved without pickle")
    total = sum(int(np.prod(arr.shape, dtype=np.int64)) * disk[name].itemsize for name, arr in arrays.items())
    with atomic_path(target, suffix=".npz") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_COMPRESS_LEVEL, allowZip64=True) as zf:
            for name, arr in arrays.items():
                blocks = arr.blocks if isinstance(arr, StreamedArray) else _row_blocks(arr, disk[name])
                _write_member(zf, name, arr.shape, disk[name], blocks)
        if total < FULL_VERIFY_BYTES and not any(isinstance(arr, StreamedArray) for arr in arrays.values()):
            if verify is not None:
                verify(tmp)
        else:
            check_npz_members(tmp)
            with zipfile.ZipFile(tmp) as zf:
                bad = zf.testzip()
            if bad is not None:
                raise GraceInputError(f"written file fails its CRC check at member {bad!r}", tmp)


def _row_blocks(arr: np.ndarray, dtype: np.dtype) -> Iterator[np.ndarray]:
    """``arr`` in slices along axis 0 of about ``_CHUNK_BYTES`` each (counting the wider of the two dtypes)."""
    if arr.ndim == 0 or arr.size == 0:
        yield arr
        return
    row = max(1, arr[0].size * max(dtype.itemsize, arr.dtype.itemsize))
    step = max(1, _CHUNK_BYTES // row)
    for start in range(0, arr.shape[0], step):
        yield arr[start:start + step]


def _write_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype, blocks: Iterable[np.ndarray]) -> None:
    """One ``name.npy`` member: the ``.npy`` header, then the C-order bytes of ``blocks`` (slices along axis 0) as ``dtype``.

    Blocks that do not add up to ``shape``, and integer values outside an integer ``dtype``'s range,
    raise ValueError (the member would not match its header; the cast would wrap them)."""
    from numpy.lib import format as npformat

    header = {"descr": npformat.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    written = 0
    with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
        npformat.write_array_header_2_0(fh, header) if _header_too_long(header) else npformat.write_array_header_1_0(fh, header)
        for block in blocks:
            block = np.asarray(block)
            _check_fits(name, block, dtype)
            block = np.ascontiguousarray(block, dtype=dtype)
            if len(shape) and block.ndim and block.shape[1:] != tuple(shape[1:]):
                raise ValueError(f"array {name!r}: a block of shape {block.shape} does not fit shape {tuple(shape)}")
            fh.write(memoryview(block.reshape(-1).view(np.uint8)))
            written += block.nbytes
    if written != expected:
        raise ValueError(f"array {name!r}: blocks hold {written} bytes, the header says {expected}")


def _check_fits(name: str, block: np.ndarray, dtype: np.dtype) -> None:
    """Raise ValueError when integer ``block`` holds a value that integer ``dtype`` cannot (a narrowing cast would wrap it)."""
    if block.size == 0 or dtype.kind not in "iu" or block.dtype.kind not in "iu" or np.can_cast(block.dtype, dtype):
        return
    lo, hi, info = int(block.min()), int(block.max()), np.iinfo(dtype)
    if lo < info.min or hi > info.max:
        raise ValueError(f"array {name!r}: values {lo}..{hi} do not fit {dtype} ({info.min}..{info.max})")


def _header_too_long(header: dict[str, Any]) -> bool:
    return len(repr(header)) > 60000


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISDIR(mode):
        return "directory"
    return "special file"


def check_input_file(path: PathLike, allow_empty: bool = False) -> Path:
    """``path`` as a :class:`Path` after checking it is a readable regular file.

    Missing files, directories, FIFOs, devices and sockets (never opened: a FIFO would block and
    ``/dev/zero`` never ends), unreadable files and names the OS refuses (too long, ...) raise
    GraceInputError; so does an empty file unless ``allow_empty``.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise GraceInputError("file not found", p) from None
    except OSError as exc:
        raise GraceInputError(f"cannot read ({exc.strerror or exc})", p) from None
    if stat.S_ISDIR(st.st_mode):
        raise GraceInputError("is a directory, expected a file", p)
    if not stat.S_ISREG(st.st_mode):
        raise GraceInputError(f"is a {_kind(st.st_mode)}, not a regular file (refused unread)", p)
    if not os.access(p, os.R_OK):
        raise GraceInputError("cannot read (permission denied)", p)
    if st.st_size == 0 and not allow_empty:
        raise GraceInputError("file is empty", p)
    return p


def _array_header(fh: IO[bytes], what: str, source: Path) -> tuple[tuple[int, ...], np.dtype, int, bool]:
    """(shape, dtype, header length, Fortran order) of the ``.npy`` stream ``fh`` at its start; bad headers raise."""
    from numpy.lib import _format_impl as fmt

    try:
        version = fmt.read_magic(fh)
        shape, fortran, dtype = fmt._read_array_header(fh, version)
    except Exception as exc:  # noqa: BLE001 - a forged header fails in many ways (SyntaxError, TokenError, ...)
        raise GraceInputError(f"{what}: not a readable array header ({_one_line(exc)})", source) from None
    return tuple(int(d) for d in shape), dtype, fh.tell(), bool(fortran)


def _check_array_bytes(shape: tuple[int, ...], dtype: np.dtype, data_bytes: int, what: str, source: Path) -> None:
    """The bytes a header claims must be the bytes that follow it, and fit the memory limit."""
    if dtype.hasobject:
        raise GraceInputError(f"{what} holds Python objects (dtype {dtype}), which would need pickle; refused", source)
    n = 1
    for d in shape:
        n *= d
    claimed = n * dtype.itemsize
    if claimed != data_bytes:
        raise GraceInputError(f"{what} claims shape {shape} of {dtype} ({claimed} bytes) but holds {data_bytes} bytes "
                              "(truncated, corrupt or forged header)", source)
    limits.check_bytes(claimed, what, source)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:160]}".replace("\n", " ")


def check_npz_members(path: PathLike) -> list[str]:
    """Names of the arrays of an ``.npz`` after checking, without expanding any, that every
    member's header matches its expanded size, that nothing needs pickle, that no member is a
    zip bomb and that all of them together fit the memory limit (:mod:`megatron_grace.limits`)."""
    path = Path(path)
    total = 0
    names: list[str] = []
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                what = f"array {name!r}"
                limits.check_zip_member(name, info.file_size, info.compress_size, path)
                if info.file_size < 10:
                    raise GraceInputError(f"{what}: not a readable array header (member of {info.file_size} bytes)", path)
                with zf.open(info) as fh:
                    shape, dtype, header, _ = _array_header(fh, what, path)
                _check_array_bytes(shape, dtype, info.file_size - header, what, path)
                total += info.file_size
                names.append(name)
    except GraceInputError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise GraceInputError(f"not a readable .npz file (truncated or corrupt: {_one_line(exc)})", path) from None
    limits.check_bytes(total, "the arrays of this file together", path)
    return names


def load_npz(path: PathLike, widen: dict[str, np.dtype | type] | None = None) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` without pickle; corrupt or implausible files raise GraceInputError.

    Member sizes and headers are checked before anything is expanded (:func:`check_npz_members`).
    A member named in ``widen`` whose stored dtype casts safely to the given one (int8 ids to
    int32) is read in blocks straight into an array of that dtype, never held in both; other
    members, and those whose values might not fit, load as stored.
    """
    path = check_input_file(path)
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise GraceInputError("not an .npz file (no zip signature; empty, truncated or a different format)", path)
    check_npz_members(path)
    widen = widen or {}
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {}
            for name in data.files:
                if name in widen:
                    wide = _read_member_widened(data.zip, name, np.dtype(widen[name]), path)
                    if wide is not None:
                        out[name] = wide
                        continue
                out[name] = data[name]
            return out
    except ValueError as exc:  # object arrays need pickle
        raise GraceInputError(f"not a pickle-free .npz file ({exc})", path) from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise GraceInputError(f"not a readable .npz file (truncated or corrupt: {exc})", path) from None


def _read_member_widened(zf: zipfile.ZipFile, name: str, dtype: np.dtype, path: Path) -> np.ndarray | None:
    """Member ``name`` read in blocks of about ``_CHUNK_BYTES`` into a new C-order ``dtype`` array, or None when its
    stored dtype does not cast safely to ``dtype`` or it is in Fortran order (the caller loads it as stored)."""
    with zf.open(f"{name}.npy") as fh:
        shape, stored, _, fortran = _array_header(fh, f"array {name!r}", path)
        if fortran or not np.can_cast(stored, dtype, "safe"):
            return None
        out = np.empty(shape, dtype=dtype)
        flat = out.reshape(-1)
        step = max(1, _CHUNK_BYTES // max(stored.itemsize, 1))
        for start in range(0, flat.size, step):
            count = min(step, flat.size - start)
            raw = fh.read(count * stored.itemsize)
            if len(raw) != count * stored.itemsize:
                raise GraceInputError(f"array {name!r} ends early (truncated or corrupt)", path)
            flat[start:start + count] = np.frombuffer(raw, dtype=stored)
        if fh.read(1):  # also makes zipfile check the member's CRC-32
            raise GraceInputError(f"array {name!r} holds more bytes than its header says (corrupt)", path)
    return out


def strict_int(value: Any, what: str) -> int:
    """An integer read from a file (JSON metadata, a plan); 1.7, True or "3" raise ValueError (no silent truncation)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}"[:120])
    return value


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so that it is strict JSON (RFC 8259)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {key: strict_json(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(value) for value in obj]
    return obj


def load_npy(path: PathLike) -> np.ndarray:
    """Load an ``.npy`` without pickle after checking its header against the file size and the memory limit."""
    path = check_input_file(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        shape, dtype, header, _ = _array_header(fh, "array", path)
    _check_array_bytes(shape, dtype, size - header, "array", path)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise GraceInputError(f"not a readable .npy file (truncated, corrupt or pickled: {_one_line(exc)})", path) from None


def save_json_atomic(target: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON atomically (NaN and infinities become null) and check it parses back."""
    with atomic_path(target, suffix=".json") as tmp:
        tmp.write_text(json.dumps(strict_json(obj), indent=1, allow_nan=False) + "\n")
        json.loads(tmp.read_text(), parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def load_json(path: PathLike) -> Any:
    """Parse a JSON file; a missing, non-regular, empty, malformed or too deeply nested file raises GraceInputError.

    Integers of more digits than Python parses (4300) are refused; the file's text must fit the
    memory limit ten times over (parsed JSON takes several times the text's size).
    """
    path = check_input_file(path, allow_empty=True)
    limits.check_bytes(path.stat().st_size * 10, "parsing this JSON file", path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise GraceInputError(f"cannot read as text ({exc})", path) from None
    return parse_json_text(text, path)


def parse_json_text(text: str, source: PathLike | None = None) -> Any:
    """``json.loads`` with every failure (syntax, nesting depth, huge integers) as one GraceInputError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise GraceInputError(f"invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); truncated or corrupt?", source) from None
    except RecursionError:
        raise GraceInputError("JSON nested too deeply", source) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise GraceInputError(f"invalid JSON ({_one_line(exc)})", source) from None
