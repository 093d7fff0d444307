"""Tests spawn gloo ranks with the package's launcher (see :mod:`megatron_grace.layer.launch`), or run a
launcher job (torchrun, deepspeed) as a subprocess with :func:`run_job`."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from megatron_grace.layer.launch import free_port, run_distributed

__all__ = ["free_port", "run_distributed", "run_job"]


def run_job(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run a launcher job in its own process group; on timeout kill every rank and fail the test. Returns (exit code, output)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd[:4]))} ... timed out after {timeout:.0f} s:\n" + log[-4000:])
    return proc.returncode, log
