#!/usr/bin/env python
"""One GRACE MoE layer on one device, against the expert math alone and Megatron-Core's MoELayer.

Rows (same tokens, same weights, one run):

- ``expert_math``: the experts alone on tokens already grouped by expert, as one grouped GEMM
  per projection (gate/up fused): :class:`megatron_grace.experts.SlotExperts` (``torch._grouped_mm``
  where supported) — the floor a layer can approach;
- ``grace_dynamic``: :class:`~megatron_grace.layer.GraceMoELayer` forward, dynamic path (copy choice,
  permutation, all-to-all of a one-rank group, experts, fused un-permute + weighted combine,
  load-predictor update);
- ``grace_static``: the static (decode) path, eager;
- ``grace_graph``: the static path replayed as a CUDA graph (CUDA only);
- ``megatron_moe``: Megatron-Core's ``MoELayer`` (``SequentialMLP``, alltoall dispatcher, EP 1;
  router included) when megatron-core is importable, and ``grace_plus_router``: Megatron's router
  then the GRACE dynamic path, the same work (the speed-up vs Megatron is taken against this row).

Host synchronisations per forward are counted with ``torch.cuda.set_sync_debug_mode("warn")`` on a
GPU, and on a CPU with :class:`megatron_grace._sync_audit.SyncAudit` (aten calls that would sync
on a GPU) plus the dispatch's intended device-to-host copies.

Defaults: on CUDA the Qwen3-30B-A3B shape (hidden 2048, expert ffn 768, 128 experts, top-8,
bf16) at 256 and 4,096 tokens; on CPU a scaled shape (hidden 256, ffn 96, 32 experts, top-8) so
it runs in about a minute on 2 cores. Prints a table and writes JSON
(default ``benchmarks/results/gpu_layer.json`` on CUDA, ``layer_one_device_cpu.json`` on CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from check_graph_capture import batch, build_layer  # noqa: E402

from megatron_grace._sync_audit import SyncAudit, count_host_copies  # noqa: E402


def _one_call_ms(fn, device: torch.device) -> float:
    """Milliseconds of one call of ``fn`` (CUDA events on a GPU, perf_counter on a CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_cases(cases: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Per-call milliseconds of every case after 2 warm-ups, the cases interleaved call by call
    (a burst of load from other processes then hits every case alike, not one case's whole run)."""
    for fn in cases.values():
        for _ in range(2):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(_one_call_ms(fn, device))
    return times


def count_syncs(fn, device: torch.device) -> dict:
    """Host syncs of one call: CUDA's sync debug mode on a GPU; the CPU audit elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return {"cuda_syncs": sum("synchroniz" in str(w.message).lower() for w in caught)}
    with count_host_copies() as copies, SyncAudit() as audit:
        fn()
    return {"hidden_sync_ops": audit.count, "sync_ops": dict(audit.ops), "split_size_copies": copies[0]}


def megatron_layer(E: int, k: int, h: int, f: int, dtype: torch.dtype, layer_weights) -> object | None:
    """Megatron-Core's MoELayer with the same expert weights, or None when megatron-core is missing."""
    try:
        from megatron_grace.adapters.megatron.testing import build_gpt, init_megatron_parallel, moe_layers, small_moe_config
        from megatron_grace.adapters.megatron.weights import expert_matrices, load_expert_state
    except ImportError:
        return None
    try:
        init_megatron_parallel(1)
        cfg = small_moe_config(num_experts=E, top_k=k, hidden_size=h, moe_ffn_hidden_size=f, num_layers=1)
        cfg.params_dtype = dtype
        cfg.bf16 = dtype == torch.bfloat16
        model = build_gpt(cfg)
        moe = moe_layers(model)[0]
        for e, (fc1, fc2) in zip(moe.local_expert_indices, expert_matrices(moe.experts)):
            load_expert_state(fc1, fc2, layer_weights(int(e)), "swiglu")
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return moe.to(dev, dtype).eval()
    except Exception as exc:  # noqa: BLE001 - the baseline is optional; say why it is missing
        print(f"megatron_moe: not measured ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--ffn", type=int, default=None)
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-megatron", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    h = args.hidden or (2048 if cuda else 256)
    f = args.ffn or (768 if cuda else 96)
    E = args.experts or (128 if cuda else 32)
    k = args.topk
    token_list = args.tokens or ([256, 4096] if cuda else [64, 512])
    dtype = torch.bfloat16
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from megatron_grace.layer.launch import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    from megatron_grace.layer.decode_graph import DecodeGraph
    from megatron_grace.layer.reference import random_expert_weights

    rows = []
    meg = None if args.no_megatron else megatron_layer(E, k, h, f, dtype, random_expert_weights(E, h, f, seed=1, dtype=dtype))
    for T in token_list:
        layer = build_layer(E, h, f, dtype, dev, T)
        x, ids, w = batch(T, E, k, h, dtype, dev)
        # the expert math alone: rows grouped by expert, counts on the device
        order = torch.argsort(ids.reshape(-1), stable=True)
        grouped = x.index_select(0, order // k)
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        cases = {
            "expert_math": lambda: layer.experts(grouped, counts, T * k),
            "grace_dynamic": lambda: layer(x, ids, w, static=False),
            "grace_static": lambda: layer(x, ids, w, static=True),
        }
        if cuda:
            graph = DecodeGraph(lambda a, b, c: layer(a, b, c), [x, ids, w], [layer])
            cases["grace_graph"] = lambda: graph.replay(x, ids, w)
        if meg is not None:
            hs = x.reshape(T, 1, h)
            cases["megatron_moe"] = lambda: meg(hs)
            # the same work as Megatron's MoELayer (router, dispatch, experts, combine): its router, then GRACE
            cases["grace_plus_router"] = lambda: (meg.router(hs), layer(x, ids, w, static=False))
        result = {"tokens": T, "device": str(dev), "hidden": h, "ffn": f, "experts": E, "top_k": k, "dtype": str(dtype)}
        with torch.no_grad():
            timings = time_cases(cases, args.repeats, dev)
            for name, fn in cases.items():
                ms = timings[name]
                entry = {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}
                if name.startswith("grace_") and name != "grace_plus_router":  # the router is Megatron's
                    entry.update(count_syncs(fn, dev))
                result[name] = entry
        base = result["expert_math"]["median_ms"]
        for name in cases:
            result[name]["vs_expert_math"] = result[name]["median_ms"] / base
        if "megatron_moe" in result:
            result["grace_speedup_vs_megatron_same_work"] = (result["megatron_moe"]["median_ms"]
                                                            / result["grace_plus_router"]["median_ms"])
        rows.append(result)
    dist.destroy_process_group()
    print(f"device {dev} ({torch.cuda.get_device_name() if cuda else 'CPU'}), hidden {h}, ffn {f}, {E} experts, top-{k}, bf16; "
          f"median of {args.repeats}")
    print(f"{'tokens':>7} {'case':<15} {'ms':>9} {'x expert math':>14}  syncs")
    for r in rows:
        for name in ("expert_math", "grace_dynamic", "grace_static", "grace_graph", "grace_plus_router", "megatron_moe"):
            if name in r:
                e = r[name]
                syncs = e.get("cuda_syncs", e.get("hidden_sync_ops", ""))
                extra = f" (+{e['split_size_copies']} split-size copies)" if "split_size_copies" in e else ""
                print(f"{r['tokens']:>7} {name:<15} {e['median_ms']:>9.3f} {e['vs_expert_math']:>14.2f}  {syncs}{extra}")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / ("gpu_layer.json" if cuda else "layer_one_device_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from megatron_grace._provenance import save_result_json

    save_result_json(out, {"rows": rows})  # the command is in its provenance
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
