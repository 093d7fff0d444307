"""scripts/emulate_cluster.sh (arguments, root check, clean-up after success, failure and Ctrl-C) and a
tiny run of scripts/cluster_workload.py on loopback ranks (no namespaces).

The tests that create namespaces need root and iproute2 (skipped otherwise); they use their own
name prefix and run a trivial command per node instead of the workload, so each takes well under
a second. The full emulation is a benchmark, not a test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "emulate_cluster.sh"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
HAS_IP = shutil.which("ip") is not None and shutil.which("tc") is not None
needs_root = pytest.mark.skipif(not (IS_ROOT and HAS_IP), reason="needs root and iproute2 (ip, tc)")


def run(*args: str, timeout: float = 60, user: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["bash", str(SCRIPT), *args]
    if user:
        cmd = ["setpriv", "--reuid", user, "--regid", user, "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def leftovers(prefix: str) -> list[str]:
    """Namespaces or root-namespace links whose name starts with ``prefix``."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [line for line in (ns + links).splitlines() if prefix in line]


@pytest.fixture
def prefix():
    p = "gt" + uuid.uuid4().hex[:6]
    yield p
    if IS_ROOT and HAS_IP:
        subprocess.run(["bash", str(SCRIPT), "--prefix", p, "--cleanup"], capture_output=True, timeout=30)


def test_help_and_bad_arguments():
    r = run("--help")
    assert r.returncode == 0 and "--quick" in r.stdout and "--node-command" in r.stdout
    for args, msg in ((["--bogus"], "unknown option '--bogus'"), (["--rate", "fast"], "--rate 'fast' is not a tc rate"),
                      (["--delay", "soon"], "--delay 'soon'"), (["--gpus-per-node", "0"], "--gpus-per-node '0'"),
                      (["--port", "80"], "--port '80'"), (["--prefix", "Bad_Name"], "--prefix 'Bad_Name'"), (["--out"], "--out needs a value")):
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr


def test_not_root_exits_2():
    if IS_ROOT:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop privileges")
        r = run("--quick", user="65534")
    else:
        r = run("--quick")
    assert r.returncode == 2
    assert "must run as root" in r.stderr


@needs_root
def test_runs_and_cleans_up_after_success_and_failure(prefix):
    # success: both nodes reach each other's address over the veth; the qdisc is there during the run
    probe = ("ip -o addr show dev $IFACE | grep -q \"$ADDR/\" && tc qdisc show dev $IFACE | grep -q tbf && "
             "ip route get 10.211.0.$((2 - NODE)) | grep -q \"dev $IFACE\"")
    r = run("--prefix", prefix, "--node-command", probe)
    assert r.returncode == 0, r.stderr
    assert "rate 1gbit" in r.stdout
    assert leftovers(prefix) == []
    # failure in one node: exit 1, nothing left
    r = run("--prefix", prefix, "--node-command", "exit $((3 * NODE))")
    assert r.returncode == 1 and "the workload failed" in r.stderr
    assert leftovers(prefix) == []
    # clean-up alone is idempotent
    for _ in range(2):
        assert run("--prefix", prefix, "--cleanup").returncode == 0
    assert leftovers(prefix) == []


@needs_root
def test_interrupt_cleans_up(prefix):
    proc = subprocess.Popen(["bash", str(SCRIPT), "--prefix", prefix, "--node-command", "sleep 60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(f"{prefix}-n1" in line for line in leftovers(prefix)):
            time.sleep(0.1)
        time.sleep(0.3)  # let the node commands start
        assert leftovers(prefix), "the namespaces never appeared"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in err
    assert leftovers(prefix) == []
    # a leftover from a killed run (no trap ran) is removed by the next run's start or by --cleanup
    subprocess.run(["ip", "netns", "add", f"{prefix}-n0"], check=True)
    assert run("--prefix", prefix, "--cleanup").returncode == 0
    assert leftovers(prefix) == []


def _workload_module():
    spec = importlib.util.spec_from_file_location("cluster_workload", ROOT / "scripts" / "cluster_workload.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_interface_bytes_reads_proc_net_dev():
    mod = _workload_module()
    if not Path("/proc/net/dev").exists():
        pytest.skip("no /proc/net/dev")
    counters = mod.interface_bytes("lo")
    assert len(counters) == 4 and all(isinstance(v, int) and v >= 0 for v in counters)
    with pytest.raises(SystemExit, match="not found"):
        mod.interface_bytes("no-such-if0")


def test_tiny_workload_on_loopback(tmp_path):
    """2 ranks (2 'nodes' x 1 GPU) on loopback: every configuration runs and its counters land in the JSON;
    ``--refit`` then fits a micro-benchmark (here an exact synthetic one) and adds the simulator's predictions."""
    out = tmp_path / "tiny.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRACE_NO_PROGRESS": "1"}
    script = str(ROOT / "scripts" / "cluster_workload.py")
    r = subprocess.run([sys.executable, script, "--world", "2", "--gpus-per-node", "1", "--layers", "1", "--hidden", "16", "--ffn", "8",
                        "--decode-tokens", "16", "--phases", "decode", "--planners", "vanilla", "grace", "--extra-slots", "1",
                        "--steps", "1", "--repeats", "2", "--no-microbench", "--out", str(out)],
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["results"]
    assert {(x["plan"], x["mode"]) for x in rows} == {(p, m) for p in ("vanilla+1", "grace+1") for m in ("flat", "hierarchical")}
    for x in rows:
        assert x["repeats"] == 2 and x["tokens_per_s_median"] > 0 and x["tokens_per_s_min"] <= x["tokens_per_s_max"]
        assert "predicted_layer_ms" not in x
    inter = {(x["plan"], x["mode"]): x["bytes_per_layer_step_by_link"]["dispatch"]["inter_node"] for x in rows}
    for plan in ("vanilla+1", "grace+1"):  # 1 GPU per node: every remote pair crosses nodes; hierarchical sends a token once
        assert 0 < inter[(plan, "hierarchical")] <= inter[(plan, "flat")]
    assert data["targets"] and "vs_vanilla_flat" in data["targets"][0] and data["calibration"] is None

    # refit with an exact micro-benchmark: 1 ms + bytes / 10 MB/s inter-node, 1 us per expert row
    data["microbench"] = {"intra": [], "inter": [[b, 1e-3 + b / 1e7] for b in (1e3, 1e5, 1e6)],
                          "compute": [[n, n * 1e-6] for n in (256, 1024, 4096)]}
    out.write_text(json.dumps(data))
    assert _workload_module().main(["--refit", str(out)]) == 0
    again = json.loads(out.read_text())
    fit = again["calibration"]["fit"]
    assert fit["inter_node"]["bandwidth_bytes_per_s"] == pytest.approx(1e7, rel=1e-6) and fit["intra_node"] is None
    assert set(again["calibration"]["comparison"]) == {"decode"}
    for x in again["results"]:
        assert x["predicted_layer_ms"] > 2.0  # at least the two 1 ms latencies of dispatch and combine
    assert Path(str(out).replace(".json", ".png")).exists()
