"""The Megatron inference job end to end: `grace plan --topology 1x4 --extra-slots 1`, then
`torchrun --nproc-per-node 4 scripts/megatron_infer.py --plan ...` on CPU/gloo prints agreement
between GRACE (flat and hierarchical) and Megatron's own alltoall dispatcher."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    pytest.skip("megatron-core is not installed", allow_module_level=True)

from _dist_utils import free_port, run_job  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_megatron_infer_with_a_cli_plan(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GRACE_NO_PROGRESS": "1"}
    plan = tmp_path / "plan.json"
    subprocess.run([sys.executable, "-m", "megatron_grace", "plan", "--topology", "1x4", "--extra-slots", "1", "--out", str(plan)],
                   check=True, env=env, cwd=tmp_path, capture_output=True, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", str(free_port())]
    cmd = torchrun + [str(ROOT / "scripts" / "megatron_infer.py"), "--plan", str(plan), "--hidden", "32", "--moe-ffn", "16",
                      "--batch", "2", "--prompt", "8", "--decode", "2", "--timeout", "300", "--json", str(tmp_path / "out.json")]
    rc, log = run_job(cmd, tmp_path, env, timeout=600)
    assert rc == 0, log[-4000:]
    assert "agreement: OK" in log
    assert "Unknown MLP type" not in log  # the known warnings are silenced
    import json

    result = json.loads((tmp_path / "out.json").read_text())
    assert result["ok"] and len(result["ranks"]) == 4
    for r in result["ranks"]:
        for mode in ("flat", "hierarchical"):
            assert r[mode]["max_rel_err_prefill"] < 1e-5 and r[mode]["greedy_tokens_agree"]
