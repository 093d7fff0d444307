"""Directories written atomically: a temporary sibling, verified, then renamed into place.

A run that dies at any point (``kill -9`` included) leaves the destination absent or as it
was before; the next run removes temporaries that dead runs left behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megatron_grace.errors import GraceInputError

_TAG = ".grace-tmp-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(dst: Path) -> None:
    """Delete temporaries ``.NAME.grace-tmp-PID-*`` next to ``dst`` whose process is gone."""
    prefix = f".{dst.name}{_TAG}"
    if not dst.parent.is_dir():
        return
    for p in dst.parent.iterdir():
        if p.name.startswith(prefix):
            pid = p.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


def check_target(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise GraceInputError("already exists (pass --overwrite to replace it)", dst)
    if dst.exists() and not dst.is_dir():
        raise GraceInputError("exists and is not a directory", dst)


def check_space(dst: Path, needed: int) -> None:
    """Raise before writing anything when the file system of ``dst`` has under ``needed`` bytes free (+1%)."""
    parent = dst.parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    margin = needed // 100 + (16 << 20)
    if free < needed + margin:
        raise GraceInputError(f"not enough disk space: {needed / 1e9:.3f} GB needed (+{margin / 1e9:.3f} GB margin), "
                              f"{free / 1e9:.3f} GB free", parent)


@contextmanager
def atomic_dir(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``dst``; on failure it is removed.

    With ``overwrite`` an existing ``dst`` is swapped with the new one in one atomic
    ``renameat2(RENAME_EXCHANGE)`` (Linux), then the old one is deleted; where that call is
    missing, the old one is renamed aside first (a crash between the two renames then leaves it
    under ``.NAME.grace-old-*``).
    """
    dst = Path(dst)
    remove_stale(dst)
    check_target(dst, overwrite)
    tmp = dst.parent / f".{dst.name}{_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_tree(tmp)
        if dst.exists():
            if _exchange(tmp, dst):
                shutil.rmtree(tmp, ignore_errors=True)  # now the old copy
            else:
                old = dst.parent / f".{dst.name}.grace-old-{uuid.uuid4().hex[:8]}"
                os.replace(dst, old)
                os.replace(tmp, dst)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
