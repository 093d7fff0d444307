"""``grace plan``: plan the expert placement of every layer with a named planner.

    grace plan --stats S.npz --topology a100-2x4 --extra-slots 1 --planner grace --out plan.json
    grace plan --topology 1x4 --extra-slots 1 --out plan.json        # for a 4-GPU (4-rank) job
    grace plan --trace T.npz --topology 4x8 --links h200-ib --memory-gb 40 --model-shape qwen3-30b-a3b \\
        --planner grace --replicas auto --set interlayer_weight=0.5 --out plan.json
    grace plan --list

Input: ``--stats`` or ``--trace`` (any format the importers read; a trace is reduced to
statistics), ``--default-data`` (the bundled Qwen3-30B-A3B statistics), or nothing (the same).
Budget: ``--slots N``, ``--extra-slots N`` (an even split plus N), or ``--memory-gb X`` with
``--expert-bytes B`` or ``--model-shape NAME``; without any, one extra slot per GPU.
Cluster: ``--topology NxG`` (nodes x GPUs per node) or a preset, ``--links`` a link profile or
explicit bandwidths (see :func:`megatron_grace.plan.topology.parse_topology`).
Prints a per-layer summary (predicted max/mean GPU and node load, copies, kept affinity). A plan
made from a per-token trace records a sample of its tokens' fingerprints, so that
``grace simulate`` can warn when it measures on the tokens the plan was made on.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from megatron_grace.cli._common import (
    DEFAULT_EXTRA_SLOTS,
    add_extra_slots_argument,
    add_model_argument,
    add_topology_arguments,
    note,
    topology_from_args,
)
from megatron_grace.errors import GraceInputError
from megatron_grace.plan.topology import Topology
from megatron_grace.statistics.expert_stats import ExpertStats
from megatron_grace.trace.routing_trace import RoutingTrace

COMMANDS = {"plan": "plan expert placement (grouping, replicas) with a named planner; writes a plan JSON"}

# shortcut flags: (flag, knob, type, help); each applies only to planners that have the knob
_SHORTCUTS: tuple[tuple[str, str, type, str], ...] = (
    ("--ratio", "ratio", float, "grace: group-size ratio r (default 0.15)"),
    ("--balance-weight", "balance_weight", float, "grace: load-imbalance weight of the grouping (default 3)"),
    ("--replicas", "replicas", str, "grace: fill | auto | none | N copies per layer (default fill)"),
    ("--balance-target", "balance_target", float, "grace: max/mean goal of --replicas auto (default 1.05)"),
    ("--interlayer-weight", "interlayer_weight", float, "grace: between-layer affinity weight (default 0)"),
    ("--num-groups", "num_groups", int, "eplb: contiguous expert groups (default: one per GPU)"),
    ("--policy", "policy", str, "eplb: hierarchical | global (default hierarchical)"),
    ("--seed", "seed", int, "affinity/grace: k-means seed (default 0)"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``plan`` to the ``grace`` parser."""
    from megatron_grace.plan.planners import PLANNERS
    from megatron_grace.plan.topology import MODEL_PRESETS

    p = subparsers.add_parser(
        "plan", help=COMMANDS["plan"],
        description="Plan which experts every GPU hosts, per MoE layer, with one of the planners "
        f"({', '.join(PLANNERS)}), and print the predicted per-layer balance, copies and kept affinity. "
        "Input defaults to the bundled Qwen3-30B-A3B statistics.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--stats", type=Path, default=None, help="routing statistics (any importable format)")
    src.add_argument("--trace", type=Path, default=None, help="per-token routing trace (any importable format)")
    src.add_argument("--default-data", action="store_true", help="the bundled Qwen3-30B-A3B statistics (also the default)")
    p.add_argument("--format", default="auto", help="input format for --stats/--trace (default: detected)")
    add_model_argument(p)
    add_topology_arguments(p)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--slots", type=int, default=None, help="expert slots per GPU")
    add_extra_slots_argument(budget, default=None)
    budget.add_argument("--memory-gb", type=float, default=None, help="memory for expert weights per GPU, GB (1e9 bytes)")
    p.add_argument("--expert-bytes", type=float, default=None, help="bytes of one expert (with --memory-gb)")
    p.add_argument("--model-shape", choices=sorted(MODEL_PRESETS), default=None,
                   help="model whose expert size goes with --memory-gb; also checked against the statistics")
    p.add_argument("--planner", choices=list(PLANNERS), default="grace", help="planner (default grace)")
    for flag, knob, kind, text in _SHORTCUTS:
        p.add_argument(flag, dest=f"knob_{knob}", type=kind, default=None, help=text)
    p.add_argument("--set", dest="knobs", action="append", default=[], metavar="KNOB=VALUE",
                   help="any planner knob (repeatable), e.g. --set load_slack=0.1; see --list")
    p.add_argument("--progress", action="store_true", help="progress bar over layers")
    p.add_argument("--out", type=Path, default=None, help="write the plan JSON here (grace-plan/1)")
    p.add_argument("--export-eplb", type=Path, default=None, metavar="FILE.npz",
                   help="also write the DeepSeek-EPLB arrays (physical_to_logical_map, logical_to_all_physical_map, logical_count)")
    p.add_argument("--export-sglang", type=Path, default=None, metavar="FILE.json",
                   help="also write the JSON SGLang's --init-expert-location reads (needs equal experts per GPU)")
    p.add_argument("--per-layer", dest="per_layer", action=argparse.BooleanOptionalAction, default=True,
                   help="print one row per layer (default on)")
    p.add_argument("--list", action="store_true", help="list the planners and their knobs with defaults, then exit")
    p.set_defaults(func=run_plan)


# ------------------------------------------------------------------------------------ inputs
def read_stats(args: argparse.Namespace) -> tuple[ExpertStats, RoutingTrace | None]:
    """The statistics to plan on (a trace is reduced with :meth:`ExpertStats.from_trace`; default: bundled)
    and the trace itself when the input is one."""
    from megatron_grace.cli.cmd_data import read_stats as read_any_stats

    path = args.stats if args.stats is not None else args.trace
    stats, trace = read_any_stats(path, args.format, args.model)
    if args.trace is not None and trace is None:
        note(f"{path} holds statistics, not a per-token trace; planning on them")
    return stats, trace


def build_topology(args: argparse.Namespace, num_experts: int) -> Topology:
    """The cluster of ``--topology``/``--links`` with the requested expert budget."""
    from megatron_grace.plan.topology import ModelShape

    topology = topology_from_args(args)
    shape = ModelShape.preset(args.model_shape) if args.model_shape else None
    if shape is not None and shape.num_experts != num_experts:
        raise GraceInputError(f"--model-shape {shape.name} has {shape.num_experts} experts per layer, the statistics {num_experts}")
    if args.expert_bytes is not None and args.memory_gb is None:
        raise GraceInputError("--expert-bytes needs --memory-gb")
    if args.slots is not None:
        if args.slots < 1:
            raise GraceInputError(f"--slots must be >= 1, got {args.slots}")
        return topology.with_slots(args.slots)
    if args.memory_gb is not None:
        if not args.memory_gb > 0:
            raise GraceInputError(f"--memory-gb must be positive, got {args.memory_gb}")
        expert_bytes = args.expert_bytes if args.expert_bytes is not None else (shape.expert_bytes if shape else None)
        if expert_bytes is None:
            raise GraceInputError("--memory-gb needs --expert-bytes or --model-shape")
        if not expert_bytes > 0:
            raise GraceInputError(f"--expert-bytes must be positive, got {expert_bytes}")
        return topology.with_memory(args.memory_gb * 1e9, expert_bytes)
    extra = args.extra_slots if args.extra_slots is not None else DEFAULT_EXTRA_SLOTS
    return topology.with_extra_slots(num_experts, extra)  # negative extra raises GraceInputError


def planner_options(args: argparse.Namespace) -> dict[str, Any]:
    """Knob values from the shortcut flags and ``--set KNOB=VALUE`` (typed by the planner's options)."""
    from megatron_grace.plan.planners import PLANNERS

    spec = PLANNERS[args.planner]
    knobs = spec.knobs()
    options: dict[str, Any] = {}
    for _, knob, _, _ in _SHORTCUTS:
        value = getattr(args, f"knob_{knob}", None)
        if value is None:
            continue
        if knob not in knobs:
            raise GraceInputError(f"--{knob.replace('_', '-')} does not apply to the {args.planner} planner "
                                  f"(its knobs: {', '.join(knobs)})")
        options[knob] = spec.parse_option(knob, str(value)) if isinstance(value, str) else value
    for item in args.knobs:
        if "=" not in item:
            raise GraceInputError(f"--set expects KNOB=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        options[key.strip()] = spec.parse_option(key.strip(), text)
    if args.progress:
        options["progress"] = True
    return options


# ------------------------------------------------------------------------------------ output
def list_planners() -> str:
    """Planners, their summaries and knobs with defaults."""
    from megatron_grace.plan.planners import PLANNERS

    lines = []
    for name, spec in PLANNERS.items():
        lines.append(f"{name}: {spec.summary}")
        for knob, default in spec.knobs().items():
            lines.append(f"    {knob} = {default!r}")
    return "\n".join(lines)


def format_summary(plan, per_layer: bool = True) -> str:
    """Per-layer predicted balance, copies and kept affinity of a planned placement."""
    meta = plan.metadata
    pred = meta["predicted"]
    topo = plan.topology
    stats = meta["stats"]
    lines = [
        f"planner {plan.planner}: {stats['model']} ({stats['layers']} layers x {stats['experts']} experts, top-{stats['top_k']}) "
        f"on {topo.name} ({topo.num_nodes} x {topo.gpus_per_node} GPUs), {meta['capacity']} slots per GPU"
        + (" (assumed: no budget given)" if meta.get("capacity_assumed") else ""),
    ]
    kept_g, kept_n = pred.get("kept_affinity_gpu"), pred.get("kept_affinity_node")

    def fmt(x: float | None) -> str:
        return "    -" if x is None else f"{x:5.3f}"

    serving = pred.get("serving", {}).get("max_over_mean")
    s = meta["summary"]
    if serving is not None:
        lines.append(f"max/mean: predicted GPU load under the serving router ({pred['serving'].get('policy', 'grace')} policy, "
                     f"{pred['serving'].get('source', 'statistics')}); static: each copy an equal share of its expert's load")
    header = f"{'layer':>5}  {'max/mean':>8}  {'static':>6}  {'node m/m':>8}  {'copies':>6}  {'kept gpu':>8}  {'kept node':>9}"
    if per_layer:
        lines.append(header)
        for layer in range(plan.num_layers):
            head = pred["max_over_mean"][layer] if serving is None else serving[layer]
            lines.append(
                f"{layer:5d}  {head:8.3f}  {pred['max_over_mean'][layer]:6.3f}  {pred['node_max_over_mean'][layer]:8.3f}  "
                f"{pred['extra_copies'][layer]:6d}  {fmt(None if kept_g is None else kept_g[layer]):>8}  "
                f"{fmt(None if kept_n is None else kept_n[layer]):>9}"
            )
    head = (s["max_over_mean"], s["worst_max_over_mean"]) if serving is None else (s["serving_max_over_mean"], s["serving_worst_max_over_mean"])
    lines.append(
        f"mean   max/mean {head[0]:.3f}"
        + ("" if s.get("serving_max_over_mean_sampling_error") is None else f" +- {s['serving_max_over_mean_sampling_error']:.3f}")
        + f" (worst layer {head[1]:.3f}; static {s['max_over_mean']:.3f}), node max/mean "
        f"{s['node_max_over_mean']:.3f}, copies per layer {s['extra_copies']:.1f}, kept affinity GPU {fmt(s['kept_affinity_gpu']).strip()} "
        f"node {fmt(s['kept_affinity_node']).strip()}"
        + ("" if s.get("kept_interlayer_gpu") is None else f", kept between-layer {s['kept_interlayer_gpu']:.3f}")
    )
    shrink = meta.get("load_shrinkage")
    if shrink and str(shrink.get("chosen_by", "")).startswith("validation"):
        scores = ", ".join(f"{k}: {v:.3f}" for k, v in shrink.get("held_out_max_over_mean", {}).items())
        lines.append(f"load shrinkage {shrink['value']:g} (the load the grouping balances and the copies are sized to, pulled "
                     f"toward the layer mean), chosen by {shrink['chosen_by']}; held-out max/mean per value: {scores}")
    for warning in meta.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    import warnings

    from megatron_grace.plan.planners import plan_placement

    if args.list:
        print(list_planners())
        return 0
    stats, trace = read_stats(args)
    topology = build_topology(args, stats.num_experts)
    options = planner_options(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the summary prints the planner's warnings once
        plan = plan_placement(stats, topology, args.planner, trace=trace, **options)
    if trace is not None:
        from megatron_grace.cli._provenance import planning_record

        plan.metadata["planned_on"] = planning_record(trace, str(args.trace if args.trace is not None else args.stats))
    print(format_summary(plan, per_layer=args.per_layer))
    if args.out is not None:
        plan.save(args.out)
        print(f"wrote {args.out}")
    if args.export_eplb is not None:
        from megatron_grace._files import save_npz_atomic

        save_npz_atomic(args.export_eplb, plan.to_eplb_arrays())
        print(f"wrote {args.export_eplb}")
    if args.export_sglang is not None:
        from megatron_grace._files import save_json_atomic

        save_json_atomic(args.export_sglang, plan.to_sglang_json())
        print(f"wrote {args.export_sglang}")
    return 0
