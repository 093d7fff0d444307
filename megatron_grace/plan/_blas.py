"""Run planning with single-threaded BLAS.

The planners work on many small dense matrices (a few hundred rows at most). Multi-threaded
OpenBLAS only adds synchronization cost there, and on a busy machine (or several planners in
parallel) its threads oversubscribe the cores: we measured 128 x 128 eigendecompositions 4-9x
slower with the default thread count than with one thread on a loaded 2-core machine.

:func:`blas_threads` sets the thread count of every OpenBLAS library loaded in the process
(numpy's and scipy's bundled copies) for the duration of a ``with`` block and restores it
afterwards, through their exported ``*_set_num_threads`` functions (found via
``/proc/self/maps``; elsewhere, or with other BLAS builds, it does nothing). The environment
variable ``GRACE_PLAN_BLAS_THREADS`` overrides the count (``0`` leaves BLAS untouched).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_SYMBOLS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)
_handles: list[tuple[Callable[[], int], Callable[[int], None]]] | None = None


def _openblas_handles() -> list[tuple[Callable[[], int], Callable[[int], None]]]:
    """(get, set) thread-count functions of the OpenBLAS libraries loaded in this process."""
    global _handles
    if _handles is not None:
        return _handles
    found: list[tuple[Callable[[], int], Callable[[int], None]]] = []
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({line.split()[-1] for line in fh if "openblas" in line.lower() and line.rstrip().split()[-1].startswith("/")})
    except OSError:
        paths = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _SYMBOLS:
            get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                found.append((get, set_))
                break
    _handles = found
    return found


@contextmanager
def blas_threads(count: int = 1) -> Iterator[None]:
    """Run the block with ``count`` OpenBLAS threads (``GRACE_PLAN_BLAS_THREADS`` overrides; 0 = untouched)."""
    env = os.environ.get("GRACE_PLAN_BLAS_THREADS")
    if env is not None:
        try:
            count = int(env)
        except ValueError:
            count = 1
    handles = _openblas_handles() if count > 0 else []
    try:
        old = [get() for get, _ in handles]
        for _, set_ in handles:
            set_(count)
    except Exception:  # a foreign BLAS build: leave it alone
        handles, old = [], []
    try:
        yield
    finally:
        for (_, set_), n in zip(handles, old):
            set_(n)


@contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """Run a block with ``count`` torch intra-op threads (restored afterwards).

    The planners call the routing policies (torch) on many small batches; on a shared 2-core
    machine torch's default threads only contend (measured: the serving prediction of a
    32-layer plan took 1.5 s with the default threads at load average 8, 0.05 s with one).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
