#!/usr/bin/env python
"""Benchmark: locality-aware replica routing against the other policies and the LP optimum.

For Qwen3-30B-A3B (trace synthesized from its real statistics; plan on the first half,
measure on the second) and Mixtral-8x7B (real per-token ids, from ../shared/traces when
present), on ``a100-2x4`` and ``h200-4x8``, with the ``grace`` and ``eplb`` plans at 1 and 2
extra slots per GPU, the measurement tokens are replayed in batches (decode: 64/256/1024
tokens per GPU; prefill: 4096 per GPU), token i of a batch on GPU i mod G. For every batch
and layer, each policy picks copies; the simulator's counter turns the decisions into
cross-node and cross-GPU pairs, max/mean GPU load and modelled layer time (flat
dispatch), and the LP (:mod:`megatron_grace.routing.optimal`) gives the optimum of the same
time model. The ``grace`` policy runs with the EMA load predictor updated after every batch
(one predictor for the whole cluster: the ``sync_every=1`` case); ``grace-static`` uses the
paper's static prediction and ``grace-oracle`` the true expert counts of the batch.

A second table times the ``grace`` policy on 16k tokens x top-8 (h200-4x8, 32 GPUs, 128
experts) against ``torch.topk`` of the same batch and against the modelled layer time.

Usage: python scripts/bench_routing.py [--layers N] [--batches N] [--quick]
Writes benchmarks/results/routing.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_grace._provenance import save_result_json  # noqa: E402
from megatron_grace.data import load_bundled_stats  # noqa: E402
from megatron_grace.plan.planners import plan_placement  # noqa: E402
from megatron_grace.plan.topology import ModelShape, Topology  # noqa: E402
from megatron_grace.routing import LoadPredictor, ReplicaTable, choose_copies, copy_destinations, static_gpu_load  # noqa: E402
from megatron_grace.routing.optimal import optimal_assignment  # noqa: E402
from megatron_grace.simulation.simulator import count_decisions  # noqa: E402
from megatron_grace.statistics.expert_stats import ExpertStats  # noqa: E402
from megatron_grace.trace.routing_trace import RoutingTrace  # noqa: E402
from megatron_grace.trace.synthesis import synthesize_trace  # noqa: E402

SHARED = ROOT.parent / "shared" / "traces"
POLICIES = ("primary", "random", "position", "static-local", "grace-static", "grace", "grace-oracle")


def datasets(qwen_tokens: int) -> list[tuple[str, RoutingTrace, RoutingTrace, ModelShape]]:
    """(name, planning half, measurement half, model shape)."""
    out = []
    stats = load_bundled_stats()
    trace = synthesize_trace(stats, qwen_tokens, seed=0, progress=True)
    plan_half, measure_half = trace.split(0.5)
    out.append(("qwen3-30b-a3b", plan_half, measure_half, ModelShape.preset("qwen3-30b-a3b")))
    mixtral = SHARED / "mixtral-8x7b" / "mixtral8x7b_fp8_decode_routing.npz"
    if mixtral.exists():
        from megatron_grace.trace.importers import import_mixtral_npz

        mt = import_mixtral_npz(mixtral).complete_tokens()
        a, b = mt.split(0.5)
        out.append(("mixtral-8x7b", a, b, ModelShape.preset("mixtral-8x7b")))
    else:
        print(f"(Mixtral trace not found at {mixtral}; skipped)")
    return out


def run_config(plan, measure: RoutingTrace, shape: ModelShape, layers: list[int], tokens_per_gpu: int, max_batches: int,
               expert_load: np.ndarray) -> dict:
    topo = plan.topology
    G = topo.num_gpus
    batch = tokens_per_gpu * G
    n_batches = max(1, min(max_batches, measure.num_tokens // batch))
    if measure.num_tokens < batch:
        # fewer measurement tokens than one batch: repeat them (stated in the JSON)
        reps = int(np.ceil(batch / measure.num_tokens))
        ids_all = np.tile(measure.expert_ids, (reps, 1, 1))[:batch]
    else:
        ids_all = measure.expert_ids[: n_batches * batch]
    src = np.arange(batch) % G
    acc = {p: {"inter": 0.0, "intra": 0.0, "local": 0.0, "imb": [], "time": 0.0} for p in POLICIES}
    acc["optimal"] = {"inter": 0.0, "intra": 0.0, "imb": [], "time": 0.0}
    pred_err = {"grace-static": [], "grace": []}
    predictors = {"grace": LoadPredictor(plan, expert_load=expert_load, alpha=0.25),
                  "grace-static": LoadPredictor(plan, expert_load=expert_load, mode="static")}
    tables = {l: ReplicaTable.from_plan(plan, l) for l in layers}
    for b in range(n_batches):
        ids_b = ids_all[b * batch:(b + 1) * batch]
        for policy in POLICIES:
            decisions = np.full((batch, len(layers), ids_b.shape[2]), -1, dtype=np.int32)
            for li, layer in enumerate(layers):
                ids = torch.from_numpy(ids_b[:, layer, :].astype(np.int64))
                table = tables[layer]
                pairs = int((ids >= 0).sum())
                if policy == "grace-oracle":
                    counts = np.bincount(ids[ids >= 0].numpy(), minlength=plan.num_experts)[None, :].repeat(plan.num_layers, 0)
                    pred = torch.from_numpy(static_gpu_load(plan, counts.astype(np.float64))[layer])
                    name = "grace"
                elif policy in predictors:
                    pred = predictors[policy].predict(layer, pairs)
                    name = "grace"
                else:
                    pred, name = None, policy
                copy = choose_copies(name, ids, torch.from_numpy(src), table, predicted_load=pred, step=b, seed=b)
                gpu, _ = copy_destinations(ids, copy, table)
                decisions[:, li, :] = gpu.numpy()
                if policy in predictors:
                    observed = np.bincount(gpu[gpu >= 0].numpy(), minlength=G).astype(np.float64)
                    share = observed / max(observed.sum(), 1)
                    pred_err[policy].append(float(np.abs(pred.numpy() / max(pairs, 1) - share).sum() / 2))
                    predictors[policy].observe(observed, layer=layer)
            res = count_decisions(decisions, src, topo, shape, dispatch="flat")
            a = acc[policy]
            a["inter"] += res.pairs_inter_node.sum()
            a["intra"] += res.pairs_intra_node.sum()
            a["local"] += res.pairs_local.sum()
            a["imb"] += res.load_imbalance.tolist()
            a["time"] += res.modes["flat"].layer_s.sum()
        for p in predictors.values():
            p.end_step()
        for layer in layers:
            opt = optimal_assignment(ids_b[:, layer, :], src, plan.expert_gpus[layer], topo, shape)
            o = acc["optimal"]
            o["inter"] += opt.inter_node_pairs
            o["intra"] += opt.intra_node_pairs
            o["imb"].append(float(opt.gpu_load.max() / max(opt.gpu_load.mean(), 1e-12)))
            o["time"] += opt.layer_s
    out = {"batches": n_batches, "batch_tokens": batch, "repeated_tokens": measure.num_tokens < batch}
    for p, a in acc.items():
        out[p] = {"cross_node_pairs": float(a["inter"]), "cross_gpu_pairs": float(a["inter"] + a["intra"]),
                  "max_over_mean": float(np.mean(a["imb"])), "layer_ms": float(a["time"] * 1e3 / n_batches)}
    for p, errs in pred_err.items():
        out[p]["prediction_tv_error"] = float(np.mean(errs)) if errs else None
    return out


def overhead_table() -> list[dict]:
    """CPU time of the grace policy for one rank's 16k tokens x top-8 vs topk, and vs the modelled layer time.

    The modelled layer time is that of a step in which every one of the 32 GPUs of h200-4x8
    holds 16,384 tokens (the ranks run the policy in parallel, each on its own tokens).
    """
    stats = load_bundled_stats()
    topo = Topology.preset("h200-4x8").with_extra_slots(stats.num_experts, 1)
    plan = plan_placement(stats, topo, "grace")
    shape = ModelShape.preset("qwen3-30b-a3b")
    per_rank = 16384
    trace = synthesize_trace(stats.select_layers([0]), per_rank, seed=1)
    ids = torch.from_numpy(trace.expert_ids[:, 0, :].astype(np.int64))
    table = ReplicaTable.from_plan(plan, 0)
    pred = torch.from_numpy(static_gpu_load(plan)[0])
    logits = torch.randn(per_rank, stats.num_experts)
    rows = []
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        for name, fn in (("grace policy", lambda: choose_copies("grace", ids, 5, table, predicted_load=pred)),
                         ("torch.topk (router)", lambda: torch.topk(logits, 8, dim=1))):
            fn()
            reps = 20
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            sec = (time.perf_counter() - t0) / reps
            rows.append({"what": name, "threads": threads, "ms": sec * 1e3, "ns_per_pair": sec / ids.numel() * 1e9})
    G = topo.num_gpus
    all_ids = ids.repeat(G, 1)  # every GPU holds the same 16k tokens' routing (statistically like the real mix)
    src = torch.arange(G).repeat_interleave(per_rank)
    copy = choose_copies("grace", all_ids, src, table, predicted_load=pred)
    gpu, _ = copy_destinations(all_ids, copy, table)
    res = count_decisions(gpu.numpy()[:, None, :], src.numpy(), topo, shape, dispatch="both")
    for r in rows:
        for mode in ("flat", "hierarchical"):
            layer_ms = float(res.modes[mode].layer_s.sum() * 1e3)
            r[f"modelled_layer_ms_{mode}"] = layer_ms
            r[f"share_of_layer_{mode}"] = r["ms"] / layer_ms
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6, help="layers measured (spread evenly; default 6)")
    ap.add_argument("--batches", type=int, default=3, help="batches per configuration (default 3)")
    ap.add_argument("--tokens", type=int, default=100_000, help="Qwen3 tokens to synthesize (default 100000)")
    ap.add_argument("--quick", action="store_true", help="one topology, one budget, two batch sizes")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "routing.json")
    args = ap.parse_args()
    results = {"command": " ".join(sys.argv), "configs": []}
    topologies = ("a100-2x4",) if args.quick else ("a100-2x4", "h200-4x8")
    budgets = (1,) if args.quick else (1, 2)
    batch_sizes = (("decode", 64), ("decode", 1024)) if args.quick else (("decode", 64), ("decode", 256), ("decode", 1024), ("prefill", 4096))
    header = (f"{'model':<14}{'topo':<10}{'plan':<6}{'+s':>3}{'phase':>8}{'tok/GPU':>8} {'policy':<13}{'x-node':>10}{'x-GPU':>10}"
              f"{'max/mean':>9}{'layer ms':>10}{'vs opt':>8}")
    print(header)
    print("-" * len(header))
    for name, plan_half, measure, shape in datasets(args.tokens):
        stats = ExpertStats.from_trace(plan_half)
        layers = sorted({int(round(x)) for x in np.linspace(0, stats.num_layers - 1, min(args.layers, stats.num_layers))})
        for topo_name in topologies:
            for extra in budgets:
                base = Topology.preset(topo_name)
                topo = base.with_extra_slots(stats.num_experts, extra)
                for planner in ("grace", "eplb"):
                    plan = plan_placement(stats, topo, planner)
                    for phase, per_gpu in batch_sizes:
                        cfg = run_config(plan, measure, shape, layers, per_gpu, args.batches, stats.load)
                        cfg.update({"model": name, "topology": topo_name, "planner": planner, "extra_slots": extra, "phase": phase,
                                    "tokens_per_gpu": per_gpu, "layers": layers})
                        results["configs"].append(cfg)
                        opt = cfg["optimal"]["layer_ms"]
                        for p in (*POLICIES, "optimal"):
                            r = cfg[p]
                            print(f"{name:<14}{topo_name:<10}{planner:<6}{extra:>3}{phase:>8}{per_gpu:>8} {p:<13}{r['cross_node_pairs']:>10.0f}"
                                  f"{r['cross_gpu_pairs']:>10.0f}{r['max_over_mean']:>9.3f}{r['layer_ms']:>10.3f}{r['layer_ms'] / opt:>8.3f}")
                        sys.stdout.flush()
    print("\nOverhead of the grace policy (one rank: 16384 tokens x top-8, 128 experts; step: 16384 tokens on each of the 32 GPUs of h200-4x8, grace plan +1 slot):")
    rows = overhead_table()
    for r in rows:
        print(f"  {r['what']:<20} threads={r['threads']}  {r['ms']:.2f} ms  {r['ns_per_pair']:.1f} ns/pair  "
              f"{r['share_of_layer_flat']:.1%} of the modelled flat layer time ({r['modelled_layer_ms_flat']:.3f} ms), "
              f"{r['share_of_layer_hierarchical']:.1%} of the hierarchical one ({r['modelled_layer_ms_hierarchical']:.3f} ms)")
    results["overhead"] = rows
    save_result_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
