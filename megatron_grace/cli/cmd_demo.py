"""``grace demo``: the main job on the bundled real data (Qwen3-30B-A3B statistics).

Stages: statistics table and plots of the bundled model -> a per-token trace synthesized
from those statistics, with its fidelity report. Everything is written under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from megatron_grace._files import save_json_atomic


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="run the main job on the bundled Qwen3-30B-A3B data and write a report",
        description="Statistics and plots of the bundled Qwen3-30B-A3B routing data, then a synthesized per-token "
        "trace with its fidelity report. Output goes to --out (default ./grace-demo).",
    )
    p.add_argument("--out", type=Path, default=Path("grace-demo"), help="output folder (default ./grace-demo)")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens to synthesize (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from megatron_grace.cli.cmd_data import _jsonable
    from megatron_grace.data import load_bundled_stats
    from megatron_grace.statistics.plots import plot_stats
    from megatron_grace.statistics.summary import format_table, summarize
    from megatron_grace.trace.synthesis import synthesis_fidelity, synthesize_trace

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
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
    fidelity = _jsonable(synthesis_fidelity(stats, trace))
    report["synthesis"] = fidelity
    overall = fidelity.get("overall", fidelity) if isinstance(fidelity, dict) else fidelity
    print(json.dumps(overall, indent=1)[:3000])

    report["seconds"] = round(time.perf_counter() - t0, 2)
    save_json_atomic(out / "report.json", report)
    print(f"\nwrote {out / 'report.json'} ({report['seconds']} s)")
    return 0
