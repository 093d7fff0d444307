"""``grace simulate`` and ``grace compare``: replay traces through plans, compare planners."""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_grace._files import save_json_atomic
from megatron_grace.errors import GraceInputError
from megatron_grace.statistics.expert_stats import ExpertStats
from megatron_grace.trace.routing_trace import RoutingTrace

BUNDLED = "bundled"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``simulate`` and ``compare`` to the ``grace`` parser."""
    from megatron_grace.plan.topology import MODEL_PRESETS, TOPOLOGY_PRESETS
    from megatron_grace.simulation.compare import DEFAULT_PLANNERS
    from megatron_grace.simulation.policies import DEFAULT_POLICY, policy_names
    from megatron_grace.simulation.simulator import DISPATCH_ALIASES, DISPATCH_MODES, TOKEN_PLACEMENTS

    shapes = sorted(MODEL_PRESETS)
    dispatch = {"choices": (*DISPATCH_MODES, "both", *DISPATCH_ALIASES), "metavar": "{" + ",".join((*DISPATCH_MODES, "both")) + "}",
                "default": "both", "help": "dispatch mode(s): flat (one message per token-expert pair), hierarchical (one per "
                "token and node, then forwarded inside the node) or both (default); per-pair is a deprecated name of flat"}
    policies = (f"{DEFAULT_POLICY} (default), " + ", ".join(p for p in policy_names() if p != DEFAULT_POLICY)
                + " (the routing module's policies, run as the distributed layer runs them)")
    p = subparsers.add_parser(
        "simulate", help="replay a routing trace through a placement plan: traffic, load and modelled MoE-layer time",
        description="Replay a trace through a plan with a replica-choice policy; print pairs crossing GPUs and nodes, "
        "deduplicated messages, bytes per link type, load imbalance and the modelled MoE-layer time for flat and "
        "hierarchical dispatch.",
    )
    p.add_argument("--plan", type=Path, required=True, help="placement plan JSON (grace-plan/1)")
    p.add_argument("--trace", type=Path, required=True, help="routing trace .npz (grace-trace/1) or any importable trace")
    p.add_argument("--dispatch", **dispatch)
    p.add_argument("--model-shape", choices=shapes, default=None, help="sizes for bytes and FLOPs (default: from the trace's model name)")
    p.add_argument("--token-placement", choices=TOKEN_PLACEMENTS, default="round-robin",
                   help="round-robin: token i on GPU i mod G; request: a request's tokens on one GPU (default round-robin)")
    p.add_argument("--policy", default=DEFAULT_POLICY, help=f"replica-choice policy: {policies}")
    p.add_argument("--stats", type=Path, default=None, help="statistics whose expert load is the policy's load prediction (default: equal)")
    p.add_argument("--seed", type=int, default=0, help="seed for randomized policies")
    p.add_argument("--per-layer", action="store_true", help="also print one row per layer")
    p.add_argument("--dump-decisions", type=Path, default=None, metavar="FILE",
                   help="write the chosen GPU of every (token, layer, slot) and each token's start GPU as .npz")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the full result (per-layer arrays) as JSON")
    p.set_defaults(func=run_simulate)

    p = subparsers.add_parser(
        "compare", help="plan with several planners on one half of a trace, simulate each on the other half, one table",
        description="Plan with every planner on the first part of a trace (or of a trace synthesized from statistics) and "
        "simulate each plan on the rest: cross-node and cross-GPU messages, bytes per link, load, modelled time, speedup "
        "over vanilla with flat dispatch.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", type=Path, help="per-token routing trace")
    src.add_argument("--stats", type=str, help=f"routing statistics to synthesize a trace from ('{BUNDLED}': the bundled Qwen3-30B-A3B)")
    p.add_argument("--tokens", type=int, default=None, help="tokens to synthesize from --stats (default 100000) or to keep of --trace (default all)")
    p.add_argument("--topology", required=True, choices=sorted(TOPOLOGY_PRESETS), help="cluster preset")
    p.add_argument("--extra-slots", type=int, required=True, help="expert slots per GPU above an even split (replication budget)")
    p.add_argument("--planners", default=",".join(DEFAULT_PLANNERS), help=f"comma-separated planners (default {','.join(DEFAULT_PLANNERS)})")
    p.add_argument("--dispatch", **dispatch)
    p.add_argument("--model-shape", choices=shapes, default=None, help="sizes for bytes and FLOPs (default: from the model name)")
    p.add_argument("--policy", default=DEFAULT_POLICY, help="replica-choice policy, a comma-separated list of them, or 'all' (every "
                   f"policy on every plan): {policies}")
    p.add_argument("--token-placement", choices=TOKEN_PLACEMENTS, default="round-robin")
    p.add_argument("--plan-fraction", type=float, default=0.5, help="share of the tokens planned on (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="synthesis seed (default 0)")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR", help="write load.png and traffic.png into DIR")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the table and summaries as JSON")
    p.set_defaults(func=run_compare)


# ------------------------------------------------------------------------------------ inputs
def read_trace(path: Path) -> RoutingTrace:
    """A per-token trace from any importable file (a grace trace ``.npz`` or a framework's dump)."""
    from megatron_grace.cli.cmd_data import read_source

    data = read_source(path)
    if not isinstance(data, RoutingTrace):
        raise GraceInputError("holds statistics, not a per-token trace", path)
    return data


def read_stats(name: str | Path) -> ExpertStats:
    """Statistics: the bundled Qwen3 data (``bundled``), or any importable source (a trace is counted)."""
    from megatron_grace.cli.cmd_data import read_stats as read_any_stats

    return read_any_stats(None if str(name) == BUNDLED else Path(name))[0]


# ------------------------------------------------------------------------------------ commands
def run_simulate(args: argparse.Namespace) -> int:
    from megatron_grace.plan.placement import PlacementPlan
    from megatron_grace.simulation.simulator import simulate

    plan = PlacementPlan.read(args.plan)
    trace = read_trace(args.trace)
    expert_load = None
    if args.stats is not None:
        stats = read_stats(args.stats)
        if stats.load.shape != (trace.num_layers, trace.num_experts):
            raise GraceInputError(f"statistics have load {stats.load.shape}, the trace has {trace.num_layers} layers x "
                                  f"{trace.num_experts} experts", args.stats)
        expert_load = stats.load
    result = simulate(plan, trace, args.model_shape, policy=args.policy, dispatch=args.dispatch,
                      token_placement=args.token_placement, expert_load=expert_load, seed=args.seed,
                      keep_decisions=args.dump_decisions is not None, progress=True)
    print(result.format_table())
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


def _per_layer_table(result) -> str:
    modes = list(result.modes)
    head = f"{'layer':>5}{'local':>10}{'intra':>10}{'inter':>10}{'x-node':>10}{'x-GPU':>10}{'max/mean':>9}" + "".join(
        f"{m + ' ms':>17}" for m in modes)
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
    from megatron_grace.plan.topology import Topology
    from megatron_grace.simulation.compare import compare_planners, split_source

    if args.extra_slots < 0:
        raise GraceInputError(f"--extra-slots must be >= 0, got {args.extra_slots}")
    if args.tokens is not None and args.tokens < 2:
        raise GraceInputError(f"--tokens must be >= 2, got {args.tokens}")
    planners = [p.strip() for p in args.planners.split(",") if p.strip()]
    if not planners:
        raise GraceInputError("--planners lists no planner")
    if args.trace is not None:
        source = read_trace(args.trace)
        tokens = args.tokens
    else:
        source = read_stats(args.stats)
        tokens = args.tokens or 100_000
    from megatron_grace.simulation.policies import policy_names

    policies = policy_names() if args.policy == "all" else [p.strip() for p in args.policy.split(",") if p.strip()]
    if not policies:
        raise GraceInputError("--policy lists no policy")
    plan_stats, measure = split_source(source, tokens, seed=args.seed, fraction=args.plan_fraction)
    plans = None
    reports = {}
    for policy in policies:
        comparison = compare_planners(plan_stats, measure, Topology.preset(args.topology), extra_slots=args.extra_slots,
                                      planners=planners, model_shape=args.model_shape, policy=policy,
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
