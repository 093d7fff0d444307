#!/usr/bin/env python
"""Simulator speed: one ``simulate`` call on a 100k-token x 48-layer x top-8 skewed random trace.

128 experts per layer, popularity per layer drawn from a Dirichlet(0.3) (max/mean expert load
about 4-6x, like Qwen3-30B-A3B). Two plans per cluster: ``contiguous`` (E/G experts per GPU,
no copies: the one-copy fast path of the policy) and ``+2 copies`` (two extra slots per GPU
holding copies of the hottest experts, greedily on the least-loaded GPUs: the full
``grace`` policy, the routing module's code, with the static load prediction). Both dispatch
modes are counted in every call.

Prints a table and writes ``benchmarks/results/simulator_speed.json``. Target: < 10 s per call.

    python scripts/bench_simulator_speed.py [--tokens 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_grace._provenance import save_result_json  # noqa: E402
from megatron_grace.plan.placement import PlacementPlan  # noqa: E402
from megatron_grace.plan.topology import Topology  # noqa: E402
from megatron_grace.simulation import DEFAULT_POLICY, DISPATCH_MODES, simulate  # noqa: E402
from megatron_grace.trace.routing_trace import RoutingTrace  # noqa: E402


def skewed_trace(tokens: int, layers: int, experts: int, k: int, seed: int) -> tuple[RoutingTrace, np.ndarray]:
    """Top-k without replacement from a per-layer Dirichlet popularity (Gumbel top-k); returns the trace and the popularity [L, E]."""
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(experts, 0.3), size=layers)
    ids = np.empty((tokens, layers, k), dtype=np.int32)
    chunk = 20_000
    for layer in range(layers):
        logp = np.log(pop[layer] + 1e-12)
        for start in range(0, tokens, chunk):
            g = rng.gumbel(size=(min(chunk, tokens - start), experts)) + logp
            ids[start:start + chunk, layer] = np.argpartition(-g, k, axis=1)[:, :k]
    return RoutingTrace(ids, experts, model="qwen3-30b-a3b", source="bench_simulator_speed"), pop


def contiguous_plan(topology: Topology, experts: int, layers: int) -> PlacementPlan:
    G = topology.num_gpus
    per = -(-experts // G)
    gpus = [list(range(g * per, min((g + 1) * per, experts))) for g in range(G)]
    return PlacementPlan(topology, experts, [gpus] * layers, planner="contiguous")


def copies_plan(topology: Topology, pop: np.ndarray, extra: int) -> PlacementPlan:
    """Contiguous primaries plus ``extra`` copies per GPU of the hottest experts, each on the least-loaded GPU without it."""
    L, E = pop.shape
    G = topology.num_gpus
    per = -(-E // G)
    layers = []
    for layer in range(L):
        gpus = [list(range(g * per, min((g + 1) * per, E))) for g in range(G)]
        copies = np.ones(E)
        gpu_load = np.array([pop[layer, g].sum() for g in gpus])
        for _ in range(extra * G):
            e = int(np.argmax(pop[layer] / copies))
            room = [g for g in range(G) if e not in gpus[g] and len(gpus[g]) < per + extra]
            if not room:
                break
            g = min(room, key=lambda x: gpu_load[x])
            gpus[g].append(e)
            copies[e] += 1
            gpu_load = np.array([sum(pop[layer, x] / copies[x] for x in gg) for gg in gpus])
        layers.append(gpus)
    return PlacementPlan(topology, E, layers, planner=f"+{extra} copies")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "simulator_speed.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    trace, pop = skewed_trace(args.tokens, args.layers, args.experts, args.top_k, seed=0)
    print(f"trace: {trace!r} generated in {time.perf_counter() - t0:.1f} s")
    rows = []
    for name in ("a100-2x4", "h200-4x8"):
        topology = Topology.preset(name)
        for plan in (contiguous_plan(topology, args.experts, args.layers), copies_plan(topology, pop, 2)):
            times, cpu = [], []
            for _ in range(args.repeats):
                t, c = time.perf_counter(), time.process_time()
                result = simulate(plan, trace, expert_load=pop, policy=DEFAULT_POLICY)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            s = result.summary()
            rows.append({"topology": name, "plan": plan.planner, "max_copies": plan.max_copies, "seconds": times,
                         "cpu_seconds": cpu, "min_s": min(times), "median_s": float(np.median(times)), "min_cpu_s": min(cpu),
                         "share_inter_node": s["share_inter_node"], "msgs_node": s["msgs_node"]})
            print(f"  {name:<10} {plan.planner:<11} {min(times):6.2f} s wall (min of {args.repeats}), median {np.median(times):6.2f} s, "
                  f"CPU {min(cpu):6.2f} s")
    head = f"{'topology':<10}{'plan':<12}{'copies':>7}{'min s':>8}{'median s':>10}{'CPU s':>8}{'< 10 s':>8}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['topology']:<10}{r['plan']:<12}{r['max_copies']:>7}{r['min_s']:>8.2f}{r['median_s']:>10.2f}{r['min_cpu_s']:>8.2f}"
              f"{'yes' if r['min_s'] < 10 else 'NO':>8}")
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: wall times above CPU times mean other processes were running)")
    report = {
        "benchmark": "simulator_speed",
        "trace": {"tokens": args.tokens, "layers": args.layers, "experts": args.experts, "top_k": args.top_k,
                  "popularity": "Dirichlet(0.3) per layer", "seed": 0},
        "dispatch_modes": list(DISPATCH_MODES),
        "policy": DEFAULT_POLICY,
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
                    "load_average": list(os.getloadavg()), "platform": platform.platform()},
        "target_s": 10.0,
        "rows": rows,
    }
    save_result_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
