"""``grace demo``: the main job on the bundled real data (Qwen3-30B-A3B statistics).

1. statistics table and plots of the bundled model;
2. a per-token trace synthesized from those statistics, with its fidelity report;
3. plans (vanilla, eplb, grace) made on the first half of the trace for the paper's cluster
   (``a100-2x4``, one extra expert slot per GPU), saved as ``grace-plan/1`` JSON;
4. a simulated comparison of the plans on the second half (both dispatch modes, the ``grace``
   replica policy), with plots;
5. a real multi-process run: 4 CPU ranks (gloo, 2 nodes x 2 GPUs) run the distributed GRACE
   layer on a grace plan for that cluster, checked against a single-process dense reference,
   with the measured traffic next to the simulator's count of the same decisions.

Everything is written under ``--out``: ``report.json``, ``report.md``, ``plans/``, ``plots/``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
import time
from pathlib import Path

from megatron_grace._files import atomic_path, save_json_atomic

DEMO_TOPOLOGY = "a100-2x4"
DEMO_EXTRA_SLOTS = 1
DEMO_PLANNERS = ("vanilla", "eplb", "grace")
DEMO_POLICY = "grace"  # the simulator's default policy (megatron_grace.simulation.DEFAULT_POLICY)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="run the main job on the bundled Qwen3-30B-A3B data and write a report",
        description="Statistics of the bundled Qwen3-30B-A3B routing data -> synthesized trace -> plans (vanilla, eplb, grace) -> "
        "simulated comparison on a100-2x4 -> a real 4-rank gloo run of the GRACE layer checked against a dense reference. "
        "Output goes to --out (default ./grace-demo).",
    )
    p.add_argument("--out", type=Path, default=Path("grace-demo"), help="output folder (default ./grace-demo)")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens to synthesize (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--ranks", type=int, choices=(4, 8), default=4, help="CPU ranks of the distributed check: 4 = 2x2, 8 = 2x4 (default 4)")
    p.add_argument("--skip-distributed", action="store_true", help="skip stage 5 (the multi-process run)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from megatron_grace.data import load_bundled_stats
    from megatron_grace.plan.planners import plan_placement
    from megatron_grace.plan.topology import Topology
    from megatron_grace.simulation.compare import compare_planners
    from megatron_grace.statistics.expert_stats import ExpertStats
    from megatron_grace.statistics.plots import plot_stats
    from megatron_grace.statistics.summary import format_table, summarize
    from megatron_grace.trace.synthesis import synthesis_fidelity, synthesize_trace

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"tokens": args.tokens, "seed": args.seed}
    t0 = time.perf_counter()

    print("== 1. statistics of the bundled Qwen3-30B-A3B routing data (real, 75,773 decode tokens)")
    stats = load_bundled_stats()
    summary = summarize(stats)
    print(format_table(stats, summary))
    report["statistics"] = summary.overall()
    for path in plot_stats(stats, out / "plots"):
        print(f"wrote {path}")

    print(f"\n== 2. per-token trace synthesized from those statistics ({args.tokens} tokens, seed {args.seed})")
    trace = synthesize_trace(stats, args.tokens, seed=args.seed, progress=True)
    trace.save(out / "qwen3-30b-a3b-synthetic.npz")
    fidelity = asdict(synthesis_fidelity(stats, trace))
    report["synthesis"] = fidelity
    overall = fidelity["overall"]
    print(f"load: max relative error {overall['load_max_rel_err']:.3%} (experts with >= {overall['min_expected_load']:.0f} tokens); "
          f"listed pairs: weighted relative error {overall['pair_weighted_rel_err']:.2%}")

    print(f"\n== 3. plans on the first half for {DEMO_TOPOLOGY}, +{DEMO_EXTRA_SLOTS} expert slot per GPU")
    plan_half, measure = trace.split(0.5)
    plan_stats = ExpertStats.from_trace(plan_half)
    topology = Topology.preset(DEMO_TOPOLOGY)
    comparison = compare_planners(plan_stats, measure, topology, extra_slots=DEMO_EXTRA_SLOTS, planners=DEMO_PLANNERS,
                                  model_shape="qwen3-30b-a3b", policy=DEMO_POLICY, progress=True)
    for name, plan in comparison.plans.items():
        plan.save(out / "plans" / f"{name}.json")
        print(f"wrote {out / 'plans' / f'{name}.json'} ({comparison.plan_seconds[name]:.2f} s to plan)")

    print(f"\n== 4. simulated on the second half ({measure.num_tokens} tokens), replica policy {DEMO_POLICY!r}")
    print(comparison.format_table())
    for path in comparison.plot(out / "plots"):
        print(f"wrote {path}")
    table = comparison.rows()
    rows = {(r["planner"], r["dispatch"]): r for r in table}
    g, v, e = rows[("grace", "hierarchical")], rows[("vanilla", "flat")], rows[("eplb", "hierarchical")]
    headline = {
        "grace_hier_vs_vanilla_flat_speedup": v["layer_s"] / g["layer_s"],
        "grace_vs_eplb_hier_speedup": e["layer_s"] / g["layer_s"],
        "grace_vs_eplb_cross_node_msgs_reduction": 1 - g["msgs_node"] / max(e["msgs_node"], 1),
        "grace_max_over_mean": g["load_max_over_mean"],
    }
    report["simulation"] = {"rows": table, "headline": headline}
    print(f"grace+hierarchical is {headline['grace_hier_vs_vanilla_flat_speedup']:.2f}x faster than vanilla+flat (modelled), "
          f"{headline['grace_vs_eplb_hier_speedup']:.2f}x vs eplb+hierarchical, with "
          f"{headline['grace_vs_eplb_cross_node_msgs_reduction']:.1%} fewer cross-node messages; max/mean load {headline['grace_max_over_mean']:.3f}")

    if not args.skip_distributed:
        from megatron_grace.layer.cpu_check import check_layer_on_gloo

        nodes, gpn = (2, 2) if args.ranks == 4 else (2, 4)
        base = Topology.preset(DEMO_TOPOLOGY)
        cpu_topo = Topology(name=f"cpu-{nodes}x{gpn}", num_nodes=nodes, gpus_per_node=gpn, intra_node=base.intra_node,
                            inter_node=base.inter_node, gpu_flops=base.gpu_flops)
        layers = [0, stats.num_layers // 2]
        print(f"\n== 5. the distributed GRACE layer on {args.ranks} gloo ranks ({nodes} nodes x {gpn}), layers {layers}, "
              "grace plan, checked against a dense single-process reference")
        plan = plan_placement(plan_stats, cpu_topo.with_extra_slots(stats.num_experts, DEMO_EXTRA_SLOTS), "grace")
        tokens_per_rank = 128
        ids = measure.expert_ids[: tokens_per_rank * args.ranks]
        check = check_layer_on_gloo(plan, ids, layers, policy=DEMO_POLICY)
        report["distributed"] = {"ranks": args.ranks, "tokens_per_rank": tokens_per_rank, "layers": layers, "results": check}
        print(f"{'layer/mode':<16}{'max rel err':>12}{'NVLink B':>11}{'(sim)':>11}{'inter B':>11}{'(sim)':>11}{'ms':>8}")
        for key, r in check.items():
            print(f"{key:<16}{r['max_rel_err']:>12.2e}{r['bytes']['intra_node']:>11}{r['simulated_bytes']['intra_node']:>11}"
                  f"{r['bytes']['inter_node']:>11}{r['simulated_bytes']['inter_node']:>11}{r['max_rank_ms']:>8.1f}")
        worst = max(r["max_rel_err"] for r in check.values())
        report["distributed"]["max_rel_err"] = worst
        print(f"largest relative error against the dense reference: {worst:.2e} ({'OK' if worst < 1e-5 else 'TOO LARGE'})")

    report["seconds"] = round(time.perf_counter() - t0, 2)
    save_json_atomic(out / "report.json", report)
    _write_markdown(out / "report.md", report)
    print(f"\nwrote {out / 'report.json'} and {out / 'report.md'} ({report['seconds']} s)")
    return 0 if report.get("distributed", {}).get("max_rel_err", 0.0) < 1e-5 else 1


def _write_markdown(path: Path, report: dict) -> None:
    """A short human-readable report of the demo."""
    s = report["statistics"]["skew"]
    syn = report["synthesis"]["overall"]
    h = report["simulation"]["headline"]
    lines = [
        "# grace demo report", "",
        f"Qwen3-30B-A3B (bundled real statistics): per-layer max/mean expert load {s['min']:.2f} to {s['max']:.2f} (median {s['median']:.2f}).",
        f"Synthesized {report['tokens']} tokens: max load error {syn['load_max_rel_err']:.3%}, listed-pair weighted error "
        f"{syn['pair_weighted_rel_err']:.2%}.", "",
        f"## Simulated on {DEMO_TOPOLOGY}, +{DEMO_EXTRA_SLOTS} slot per GPU, policy {DEMO_POLICY}", "",
        "| planner | dispatch | cross-node msgs | cross-GPU msgs | max/mean | ms/layer | speedup |", "|---|---|---|---|---|---|---|",
    ]
    for r in report["simulation"]["rows"]:
        lines.append(f"| {r['planner']} | {r['dispatch']} | {r['msgs_node']} | {r['msgs_gpu']} | {r['load_max_over_mean']:.3f} | "
                     f"{r['mean_layer_s'] * 1e3:.3f} | {r['speedup']:.2f}x |")
    lines += ["", f"grace+hierarchical vs vanilla+flat: {h['grace_hier_vs_vanilla_flat_speedup']:.2f}x; vs eplb+hierarchical: "
              f"{h['grace_vs_eplb_hier_speedup']:.2f}x, {h['grace_vs_eplb_cross_node_msgs_reduction']:.1%} fewer cross-node messages.", ""]
    if "distributed" in report:
        d = report["distributed"]
        lines += [f"## Distributed check: {d['ranks']} gloo ranks, {d['tokens_per_rank']} tokens per rank", "",
                  "| layer/mode | max rel err | NVLink bytes (simulated) | inter-node bytes (simulated) |", "|---|---|---|---|"]
        for key, r in d["results"].items():
            lines.append(f"| {key} | {r['max_rel_err']:.1e} | {r['bytes']['intra_node']} ({r['simulated_bytes']['intra_node']}) | "
                         f"{r['bytes']['inter_node']} ({r['simulated_bytes']['inter_node']}) |")
    with atomic_path(path, suffix=".md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
