"""``grace simulate`` and ``grace compare``: replay traces through plans, compare planners."""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_grace._files import save_json_atomic
from megatron_grace.cli._common import (
    BUNDLED,
    DEFAULT_EXTRA_SLOTS,
    MS_PER_LAYER,
    POLICY_HELP,
    add_dispatch_argument,
    add_extra_slots_argument,
    add_model_argument,
    add_topology_arguments,
    model_shape_for,
    note,
    topology_from_args,
    warn,
)
from megatron_grace.errors import GraceInputError
from megatron_grace.statistics.expert_stats import ExpertStats
from megatron_grace.trace.routing_trace import RoutingTrace

COMMANDS = {
    "simulate": "replay a routing trace through a placement plan: traffic, load and modelled MoE-layer time",
    "compare": "plan with several planners on one part of a trace, simulate each on the rest, one table",
}
TOKEN_PLACEMENT_HELP = ("where tokens start: round-robin (token i on GPU i mod G, default) or request (all tokens of a "
                        "request on one GPU, requests dealt round-robin)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``simulate`` and ``compare`` to the ``grace`` parser."""
    from megatron_grace.names import DEFAULT_PLANNERS, DEFAULT_POLICY, TOKEN_PLACEMENTS
    from megatron_grace.plan.topology import MODEL_PRESETS

    shapes = sorted(MODEL_PRESETS)
    p = subparsers.add_parser(
        "simulate", help=COMMANDS["simulate"],
        description="Replay a trace through a plan with a replica-choice policy; print pairs crossing GPUs and nodes, "
        "deduplicated messages, bytes per link type, load imbalance and the modelled MoE-layer time (ms/layer) for flat "
        f"and hierarchical dispatch. {MS_PER_LAYER}. Warns when the trace holds the tokens the plan was made on.",
    )
    p.add_argument("--plan", type=Path, required=True, help="placement plan JSON (grace-plan/1)")
    p.add_argument("--trace", type=Path, required=True, help="routing trace .npz (grace-trace/1) or any importable trace")
    add_dispatch_argument(p)
    add_model_argument(p)
    p.add_argument("--model-shape", choices=shapes, default=None, help="sizes for bytes and FLOPs (default: from the model name)")
    p.add_argument("--token-placement", choices=TOKEN_PLACEMENTS, default="round-robin", help=TOKEN_PLACEMENT_HELP)
    p.add_argument("--policy", default=DEFAULT_POLICY, help=POLICY_HELP)
    p.add_argument("--load-prediction", type=Path, default=None, metavar="STATS",
                   help="statistics whose expert load is the policy's load forecast (default: equal load per expert)")
    p.add_argument("--stats", dest="stats_deprecated", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help="seed for randomized policies")
    p.add_argument("--per-layer", action="store_true", help="also print one row per layer")
    p.add_argument("--dump-decisions", type=Path, default=None, metavar="FILE",
                   help="write the chosen GPU of every (token, layer, slot) and each token's start GPU as .npz")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the full result (per-layer arrays) as JSON")
    p.set_defaults(func=run_simulate)

    p = subparsers.add_parser(
        "compare", help=COMMANDS["compare"],
        description="Plan with every planner on the first part of a trace (or of a trace synthesized from statistics; "
        "default: the bundled Qwen3-30B-A3B statistics) and simulate each plan on the rest: cross-node and cross-GPU "
        f"messages, bytes per link, load, modelled time, speedup over vanilla with flat dispatch. {MS_PER_LAYER}.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", type=Path, help="per-token routing trace")
    src.add_argument("--stats", type=str, default=None,
                     help=f"routing statistics to synthesize a trace from ('{BUNDLED}', the default: the bundled Qwen3-30B-A3B)")
    p.add_argument("--tokens", type=int, default=None, help="tokens to synthesize from --stats (default 100000) or to keep of --trace (default all)")
    add_topology_arguments(p)
    add_extra_slots_argument(p, default=DEFAULT_EXTRA_SLOTS)
    p.add_argument("--planners", default=",".join(DEFAULT_PLANNERS), help=f"comma-separated planners (default {','.join(DEFAULT_PLANNERS)})")
    add_dispatch_argument(p)
    add_model_argument(p)
    p.add_argument("--model-shape", choices=shapes, default=None, help="sizes for bytes and FLOPs (default: from the model name)")
    p.add_argument("--policy", default=DEFAULT_POLICY, help="a comma-separated list of policies, or 'all' (every policy on "
                   f"every plan); {POLICY_HELP}")
    p.add_argument("--token-placement", choices=TOKEN_PLACEMENTS, default="round-robin", help=TOKEN_PLACEMENT_HELP)
    p.add_argument("--plan-fraction", type=float, default=0.5, help="share of the tokens planned on (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="synthesis seed (default 0)")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR", help="write load.png and traffic.png into DIR")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the table and summaries as JSON")
    p.set_defaults(func=run_compare)


# ------------------------------------------------------------------------------------ inputs
def read_trace(path: Path, model: str | None = None) -> RoutingTrace:
    """A per-token trace from any importable file (a grace trace ``.npz`` or a framework's dump)."""
    from megatron_grace.cli.cmd_data import read_source

    data = read_source(path, model=model)
    if not isinstance(data, RoutingTrace):
        raise GraceInputError("holds statistics, not a per-token trace", path)
    return data


def read_stats(name: str | Path, model: str | None = None) -> ExpertStats:
    """Statistics: the bundled Qwen3 data (``bundled``), or any importable source (a trace is counted)."""
    from megatron_grace.cli.cmd_data import read_stats as read_any_stats

    return read_any_stats(None if str(name) == BUNDLED else Path(name), model=model)[0]


# ------------------------------------------------------------------------------------ commands
def run_simulate(args: argparse.Namespace) -> int:
    from megatron_grace.plan.placement import PlacementPlan
    from megatron_grace.simulation.simulator import simulate

    from megatron_grace.cli._provenance import IN_SAMPLE_SHARE, in_sample_share

    plan = PlacementPlan.read(args.plan)
    trace = read_trace(args.trace, args.model)
    shape = model_shape_for(args.model_shape, trace.model, "trace", trace)
    share = in_sample_share(plan.metadata, trace)
    if share is not None and share >= IN_SAMPLE_SHARE:
        source = plan.metadata["planned_on"].get("source", "?")
        warn(f"in-sample: {share:.0%} of the sampled tokens the plan was made on ({source}) are in {args.trace}; the "
             "figures measure the plan on its own planning data. Measure on held-out tokens (plan on one part of a "
             "trace, simulate the rest, as `grace compare` does)")
    expert_load = None
    if args.stats_deprecated is not None:
        note("simulate --stats is now --load-prediction (plan and compare use --stats for their input)")
        args.load_prediction = args.load_prediction or args.stats_deprecated
    if args.load_prediction is not None:
        stats = read_stats(args.load_prediction)
        if stats.load.shape != (trace.num_layers, trace.num_experts):
            raise GraceInputError(f"statistics have load {stats.load.shape}, the trace has {trace.num_layers} layers x "
                                  f"{trace.num_experts} experts", args.load_prediction)
        expert_load = stats.load
    result = simulate(plan, trace, shape, policy=args.policy, dispatch=args.dispatch,
                      token_placement=args.token_placement, expert_load=expert_load, seed=args.seed,
                      keep_decisions=args.dump_decisions is not None, progress=True)
    print(result.format_table())
    print(_predicted_vs_simulated(plan, result))
    if args.per_layer:
        print()
        print(_per_layer_table(result))
    if args.dump_decisions is not None:
        result.dump_decisions(args.dump_decisions)
        print(f"wrote {args.dump_decisions}")
    if args.json is not None:
        result.save_json(args.json)
        print(f"wrote {args.json}")
    return 0


def _predicted_vs_simulated(plan, result) -> str:
    """One line: the planner's serving-policy prediction of max/mean GPU load next to the simulated one."""
    import numpy as np

    serving = plan.metadata.get("predicted", {}).get("serving") if isinstance(plan.metadata, dict) else None
    sim = result.load_imbalance
    simulated = f"simulated {sim.mean():.3f} (worst layer {sim.max():.3f})"
    if not serving:
        return f"max/mean GPU load: {simulated}; the plan records no serving-policy prediction"
    pred = np.asarray(serving["max_over_mean"], dtype=np.float64)
    note = "" if serving.get("policy") == result.policy else f" (predicted for policy {serving.get('policy')}, simulated with {result.policy})"
    return (f"max/mean GPU load: predicted {pred.mean():.3f} (worst layer {pred.max():.3f}) from {serving.get('source', 'the plan')} "
            f"| {simulated}{note}")


def _per_layer_table(result) -> str:
    modes = list(result.modes)
    head = f"{'layer':>5}{'local':>10}{'intra':>10}{'inter':>10}{'x-node':>10}{'x-GPU':>10}{'max/mean':>9}" + "".join(
        f"{m[:4] + ' ms':>17}" for m in modes)
    lines = [head, "-" * len(head)]
    imb = result.load_imbalance
    for layer in range(result.num_layers):
        lines.append(
            f"{layer:>5}{result.pairs_local[layer]:>10}{result.pairs_intra_node[layer]:>10}{result.pairs_inter_node[layer]:>10}"
            f"{result.msgs_node[layer]:>10}{result.msgs_gpu[layer]:>10}{imb[layer]:>9.3f}"
            + "".join(f"{result.modes[m].layer_s[layer] * 1e3:>17.4f}" for m in modes)
        )
    return "\n".join(lines)


def run_compare(args: argparse.Namespace) -> int:
    from megatron_grace.simulation.compare import compare_planners, split_source

    if args.extra_slots < 0:
        raise GraceInputError(f"--extra-slots must be >= 0, got {args.extra_slots}")
    if args.tokens is not None and args.tokens < 2:
        raise GraceInputError(f"--tokens must be >= 2, got {args.tokens}")
    planners = [p.strip() for p in args.planners.split(",") if p.strip()]
    if not planners:
        raise GraceInputError("--planners lists no planner")
    topology = topology_from_args(args)
    if args.trace is not None:
        source = read_trace(args.trace, args.model)
        tokens = args.tokens
    else:
        source = read_stats(args.stats or BUNDLED, args.model)
        tokens = args.tokens or 100_000
    shape = model_shape_for(args.model_shape, source.model, "trace" if args.trace is not None else "statistics", source)
    from megatron_grace.simulation.policies import policy_names

    policies = policy_names() if args.policy == "all" else [p.strip() for p in args.policy.split(",") if p.strip()]
    if not policies:
        raise GraceInputError("--policy lists no policy")
    plan_stats, measure = split_source(source, tokens, seed=args.seed, fraction=args.plan_fraction)
    plans = None
    reports = {}
    for policy in policies:
        comparison = compare_planners(plan_stats, measure, topology, extra_slots=args.extra_slots,
                                      planners=planners, model_shape=shape, policy=policy,
                                      token_placement=args.token_placement, dispatch=args.dispatch, progress=True, plans=plans)
        plans = comparison.plans  # every policy runs on the same plans
        print(comparison.format_table())
        print()
        if args.plot is not None:
            directory = args.plot if len(policies) == 1 else args.plot / policy
            for path in comparison.plot(directory):
                print(f"wrote {path}")
        reports[policy] = comparison.to_dict()
    if args.json is not None:
        save_json_atomic(args.json, reports[policies[0]] if len(policies) == 1 else {"format": "grace-compare-policies/1",
                                                                                      "policies": reports})
        print(f"wrote {args.json}")
    return 0
