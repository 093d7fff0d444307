"""Benchmark ``grace checkpoint patch``: throughput against ``cp -r``, peak memory, Qwen3-30B-A3B estimate.

Generates (and deletes afterwards) a Megatron legacy per-rank ``torch`` checkpoint with
Qwen3-30B-A3B expert shapes (h 2048, f 768, bfloat16, 128 experts per layer, random weights) for
``--layers`` MoE layers at expert-parallel size ``--ep`` (the files Megatron-LM writes:
``iter_0000001/mp_rank_00_EEE/model_optim_rng.pt`` with ``decoder.layers.{i}.mlp.experts.
local_experts.{j}.linear_fc{1,2}.weight``; written here with ``torch.save`` because a 1 GB+
Megatron model is too slow to build on this CPU). A GRACE plan for the bundled Qwen3-30B-A3B
statistics (``--topology``, ``--extra-slots``; its first ``--layers`` layers) is applied with the
CLI in a subprocess. Measured in the same run: ``cp -r`` of the same checkpoint on the same
disk, ``cp -r`` followed by ``sync -f`` (a copy that is on the disk when it returns, as the
patch's output is: the patch fsyncs every file before its rename) and the patch (wall time,
peak RSS of the process), ``--repeat`` times in alternating order
(the machine is shared: each pair's ratio, their median and range, and the load average are
reported), the patch with ``--file-sha256`` (plain sha256 of every output file as well),
the patch with ``--no-kernel-copy`` (every block written from the read buffer, the path before
the kernel copy), ``verify``, and a Python process that only imports the package (baseline
RSS). The Qwen3-30B-A3B (48 layers) time is extrapolated linearly per layer from the measured
subset. Prints a table, writes JSON.

    python scripts/bench_checkpoint.py --layers 2 --ep 4 --out benchmarks/results/checkpoint.json
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
QWEN = {"layers": 48, "experts": 128, "hidden": 2048, "ffn": 768}


def _child(argv: list[str]) -> tuple[float, int, int]:
    """Run a command; return (seconds, exit code, peak RSS in bytes of that child)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), GRACE_NO_PROGRESS="1")
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); rc = subprocess.call(sys.argv[1:]); "
            "dt = time.perf_counter() - t; print(dt, rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, check=True)
    dt, rc, rss = out.stdout.split()[-3:]
    return float(dt), int(rc), int(rss)


def make_checkpoint(root: Path, layers: int, ep: int, seed: int = 0) -> list[Path]:
    """Megatron legacy files, EP ``ep``, Qwen3 expert shapes in bfloat16; returns the rank files."""
    E, h, f = QWEN["experts"], QWEN["hidden"], QWEN["ffn"]
    n = E // ep
    it = root / "iter_0000001"
    files = []
    g = torch.Generator().manual_seed(seed)
    for r in range(ep):
        model = {"embedding.word_embeddings.weight": torch.randn(1024, h, generator=g).to(torch.bfloat16)}
        for li in range(layers):
            p = f"decoder.layers.{li}.mlp."
            model[p + "router.weight"] = torch.randn(E, h, generator=g).to(torch.bfloat16)
            for j in range(n):
                model[f"{p}experts.local_experts.{j}.linear_fc1.weight"] = torch.randn(2 * f, h, generator=g).to(torch.bfloat16)
                model[f"{p}experts.local_experts.{j}.linear_fc2.weight"] = torch.randn(h, f, generator=g).to(torch.bfloat16)
        d = it / f"mp_rank_00_{r:03d}"
        d.mkdir(parents=True)
        torch.save({"model": model, "iteration": 1, "checkpoint_version": 3.0}, d / "model_optim_rng.pt")
        files.append(d / "model_optim_rng.pt")
        del model
    (root / "latest_checkpointed_iteration.txt").write_text("1")
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="MoE layers generated (of Qwen3-30B-A3B's 48)")
    ap.add_argument("--ep", type=int, default=4, help="expert-parallel size of the generated checkpoint")
    ap.add_argument("--topology", default="a100-2x4", help="topology preset of the plan")
    ap.add_argument("--extra-slots", type=int, default=2, help="replica slots per GPU in the plan")
    ap.add_argument("--repeat", type=int, default=3, help="cp -r / patch pairs (alternating order); medians and ranges are reported")
    ap.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temporary directory on /tmp's disk)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "checkpoint.json")
    args = ap.parse_args()

    from megatron_grace.data import load_bundled_stats
    from megatron_grace.plan.placement import PlacementPlan
    from megatron_grace.plan.planners import plan_placement
    from megatron_grace.plan.topology import Topology

    work = Path(tempfile.mkdtemp(prefix="grace-bench-ckpt-", dir=args.workdir))
    try:
        stats = load_bundled_stats()
        topo = Topology.preset(args.topology).with_extra_slots(QWEN["experts"], args.extra_slots)
        full = plan_placement(stats, topo, "grace")
        plan = PlacementPlan(full.topology, full.num_experts, full.gpu_experts[: args.layers], planner=full.planner)
        plan.save(work / "plan.json")
        src = work / "src"
        t = time.perf_counter()
        files = make_checkpoint(src, args.layers, args.ep)
        gen_s = time.perf_counter() - t
        src_bytes = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        largest = max(p.stat().st_size for p in files)
        base_s, _, base_rss = _child([sys.executable, "-c", "import torch, megatron_grace.checkpoint, megatron_grace.cli.main"])
        grace = [sys.executable, "-m", "megatron_grace", "checkpoint"]
        patch_argv = [*grace, "patch", str(src), str(work / "dst"), "--plan", str(work / "plan.json")]
        runs = []
        load_before = os.getloadavg()
        for i in range(args.repeat):  # cp -r and patch alternate (their order too): the machine is shared, its load drifts
            run: dict[str, float] = {}
            order = ["cp", "patch", "cp_sync", "patch_file_sha256", "patch_no_kernel_copy"]
            for what in order if i % 2 == 0 else order[::-1]:
                if what in ("cp", "cp_sync"):
                    sync = ' && sync -f "$1"' if what == "cp_sync" else ""
                    run[f"{what.replace('cp', 'cp_r')}_s"], _, _ = _child(["sh", "-c", 'cp -r "$0" "$1"' + sync, str(src), str(work / "copy")])
                    shutil.rmtree(work / "copy")
                    continue
                shutil.rmtree(work / "dst", ignore_errors=True)
                flag = {"patch_file_sha256": ["--file-sha256"], "patch_no_kernel_copy": ["--no-kernel-copy"]}.get(what, [])
                dt, rc, rss = _child(patch_argv + flag)
                if rc != 0:
                    raise SystemExit(f"patch failed with exit code {rc}")
                run[f"{what}_s"], run[f"{what}_rss"] = dt, rss
            run["ratio"] = run["cp_r_s"] / run["patch_s"]
            run["ratio_file_sha256"] = run["cp_r_s"] / run["patch_file_sha256_s"]
            run["ratio_vs_cp_sync"] = run["cp_r_sync_s"] / run["patch_s"]
            run["ratio_no_kernel_copy"] = run["cp_r_s"] / run["patch_no_kernel_copy_s"]
            run["loadavg_1min"] = os.getloadavg()[0]
            runs.append(run)
            print(f"run {i + 1}/{args.repeat}: cp -r {run['cp_r_s']:.2f} s, patch {run['patch_s']:.2f} s ({run['ratio']:.2f}x), "
                  f"patch --file-sha256 {run['patch_file_sha256_s']:.2f} s ({run['ratio_file_sha256']:.2f}x), "
                  f"cp -r + sync {run['cp_r_sync_s']:.2f} s (patch {run['ratio_vs_cp_sync']:.2f}x of it), "
                  f"patch --no-kernel-copy {run['patch_no_kernel_copy_s']:.2f} s, "
                  f"load {run['loadavg_1min']:.1f}", flush=True)
        cp_s = statistics.median(r["cp_r_s"] for r in runs)
        patch_s = statistics.median(r["patch_s"] for r in runs)
        patch_rss = max(max(r["patch_rss"], r["patch_file_sha256_rss"]) for r in runs)
        dst_bytes = sum(p.stat().st_size for p in (work / "dst").rglob("*") if p.is_file())
        verify_s, rc_v, _ = _child([*grace, "verify", str(work / "dst")])
        from megatron_grace.checkpoint import load_rank_slots

        per_rank = []
        for g in range(plan.num_gpus):  # what each rank reads to load its slots of layer 0
            t = time.perf_counter()
            slots_g = load_rank_slots(work / "dst", 0, g, plan=plan)
            per_rank.append({"rank": g, "slots": len(slots_g), "bytes_read": slots_g.bytes_read,
                             "rank_file_bytes": (work / "dst" / "experts" / f"rank_{g:05d}.safetensors").stat().st_size,
                             "manifest_bytes": slots_g.manifest_bytes, "seconds": time.perf_counter() - t})
            del slots_g
        slots = sum(len(g) for layer in plan.gpu_experts for g in layer)
        # patch time without the ~fixed start-up (interpreter, imports): the baseline process's time
        per_layer = max(patch_s - base_s, 1e-9) / args.layers
        qwen_s = base_s + per_layer * QWEN["layers"]
        ratios = [r["ratio"] for r in runs]
        ratios_sha = [r["ratio_file_sha256"] for r in runs]
        ratios_sync = [r["ratio_vs_cp_sync"] for r in runs]
        cp_sync_s = statistics.median(r["cp_r_sync_s"] for r in runs)
        no_kernel_s = statistics.median(r["patch_no_kernel_copy_s"] for r in runs)
        result = {
            "layers": args.layers, "ep": args.ep, "plan": {"topology": args.topology, "extra_slots": args.extra_slots, "slots": slots,
                                                           "gpus": plan.num_gpus},
            "source_bytes": src_bytes, "largest_source_file": largest, "patched_bytes": dst_bytes, "generate_s": gen_s,
            "runs": runs, "loadavg_before": load_before,  # the load after: the provenance
            "cp_r_s": cp_s, "patch_s": patch_s, "verify_s": verify_s, "verify_rc": rc_v, "startup_s": base_s,
            "patch_mb_per_s": src_bytes / patch_s / 1e6, "cp_mb_per_s": src_bytes / cp_s / 1e6,
            "throughput_vs_cp": statistics.median(ratios), "throughput_vs_cp_range": [min(ratios), max(ratios)],
            "throughput_vs_cp_file_sha256": statistics.median(ratios_sha),
            "throughput_vs_cp_file_sha256_range": [min(ratios_sha), max(ratios_sha)],
            "cp_r_sync_s": cp_sync_s, "throughput_vs_cp_sync": statistics.median(ratios_sync),
            "throughput_vs_cp_sync_range": [min(ratios_sync), max(ratios_sync)],
            "throughput_after_startup_vs_cp": cp_s / max(patch_s - base_s, 1e-9),
            "patch_no_kernel_copy_s": no_kernel_s, "throughput_vs_cp_no_kernel_copy": cp_s / no_kernel_s,
            "peak_rss": patch_rss, "baseline_rss": base_rss, "peak_rss_over_largest_file": patch_rss / largest,
            "rss_above_baseline_over_largest_file": (patch_rss - base_rss) / largest,
            "qwen3_30b_a3b_estimate_s": qwen_s, "load_rank_slots_layer0": per_rank,
            "qwen3_30b_a3b_source_bytes": src_bytes / args.layers * QWEN["layers"],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [("source (generated, Qwen3 shapes, bf16)", f"{args.layers} layers x 128 experts, EP {args.ep}: {src_bytes / 1e9:.2f} GB, "
             f"largest file {largest / 1e9:.2f} GB"),
            ("plan", f"grace on the bundled Qwen3 statistics, {args.topology} +{args.extra_slots} slots: {slots} slots on "
             f"{plan.num_gpus} GPUs"),
            ("cp -r (median)", f"{cp_s:.2f} s ({result['cp_mb_per_s']:.0f} MB/s)"),
            ("grace checkpoint patch (median)", f"{patch_s:.2f} s ({result['patch_mb_per_s']:.0f} MB/s of source; "
             f"{dst_bytes / 1e9:.2f} GB written)"),
            ("patch throughput / cp -r", f"median {result['throughput_vs_cp']:.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x over "
             f"{args.repeat} runs (target >= 0.5x)"),
            ("patch throughput / (cp -r + sync -f)", f"median {result['throughput_vs_cp_sync']:.2f}x, range "
             f"{min(ratios_sync):.2f}-{max(ratios_sync):.2f}x (cp -r + sync median {cp_sync_s:.2f} s)"),
            ("patch without its start-up / cp -r", f"{result['throughput_after_startup_vs_cp']:.2f}x (medians; start-up = "
             f"{base_s:.2f} s, a process that only imports)"),
            ("patch --no-kernel-copy (pwrite from the buffer)", f"median {no_kernel_s:.2f} s = "
             f"{result['throughput_vs_cp_no_kernel_copy']:.2f}x of cp -r"),
            ("same with --file-sha256", f"median {result['throughput_vs_cp_file_sha256']:.2f}x, range {min(ratios_sha):.2f}-"
             f"{max(ratios_sha):.2f}x"),
            ("load average (1 min)", f"{load_before[0]:.1f} before, " + ", ".join(f"{r['loadavg_1min']:.1f}" for r in runs)
             + " after each run"),
            ("peak RSS of patch", f"{patch_rss / 1e9:.2f} GB = {result['peak_rss_over_largest_file']:.2f}x the largest file "
             f"({(patch_rss - base_rss) / 1e9:.2f} GB above the {base_rss / 1e9:.2f} GB of a process that only imports = "
             f"{result['rss_above_baseline_over_largest_file']:.2f}x; target < 1.5x)"),
            ("grace checkpoint verify", f"{verify_s:.2f} s (exit {rc_v})"),
            ("load_rank_slots, layer 0, per rank", f"{min(r['bytes_read'] for r in per_rank) / 1e6:.1f}-"
             f"{max(r['bytes_read'] for r in per_rank) / 1e6:.1f} MB read ({min(r['slots'] for r in per_rank)}-"
             f"{max(r['slots'] for r in per_rank)} slots) of {src_bytes / 1e9:.2f} GB; + manifest "
             f"{per_rank[0]['manifest_bytes'] / 1e6:.2f} MB"),
            ("Qwen3-30B-A3B, 48 layers (estimate)", f"{qwen_s:.0f} s for {result['qwen3_30b_a3b_source_bytes'] / 1e9:.0f} GB "
             f"(start-up {base_s:.1f} s + {per_layer:.1f} s per layer, linear in layers)")]
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")
    from megatron_grace._provenance import save_result_json

    save_result_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up of the generated files
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
