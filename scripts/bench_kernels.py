"""Benchmark the dispatch ops: compiled kernels (``GRACE_OPS=native``) against the pure-torch references.

Every op is timed on every available device (CPU always; CUDA when there is a device and the
CUDA kernels are built): destination_histogram, sort_by_key, permute_by_key, gather_rows,
scatter_rows, weighted_combine (dense pair layout, value_index from permute_by_key, 10% dropped
pairs) and grace_choose_copies. CPU times come from ``time.perf_counter``, GPU times from CUDA
events (median of ``--repeats``). Outputs of the two implementations must be bit-identical.

CPU: C++ vs pure torch for the dispatch path ``permute_by_key`` + ``weighted_combine`` (target
>= 2x). CUDA: bandwidth of permute (reads and writes n rows) and combine (reads n rows, writes T
rows) at 65,536 tokens x top-8 x hidden 4096 bf16 by default, against a device copy
``y.copy_(x)`` of the same n rows.

Results: a table on stdout and JSON in ``benchmarks/results/kernels.json`` (``--out``; also
``$OUT/kernels.json`` when ``OUT`` is set).

Usage: python scripts/bench_kernels.py [--tokens 1024 4096] [--gpu-tokens 65536] [--repeats 5] [--hidden H] [--skip-cpu] [--skip-gpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_grace import _ops  # noqa: E402
from megatron_grace._provenance import save_result_json  # noqa: E402

TOP_K = 8
NUM_RANKS, SLOTS = 16, 4  # destination keys: (rank, slot) pairs, plus one "not sent" key
NUM_EXPERTS, NUM_GPUS, GPUS_PER_NODE, MAX_COPIES = 128, 16, 8, 3
DROP = 0.1
OPS = ("destination_histogram", "sort_by_key", "permute_by_key", "gather_rows", "scatter_rows", "weighted_combine", "grace_choose_copies")


def _case(T: int, h: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n = T * TOP_K
    sentinel = NUM_RANKS * SLOTS
    key = torch.randint(0, sentinel, (n,), generator=gen)
    dropped = torch.rand(n, generator=gen) < DROP
    key[dropped] = sentinel
    copies = torch.randint(1, MAX_COPIES + 1, (NUM_EXPERTS,), generator=gen)
    hosts = torch.full((NUM_EXPERTS, MAX_COPIES), -1, dtype=torch.int64)
    for e in range(NUM_EXPERTS):
        hosts[e, : copies[e]] = torch.randperm(NUM_GPUS, generator=gen)[: copies[e]]
    ids = torch.randint(0, NUM_EXPERTS, (T, TOP_K), generator=gen)
    ids[dropped.view(T, TOP_K)] = -1
    pred = torch.rand(NUM_GPUS, generator=gen, dtype=torch.float64) * 100
    c = {
        "x": torch.randn(T, h, generator=gen).to(dtype),
        "key": key,
        "dest": torch.where(dropped, torch.full_like(key, -1), key // SLOTS),
        "dropped": dropped,
        "token": torch.arange(T).repeat_interleave(TOP_K),
        "choice": torch.arange(TOP_K).repeat(T),
        "weight": torch.rand(n, generator=gen),
        "ids": ids,
        "src": torch.randint(0, NUM_GPUS, (T,), generator=gen),
        "hosts": hosts,
        "copies": copies,
        "spare": torch.rand(NUM_GPUS, generator=gen, dtype=torch.float64) + 0.1,
        "pred": pred,
        "params": torch.tensor([5.0, float(pred.mean()), 1.3 * float(pred.mean())], dtype=torch.float64),
    }
    return {k: v.to(device) for k, v in c.items()} | {"T": T, "h": h, "num_keys": sentinel + 1}


def _calls(c: dict) -> dict[str, Callable[[], object]]:
    """One closure per op; permute_by_key's outputs feed gather/scatter/combine."""
    T, K = c["T"], c["num_keys"]
    y, position, _ = _ops.permute_by_key(c["x"], c["key"], K, TOP_K)
    order, _ = _ops.sort_by_key(c["key"], K)
    vidx = torch.where(c["dropped"], torch.full_like(position, -1), position)
    return {
        "destination_histogram": lambda: _ops.destination_histogram(c["dest"], NUM_RANKS),
        "sort_by_key": lambda: _ops.sort_by_key(c["key"], K),
        "permute_by_key": lambda: _ops.permute_by_key(c["x"], c["key"], K, TOP_K),
        "gather_rows": lambda: _ops.gather_rows(c["x"], c["token"], order),
        "scatter_rows": lambda: _ops.scatter_rows(y, order),
        "weighted_combine": lambda: _ops.weighted_combine(y, c["token"], c["choice"], c["weight"], T, TOP_K, y.dtype, vidx),
        "grace_choose_copies": lambda: _ops.grace_choose_copies(c["ids"], c["src"], c["hosts"], c["copies"], c["spare"], c["pred"],
                                                                c["params"], GPUS_PER_NODE, True),
    }


def _time_cpu(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_cuda(fn: Callable[[], object], repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def bench_device(device: str, T: int, h: int, dtype: torch.dtype, repeats: int) -> dict:
    timer = _time_cuda if device == "cuda" else _time_cpu
    c = _case(T, h, dtype, device)
    res = {"device": device, "tokens": T, "top_k": TOP_K, "hidden": h, "dtype": str(dtype).replace("torch.", ""),
           "threads": torch.get_num_threads(), "ops": {}}
    outs = {}
    for mode in ("torch", "native"):
        os.environ["GRACE_OPS"] = mode
        calls = _calls(c)
        outs[mode] = {name: calls[name]() for name in OPS}
        for name in OPS:
            res["ops"].setdefault(name, {})[f"{mode}_ms"] = 1e3 * timer(calls[name], repeats)
        del calls
    os.environ.pop("GRACE_OPS", None)
    for name in OPS:
        op = res["ops"][name]
        op["speedup"] = op["torch_ms"] / op["native_ms"]
        op["identical"] = _same(outs["torch"][name], outs["native"][name])
    dispatch = ("permute_by_key", "weighted_combine")
    res["dispatch_torch_ms"] = sum(res["ops"][o]["torch_ms"] for o in dispatch)
    res["dispatch_native_ms"] = sum(res["ops"][o]["native_ms"] for o in dispatch)
    res["dispatch_speedup"] = res["dispatch_torch_ms"] / res["dispatch_native_ms"]
    if device == "cuda":
        n, row_bytes = T * TOP_K, h * c["x"].element_size()
        src = torch.empty(n, h, dtype=dtype, device=device)
        dst = torch.empty_like(src)
        t_copy = timer(lambda: dst.copy_(src), repeats)
        del src, dst
        copy_bw = 2 * n * row_bytes / t_copy
        moved = {"permute_by_key": 2 * n * row_bytes, "gather_rows": 2 * n * row_bytes, "scatter_rows": 2 * n * row_bytes,
                 "weighted_combine": (n + T) * row_bytes}
        res["copy_GBps"] = copy_bw / 1e9
        res["device_name"] = torch.cuda.get_device_name()
        for name, nbytes in moved.items():
            op = res["ops"][name]
            for mode in ("native", "torch"):
                op[f"{mode}_GBps"] = nbytes / (op[f"{mode}_ms"] / 1e3) / 1e9
                op[f"{mode}_copy_fraction"] = op[f"{mode}_GBps"] / res["copy_GBps"]
    del c, outs
    return res


def _print(res: dict) -> None:
    head = f"{res['device']}: {res['tokens']} tokens x top-{res['top_k']}, hidden {res['hidden']} {res['dtype']}"
    if res["device"] == "cpu":
        head += f", {res['threads']} threads"
    else:
        head += f", {res['device_name']}, copy {res['copy_GBps']:.0f} GB/s"
    print(head)
    gb = res["device"] == "cuda"
    print(f"  {'op':22s} {'torch ms':>10s} {'native ms':>10s} {'speedup':>8s} {'identical':>9s}" + ("  native GB/s (of copy)" if gb else ""))
    for name, op in res["ops"].items():
        line = f"  {name:22s} {op['torch_ms']:10.3f} {op['native_ms']:10.3f} {op['speedup']:7.2f}x {str(op['identical']):>9s}"
        if gb and "native_GBps" in op:
            line += f"  {op['native_GBps']:8.0f} ({100 * op['native_copy_fraction']:3.0f}%)"
        print(line)
    print(f"  {'permute+combine':22s} {res['dispatch_torch_ms']:10.3f} {res['dispatch_native_ms']:10.3f} {res['dispatch_speedup']:7.2f}x",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="CPU token counts (default: 1024 4096)")
    ap.add_argument("--gpu-tokens", type=int, nargs="+", default=[65536], help="CUDA token counts (default: 65536)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=None, help="hidden size (default: 1024 on CPU, 4096 on CUDA)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--skip-gpu", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernels.json")
    args = ap.parse_args()
    if not _ops.has_kernel("cpu"):
        print("megatron_grace._C is not built: nothing to compare (python setup.py build_ext --inplace)")
        sys.exit(1)
    dtype = getattr(torch, args.dtype)
    report: dict = {"torch": torch.__version__, "cpu": [], "cuda": []}
    start = time.time()
    if not args.skip_cpu:
        for T in args.tokens:
            res = bench_device("cpu", T, args.hidden or 1024, dtype, args.repeats)
            report["cpu"].append(res)
            _print(res)
    if not args.skip_gpu and torch.cuda.is_available() and _ops.has_kernel("cuda"):
        for T in args.gpu_tokens:
            res = bench_device("cuda", T, args.hidden or 4096, dtype, args.repeats)
            report["cuda"].append(res)
            _print(res)
    elif not args.skip_gpu:
        print("CUDA part skipped (no CUDA device or no CUDA kernels built)")
    report["wall_s"] = time.time() - start
    save_result_json(args.out, report)
    if os.environ.get("OUT"):
        save_result_json(Path(os.environ["OUT"]) / "kernels.json", report)
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    if not all(op["identical"] for res in report["cpu"] + report["cuda"] for op in res["ops"].values()):
        print("ERROR: a compiled op differs from its pure-torch reference")
        sys.exit(2)


if __name__ == "__main__":
    main()
