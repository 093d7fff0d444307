"""Where a benchmark result came from: the commit, whether the tree had uncommitted changes, the machine's load.

Every script under ``scripts/`` that writes ``benchmarks/results/*.json`` writes it with
:func:`save_result_json`, so a result can be traced to the code that produced it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from megatron_grace._files import PathLike, save_json_atomic

_ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_provenance() -> dict[str, Any]:
    """``{"commit", "uncommitted_changes", "utc", "command", "python", "torch", "cpus", "loadavg"}`` of this run
    (commit None outside a git checkout)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    try:
        import torch

        torch_version: str | None = torch.__version__
    except ImportError:
        torch_version = None
    return {"commit": _git("rev-parse", "HEAD"), "uncommitted_changes": None if status is None else bool(status),
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(["python", *sys.argv]),
            "python": platform.python_version(), "torch": torch_version, "cpus": os.cpu_count(),
            "loadavg": list(os.getloadavg())}


def save_result_json(target: PathLike, result: dict[str, Any]) -> None:
    """:func:`save_json_atomic` of ``result`` plus its ``"provenance"`` (:func:`run_provenance`)."""
    save_json_atomic(target, {**result, "provenance": run_provenance()})
