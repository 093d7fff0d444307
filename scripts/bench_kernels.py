"""Benchmark the compiled dispatch kernels against the pure-torch path.

CPU: permute (stable sort by destination + gather into the send buffer) and combine (un-permute +
weighted top-k sum) for 4k/16k/64k tokens x top-8, hidden 2048, float32 and bfloat16, C++ kernels
(``GRACE_OPS=native``) vs pure torch (``GRACE_OPS=torch``). Results: benchmarks/results/kernels_cpu.json.

GPU (only with CUDA): permute and combine at 64k tokens x top-8, hidden 4096, bf16, as a fraction of
the device memory bandwidth measured with a large copy, against torch's index_select / index_add_.
Results: benchmarks/results/kernels_gpu.json (or ``$OUT/kernels_gpu.json`` when ``OUT`` is set).

Usage: python scripts/bench_kernels.py [--tokens 4096 16384 65536] [--repeats 5] [--skip-cpu] [--skip-gpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_grace import _ops  # noqa: E402
from megatron_grace._files import save_json_atomic  # noqa: E402

TOP_K = 8
NUM_DEST = 64  # destination (rank, slot) keys


def _case(T: int, h: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, h, generator=gen).to(dtype).to(device)
    dest = torch.randint(0, NUM_DEST, (T * TOP_K,), generator=gen).to(device)
    token = torch.arange(T).repeat_interleave(TOP_K).to(device)
    choice = torch.arange(TOP_K).repeat(T).to(device)
    weight = torch.rand(T * TOP_K, generator=gen).to(device)
    return x, dest, token, choice, weight


def _permute(x, dest, token):
    order, counts = _ops.sort_by_key(dest, NUM_DEST)
    return _ops.gather_rows(x, token, order), order


def _combine(y, order, token, choice, weight, T):
    back = _ops.scatter_rows(y, order)  # to pair order
    return _ops.weighted_combine(back, token, choice, weight, T, TOP_K, y.dtype)


def _time(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_cpu(tokens: list[int], repeats: int, hidden: int = 2048) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for T in tokens:
            x, dest, token, choice, weight = _case(T, hidden, dtype, "cpu")
            res = {"tokens": T, "top_k": TOP_K, "hidden": hidden, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()}
            outs = {}
            for mode in ("torch", "native"):
                os.environ["GRACE_OPS"] = mode
                y, order = _permute(x, dest, token)
                outs[mode] = _combine(y, order, token, choice, weight, T)
                res[f"{mode}_permute_ms"] = 1e3 * _time(lambda: _permute(x, dest, token), repeats)
                res[f"{mode}_combine_ms"] = 1e3 * _time(lambda: _combine(y, order, token, choice, weight, T), repeats)
                del y
            res["identical"] = bool(torch.equal(outs["torch"], outs["native"]))
            for part in ("permute", "combine"):
                res[f"speedup_{part}"] = res[f"torch_{part}_ms"] / res[f"native_{part}_ms"]
            res["speedup_total"] = (res["torch_permute_ms"] + res["torch_combine_ms"]) / (res["native_permute_ms"] + res["native_combine_ms"])
            rows.append(res)
            print(f"{res['dtype']:>9} {T:>6} | permute torch {res['torch_permute_ms']:8.1f} ms  C++ {res['native_permute_ms']:8.1f} ms "
                  f"({res['speedup_permute']:4.1f}x) | combine torch {res['torch_combine_ms']:8.1f} ms  C++ {res['native_combine_ms']:8.1f} ms "
                  f"({res['speedup_combine']:4.1f}x) | total {res['speedup_total']:4.1f}x | identical {res['identical']}", flush=True)
            del x
    os.environ.pop("GRACE_OPS", None)
    return rows


def bench_gpu(repeats: int, T: int = 65536, hidden: int = 4096) -> dict:
    dev = "cuda"
    sync = torch.cuda.synchronize
    big = torch.empty(1 << 30, dtype=torch.uint8, device=dev)  # 1 GiB copy: read + write
    dst = torch.empty_like(big)
    t = _time(lambda: dst.copy_(big), repeats, sync)
    bandwidth = 2 * big.numel() / t
    del big, dst
    x, dest, token, choice, weight = _case(T, hidden, torch.bfloat16, dev)
    row_bytes = hidden * 2
    n = T * TOP_K
    os.environ["GRACE_OPS"] = "native"
    order, _ = _ops.sort_by_key(dest, NUM_DEST)
    y = _ops.gather_rows(x, token, order)
    res = {"tokens": T, "top_k": TOP_K, "hidden": hidden, "dtype": "bfloat16", "copy_bandwidth_GBps": bandwidth / 1e9,
           "device": torch.cuda.get_device_name()}
    # permute: read n rows, write n rows; combine: read n rows (+ un-permute read/write n rows), write T rows
    t_gather = _time(lambda: _ops.gather_rows(x, token, order), repeats, sync)
    t_sort = _time(lambda: _ops.sort_by_key(dest, NUM_DEST), repeats, sync)
    t_comb = _time(lambda: _ops.weighted_combine(y, token[order], choice[order], weight[order], T, TOP_K, y.dtype), repeats, sync)
    idx = token[order]
    t_ref_gather = _time(lambda: x.index_select(0, idx), repeats, sync)

    def ref_combine():
        out = torch.zeros(T, hidden, dtype=torch.float32, device=dev)
        out.index_add_(0, idx, y.float() * weight[order][:, None])
        return out.to(torch.bfloat16)

    t_ref_comb = _time(ref_combine, repeats, sync)
    res.update({
        "gather_ms": 1e3 * t_gather, "sort_ms": 1e3 * t_sort, "combine_ms": 1e3 * t_comb,
        "gather_bw_fraction": 2 * n * row_bytes / t_gather / bandwidth,
        "combine_bw_fraction": (n + T) * row_bytes / t_comb / bandwidth,
        "torch_index_select_ms": 1e3 * t_ref_gather, "torch_index_add_combine_ms": 1e3 * t_ref_comb,
        "torch_index_select_bw_fraction": 2 * n * row_bytes / t_ref_gather / bandwidth,
        "torch_index_add_bw_fraction": (n + T) * row_bytes / t_ref_comb / bandwidth,
    })
    os.environ.pop("GRACE_OPS", None)
    for key, val in res.items():
        print(f"  {key:32s} {val:.3f}" if isinstance(val, float) else f"  {key:32s} {val}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--skip-gpu", action="store_true")
    args = ap.parse_args()
    if not _ops.has_kernel("cpu"):
        print("megatron_grace._C is not built: nothing to compare (pip install --no-build-isolation -e .)")
        sys.exit(1)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    if not args.skip_cpu:
        print(f"CPU: permute = sort_by_key + gather_rows; combine = scatter_rows + weighted_combine; top-{TOP_K}, hidden 2048, "
              f"{torch.get_num_threads()} threads")
        rows = bench_cpu(args.tokens, args.repeats)
        save_json_atomic(out_dir / "kernels_cpu.json", {"torch": torch.__version__, "rows": rows})
    if not args.skip_gpu and torch.cuda.is_available() and _ops.has_kernel("cuda"):
        print("GPU:")
        save_json_atomic(out_dir / "kernels_gpu.json", {"torch": torch.__version__, **bench_gpu(args.repeats)})
    elif not args.skip_gpu:
        print("GPU part skipped (no CUDA device or no CUDA kernels built)")


if __name__ == "__main__":
    main()
