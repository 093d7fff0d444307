"""``scripts/deepspeed_infer.py`` under DeepSpeed's own launcher (``deepspeed --num_gpus 4``, CPU ranks, gloo).

One small job (1 MoE layer, 8 experts with Linear biases, ep_size 4, one batch of 32 tokens per rank): the script
makes its plan with the project's planner from a calibration pass, runs DeepSpeed's MoE, then GRACE
with flat and hierarchical dispatch, and must print ``agree`` for both, the per-rank traffic and
exit 0. A second job runs on a plan made by `grace plan --topology 1x4 --extra-slots 1` (48 layers
x 128 experts with copies). On a machine where DeepSpeed has not yet built its shared-memory comm op
(``~/.cache/torch_extensions``), the launcher's ranks first spend ~30 s compiling it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from _dist_utils import free_port, run_job

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = Path(sys.executable).parent / "deepspeed"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None or not LAUNCHER.exists(),
                                reason="deepspeed (and its launcher) is not installed")


def _shm_left(port: int) -> list[str]:
    """DeepSpeed CPU all-reduce segments of the job on ``port`` still in /dev/shm (the job must remove its own)."""
    return sorted(str(p) for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def test_deepspeed_launcher_job_agrees(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out_json, plan_json = tmp_path / "result.json", tmp_path / "plan.json"
    port = free_port()
    cmd = [str(LAUNCHER), "--num_gpus", "4", "--master_port", str(port), str(ROOT / "scripts" / "deepspeed_infer.py"),
           "--layers", "1", "--experts", "8", "--tokens", "32", "--steps", "1", "--json", str(out_json),
           "--save-plan", str(plan_json), "--timeout", "300", "--expert-bias"]
    rc, log = run_job(cmd, tmp_path, env, timeout=400)
    assert rc == 0, log[-4000:]
    assert not _shm_left(port)  # DeepSpeed never unlinks them; the job does
    assert "GRACE flat vs DeepSpeed MoE: agree" in log and "GRACE hierarchical vs DeepSpeed MoE: agree" in log, log[-4000:]
    assert "agreement: OK" in log and "gelu experts with biases" in log
    result = json.loads(out_json.read_text())
    assert result["ok"] and len(result["ranks"]) == 4
    for r in result["ranks"]:
        for mode in ("flat", "hierarchical"):
            assert r[mode]["max_rel_err"] <= 1e-5 and r[mode]["end_to_end_rel_err"] <= 1e-5  # one layer: the same thing
            assert r[mode]["traffic"]["pairs"] == 32 * 2  # top-2, nothing dropped
        assert sum(r["deepspeed"]["rows_sent_by_link"]["tokens"].values()) == 32 * 2
    plan = json.loads(plan_json.read_text())
    assert plan["topology"]["num_nodes"] * plan["topology"]["gpus_per_node"] == 4


def test_deepspeed_launcher_job_with_a_cli_plan(tmp_path):
    """`grace plan --topology 1x4 --extra-slots 1` (the bundled Qwen3 statistics: 48 layers x 128 experts, copies),
    then the launcher job on that plan: the model takes its layer and expert counts from the plan."""
    import subprocess

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), GRACE_NO_PROGRESS="1")
    plan = tmp_path / "plan.json"
    subprocess.run([sys.executable, "-m", "megatron_grace", "plan", "--topology", "1x4", "--extra-slots", "1", "--out", str(plan)],
                   check=True, env=env, cwd=tmp_path, capture_output=True, timeout=300)
    out_json = tmp_path / "result.json"
    cmd = [str(LAUNCHER), "--num_gpus", "4", "--master_port", str(free_port()), str(ROOT / "scripts" / "deepspeed_infer.py"),
           "--plan", str(plan), "--tokens", "16", "--steps", "1", "--json", str(out_json), "--timeout", "300"]
    rc, log = run_job(cmd, tmp_path, env, timeout=600)
    assert rc == 0, log[-4000:]
    assert "48 DeepSpeed MoE layers, 128 experts" in log and "agreement: OK" in log, log[-4000:]
    result = json.loads(out_json.read_text())
    assert result["ok"] and result["plan_source"] == f"file {plan}"
    for r in result["ranks"]:
        for mode in ("flat", "hierarchical"):
            assert r[mode]["max_rel_err"] <= 1e-5 and r[mode]["traffic"]["pairs"] == 48 * 16 * 2  # 48 layers, top-2
