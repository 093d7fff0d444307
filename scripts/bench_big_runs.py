"""Peak memory and time of big `grace` runs (issue 14, item 7): synthesize, then stats on the result.

Each step runs as its own `python -m megatron_grace ...` process under GNU time; the table gives
wall time, peak RSS, the output's size on disk and in memory (int32 ids), and peak RSS over the
in-memory output (the issue's target: at most 2x for synthesis).

    python scripts/bench_big_runs.py --tokens 200000 [--tokens 1000000]

Writes benchmarks/results/big_runs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str]) -> dict[str, float]:
    """Wall seconds and peak RSS (MB) of one CLI run; raises if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "megatron_grace", *argv], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1e3
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    return {"wall_s": seconds, "peak_rss_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, action="append", help="token counts (default 200000)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "big_runs.json")
    args = ap.parse_args()
    rows = []
    baseline = run(["--version"])["peak_rss_mb"]
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in args.tokens or [200_000]:
            trace = Path(tmp) / f"t{tokens}.npz"
            syn = run(["synthesize", "--tokens", str(tokens), "--out", str(trace)])
            in_memory = tokens * 48 * 8 * 4 / 1e6  # bundled Qwen3-30B-A3B: 48 layers, top-8, int32 ids
            st = run(["stats", str(trace)])
            rows.append({"tokens": tokens, "synthesize_s": syn["wall_s"], "synthesize_peak_rss_mb": syn["peak_rss_mb"],
                         "output_file_mb": trace.stat().st_size / 1e6, "output_in_memory_mb": in_memory,
                         "synthesize_rss_over_output": syn["peak_rss_mb"] / in_memory,
                         "stats_s": st["wall_s"], "stats_peak_rss_mb": st["peak_rss_mb"]})
    print(f"python + imports alone: {baseline:.0f} MB peak RSS")
    print(f"{'tokens':>9} {'synth s':>8} {'synth RSS MB':>12} {'out MB (disk)':>13} {'out MB (mem)':>12} {'RSS/out':>8} "
          f"{'stats s':>8} {'stats RSS MB':>12}")
    for r in rows:
        print(f"{r['tokens']:>9} {r['synthesize_s']:>8.1f} {r['synthesize_peak_rss_mb']:>12.0f} {r['output_file_mb']:>13.0f} "
              f"{r['output_in_memory_mb']:>12.0f} {r['synthesize_rss_over_output']:>8.2f} {r['stats_s']:>8.1f} {r['stats_peak_rss_mb']:>12.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "cpus": os.cpu_count(), "imports_rss_mb": baseline,
                                    "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
