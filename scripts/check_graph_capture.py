#!/usr/bin/env python
"""Check that the GRACE decode step is a static graph: fullgraph compile on CPU, CUDA-graph capture on a GPU.

CPU (always): a one-rank gloo group (so the step runs without collectives), a GRACE layer with
decode options; its static forward (copy choice, dispatch, grouped experts, combine, load
predictor update) is compiled with ``torch.compile(fullgraph=True)`` in bf16 (``torch._grouped_mm``)
and float32 (the padded-batch fallback) and compared with eager. Also the ``grace`` copy choice
on a replicated h200-4x8 plan (the part that only has work to do with replicas) compiles alone.

CUDA (when a GPU is there): a one-rank NCCL group, the Qwen3-30B-A3B layer shape (hidden 2048,
expert ffn 768, 128 experts, top-8, bf16, 256 tokens); the static step captured with
:class:`megatron_grace.layer.decode_graph.DecodeGraph` and replayed must equal eager output; the
static forward runs under ``torch.cuda.set_sync_debug_mode("error")`` (any host sync raises);
the grace copy choice on the replicated plan is captured and replayed too.

Exit status 0 when every check passes, 1 otherwise. ``--json F`` writes the results.

Usage: python scripts/check_graph_capture.py [--device auto|cpu|cuda] [--tokens 256] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

from megatron_grace.dispatch.static import DecodeOptions
from megatron_grace.layer.grace_moe import GraceMoELayer
from megatron_grace.layer.reference import random_expert_weights
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.plan.topology import Topology


def one_gpu_plan(num_experts: int) -> PlacementPlan:
    """All experts on one GPU (a one-rank expert-parallel group)."""
    base = Topology.preset("h200-4x8")
    topo = Topology(name="1x1", num_nodes=1, gpus_per_node=1, intra_node=base.intra_node, inter_node=base.inter_node,
                    gpu_flops=base.gpu_flops)
    return PlacementPlan(topo, num_experts, [[list(range(num_experts))]])


def replicated_table(device: torch.device):
    """A ReplicaTable of an eplb plan of the bundled Qwen3 statistics on h200-4x8 with one extra slot per GPU (layer 0)."""
    from megatron_grace.data import load_bundled_stats
    from megatron_grace.plan.planners import plan_placement
    from megatron_grace.routing import ReplicaTable

    stats = load_bundled_stats()
    plan = plan_placement(stats, Topology.preset("h200-4x8").with_extra_slots(stats.num_experts, 1), "eplb")
    return ReplicaTable.from_plan(plan, 0, device=device), stats.num_experts


def batch(tokens: int, num_experts: int, k: int, hidden: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    ids = torch.argsort(torch.rand(tokens, num_experts, generator=g), dim=1)[:, :k].to(device)
    w = torch.softmax(torch.randn(tokens, k, generator=g), dim=1).to(device)
    return x, ids, w


def build_layer(num_experts: int, hidden: int, ffn: int, dtype: torch.dtype, device: torch.device, max_tokens: int) -> GraceMoELayer:
    weights = random_expert_weights(num_experts, hidden, ffn, seed=1, dtype=dtype)
    return GraceMoELayer.from_full_weights(one_gpu_plan(num_experts), 0, weights, hidden_size=hidden, ffn_size=ffn, dtype=dtype,
                                           device=device, decode=DecodeOptions(max_tokens=max_tokens, capacity_factor=1.0))


def check_cpu(tokens: int) -> dict:
    results = {}
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float32, 1e-5)):
        name = f"cpu_fullgraph_{str(dtype).split('.')[-1]}"
        try:
            E, k, h, f = 16, 4, 64, 32
            layer = build_layer(E, h, f, dtype, torch.device("cpu"), tokens)
            x, ids, w = batch(tokens, E, k, h, dtype, torch.device("cpu"))
            eager = layer(x, ids, w, static=True)
            torch._dynamo.reset()
            compiled = torch.compile(lambda a, b, c: layer(a, b, c, static=True), fullgraph=True)
            t0 = time.perf_counter()
            out = compiled(x, ids, w)
            err = float((out.float() - eager.float()).norm() / eager.float().norm().clamp(min=1e-12))
            results[name] = {"ok": err <= tol, "rel_err": err, "compile_s": round(time.perf_counter() - t0, 1)}
        except Exception as exc:  # noqa: BLE001 - a graph break or failure is the finding
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    try:
        from megatron_grace.routing import choose_copies

        table, E = replicated_table(torch.device("cpu"))
        _, ids, _ = batch(tokens, E, 8, 8, torch.float32, torch.device("cpu"))
        pred = torch.rand(table.num_gpus, dtype=torch.float64) * 100
        step = torch.tensor(3)
        eager = choose_copies("grace", ids, 5, table, pred, step=step)
        torch._dynamo.reset()
        compiled = torch.compile(lambda i, p, s: choose_copies("grace", i, 5, table, p, step=s), fullgraph=True)
        results["cpu_fullgraph_grace_choice"] = {"ok": bool(torch.equal(compiled(ids, pred, step), eager))}
    except Exception as exc:  # noqa: BLE001
        results["cpu_fullgraph_grace_choice"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    return results


def check_cuda(tokens: int) -> dict:
    from megatron_grace.layer.decode_graph import DecodeGraph
    from megatron_grace.routing import choose_copies

    dev = torch.device("cuda", torch.cuda.current_device())
    results = {}
    E, k, h, f = 128, 8, 2048, 768
    try:
        layer = build_layer(E, h, f, torch.bfloat16, dev, tokens)
        x, ids, w = batch(tokens, E, k, h, torch.bfloat16, dev)
        eager = layer(x, ids, w, static=True).clone()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x, ids, w, static=True)
            results["cuda_static_no_sync"] = {"ok": True}
        except RuntimeError as exc:
            results["cuda_static_no_sync"] = {"ok": False, "error": str(exc).splitlines()[0][:300]}
        finally:
            torch.cuda.set_sync_debug_mode(0)
        graph = DecodeGraph(lambda a, b, c: layer(a, b, c), [x, ids, w], [layer])
        out = graph(x, ids, w).clone()
        results["cuda_graph_replay_equal"] = {"ok": bool(torch.equal(out, eager)), "max_abs_diff": float((out.float() - eager.float()).abs().max()),
                                              "fallbacks": graph.fallbacks}
        # timing: eager static vs replay
        for name, fn in (("eager_static", lambda: layer(x, ids, w, static=True)), ("graph_replay", lambda: graph.replay(x, ids, w))):
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                fn()
            end.record()
            torch.cuda.synchronize()
            results.setdefault("cuda_decode_step_ms", {})[name] = start.elapsed_time(end) / 20
    except Exception as exc:  # noqa: BLE001
        results["cuda_layer"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500], "trace": traceback.format_exc()[-2000:]}
    try:
        table, E = replicated_table(dev)
        _, ids, _ = batch(tokens, E, 8, 8, torch.float32, dev)
        pred = (torch.rand(table.num_gpus, dtype=torch.float64) * 100).to(dev)
        step = torch.tensor(3, device=dev)
        eager = choose_copies("grace", ids, 5, table, pred, step=step)
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            choose_copies("grace", ids, 5, table, pred, step=step)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            captured = choose_copies("grace", ids, 5, table, pred, step=step)
        g.replay()
        torch.cuda.synchronize()
        results["cuda_graph_grace_choice"] = {"ok": bool(torch.equal(captured, eager))}
    except Exception as exc:  # noqa: BLE001
        results["cuda_graph_grace_choice"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        print("check_graph_capture: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from megatron_grace.layer.launch import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=0, world_size=1)
    try:
        results = check_cpu(min(args.tokens, 64))
        if use_cuda:
            results.update(check_cuda(args.tokens))
        else:
            results["cuda"] = "not measured (no CUDA device)"
    finally:
        dist.destroy_process_group()
    ok = all(v.get("ok", True) for v in results.values() if isinstance(v, dict))
    for name, v in results.items():
        print(f"{name:<28} {json.dumps(v)}")
    print("check_graph_capture:", "PASS" if ok else "FAIL")
    if args.json:
        from megatron_grace._provenance import save_result_json

        save_result_json(args.json, {"ok": ok, "results": results})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
