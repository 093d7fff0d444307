"""Directories written atomically: a temporary sibling, verified, then renamed into place.

A run that dies at any point (``kill -9`` included) leaves the destination absent or as it
was before. The temporary is named like every temporary of the package,
``.NAME.grace{pid}h{host}.{random}.tmpdir`` (:func:`megatron_grace._files.temporary_prefix`), and
the next run removes those of dead runs with the package's one rule
(:func:`megatron_grace._files.remove_stale_temporaries`): a temporary of this host whose process
is gone, or one of another host (shared file system) only when it is more than a day old.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megatron_grace._files import chmod_as_created, remove_stale_temporaries, temporary_prefix
from megatron_grace.errors import GraceInputError

SUFFIX = "dir"
"""Temporaries are ``....tmpdir`` (files of :func:`megatron_grace._files.atomic_path` end ``.tmp{suffix}``)."""


def remove_stale(dst: Path) -> list[Path]:
    """Delete the temporary directories of dead runs next to ``dst`` (see the module docstring)."""
    return remove_stale_temporaries(dst, SUFFIX, directories=True)


def check_target(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise GraceInputError("already exists (pass --overwrite to replace it)", dst)
    if dst.exists() and not dst.is_dir():
        raise GraceInputError("exists and is not a directory", dst)


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
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(dst), suffix=f".tmp{SUFFIX}", dir=dst.parent))
    chmod_as_created(tmp, 0o777)  # mkdtemp makes 0700; give DST the mode a plain mkdir would
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
