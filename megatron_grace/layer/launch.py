"""Run a function on N gloo ranks in spawned processes, with a free TCP port and a timeout.

Usage (tests, `grace demo`)::

    results = run_distributed(worker, world_size=4, args=(...,), timeout=60)

``worker(rank, world_size, *args)`` must be a module-level function (spawn pickles it by
name); it runs after ``dist.init_process_group("gloo")`` with ``OMP_NUM_THREADS=1`` and one
torch thread, and its return value (picklable) comes back in ``results[rank]``. An exception on
any rank fails the call with that rank's traceback; ranks still running after ``timeout``
seconds are terminated and the call raises ``TimeoutError`` (a hang is a test failure, never
a stuck test session).
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world_size: int, port: int, backend: str, fn: Callable[..., Any], args: tuple, out: Any,
           collective_timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout))
        result = fn(rank, world_size, *args)
        out.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout: float = 60.0,
                    backend: str = "gloo") -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return the results by rank."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    # not daemonic: ranks may start their own workers (e.g. Megatron's checkpoint writer); they are
    # always joined or terminated below
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, backend, fn, args, out, timeout), daemon=False)
             for r in range(world_size)]
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # children inherit it before importing torch
    try:
        for p in procs:
            p.start()
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    results: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, value = out.get(timeout=min(left, 0.5))
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    break  # every rank exited; whatever they reported is in
                continue
            results[rank] = (ok, value)
            if not ok:  # the others are probably stuck in a collective: give them a moment, then stop
                deadline = min(deadline, time.monotonic() + 5.0)
    finally:
        for p in procs:
            p.join(timeout=2.0 if len(results) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    failures = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(results.items()) if not ok]
    if failures:
        raise RuntimeError("distributed worker failed\n" + "\n".join(failures))
    if len(results) < world_size:
        missing = sorted(set(range(world_size)) - set(results))
        raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s (hang or crash; exit codes "
                           f"{[p.exitcode for p in procs]})")
    return [results[r][1] for r in range(world_size)]
