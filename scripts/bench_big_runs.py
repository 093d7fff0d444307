"""Time and peak memory of big `grace` runs (issue 14, item 7): synthesize, then stats, plan --trace and simulate on it.

Each step runs as its own `python -m megatron_grace ...` process; its peak RSS (ru_maxrss) and
CPU time come from os.wait4, that child's own resource usage. The table gives wall and CPU seconds, peak RSS, and peak
RSS over the issue's yardsticks: the output file's size for synthesize, the trace's in-memory
size (int32 ids [T, L, k] + request ids + phase) for stats, plan --trace and simulate. Targets:
synthesize 1,000,000 tokens x 48 layers x top-8 in under 90 s on 2 cores at peak RSS <= 2x the
output file; the others at <= 2x the trace in memory. The machine's load average is recorded
next to the figures (a shared machine stretches wall times; CPU seconds are steadier).

    python scripts/bench_big_runs.py --tokens 1000000

Writes benchmarks/results/big_runs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS, TOP_K = 48, 8  # the bundled Qwen3-30B-A3B statistics


def run(argv: list[str]) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one CLI run, from ``os.wait4`` (that child's own
    ``ru_maxrss``, the kernel's peak RSS, and its user + system time); raises if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "megatron_grace", *argv], stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {err.read()[-2000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000, help="tokens to synthesize (default 1000000)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "big_runs.json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    imports = run(["--version"])["peak_rss_mb"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trace, plan = Path(tmp) / "trace.npz", Path(tmp) / "plan.json"
        in_memory = (args.tokens * LAYERS * TOP_K * 4 + args.tokens * 9) / 1e6  # int32 ids + int64 request ids + int8 phase
        steps = [("synthesize", ["synthesize", "--tokens", str(args.tokens), "--out", str(trace)]),
                 ("stats", ["stats", str(trace)]),
                 ("plan --trace", ["plan", "--trace", str(trace), "--out", str(plan), "--no-per-layer"]),
                 ("simulate", ["simulate", "--plan", str(plan), "--trace", str(trace)])]
        for name, argv in steps:
            res = run(argv)
            if name == "synthesize":
                file_mb = trace.stat().st_size / 1e6
                res.update(yardstick="output file", yardstick_mb=file_mb)
            else:
                res.update(yardstick="trace in memory", yardstick_mb=in_memory)
            res.update(step=name, tokens=args.tokens, rss_over_yardstick=res["peak_rss_mb"] / res["yardstick_mb"],
                       loadavg_1min_after=os.getloadavg()[0])
            rows.append(res)
            print(f"{name}: {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU, {res['peak_rss_mb']:.0f} MB peak RSS", flush=True)
    print(f"\n{args.tokens} tokens x {LAYERS} layers x top-{TOP_K} (bundled Qwen3-30B-A3B statistics); python + imports alone: "
          f"{imports:.0f} MB; load average before {load_before[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'step':<14}{'wall s':>8}{'CPU s':>8}{'peak RSS MB':>13}{'yardstick':>18}{'MB':>8}{'RSS/yardstick':>15}{'load':>6}")
    for r in rows:
        print(f"{r['step']:<14}{r['wall_s']:>8.1f}{r['cpu_s']:>8.1f}{r['peak_rss_mb']:>13.0f}{r['yardstick']:>18}{r['yardstick_mb']:>8.0f}"
              f"{r['rss_over_yardstick']:>15.2f}{r['loadavg_1min_after']:>6.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "cpus": os.cpu_count(),
                                    "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
                                    "imports_rss_mb": imports, "targets": {"synthesize_wall_s": 90, "rss_over_yardstick": 2.0},
                                    "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
