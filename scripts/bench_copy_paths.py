#!/usr/bin/env python
"""How ``grace checkpoint patch`` should move bytes: three ways to copy a file while hashing it.

The patch must see every source byte in user space (sha256 for the manifest) and write it into
one or more new files. This measures, on the machine and disk at hand, copying one generated
file of ``--gb`` GB (random bytes, deleted afterwards) in 8 MiB blocks, every block also hashed
on one of two threads as the patch does, three ways:

- ``mmap+pwrite``: each block a pre-populated read-only map of its source window, ``pwrite`` from it;
- ``pread+pwrite``: each block ``pread`` into one of 3 ring buffers, ``pwrite`` from the buffer;
- ``pread+copy_file_range``: the same ``pread`` for the hash, the write done by the kernel
  (``os.copy_file_range``), the path ``StreamWriter`` takes.

The methods alternate ``--repeat`` times (the order rotates) so a drifting machine hits them
alike; the output file is deleted after each run and not fsynced (page-cache copies, as ``cp -r``
makes). Prints wall and system seconds per method (median and range) and writes JSON.

    python scripts/bench_copy_paths.py --gb 2 --repeat 3 --out benchmarks/results/copy_paths.json
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_grace._provenance import save_result_json  # noqa: E402
from megatron_grace.checkpoint.stream_copy import copy_range, pwrite_all  # noqa: E402

BLOCK = 8 << 20
METHODS = ("mmap+pwrite", "pread+pwrite", "pread+copy_file_range")


def copy_file(method: str, src: Path, dst: Path) -> tuple[float, float, str]:
    """Copy ``src`` to ``dst`` by ``method``, hashing every block on two threads; (wall s, system s, sha256 hex)."""
    pools = [ThreadPoolExecutor(1) for _ in range(2)]
    hashes = [hashlib.sha256() for _ in range(2)]  # one running hash per thread (alternate blocks): cost, not a file digest
    bufs = [bytearray(BLOCK) for _ in range(3)]
    busy: list = [None] * 3
    maps: list = [None] * 3
    t0, s0 = time.perf_counter(), os.times().system
    fd = os.open(src, os.O_RDONLY)
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size, pos, k = os.fstat(fd).st_size, 0, 0
        while pos < size:
            n = min(BLOCK, size - pos)
            slot = k % 3
            if busy[slot] is not None:
                busy[slot].result()
                if maps[slot] is not None:
                    maps[slot][1].release()
                    maps[slot][0].close()
                    maps[slot] = None
            if method == "mmap+pwrite":
                start = pos - pos % mmap.ALLOCATIONGRANULARITY
                mm = mmap.mmap(fd, pos - start + n, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                               prot=mmap.PROT_READ, offset=start)
                view = memoryview(mm)[pos - start: pos - start + n]
                maps[slot] = (mm, view)
            else:
                view = memoryview(bufs[slot])[:n]
                os.preadv(fd, [view], pos)
            done = copy_range(fd, pos, out, pos, n) if method == "pread+copy_file_range" else 0  # the patch's own calls
            pwrite_all(out, view[done:], pos + done)
            busy[slot] = pools[k % 2].submit(hashes[k % 2].update, view)
            pos, k = pos + n, k + 1
        for f in busy:
            if f is not None:
                f.result()
    finally:
        for m in maps:
            if m is not None:
                m[1].release()
                m[0].close()
        for p in pools:
            p.shutdown()
        os.close(fd)
        os.close(out)
    return time.perf_counter() - t0, os.times().system - s0, hashes[0].hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="size of the generated source file in GB (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each runs every method once (default 3)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temporary directory on /tmp's disk)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "copy_paths.json")
    args = ap.parse_args()
    if not hasattr(os, "copy_file_range"):
        raise SystemExit("os.copy_file_range is not available on this platform")
    with tempfile.TemporaryDirectory(prefix="grace-copy-", dir=args.workdir) as work:
        src = Path(work) / "src.bin"
        with src.open("wb") as fh:
            left = int(args.gb * 1e9)
            while left > 0:
                fh.write(os.urandom(min(left, 64 << 20)))
                left -= 64 << 20
        size = src.stat().st_size
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
        for r in range(args.repeat):
            order = METHODS[r % 3:] + METHODS[: r % 3]
            for method in order:
                dst = Path(work) / "dst.bin"
                wall, system, _ = copy_file(method, src, dst)
                if dst.stat().st_size != size:
                    raise SystemExit(f"{method}: wrote {dst.stat().st_size} of {size} bytes")
                dst.unlink()
                runs[method].append((wall, system))
                print(f"round {r + 1}/{args.repeat} {method:24s} {wall:6.2f} s wall, {system:6.2f} s system", flush=True)
    result = {"bytes": size, "block": BLOCK, "repeat": args.repeat, "methods": {}}
    print(f"\n{'method':24s} {'wall s (median, range)':>26s} {'system s (median)':>18s} {'GB/s':>6s}")
    for method in METHODS:
        walls = [w for w, _ in runs[method]]
        systems = [s for _, s in runs[method]]
        med = statistics.median(walls)
        result["methods"][method] = {"wall_s": walls, "system_s": systems, "wall_median_s": med,
                                     "system_median_s": statistics.median(systems), "gb_per_s": size / med / 1e9}
        print(f"{method:24s} {med:8.2f} ({min(walls):.2f}-{max(walls):.2f}) {statistics.median(systems):18.2f} "
              f"{size / med / 1e9:6.2f}")
    save_result_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
