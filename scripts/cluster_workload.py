#!/usr/bin/env python
"""End-to-end MoE workload for the emulated cluster: calibration micro-benchmark, then every configuration.

Launched by ``scripts/emulate_cluster.sh`` under ``torchrun`` (one process per rank, gloo over
TCP; ranks ``0..P-1`` on node 0, ``P..2P-1`` on node 1). Every rank builds the same inputs from
the same seed:

- **routing**: Qwen3-30B-A3B, top-8 of 128 experts, per-token choices synthesized by
  :func:`megatron_grace.trace.synthesis.synthesize_trace` from the bundled statistics (load and
  within-layer co-activation of the chosen Qwen3 layers) and replayed; the planners see the
  bundled statistics themselves;
- **model (scaled down to fit 2 CPU cores)**: a stack of ``--layers`` MoE layers, hidden size
  ``--hidden`` (Qwen3: 2048) and expert FFN ``--ffn`` (Qwen3: 768), SwiGLU, float32, real expert
  GEMMs; between layers a residual add;
- **plans**: ``vanilla`` (contiguous, Megatron's placement), ``eplb`` and ``grace`` from
  :func:`megatron_grace.plan.planners.plan_placement` with ``ceil(E/G) + extra`` slots per GPU
  (vanilla ignores extra slots, so it runs once);
- **layer**: :class:`megatron_grace.layer.GraceMoELayer` with ``flat`` or ``hierarchical``
  dispatch, replica choice ``grace`` (``primary`` on plans without copies), ``counters=True``;
- **phases**: decode (``--decode-tokens`` per rank) and prefill (``--prefill-tokens`` per rank).

Step ``s`` of a phase serves trace tokens ``[s*T*G, (s+1)*T*G)``, token ``i`` on rank ``i mod G``
(the simulator's round-robin placement), so the simulator can replay exactly the same batches.
Configurations are interleaved (repeat 1 of all, then repeat 2, ...) so that load from other
users of the machine spreads over them. Before and after the configurations, a micro-benchmark
measures intra-node and inter-node all-to-alls and the expert GEMM rate with all ranks busy;
rank 0 then fits the simulator's link and compute model to both sets of samples (:mod:`megatron_grace.simulation.calibration`),
predicts every configuration's layer time with the simulator and writes one JSON (``--out``)
plus a plot next to it.

Without torchrun (no ``RANK`` in the environment) it spawns ``--world`` ranks on loopback itself
(``megatron_grace.layer.launch.run_distributed``): a quick check, not an emulated cluster.
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

QWEN_HIDDEN, QWEN_FFN = 2048, 768


# ============================================================================ settings
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced set: grace/eplb at 2 extra slots, vanilla; fewer steps")
    ap.add_argument("--layers", type=int, default=4, help="MoE layers in the stack")
    ap.add_argument("--qwen-layers", type=int, nargs="+", default=None,
                    help="Qwen3-30B-A3B layers whose routing the stack replays (default: evenly spread, one per layer)")
    ap.add_argument("--hidden", type=int, default=256, help=f"hidden size (Qwen3-30B-A3B: {QWEN_HIDDEN})")
    ap.add_argument("--ffn", type=int, default=96, help=f"expert FFN size (Qwen3-30B-A3B: {QWEN_FFN})")
    ap.add_argument("--decode-tokens", type=int, default=128, help="tokens per rank in a decode step")
    ap.add_argument("--prefill-tokens", type=int, default=2048, help="tokens per rank in a prefill step")
    ap.add_argument("--phases", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"])
    ap.add_argument("--planners", nargs="+", default=["vanilla", "eplb", "grace"])
    ap.add_argument("--extra-slots", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--modes", nargs="+", default=["flat", "hierarchical"], choices=["flat", "hierarchical"])
    ap.add_argument("--steps", type=int, default=None, help="measured steps per repeat (default decode 6, prefill 2)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of every configuration (default 5; quick 3)")
    ap.add_argument("--gpus-per-node", type=int, default=4)
    ap.add_argument("--world", type=int, default=2, help="ranks to spawn on loopback when not under torchrun")
    ap.add_argument("--iface", default="", help="network interface whose byte counters cross-check the inter-node bytes")
    ap.add_argument("--link-rate", default="", help="the shaped rate (recorded only)")
    ap.add_argument("--link-delay", default="", help="the applied delay (recorded only)")
    ap.add_argument("--no-microbench", action="store_true", help="skip the calibration micro-benchmark and the predictions")
    ap.add_argument("--micro-repeats", type=int, default=5, help="timed repeats of every micro-benchmark point (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/emulated_cluster.json)")
    ap.add_argument("--plot", default=None, help="plot path (default: --out with .png)")
    ap.add_argument("--refit", default=None, metavar="JSON",
                    help="only redo calibration and predictions of an earlier result (written to --out if given, else in place)")
    args = ap.parse_args(argv)
    args.out_given = args.out is not None
    args.out = args.out or str(ROOT / "benchmarks" / "results" / "emulated_cluster.json")
    if args.quick:
        args.extra_slots = [2] if args.extra_slots == [0, 1, 2] else args.extra_slots
        args.layers = 2 if args.layers == 4 else args.layers
    args.repeats = args.repeats or (3 if args.quick else 5)
    for name in ("layers", "hidden", "ffn", "decode_tokens", "prefill_tokens", "repeats", "gpus_per_node", "world", "micro_repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(e < 0 for e in args.extra_slots):
        ap.error("--extra-slots must be >= 0")
    return args


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The plain-data settings every rank needs."""
    layers = args.qwen_layers or [int(round(x)) for x in np.linspace(4, 44, args.layers)]
    if len(layers) != args.layers:
        raise SystemExit(f"--qwen-layers gives {len(layers)} layers but --layers is {args.layers}")
    return {
        "layers": args.layers, "qwen_layers": layers, "hidden": args.hidden, "ffn": args.ffn,
        "tokens": {"decode": args.decode_tokens, "prefill": args.prefill_tokens}, "phases": list(args.phases),
        "planners": list(args.planners), "extra_slots": list(args.extra_slots), "modes": list(args.modes),
        "steps": {"decode": args.steps or 6, "prefill": args.steps or 2}, "repeats": args.repeats,
        "gpus_per_node": args.gpus_per_node, "iface": args.iface, "seed": args.seed, "quick": args.quick,
        "microbench": not args.no_microbench, "micro_repeats": args.micro_repeats,
    }


# ============================================================================ inputs
def build_inputs(cfg: dict[str, Any], world: int) -> dict[str, Any]:
    """Routing batches and plans, identical on every rank.

    Returns:
        ``{"stats", "ids": {phase: int64 [steps, T*G, L, k]}, "gates": {phase: float32 [...]},
        "plans": {name: PlacementPlan}, "topology", "source"}``.
    """
    from megatron_grace.data import load_bundled_stats
    from megatron_grace.plan.planners import plan_placement
    from megatron_grace.plan.topology import Topology
    from megatron_grace.trace.synthesis import synthesize_trace

    gpn = cfg["gpus_per_node"]
    if world % gpn:
        raise SystemExit(f"world size {world} is not a multiple of --gpus-per-node {gpn}")
    stats = load_bundled_stats().select_layers(cfg["qwen_layers"])
    ids, gates = {}, {}
    for n, phase in enumerate(cfg["phases"]):
        T, steps = cfg["tokens"][phase], cfg["steps"][phase]
        trace = synthesize_trace(stats, steps * T * world, seed=cfg["seed"] + n)
        k = trace.top_k
        ids[phase] = trace.expert_ids.astype(np.int64).reshape(steps, T * world, cfg["layers"], k)
        logits = np.random.default_rng(cfg["seed"] + 100 + n).standard_normal(ids[phase].shape)
        gates[phase] = (np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)).astype(np.float32)
    base = Topology.preset("a100-2x4")
    topo = dataclasses.replace(base, name=f"emulated-{world // gpn}x{gpn}", num_nodes=world // gpn, gpus_per_node=gpn)
    plans = {}
    for planner in cfg["planners"]:
        for extra in cfg["extra_slots"]:
            if planner == "vanilla" and extra != min(cfg["extra_slots"]):
                continue  # vanilla never uses extra slots: the same plan again
            plans[f"{planner}+{extra}"] = plan_placement(stats, topo.with_extra_slots(stats.num_experts, extra), planner)
    return {"stats": stats, "ids": ids, "gates": gates, "plans": plans, "topology": topo,
            "source": f"synthesize_trace(bundled Qwen3-30B-A3B statistics, layers {cfg['qwen_layers']})"}


def interface_bytes(iface: str) -> tuple[int, int, int, int]:
    """``(rx_bytes, rx_packets, tx_bytes, tx_packets)`` of ``iface`` from /proc/net/dev (this network namespace)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == iface:
            f = rest.split()
            return int(f[0]), int(f[1]), int(f[8]), int(f[9])
    raise SystemExit(f"interface {iface!r} not found in /proc/net/dev")


# ============================================================================ micro-benchmark
def microbench(rank: int, world: int, cfg: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Time all-to-alls per link type and the expert GEMMs, all ranks busy at once.

    - ``intra``: every rank sends ``b`` bytes to each other rank of its node (both nodes at once);
      per-GPU bytes ``(P-1) b``.
    - ``inter``: every rank sends ``b`` bytes to its peer (same local index) on the other node;
      per-GPU bytes ``b``, the node's link carries ``P b``.
    - ``compute``: every rank runs its ``S`` expert slots on ``n`` rows (``n / S`` per slot).

    Returns (identical on every rank): ``{"intra": [[bytes_per_gpu, seconds], ...], "inter": ...,
    "compute": [[rows, seconds], ...]}``, seconds = median over repeats of the slowest rank.
    """
    import torch
    import torch.distributed as dist

    from megatron_grace.experts import SlotExperts
    from megatron_grace.layer import random_expert_weights

    gpn, h = cfg["gpus_per_node"], cfg["hidden"]
    node, local = divmod(rank, gpn)
    out: dict[str, list[list[float]]] = {"intra": [], "inter": [], "compute": []}

    def timed(fn) -> float:
        samples = []
        for rep in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if rep:  # the first is warm-up
                samples.append(float(t))
        return float(np.median(samples))

    row_bytes = h * 4
    for kind, sizes in (("intra", (16, 256, 1024, 4096)), ("inter", (16, 512, 2048, 8192))):
        for rows in sizes if kind == "inter" or gpn > 1 else ():
            splits = [0] * world
            if kind == "intra":
                for j in range(gpn):
                    if j != local:
                        splits[node * gpn + j] = rows
            else:
                splits[(rank + gpn) % world] = rows
            x = torch.randn(sum(splits), h)
            y = torch.empty_like(x)  # symmetric pattern: receive what we send
            t = timed(lambda: dist.all_to_all_single(y, x, output_split_sizes=splits, input_split_sizes=splits))
            out[kind].append([float(sum(splits) * row_bytes), t])
    slots = list(range(16))
    experts = SlotExperts.from_full_weights(slots, random_expert_weights(128, h, cfg["ffn"], seed=1), h, cfg["ffn"])
    for rows in (256, 1024, 4096, 16384):
        counts = torch.full((len(slots),), rows // len(slots), dtype=torch.int64)
        x = torch.randn(int(counts.sum()), h)
        out["compute"].append([float(counts.sum()), timed(lambda: experts(x, counts, int(counts.max())))])
    return out


# ============================================================================ configurations
def run_configs(rank: int, world: int, cfg: dict[str, Any], inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """Measure every (phase, plan, mode); returns this rank's raw records (one per config and repeat)."""
    import torch
    import torch.distributed as dist

    from megatron_grace.dispatch.hierarchical import HierarchicalGroups
    from megatron_grace.experts import SlotExperts
    from megatron_grace.layer import LINK_TYPES, GraceMoELayer, random_expert_weights

    h, f, L, gpn = cfg["hidden"], cfg["ffn"], cfg["layers"], cfg["gpus_per_node"]
    E = inputs["stats"].num_experts
    weights = random_expert_weights(E, h, f, seed=cfg["seed"])
    hgroups = HierarchicalGroups.build(gpn) if "hierarchical" in cfg["modes"] else None
    stacks: dict[tuple[str, str], list[Any]] = {}
    for name, plan in inputs["plans"].items():
        experts = [SlotExperts.from_full_weights(plan.gpu_experts[l][rank], weights, h, f) for l in range(L)]
        policy = "grace" if plan.max_copies > 1 else "primary"
        for mode in cfg["modes"]:
            stacks[(name, mode)] = [GraceMoELayer(plan, l, experts[l], policy=policy, dispatch=mode, num_experts=E, counters=True,
                                                  timing=True, hierarchical_groups=hgroups if mode == "hierarchical" else None)
                                    for l in range(L)]
    reads_iface = bool(cfg["iface"]) and rank % gpn == 0
    records = []
    for phase in cfg["phases"]:
        T, steps = cfg["tokens"][phase], cfg["steps"][phase]
        ids_all, gates_all = inputs["ids"][phase], inputs["gates"][phase]
        batches = [([torch.from_numpy(np.ascontiguousarray(ids_all[s, rank::world, l])) for l in range(L)],
                    [torch.from_numpy(np.ascontiguousarray(gates_all[s, rank::world, l])) for l in range(L)]) for s in range(steps)]
        x0 = torch.randn(T, h, generator=torch.Generator().manual_seed(1000 + rank))
        for rep in range(cfg["repeats"] + 1):  # repeat 0 = warm-up (one step per config)
            for (name, mode), layers in stacks.items():
                step_s, phases_s = [], {}
                link = {kind: np.zeros(len(LINK_TYPES)) for kind in ("dispatch", "combine", "meta")}
                dist.barrier()
                before = interface_bytes(cfg["iface"]) if reads_iface else None
                for s in range(1 if rep == 0 else steps):
                    ids, gates = batches[s]
                    dist.barrier()
                    t0 = time.perf_counter()
                    x = x0
                    for l, layer in enumerate(layers):
                        x = x + layer(x, ids[l], gates[l])
                    step_s.append(time.perf_counter() - t0)
                    for layer in layers:
                        c = layer.last_counters
                        for p, v in c.times.items():
                            phases_s[p] = phases_s.get(p, 0.0) + v
                        for kind in link:
                            by = c.kind_bytes_sent_by_link(kind)
                            link[kind] += [by[t] for t in LINK_TYPES]
                dist.barrier()
                after = interface_bytes(cfg["iface"]) if reads_iface else None
                if rep == 0:
                    continue
                records.append({
                    "phase": phase, "plan": name, "mode": mode, "repeat": rep, "rank": rank, "steps": len(step_s),
                    "step_s": step_s, "phase_s": {p: v / len(step_s) for p, v in phases_s.items()},
                    "bytes_sent": {kind: (v / len(step_s)).tolist() for kind, v in link.items()},
                    "iface_delta": None if before is None else [a - b for a, b in zip(after, before)],
                    "policy": layers[0].policy,
                })
    return records


# ============================================================================ one rank
def run_rank(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Everything one rank does; rank 0 returns the gathered raw measurements, the others None."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    inputs = build_inputs(cfg, world)
    reps = cfg.get("micro_repeats", 5)
    before = microbench(rank, world, cfg, repeats=reps) if cfg["microbench"] else None
    records = run_configs(rank, world, cfg, inputs)
    after = microbench(rank, world, cfg, repeats=reps) if cfg["microbench"] else None
    # the machine's load drifts over a long run: fit on the samples from before and after the configurations
    micro = None if before is None else {key: before[key] + after[key] for key in before}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, records)
    if rank != 0:
        return None
    return {"inputs": inputs, "micro": micro, "micro_runs": [before, after], "records": [r for part in gathered for r in part],
            "wall_s": time.perf_counter() - t0}


# ============================================================================ summary (rank 0)
def summarize(raw: dict[str, Any], cfg: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """One row per (phase, plan, mode): tokens/s and layer time (median and spread over repeats),
    phase times, bytes per link from the counters and from the interface."""
    from megatron_grace.layer import LINK_TYPES

    rows = []
    recs = raw["records"]
    keys = sorted({(r["phase"], r["plan"], r["mode"]) for r in recs}, key=lambda k: (cfg["phases"].index(k[0]), k[1], k[2]))
    L = cfg["layers"]
    for phase, plan, mode in keys:
        mine = [r for r in recs if (r["phase"], r["plan"], r["mode"]) == (phase, plan, mode)]
        reps = sorted({r["repeat"] for r in mine})
        step_per_rep, inter_counter, inter_iface = [], [], []
        for rep in reps:
            rr = [r for r in mine if r["repeat"] == rep]
            per_step = np.max(np.array([r["step_s"] for r in rr]), axis=0)  # slowest rank per step
            step_per_rep.append(float(np.median(per_step)))
            steps = rr[0]["steps"]
            sent = sum(sum(r["bytes_sent"][kind][LINK_TYPES.index("inter_node")] for kind in r["bytes_sent"]) for r in rr) * steps
            inter_counter.append(sent)
            deltas = [r["iface_delta"] for r in rr if r["iface_delta"] is not None]
            if deltas:  # tx of every node's veth = bytes that crossed, both directions
                inter_iface.append({"tx_bytes": sum(d[2] for d in deltas), "tx_packets": sum(d[3] for d in deltas)})
        step = np.array(step_per_rep)
        tokens = cfg["tokens"][phase] * world
        tps = tokens / step
        phase_ms = {}
        for p in mine[0]["phase_s"]:
            phase_ms[p] = 1e3 * float(np.median([r["phase_s"].get(p, 0.0) for r in mine])) / L
        bytes_link = {kind: {t: float(sum(r["bytes_sent"][kind][j] for r in mine) / len(reps) / L) for j, t in enumerate(LINK_TYPES)}
                      for kind in ("dispatch", "combine", "meta")}
        row = {
            "phase": phase, "plan": plan, "planner": plan.split("+")[0], "extra_slots": int(plan.split("+")[1]), "mode": mode,
            "policy": mine[0]["policy"], "tokens_per_step": tokens, "repeats": len(reps), "steps_per_repeat": mine[0]["steps"],
            "tokens_per_s_median": float(np.median(tps)), "tokens_per_s_min": float(tps.min()), "tokens_per_s_max": float(tps.max()),
            "layer_ms_median": 1e3 * float(np.median(step)) / L, "layer_ms_min": 1e3 * float(step.min()) / L,
            "layer_ms_max": 1e3 * float(step.max()) / L,
            "layer_ms_iqr": 1e3 * float(np.subtract(*np.percentile(step, [75, 25]))) / L,
            "phase_ms_median_over_ranks_and_repeats": phase_ms,
            "bytes_per_layer_step_by_link": bytes_link,
        }
        if inter_iface:
            counted = float(np.sum(inter_counter))
            tx = float(sum(d["tx_bytes"] for d in inter_iface))
            pk = float(sum(d["tx_packets"] for d in inter_iface))
            row["inter_node_check"] = {
                "counter_bytes": counted, "iface_tx_bytes": tx, "iface_tx_packets": pk,
                "iface_payload_bytes": tx - pk * HEADER_BYTES,
                "ratio_raw": tx / counted if counted else None,
                "ratio_payload": (tx - pk * HEADER_BYTES) / counted if counted else None,
            }
        rows.append(row)
    return rows


#: Ethernet (14) + IPv4 (20) + TCP with timestamps (32) header bytes per packet on the veth.
HEADER_BYTES = 66


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's ratios per phase: grace+hierarchical vs vanilla+flat and vs eplb+hierarchical (same extra slots)."""
    out = []
    for phase in sorted({r["phase"] for r in rows}):
        ph = [r for r in rows if r["phase"] == phase]
        van = [r for r in ph if r["planner"] == "vanilla" and r["mode"] == "flat"]
        for g in (r for r in ph if r["planner"] == "grace" and r["mode"] == "hierarchical"):
            e = [r for r in ph if r["planner"] == "eplb" and r["mode"] == "hierarchical" and r["extra_slots"] == g["extra_slots"]]
            item = {"phase": phase, "extra_slots": g["extra_slots"]}
            if van:
                item["vs_vanilla_flat"] = g["tokens_per_s_median"] / van[0]["tokens_per_s_median"]
            if e:
                item["vs_eplb_hierarchical"] = g["tokens_per_s_median"] / e[0]["tokens_per_s_median"]
            item["meets_2x_vanilla_flat"] = item.get("vs_vanilla_flat", 0) >= 2.0
            item["meets_1.1x_eplb_hierarchical"] = item.get("vs_eplb_hierarchical", 0) >= 1.1
            out.append(item)
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'phase':<8} {'plan':<10} {'mode':<12} {'tok/s':>9} {'(min-max)':>17} {'layer ms':>9} {'pred ms':>8} {'err':>6} "
            f"{'comm ms':>8} {'exp ms':>7} {'MB inter':>9} {'iface/ctr':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ph = r["phase_ms_median_over_ranks_and_repeats"]
        inter = sum(r["bytes_per_layer_step_by_link"][k]["inter_node"] for k in r["bytes_per_layer_step_by_link"])
        pred = r.get("predicted_layer_ms")
        chk = r.get("inter_node_check", {}).get("ratio_payload")
        print(f"{r['phase']:<8} {r['plan']:<10} {r['mode']:<12} {r['tokens_per_s_median']:>9.0f} "
              f"({r['tokens_per_s_min']:>7.0f}-{r['tokens_per_s_max']:<7.0f}) {r['layer_ms_median']:>9.2f} "
              f"{pred if pred is not None else float('nan'):>8.2f} {100 * r.get('prediction_error', float('nan')):>5.0f}% "
              f"{ph.get('comm', 0):>8.2f} {ph.get('experts', 0):>7.2f} {inter / 1e6:>9.3f} "
              f"{chk if chk is not None else float('nan'):>9.4f}")


def model_shape(cfg: dict[str, Any], inputs: dict[str, Any]):
    """The scaled model's :class:`ModelShape` (float32 rows on the wire)."""
    from megatron_grace.plan.topology import ModelShape

    return ModelShape(f"qwen3-30b-a3b-scaled-h{cfg['hidden']}-f{cfg['ffn']}", cfg["layers"], inputs["stats"].num_experts,
                      int(inputs["ids"][cfg["phases"][0]].shape[-1]), cfg["hidden"], cfg["ffn"], dtype_bytes=4)


def predict_rows(rows: list[dict[str, Any]], micro: dict[str, Any], cfg: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Fit the cost model to the micro-benchmark, add the simulator's prediction to every row; the calibration summary."""
    from megatron_grace.simulation import calibration

    shape = model_shape(cfg, inputs)
    fit = calibration.fit_cluster(micro, shape)
    topo = fit.topology(inputs["topology"])
    for r in rows:
        plan = dataclasses.replace(inputs["plans"][r["plan"]], topology=topo)
        pred = calibration.predict_layer_s(plan, inputs["ids"][r["phase"]], shape, mode=r["mode"], policy=r["policy"],
                                           compute_fixed_s=fit.compute_fixed_s, seed=cfg["seed"])
        r["predicted_layer_ms"] = 1e3 * pred["layer_s"]
        r["predicted_phase_ms"] = {k: 1e3 * v for k, v in pred.items()}
        r["prediction_error"] = r["predicted_layer_ms"] / r["layer_ms_median"] - 1.0
    return {"fit": fit.to_dict(), "comparison": calibration.compare_ranking(rows)}


def write_report(result: dict[str, Any], out: str, plot: str | None) -> int:
    """Print the table, ratios and calibration summary; write the JSON and the plot."""
    from megatron_grace._provenance import save_result_json

    rows, calib = result["results"], result["calibration"]
    if calib and "error" in calib:
        calib = None
    print_table(rows)
    result["targets"] = targets(rows)
    for t in result["targets"]:
        print(f"{t['phase']}, {t['extra_slots']} extra slots: grace+hierarchical = {t.get('vs_vanilla_flat', float('nan')):.2f}x "
              f"vanilla+flat, {t.get('vs_eplb_hierarchical', float('nan')):.2f}x eplb+hierarchical")
    if calib:
        for phase, c in calib["comparison"].items():
            print(f"{phase}: prediction within 25% for {c['within_25pct']}/{c['configs']} configs (max |err| "
                  f"{100 * c['max_abs_error']:.0f}%); Kendall tau {c['kendall_tau']:.2f}; same order: {c['same_order']}")
    save_result_json(out, result)
    if calib:
        from megatron_grace.simulation.calibration import plot_results

        plot = plot or str(Path(out).with_suffix(".png"))
        plot_results(rows, plot)
        print(f"wrote {plot}")
    print(f"wrote {out}")
    return 0


def report(raw: dict[str, Any], cfg: dict[str, Any], args: argparse.Namespace, world: int) -> int:
    """Rank 0: summary, calibration and predictions, JSON and plot."""
    rows = summarize(raw, cfg, world)
    inputs = raw["inputs"]
    shape = model_shape(cfg, inputs)
    calib = None
    if raw["micro"] is not None:
        from megatron_grace.errors import GraceInputError

        try:
            calib = predict_rows(rows, raw["micro"], cfg, inputs)
        except GraceInputError as exc:  # keep the measurements; say why there are no predictions
            print(f"calibration failed: {exc}", file=sys.stderr)
            calib = {"error": str(exc)}
    result = {
        "benchmark": "emulated_cluster",
        "description": "GraceMoELayer stack on 2 emulated nodes (network namespaces, shaped veth), gloo over TCP; "
                       "see scripts/emulate_cluster.sh and scripts/cluster_workload.py",
        "command": "sudo bash scripts/emulate_cluster.sh" + (" --quick" if cfg["quick"] else ""),
        "link": {"rate": args.link_rate, "delay_applied": args.link_delay, "iface": cfg["iface"]},
        "world": world, "gpus_per_node": cfg["gpus_per_node"],
        "model": {"name": shape.name, "hidden": cfg["hidden"], "ffn": cfg["ffn"], "qwen3_hidden": QWEN_HIDDEN, "qwen3_ffn": QWEN_FFN,
                  "layers": cfg["layers"], "qwen_layers": cfg["qwen_layers"], "experts": shape.num_experts, "top_k": shape.top_k,
                  "dtype": "float32", "activation": "swiglu"},
        "routing_source": inputs["source"], "settings": dict(cfg),
        "machine": {"cpus": os.cpu_count(), "threads_per_rank": 1, "loadavg_before": args.load_before, "loadavg_after": _uptime()},
        "microbench": raw["micro"], "microbench_before_and_after": raw["micro_runs"], "calibration": calib, "results": rows, "wall_s": raw["wall_s"],
    }
    return write_report(result, args.out, args.plot)


def refit(path: str, out: str | None, plot: str | None) -> int:
    """Re-run the calibration and predictions of a result JSON (same inputs, rebuilt from its settings)."""
    import json

    result = json.loads(Path(path).read_text())
    cfg, world = result["settings"], int(result["world"])
    if result.get("microbench") is None:
        raise SystemExit(f"{path} has no micro-benchmark to fit")
    result["calibration"] = predict_rows(result["results"], result["microbench"], cfg, build_inputs(cfg, world))
    return write_report(result, out or path, plot)


def _uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


# ============================================================================ entry points
def _spawned(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any] | None:
    return run_rank(rank, world, cfg)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.refit:
        return refit(args.refit, args.out if args.out_given else None, args.plot)
    args.load_before = _uptime()
    if "RANK" in os.environ:  # under torchrun
        import torch.distributed as dist

        dist.init_process_group("gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
        cfg = settings_of(args)
        raw = run_rank(rank, world, cfg)
        code = report(raw, cfg, args, world) if rank == 0 else 0
        dist.barrier()
        dist.destroy_process_group()
        return code
    from megatron_grace.layer.launch import run_distributed

    cfg = settings_of(args)
    raw = run_distributed(_spawned, world_size=args.world, args=(cfg,), timeout=1800)[0]
    return report(raw, cfg, args, args.world)


if __name__ == "__main__":
    raise SystemExit(main())
