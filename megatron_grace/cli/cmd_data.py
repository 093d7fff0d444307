"""``grace import``, ``grace stats`` and ``grace synthesize``: routing data in, statistics out."""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_grace._files import save_json_atomic
from megatron_grace.cli._common import add_model_argument, with_model
from megatron_grace.errors import GraceInputError
from megatron_grace.statistics.expert_stats import ExpertStats
from megatron_grace.trace.routing_trace import RoutingTrace

COMMANDS = {
    "import": "convert routing data (vLLM/SGLang/EPLB dumps, Qwen3/Switch statistics) to a .npz trace or stats",
    "stats": "summary table of routing statistics; --plot writes PNG heatmaps and load bars",
    "synthesize": "generate a per-token trace that reproduces load and co-activation statistics",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the data commands to the ``grace`` parser."""
    from megatron_grace.trace.importers import IMPORT_FORMATS

    formats = ["auto", *IMPORT_FORMATS]
    p = subparsers.add_parser(
        "import", help=COMMANDS["import"],
        description="Convert routing data to a grace .npz: a per-token trace when the source has per-token ids, "
        "statistics otherwise (or with --stats).",
    )
    p.add_argument("sources", nargs="+", type=Path, help="input file(s); several JSONL record files form one trace")
    p.add_argument("--format", choices=formats, default="auto", help="input format (default: detected)")
    p.add_argument("--out", type=Path, required=True, help="output .npz")
    p.add_argument("--stats", action="store_true", help="write statistics (load, co-activation, transitions) even from a trace")
    p.add_argument("--num-experts", type=int, default=None, help="experts per layer, when the source does not say")
    p.add_argument("--top-k", type=int, default=None, help="experts per token, for a plain load matrix")
    add_model_argument(p)
    p.set_defaults(func=run_import)

    p = subparsers.add_parser(
        "stats", help=COMMANDS["stats"],
        description="Per-layer summary: load skew (max/mean), zero-load experts, share of the top 10% of experts, "
        "co-activation lift, mutual information between consecutive layers ('-' where the source lacks the data, e.g. "
        "MI needs per-token ids or transitions). Default input: the bundled Qwen3-30B-A3B statistics.",
    )
    p.add_argument("source", nargs="?", type=Path, default=None, help="trace or statistics (any importable format); default: bundled Qwen3-30B-A3B")
    p.add_argument("--format", choices=formats, default="auto", help="input format (default: detected)")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR", help="write load and co-activation PNGs into DIR")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the per-layer summary as JSON")
    add_model_argument(p)
    p.set_defaults(func=run_stats)

    p = subparsers.add_parser(
        "synthesize", help=COMMANDS["synthesize"],
        description="Synthesize a seeded per-token trace from statistics (e.g. Qwen3-30B-A3B load and pairs) and "
        "report how well it reproduces them.",
    )
    p.add_argument("source", nargs="?", type=Path, default=None, help="statistics (any importable format); default: bundled Qwen3-30B-A3B")
    p.add_argument("--format", choices=formats, default="auto")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens to generate (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output trace .npz")
    p.add_argument("--report", type=Path, default=None, metavar="FILE", help="write the full fidelity report (per layer) as JSON")
    add_model_argument(p)
    p.set_defaults(func=run_synthesize)


def read_source(path: Path | None, fmt: str = "auto", model: str | None = None, **kwargs) -> RoutingTrace | ExpertStats:
    """Any importable input, or the bundled statistics when ``path`` is None; ``model`` renames its model."""
    if path is None:
        from megatron_grace.data import load_bundled_stats

        return with_model(load_bundled_stats(), model)
    from megatron_grace.trace.importers import import_any

    return with_model(import_any(path, fmt, **kwargs), model)


def read_stats(path: Path | None, fmt: str = "auto", model: str | None = None) -> tuple[ExpertStats, RoutingTrace | None]:
    """Statistics of an input (computed when it is a trace) and the trace itself if any."""
    data = read_source(path, fmt, model)
    if isinstance(data, RoutingTrace):
        return ExpertStats.from_trace(data), data
    return data, None


def run_import(args: argparse.Namespace) -> int:
    from megatron_grace.trace.importers import import_any

    kwargs = {k: v for k, v in (("num_experts", args.num_experts), ("top_k", args.top_k)) if v is not None}
    sources = args.sources
    data = with_model(import_any(sources if len(sources) > 1 else sources[0], args.format, **kwargs), args.model)
    if args.stats and isinstance(data, RoutingTrace):
        data = ExpertStats.from_trace(data)
    data.save(args.out)
    print(f"wrote {args.out}: {data!r}")
    if data.model == "unknown":
        print("note: the source does not name its model; give --model NAME (e.g. mixtral-8x7b) so that simulate and "
              "compare find its sizes")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from megatron_grace.statistics.summary import format_table, summarize

    stats, trace = read_stats(args.source, args.format, args.model)
    summary = summarize(stats, trace)
    print(f"{stats.model}: {stats.num_layers} MoE layers x {stats.num_experts} experts, top-{stats.top_k}, "
          f"{stats.tokens.max():.0f} tokens ({stats.source})")
    if stats.missing:
        print(f"not in this source: {', '.join(stats.missing)}")
    if stats.notes:
        print(f"derived, not read: {'; '.join(stats.notes)}")
    print(format_table(stats, summary))
    if args.json is not None:
        save_json_atomic(args.json, {"model": stats.model, "per_layer": summary.per_layer(), "overall": summary.overall()})
        print(f"wrote {args.json}")
    if args.plot is not None:
        from megatron_grace.statistics.plots import plot_stats

        for path in plot_stats(stats, args.plot, progress=True):
            print(f"wrote {path}")
    return 0


def run_synthesize(args: argparse.Namespace) -> int:
    from megatron_grace.trace.synthesis import synthesis_fidelity, synthesize_to_file

    data = read_source(args.source, args.format, args.model)
    if isinstance(data, RoutingTrace):
        raise GraceInputError("synthesize needs statistics, got a per-token trace (use it directly)", args.source)
    if args.tokens <= 0:
        raise GraceInputError(f"--tokens must be positive, got {args.tokens}")
    counts = synthesize_to_file(data, args.tokens, args.out, seed=args.seed, progress=True)  # streamed: never the whole trace
    print(f"wrote {args.out}: a trace of {args.tokens} tokens x {data.num_layers} layers, top-{data.top_k} of "
          f"{data.num_experts} experts (model {data.model})")
    fidelity = synthesis_fidelity(data, counts).to_dict()
    print(format_fidelity(fidelity))
    if args.report is not None:
        save_json_atomic(args.report, fidelity)
        print(f"wrote {args.report}")
    return 0


def pct(x: float | None, digits: int = 2) -> str:
    """``x`` as a percentage; None or NaN (nothing was measured) as n/a."""
    return "n/a (too few tokens to measure)" if x is None or x != x else f"{x:.{digits}%}"  # x != x: NaN


def format_fidelity(fidelity: dict) -> str:
    """One line: how well a synthesized trace reproduces its statistics (from ``synthesis_fidelity``)."""
    o = fidelity["overall"]

    return (f"load: max relative error {pct(o.get('load_max_rel_err'), 3)} (experts with >= {o['min_expected_load']:.0f} expected "
            f"tokens); listed co-activation pairs: weighted relative error {pct(o.get('pair_weighted_rel_err'), 2)}")
