"""Benchmark results record where they came from (``megatron_grace._provenance``)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from megatron_grace._provenance import save_result_json

ROOT = Path(__file__).resolve().parents[1]


def test_results_carry_the_commit_and_the_load(tmp_path):
    out = tmp_path / "r.json"
    save_result_json(out, {"rows": [1, 2], "ratio": float("nan")})
    data = json.loads(out.read_text())
    assert data["rows"] == [1, 2] and data["ratio"] is None  # strict JSON, as every result file
    prov = data["provenance"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI's clean clone is one)
        assert prov["commit"] == head.stdout.strip() and isinstance(prov["uncommitted_changes"], bool)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", prov["utc"]) and len(prov["loadavg"]) == 3 and prov["cpus"] >= 1
