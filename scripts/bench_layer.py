#!/usr/bin/env python
"""Benchmark the GRACE MoE layer on CPU ranks (gloo): flat vs hierarchical dispatch, per plan.

A small Qwen3-30B-A3B-shaped MoE layer (hidden 256, expert FFN 128, 128 experts, top-8) runs on
4 and 8 CPU ranks laid out as 2 nodes x (world / 2) GPUs. Routing is replayed from a trace
(``--trace``, a ``grace-trace/1`` .npz; its first half is profiled for the planners, the second
half is replayed) or synthesized from the bundled Qwen3-30B-A3B statistics of the chosen layers
with ``megatron_grace.trace.synthesis.synthesize_trace`` (load and co-activation matched); if
that is unavailable (or ``--routing simple``), a simple skewed generator: a seed expert per token
drawn by load, the other k-1 drawn without replacement with weights ``load * lift(seed, .)``.

Plans ``vanilla``, ``eplb`` and ``grace`` come from ``megatron_grace.plan.planners.plan_placement``
(a contiguous plan when the planner is unavailable or fails; the JSON says so), with
``ceil(E / G) + extra`` slots per GPU. For every (plan, policy, dispatch mode) it measures:

- time per layer forward (median over steps of the slowest rank's time);
- the time spent before the first all-to-all (replica choice = ``route``, plus sorting and
  gathering = ``permute_pre``) as a fraction of the layer time, and the other phases;
- bytes and hidden rows sent per link type (same GPU / intra-node / inter-node) per layer-step,
  summed over ranks, from the layer's counters;
- the received-pairs imbalance (max / mean over GPUs).

On 2 CPU cores the absolute times mostly measure oversubscription (8 ranks share 2 cores and all
links are loopback); the bytes per link type and the relative cost of routing are the portable
numbers. Results: a table on stdout and ``benchmarks/results/layer_cpu.json``.

    python scripts/bench_layer.py                     # 4 and 8 ranks, synthetic routing
    python scripts/bench_layer.py --world 4 --steps 3 --trace path/to/trace.npz
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, FFN, EXPERTS, TOP_K = 256, 128, 128, 8


# ============================================================================ routing data
def synthetic_ids(num_tokens: int, layers: list[int], seed: int, lift_weight: float = 1.0) -> tuple[np.ndarray, str]:
    """int32 ``[T, L, 8]`` skewed top-8 choices over 128 experts; returns (ids, description)."""
    rng = np.random.default_rng(seed)
    try:
        from megatron_grace.data import load_bundled_stats

        stats = load_bundled_stats()
        load = stats.load[layers]
        lift = np.nan_to_num(stats.lift()[layers], nan=1.0)
        source = f"synthetic, load and lift of Qwen3-30B-A3B layers {layers}"
    except Exception as exc:  # noqa: BLE001 - bundled data missing: plain Zipf skew
        load = np.stack([np.random.default_rng(seed + l).permutation(1.0 / np.arange(1, EXPERTS + 1)) for l in layers])
        lift = np.ones((len(layers), EXPERTS, EXPERTS))
        source = f"synthetic Zipf(1) skew ({type(exc).__name__}: bundled statistics unavailable)"
    ids = np.zeros((num_tokens, len(layers), TOP_K), dtype=np.int32)
    for i in range(len(layers)):
        p = load[i] / load[i].sum() + 1e-6
        p /= p.sum()
        seed_expert = rng.choice(EXPERTS, size=num_tokens, p=p)
        scores = np.log(p)[None, :] + lift_weight * np.log(np.maximum(lift[i][seed_expert], 1.0)) + rng.gumbel(size=(num_tokens, EXPERTS))
        scores[np.arange(num_tokens), seed_expert] = np.inf
        ids[:, i] = np.argsort(-scores, axis=1)[:, :TOP_K]
    return ids, source


def load_routing(args: argparse.Namespace) -> dict[str, Any]:
    """Profile and replay routing: ``{profile_ids [Tp, L, k], replay_ids [Tr, L, k], replay_weights, num_experts, source}``."""
    from megatron_grace.trace.routing_trace import RoutingTrace

    if args.trace:
        trace = RoutingTrace.read(args.trace)
        layers = [l for l in args.trace_layers if l < trace.num_layers] or list(range(min(2, trace.num_layers)))
        trace = RoutingTrace(expert_ids=trace.expert_ids[:, layers], num_experts=trace.num_experts,
                             gate_weights=None if trace.gate_weights is None else trace.gate_weights[:, layers], model=trace.model,
                             source=trace.source)
        source = f"trace {args.trace} layers {layers}"
    else:
        needed = max(2 * args.steps_total * max(args.world) * args.tokens, 4096)
        trace = None
        if args.routing == "synthesis":
            try:
                from megatron_grace.data import load_bundled_stats
                from megatron_grace.trace.synthesis import synthesize_trace

                trace = synthesize_trace(load_bundled_stats().select_layers(args.qwen_layers), needed, seed=args.seed)
                source = f"synthesize_trace from the Qwen3-30B-A3B statistics of layers {args.qwen_layers}"
            except Exception as exc:  # noqa: BLE001 - synthesis module absent or failing: simple generator
                print(f"trace synthesis unavailable ({type(exc).__name__}: {exc}); using the simple generator", flush=True)
        if trace is None:
            ids, source = synthetic_ids(needed, args.qwen_layers, args.seed)
            trace = RoutingTrace(expert_ids=ids, num_experts=EXPERTS, model="qwen3-30b-a3b-shaped", source=source)
    profile, replay = trace.split(0.5)
    weights = replay.gate_weights
    if weights is None:
        logits = np.random.default_rng(args.seed + 1).standard_normal(replay.expert_ids.shape)
        weights = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    return {"profile": profile, "replay_ids": replay.expert_ids.astype(np.int64), "replay_weights": weights.astype(np.float32),
            "num_experts": trace.num_experts, "top_k": trace.top_k, "source": source}


def make_plans(profile, world: int, planners: list[str], extra_slots: int) -> dict[str, tuple[dict, str]]:
    """Plan name -> (plan dict, how it was made) for a 2 x (world/2) topology."""
    from megatron_grace.plan.placement import PlacementPlan
    from megatron_grace.plan.topology import Topology
    from megatron_grace.statistics.expert_stats import ExpertStats

    nodes = 2 if world % 2 == 0 and world > 1 else 1
    base = Topology.preset("a100-2x4")
    topo = dataclasses.replace(base, name=f"cpu-{nodes}x{world // nodes}", num_nodes=nodes, gpus_per_node=world // nodes)
    E = profile.num_experts
    topo = topo.with_extra_slots(E, extra_slots)
    stats = ExpertStats.from_trace(profile)
    out: dict[str, tuple[dict, str]] = {}
    for name in planners:
        try:
            from megatron_grace.plan.planners import plan_placement

            plan = plan_placement(stats, topo, name)
            how = f"plan_placement(planner={name!r})"
        except Exception as exc:  # noqa: BLE001 - planner being written elsewhere: fall back, say so
            G = topo.num_gpus
            layer = [list(range(g * E // G, (g + 1) * E // G)) for g in range(G)]
            plan = PlacementPlan(topo, E, [layer] * stats.num_layers, planner="contiguous-fallback")
            how = f"contiguous fallback ({type(exc).__name__}: {exc})"
        out[name] = (plan.to_dict(), how)
    return out


# ============================================================================ one rank
def rank_main(rank: int, world: int, plans: dict[str, tuple[dict, str]], routing: dict[str, Any], args: dict[str, Any]) -> list[dict]:
    """Run every configuration on this rank; rank 0 returns the summaries."""
    import torch
    import torch.distributed as dist

    from megatron_grace.experts import SlotExperts
    from megatron_grace.layer import LINK_TYPES, GraceMoELayer, random_expert_weights
    from megatron_grace.plan.placement import PlacementPlan

    E, k = routing["num_experts"], routing["top_k"]
    L = routing["replay_ids"].shape[1]
    T = args["tokens"]
    weights = random_expert_weights(E, HIDDEN, FFN, seed=args["seed"])
    x = torch.randn(T, HIDDEN, generator=torch.Generator().manual_seed(1000 + rank))
    ids_all, w_all = routing["replay_ids"], routing["replay_weights"]

    def batch(step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = (np.arange(T) + (step * world + rank) * T) % ids_all.shape[0]
        return torch.from_numpy(ids_all[rows, layer]), torch.from_numpy(w_all[rows, layer])

    summaries = []
    for plan_name, (plan_dict, how) in plans.items():
        plan = PlacementPlan.from_dict(plan_dict)
        experts = [SlotExperts.from_full_weights(plan.gpu_experts[l][rank], weights, HIDDEN, FFN) for l in range(L)]
        has_copies = plan.max_copies > 1
        policies = [p for p in args["policies"] if has_copies or p == "primary"] or ["primary"]
        for policy in policies:
            for mode in args["modes"]:
                layers = [GraceMoELayer(plan, l, experts[l], policy=policy, dispatch=mode, num_experts=E, counters=True, timing=True)
                          for l in range(L)]
                step_times, phase_sum = [], {}
                link_bytes = {kind: np.zeros(3) for kind in ("dispatch", "combine", "meta")}
                link_rows = np.zeros(3)
                imbalance = []
                for step in range(args["warmup"] + args["steps"]):
                    inputs = [batch(step, l) for l in range(L)]
                    dist.barrier()
                    t0 = time.perf_counter()
                    for l, layer in enumerate(layers):
                        layer(x, *inputs[l])
                    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                    if step < args["warmup"]:
                        continue
                    step_times.append(float(elapsed) / L)
                    for layer in layers:
                        c = layer.last_counters
                        for name, v in c.times.items():
                            phase_sum[name] = phase_sum.get(name, 0.0) + v
                        for kind in link_bytes:
                            link_bytes[kind] += np.array([c.kind_bytes_sent_by_link(kind)[t] for t in LINK_TYPES], dtype=np.float64)
                        link_rows += np.array([c.rows_sent_by_link[t] for t in LINK_TYPES], dtype=np.float64)
                        recv = torch.tensor([float(c.slot_load.sum())], dtype=torch.float64)
                        gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
                        dist.all_gather(gathered, recv)
                        loads = torch.cat(gathered)
                        imbalance.append(float(loads.max() / loads.mean().clamp(min=1e-9)))
                n = args["steps"] * L
                names = sorted(phase_sum)
                phases = torch.tensor([phase_sum[p] / n for p in names], dtype=torch.float64)
                dist.all_reduce(phases)  # sum over ranks -> mean below
                traffic = torch.tensor(np.concatenate([link_bytes[kd] for kd in link_bytes] + [link_rows]) / n, dtype=torch.float64)
                dist.all_reduce(traffic)  # summed over ranks: per layer-step totals
                if rank == 0:
                    ph = {p: float(v) / world for p, v in zip(names, phases)}
                    total = ph.get("total", float("nan"))
                    tr = traffic.numpy()
                    by_kind = {kd: {t: float(tr[3 * i + j]) for j, t in enumerate(LINK_TYPES)} for i, kd in enumerate(link_bytes)}
                    all_bytes = {t: sum(by_kind[kd][t] for kd in by_kind) for t in LINK_TYPES}
                    summaries.append({
                        "world": world, "nodes": plan.topology.num_nodes, "gpus_per_node": plan.topology.gpus_per_node,
                        "plan": plan_name, "plan_source": how, "slots_per_gpu": plan.topology.capacity(),
                        "extra_copies": int(plan.copy_count.sum() - plan.num_layers * plan.num_experts),
                        "policy": policy, "mode": mode, "tokens_per_rank": T, "layers": L, "steps": args["steps"],
                        "layer_ms_median": 1e3 * float(np.median(step_times)),
                        "layer_ms_min": 1e3 * float(np.min(step_times)),
                        "phase_ms_mean_over_ranks": {p: 1e3 * v for p, v in ph.items()},
                        "route_frac": ph.get("route", 0.0) / total,
                        "pre_all_to_all_frac": (ph.get("route", 0.0) + ph.get("permute_pre", 0.0)) / total,
                        "comm_frac": ph.get("comm", 0.0) / total,
                        "experts_frac": ph.get("experts", 0.0) / total,
                        "bytes_per_layer_step": {"total": all_bytes, **by_kind},
                        "rows_per_layer_step": {t: float(tr[9 + j]) for j, t in enumerate(LINK_TYPES)},
                        "recv_imbalance_max_over_mean": float(np.mean(imbalance)),
                    })
                del layers
    return summaries


# ============================================================================ launcher
def run_world(world: int, payload: tuple, timeout: float) -> list[dict]:
    """Spawn ``world`` gloo ranks (the package's launcher), return rank 0's summaries."""
    from megatron_grace.layer.launch import run_distributed

    return run_distributed(rank_main, world_size=world, args=payload, timeout=timeout)[0]


# ============================================================================ report
def print_table(rows: list[dict]) -> None:
    head = (f"{'W':>2} {'plan':<8} {'policy':<8} {'mode':<12} {'layer ms':>9} {'pre-a2a':>8} {'route':>6} {'comm':>6} "
            f"{'experts':>7} {'imbal':>6} {'KB same':>8} {'KB intra':>9} {'KB inter':>9} {'inter rows':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        b = r["bytes_per_layer_step"]["total"]
        print(f"{r['world']:>2} {r['plan']:<8} {r['policy']:<8} {r['mode']:<12} {r['layer_ms_median']:>9.2f} "
              f"{100 * r['pre_all_to_all_frac']:>7.1f}% {100 * r['route_frac']:>5.1f}% {100 * r['comm_frac']:>5.1f}% "
              f"{100 * r['experts_frac']:>6.1f}% {r['recv_imbalance_max_over_mean']:>6.2f} {b['same_gpu'] / 1e3:>8.1f} "
              f"{b['intra_node'] / 1e3:>9.1f} {b['inter_node'] / 1e3:>9.1f} {r['rows_per_layer_step']['inter_node']:>10.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, nargs="+", default=[4, 8], help="rank counts (2 nodes x world/2 GPUs)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    ap.add_argument("--steps", type=int, default=5, help="measured steps")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    ap.add_argument("--trace", type=str, default=None, help="replay a grace-trace/1 .npz instead of synthetic routing")
    ap.add_argument("--trace-layers", type=int, nargs="+", default=[0, 1], help="layers of --trace to use")
    ap.add_argument("--qwen-layers", type=int, nargs="+", default=[10, 30], help="Qwen3 layers shaping the synthetic routing")
    ap.add_argument("--routing", choices=("synthesis", "simple"), default="synthesis",
                    help="synthetic routing: trace synthesis from the Qwen3 statistics, or the simple skewed generator")
    ap.add_argument("--planners", nargs="+", default=["vanilla", "eplb", "grace"])
    ap.add_argument("--policies", nargs="+", default=["primary", "random", "grace"],
                    help="replica-choice policies for plans with copies (plans without copies use primary)")
    ap.add_argument("--modes", nargs="+", default=["flat", "hierarchical"])
    ap.add_argument("--extra-slots", type=int, default=2, help="slots per GPU beyond ceil(E/G)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per world size")
    ap.add_argument("--out", type=str, default=str(ROOT / "benchmarks" / "results" / "layer_cpu.json"))
    args = ap.parse_args(argv)
    args.steps_total = args.warmup + args.steps

    from megatron_grace._provenance import save_result_json

    t0 = time.perf_counter()
    routing = load_routing(args)
    print(f"routing: {routing['source']}; {routing['num_experts']} experts, top-{routing['top_k']}, "
          f"{routing['replay_ids'].shape[0]} replay tokens x {routing['replay_ids'].shape[1]} layers", flush=True)
    rows: list[dict] = []
    plan_notes: dict[str, dict[str, str]] = {}
    for world in args.world:
        plans = make_plans(routing["profile"], world, args.planners, args.extra_slots)
        plan_notes[str(world)] = {name: how for name, (_, how) in plans.items()}
        for name, how in plan_notes[str(world)].items():
            print(f"world {world}: plan {name}: {how}", flush=True)
        payload = (plans, {k: routing[k] for k in ("replay_ids", "replay_weights", "num_experts", "top_k")},
                   {"tokens": args.tokens, "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
                    "policies": args.policies, "modes": args.modes})
        t = time.perf_counter()
        rows.extend(run_world(world, payload, args.timeout))
        print(f"world {world}: {time.perf_counter() - t:.1f} s", flush=True)
    print()
    print_table(rows)
    # GRACE's own addition before the all-to-all: its replica choice vs always-primary on the same plan and mode
    extra = []
    for r in rows:
        if r["policy"] == "grace":
            base = [b for b in rows if b["world"] == r["world"] and b["plan"] == r["plan"] and b["mode"] == r["mode"]
                    and b["policy"] == "primary"]
            if base:
                d = r["phase_ms_mean_over_ranks"].get("route", 0) - base[0]["phase_ms_mean_over_ranks"].get("route", 0)
                extra.append({"world": r["world"], "plan": r["plan"], "mode": r["mode"], "grace_route_extra_ms": d,
                              "fraction_of_layer": d / r["phase_ms_mean_over_ranks"]["total"]})
    for e in extra:
        print(f"grace policy vs primary, world {e['world']}, plan {e['plan']}, {e['mode']}: routing +{e['grace_route_extra_ms']:.2f} ms "
              f"= {100 * e['fraction_of_layer']:.1f}% of the layer")
    result = {
        "benchmark": "layer_cpu", "description": "GraceMoELayer forward on gloo CPU ranks (see scripts/bench_layer.py)",
        "model": {"hidden": HIDDEN, "ffn": FFN, "experts": routing["num_experts"], "top_k": routing["top_k"], "activation": "swiglu",
                  "dtype": "float32"},
        "routing_source": routing["source"], "plans": plan_notes,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpus": os.cpu_count(), "threads_per_rank": 1},
        "results": rows, "grace_routing_extra": extra, "wall_s": time.perf_counter() - t0,
    }
    save_result_json(args.out, result)
    print(f"\nwrote {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
