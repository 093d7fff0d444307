"""Hostile inputs and resource limits (issue 14) and detection that never guesses (issue 12, item 6).

Every case either succeeds with the right answer or ends with exit code 2 and one line naming
the problem: no traceback, no hang, no silent wrong result. Sizes an input claims are refused
before anything of that size is allocated. Generated cases, the cases that claim terabytes and
the special-file cases run through the CLI's ``main()`` in subprocesses whose address space is
capped (:data:`AS_CAP`) and that are killed on a timeout (:func:`run_capped`, batched, a case that
kills its batch rerun alone), so an attempted big allocation fails with "out of memory" instead
of the limit's message, and a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT

from megatron_grace import ExpertStats, RoutingTrace, limits
from megatron_grace._files import atomic_path, load_npz, remove_stale_temporaries, save_npz_atomic
from megatron_grace.cli.main import build_parser, main
from megatron_grace.errors import GraceInputError
from megatron_grace.plan.topology import Topology
from megatron_grace.trace.importers import detect_format, import_any

PY = sys.executable


# ====================================================================== helpers
def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _refused(rc: int, err: str, *words: str) -> str:
    """Exit code 2 and exactly one stderr line, no traceback, holding every word."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("grace ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _records(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _vllm(layer: int = 0, tok: int = 0, experts: list | None = None) -> dict:
    return {"dataset": "d", "problem_id": 0, "layer": layer, "token_idx": tok, "experts": experts or [0, 1]}


def _npy_header(shape: tuple[int, ...], descr: str = "<i8") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _plan_dict(num_experts: int = 8, gpu_experts=None) -> dict:
    topo = Topology.preset("a100-2x4").with_slots(2)
    layer = gpu_experts or [[g] for g in range(8)]
    return {"format": "grace-plan/1", "topology": topo.to_dict(), "num_experts": num_experts, "num_layers": 1,
            "planner": "x", "metadata": {}, "layers": [{"gpu_experts": layer}]}


def _small_trace(tmp_path: Path, name: str = "t.npz", E: int = 8, L: int = 1, T: int = 40) -> Path:
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(E, 2, replace=False) for _ in range(L)]) for _ in range(T)]).astype(np.int32)
    path = tmp_path / name
    RoutingTrace(ids, E, model="tiny").save(path)
    return path


# ====================================================================== 1. sizes checked before allocation
def _huge_claims(tmp: Path) -> list[tuple[list[str], list[str]]]:
    """(argv, words of the refusal) for inputs that claim sizes no machine holds."""
    cases: list[tuple[list[str], list[str]]] = []
    cases.append((["stats", str(_records(tmp / "id.jsonl", [_vllm(experts=[0, 10**6])]))], ["expert id 1000000", "experts per layer"]))
    cases.append((["stats", str(_records(tmp / "layer.jsonl", [_vllm(layer=10**9)]))], ["layer 1000000000", "--limit layers"]))
    cases.append((["stats", str(_records(tmp / "layer5.jsonl", [_vllm(layer=100000)]))], ["layer 100000", "layers"]))
    cases.append((["stats", str(_records(tmp / "tok.jsonl", [_vllm(tok=2**62)]))], ["token index", "tokens"]))
    npy = tmp / "claims.npy"
    npy.write_bytes(_npy_header((10**12,)) + bytes(16))
    cases.append((["import", str(npy), "--format", "load-matrix", "--top-k", "1", "--out", str(tmp / "o.npz")],
                  ["claims shape (1000000000000,)", "holds 16 bytes"]))
    npz = tmp / "claims.npz"
    with zipfile.ZipFile(npz, "w") as zf:
        zf.writestr("expert_ids.npy", _npy_header((10**12, 2, 2), "<i2") + bytes(64))
    cases.append((["stats", str(npz)], ["array 'expert_ids'", "claims shape (1000000000000, 2, 2)"]))
    plan = tmp / "plan.json"
    plan.write_text(json.dumps(_plan_dict(num_experts=10**12)))
    cases.append((["simulate", "--plan", str(plan), "--trace", str(_small_trace(tmp))], ["num_experts 1000000000000 is implausible", "--limit experts"]))
    switch = tmp / "switch.json"
    switch.write_text(json.dumps({"expert_usage_by_layer": {"0": {"0": 5, "100000": 5}}}))
    cases.append((["synthesize", str(switch), "--tokens", "500", "--out", str(tmp / "s.npz")], ["expert id 100000"]))
    for argv, words in ((["plan", "--extra-slots", "1000000000"], ["--extra-slots 1000000000 is implausible", "--limit slots"]),
                        (["plan", "--extra-slots", str(2**63)], ["--extra-slots"]),
                        (["synthesize", "--tokens", str(10**12), "--out", str(tmp / "s.npz")], ["--tokens", "--limit tokens"]),
                        (["synthesize", "--tokens", str(2**63), "--out", str(tmp / "s.npz")], ["--tokens"]),
                        (["synthesize", "--tokens", str(10**9), "--out", str(tmp / "s.npz")], ["384.0 GB of disk", "free"]),
                        (["synthesize", "--seed", str(2**70), "--tokens", "10", "--out", str(tmp / "s.npz")], ["--seed", "2**63"]),
                        (["simulate", "--plan", str(plan), "--trace", str(tmp / "t.npz"), "--seed", "-1"], ["--seed must be >= 0"]),
                        (["plan", "--ratio", "nan"], ["--ratio must be a finite number"])):
        cases.append((argv, words))
    return cases


def test_huge_claims_refused_in_process(tmp_path: Path, capsys) -> None:
    for argv, words in _huge_claims(tmp_path):
        rc, _out, err = _cli(capsys, *argv)
        _refused(rc, err, *words)
        assert "out of memory" not in err  # the limit's message: nothing of that size was attempted


AS_CAP = 2 << 30
"""Address space of a capped CLI process (torch and this package import in about 0.7 GB of it)."""

_BATCH_RUNNER = r"""
import contextlib, io, json, sys
from megatron_grace.cli.main import main
for i, argv in enumerate(json.load(sys.stdin)):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    print(json.dumps([i, rc, err.getvalue()]), flush=True)
"""


def _cap_address_space() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (AS_CAP, AS_CAP))


def _run_batch(cases: list[list[str]], cwd: Path, timeout: float, prefix: tuple[str, ...] = ()) -> tuple[list[tuple[int, str]], str]:
    """(exit code, stderr) of the cases one capped subprocess finished (in order), and how it ended."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([*prefix, PY, "-c", _BATCH_RUNNER], input=json.dumps(cases), capture_output=True, text=True, env=env,
                              cwd=cwd, timeout=timeout, preexec_fn=_cap_address_space)
        out, ending = proc.stdout, f"exit {proc.returncode}: {proc.stderr[-1500:]}"
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        ending = f"timeout after {timeout:.0f} s"
    done = []
    for line in out.splitlines():
        try:
            i, rc, err = json.loads(line)
        except ValueError:
            continue
        if i == len(done):
            done.append((rc, err))
    return done, ending


def run_capped(cases: list[list[str]], cwd: Path, timeout: float = 400, alone_timeout: float = 60,
               prefix: tuple[str, ...] = ()) -> list[tuple[int | str, str]]:
    """(exit code, stderr) of ``main(argv)`` for every argv of ``cases``, each run under a memory cap and a timeout.

    Cases run in batches through the CLI's ``main()`` in subprocesses whose address space is
    capped at :data:`AS_CAP` (one interpreter start-up per batch, not per case). A case that
    kills its batch (out of memory, a crash) or hangs it is rerun alone; its result is then
    ``"crash: ..."`` or ``"hang: ..."`` unless it passes alone; the batch goes on after it.
    ``prefix``: a command the interpreter runs under (e.g. ``setpriv ...``).
    """
    results: dict[int, tuple[int | str, str]] = {}
    todo = list(range(len(cases)))
    while todo:
        done, _ = _run_batch([cases[i] for i in todo], cwd, timeout, prefix)
        results.update(zip(todo, done))
        if len(done) == len(todo):
            break
        culprit = todo[len(done)]
        alone, ending = _run_batch([cases[culprit]], cwd, alone_timeout, prefix)
        results[culprit] = alone[0] if alone else ("hang" if ending.startswith("timeout") else "crash", ending)
        todo = todo[len(done) + 1:]
    return [results[i] for i in range(len(cases))]


def test_huge_claims_refused_under_a_memory_cap(tmp_path: Path) -> None:
    """The same cases under an address-space cap: an attempted allocation would fail with "out of memory"."""
    cases = _huge_claims(tmp_path)
    for (argv, words), (rc, err) in zip(cases, run_capped([argv for argv, _ in cases], tmp_path), strict=True):
        _refused(rc, err, *words)
        assert "out of memory" not in err, argv


def test_the_cap_is_in_force(tmp_path: Path) -> None:
    """A case that passes the (raised) memory limit but not the address-space cap ends as one "out of memory" line,
    and the cases after it in the batch still run."""
    big = ["--limit", "memory_gb=100", "compare", "--tokens", str(10**7)]  # a 15 GB trace in memory
    results = run_capped([["stats"], big, ["stats"]], tmp_path, timeout=240)
    assert results[0][0] == 0 and results[2][0] == 0, results
    _refused(results[1][0], results[1][1], "out of memory")


def _zip_bomb(path: Path, expanded: int) -> None:
    """An .npz with one uint8 array of ``expanded`` zero bytes, deflated (~1000x), written in 1 MiB chunks."""
    header = _npy_header((expanded,), "|u1")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("logical_count.npy", "w", force_zip64=True) as fh:
            fh.write(header)
            chunk = bytes(1 << 20)
            for start in range(0, expanded, len(chunk)):
                fh.write(chunk[: min(len(chunk), expanded - start)])


def test_zip_bomb_refused_before_expansion(tmp_path: Path, capsys) -> None:
    bomb = tmp_path / "bomb.npz"
    _zip_bomb(bomb, 96 << 20)
    assert bomb.stat().st_size < 1 << 20
    rc, _out, err = _cli(capsys, "import", bomb, "--top-k", "1", "--out", tmp_path / "o.npz")
    _refused(rc, err, "expands", "zip bomb", "--limit zip_ratio")  # from the member table, before inflating
    with limits.override(memory_gb=0.05):  # and the memory ceiling holds whatever the ratio
        with pytest.raises(GraceInputError, match="above the memory limit"):
            load_npz(bomb)
    with limits.override(zip_ratio=1e6):  # raised on purpose: the file is read
        assert load_npz(bomb)["logical_count"].shape == (96 << 20,)


def test_limits_flag_and_environment(tmp_path: Path, capsys) -> None:
    path = _records(tmp_path / "big.jsonl", [_vllm(experts=[0, 20000])])
    _refused(*_cli(capsys, "stats", path)[::2], "expert id 20000", "--limit experts")
    rc, out, _err = _cli(capsys, "--limit", "experts=30000", "import", path, "--out", tmp_path / "o.npz")
    assert rc == 0 and RoutingTrace.read(tmp_path / "o.npz").num_experts == 20001
    limits.set_limits(experts=limits.Limits().experts)  # main() set it for this process
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GRACE_LIMITS": "experts=100"}
    proc = subprocess.run([PY, "-m", "megatron_grace", "stats", str(_records(tmp_path / "e.jsonl", [_vllm(experts=[0, 150])]))],
                          capture_output=True, text=True, env=env, timeout=120)
    _refused(proc.returncode, proc.stderr, "limit of 100 experts")
    for bad in ("experts", "experts=0", "speed=3", "tokens=abc"):
        _refused(*_cli(capsys, "--limit", bad, "stats")[::2], "bad limit")


# ====================================================================== 2. integers stay integers
@pytest.mark.parametrize("big", [10**30, 2**63, 2**64 + 1])
def test_huge_ids_in_jsonl(big: int, tmp_path: Path, capsys) -> None:
    path = _records(tmp_path / "r.jsonl", [_vllm(), _vllm(tok=1, experts=[0, big])])
    _refused(*_cli(capsys, "import", path, "--out", tmp_path / "o.npz")[::2], "line 2", f"expert id {big}")


def test_json_integer_of_5000_digits(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.json"
    path.write_text("[[1, " + "9" * 5000 + "]]")
    _refused(*_cli(capsys, "import", path, "--format", "load-matrix", "--top-k", "1", "--out", tmp_path / "o.npz")[::2],
             "invalid JSON")
    path.write_text("[[1, " + "9" * 40 + "]]")  # parses, but fits no 64-bit integer
    _refused(*_cli(capsys, "import", path, "--format", "load-matrix", "--top-k", "1", "--out", tmp_path / "o.npz")[::2],
             "too large for 64 bits")


def test_mixtral_id_beyond_int32_is_not_wrapped(tmp_path: Path, capsys) -> None:
    ids = np.zeros((3, 1, 2), dtype=np.int64)
    ids[:, 0, 1] = 1
    ids[2, 0, 1] = 2**32 + 5  # int32 would store 5
    np.savez(tmp_path / "m.npz", expert_ids=ids)
    _refused(*_cli(capsys, "import", tmp_path / "m.npz", "--out", tmp_path / "o.npz")[::2], "expert id 4294967301")
    with pytest.raises(GraceInputError, match="4294967301"):
        RoutingTrace(ids, 8)


@pytest.mark.parametrize(("value", "words"), [(1.7, "expert id must be an integer, got 1.7"), (True, "got True"), ("3", "got '3'")])
def test_plan_ids_must_be_integers(value, words: str, tmp_path: Path, capsys) -> None:
    layer = [[g] for g in range(8)]
    layer[1] = [1, value]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan_dict(gpu_experts=layer)))
    _refused(*_cli(capsys, "simulate", "--plan", path, "--trace", _small_trace(tmp_path))[::2], str(path), words)


def test_metadata_integers_in_own_files(tmp_path: Path, capsys) -> None:
    path = _small_trace(tmp_path)
    data = dict(np.load(path))
    meta = json.loads(str(data["metadata"]))
    meta["num_experts"] = 8.9
    data["metadata"] = np.array(json.dumps(meta))
    np.savez(path, **data)
    _refused(*_cli(capsys, "stats", path)[::2], "num_experts must be an integer, got 8.9")


# ====================================================================== 3. OS errors are input errors
def test_deep_json_and_long_names(tmp_path: Path, capsys) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    _refused(*_cli(capsys, "simulate", "--plan", deep, "--trace", _small_trace(tmp_path))[::2], "nested too deeply")
    _refused(*_cli(capsys, "stats", deep)[::2], "nested too deeply")
    deep_l = tmp_path / "deep.jsonl"
    deep_l.write_text("[" * 200_000 + "]" * 200_000 + "\n")
    _refused(*_cli(capsys, "stats", deep_l)[::2], "line 1", "nested too deeply")
    long = tmp_path / ("x" * 300 + ".json")
    _refused(*_cli(capsys, "stats", long)[::2], "File name too long")
    _refused(*_cli(capsys, "synthesize", "--tokens", "10", "--out", tmp_path / ("y" * 300 + ".npz"))[::2], "File name too long")
    near = tmp_path / ("z" * 250 + ".npz")  # fits, but a temporary beside it with a longer name would not
    assert _cli(capsys, "import", _small_trace(tmp_path), "--stats", "--out", near)[0] == 0 and near.exists()


def test_output_targets(tmp_path: Path, capsys) -> None:
    trace = _small_trace(tmp_path)
    existing = tmp_path / "plots"
    existing.write_text("a file, not a folder")
    _refused(*_cli(capsys, "stats", trace, "--plot", existing)[::2], str(existing))
    _refused(*_cli(capsys, "stats", trace, "--json", tmp_path)[::2], "is a directory")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _refused(*_cli(capsys, "import", trace, "--stats", "--out", fifo)[::2], "is a FIFO", "regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still a FIFO, not replaced by a file
    link = tmp_path / "null-link"
    link.symlink_to("/dev/null")
    _refused(*_cli(capsys, "import", trace, "--stats", "--out", link)[::2], "is a device")
    assert link.is_symlink() and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    regular = tmp_path / "target.npz"
    (tmp_path / "real.npz").write_bytes(b"old")
    regular.symlink_to(tmp_path / "real.npz")  # a symlink to a regular file: written through, link kept
    assert _cli(capsys, "import", trace, "--stats", "--out", regular)[0] == 0
    assert regular.is_symlink() and ExpertStats.read(tmp_path / "real.npz").num_experts == 8


def test_special_files_are_refused_unread(tmp_path: Path) -> None:
    """FIFOs and devices as inputs: refused without opening them (a FIFO would block forever; the
    subprocess's timeout turns a hang into a failure)."""
    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo)
    trace = _small_trace(tmp_path)
    cases = [["simulate", "--plan", str(fifo), "--trace", str(trace)],
             ["simulate", "--plan", "/dev/zero", "--trace", str(trace)],
             ["stats", str(fifo)],
             ["stats", "/dev/zero"],
             ["import", "/dev/urandom", "--format", "load-matrix", "--top-k", "1", "--out", str(tmp_path / "o.npz")]]
    for (rc, err), argv in zip(run_capped(cases, tmp_path), cases, strict=True):
        _refused(rc, err, "not a regular file", "refused unread")


@pytest.mark.skipif(shutil.which("setpriv") is None and os.geteuid() == 0, reason="root without setpriv reads every file")
def test_permission_denied(tmp_path: Path) -> None:
    """Unreadable inputs of every kind, and an output folder that cannot be written, as one line each
    (run without the capability to override file permissions, so it holds for root too)."""
    trace = _small_trace(tmp_path)
    files = {"t.npz": trace.read_bytes(), "r.jsonl": (json.dumps(_vllm()) + "\n").encode(),
             "q.json": json.dumps({"expert_usage_by_layer": {"0": {"0": 4}}}).encode(), "plan.json": json.dumps(_plan_dict()).encode()}
    locked = tmp_path / "locked"
    locked.mkdir()
    for name, data in files.items():
        (locked / name).write_bytes(data)
        (locked / name).chmod(0)
    np.save(locked / "m.npy", np.ones((2, 4)))
    (locked / "m.npy").chmod(0)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cases = [["stats", str(locked / "t.npz")], ["stats", str(locked / "r.jsonl")], ["stats", str(locked / "q.json")],
             ["import", str(locked / "m.npy"), "--format", "load-matrix", "--top-k", "1", "--out", str(tmp_path / "o.npz")],
             ["simulate", "--plan", str(locked / "plan.json"), "--trace", str(trace)],
             ["import", str(trace), "--stats", "--out", str(ro / "o.npz")],
             ["stats", str(trace), "--plot", str(ro / "plots")]]
    prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all") if os.geteuid() == 0 else ()
    results = run_capped(cases, tmp_path, prefix=prefix)
    for (rc, err), argv in zip(results, cases, strict=True):
        line = _refused(rc, err)
        assert "ermission denied" in line, (argv, line)


def test_broken_pipe_is_quiet(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    # the reader is gone before grace writes (`| true`), so the write must hit a closed pipe
    proc = subprocess.run(f"{PY} -m megatron_grace stats | true; echo \"rc=${{PIPESTATUS[0]}}\"", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.strip() == "rc=141" and proc.stderr == "", (proc.stdout, proc.stderr)
    proc = subprocess.run(f"{PY} -m megatron_grace stats | head -1", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.startswith("qwen3-30b-a3b") and proc.stderr == "", (proc.stdout, proc.stderr)


# ====================================================================== 4. no silent wrong answers
def test_headless_own_files_are_refused(tmp_path: Path, capsys) -> None:
    trace = RoutingTrace(np.array([[[0, 1]], [[2, 3]], [[1, 2]], [[0, 3]]], dtype=np.int32), 4,
                         gate_weights=np.full((4, 1, 2), 0.5, np.float32), request_ids=np.arange(4))
    trace.save(tmp_path / "t.npz")
    data = dict(np.load(tmp_path / "t.npz"))
    del data["format"]
    np.savez(tmp_path / "headless.npz", **data)
    _refused(*_cli(capsys, "stats", tmp_path / "headless.npz")[::2], "looks like a grace-trace file", "'format'")
    stats = ExpertStats.from_trace(trace)
    stats.save(tmp_path / "s.npz")
    data = dict(np.load(tmp_path / "s.npz"))
    del data["format"]
    np.savez(tmp_path / "headless-s.npz", **data)
    _refused(*_cli(capsys, "stats", tmp_path / "headless-s.npz")[::2], "looks like a grace-stats file")


def _torch_save(path: Path, value) -> Path:
    import torch

    torch.save(value, path)
    return path


@pytest.mark.parametrize("kind", ["complex-npy", "bool-npy", "complex-pt", "bool-pt", "complex-stats"])
def test_complex_and_boolean_loads_are_refused(kind: str, tmp_path: Path, capsys) -> None:
    import torch

    m = np.array([[3, 1, 2, 2], [1, 1, 4, 2]])
    if kind == "complex-npy":
        np.save(path := tmp_path / "m.npy", m + 1j)
    elif kind == "bool-npy":
        np.save(path := tmp_path / "m.npy", m > 1)
    elif kind == "complex-pt":
        path = _torch_save(tmp_path / "m.pt", {"logical_count": torch.tensor(m + 1j)})
    elif kind == "bool-pt":
        path = _torch_save(tmp_path / "m.pt", torch.tensor(m > 1))
    else:
        ExpertStats(load=m.astype(float), tokens=np.full(2, 4.0), top_k=2).save(tmp_path / "s.npz")
        data = dict(np.load(tmp_path / "s.npz"))
        data["load"] = data["load"] + 1j
        np.savez(path := tmp_path / "s.npz", **data)
    argv = ["stats", path] if kind == "complex-stats" else ["import", path, "--format", "load-matrix", "--top-k", "2", "--out", tmp_path / "o.npz"]
    _refused(*_cli(capsys, *argv)[::2], "must be real numbers", "complex" if "complex" in kind else "bool")


def test_top_k_hint_names_a_flag_that_exists(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.npy"
    np.save(path, np.array([[3.5, 1, 2, 2], [1, 1, 4, 2]]))
    for argv in (["stats", path], ["plan", "--stats", path], ["synthesize", path, "--out", tmp_path / "s.npz"]):
        line = _refused(*_cli(capsys, *argv)[::2], "top_k is unknown", "grace import", "--top-k")
        assert argv[0] == "import" or "--top-k K --out" in line
    sub = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - the registered commands
    assert "--top-k" in sub["import"]._option_string_actions  # noqa: SLF001


def test_model_shape_checked_against_the_trace(tmp_path: Path, capsys) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_plan_dict()))
    _refused(*_cli(capsys, "simulate", "--plan", plan, "--trace", _small_trace(tmp_path), "--model-shape", "qwen3-30b-a3b")[::2],
             "qwen3-30b-a3b has 128 experts per layer", "the trace 8")


# ====================================================================== 5. temporaries never pile up
_KILLED_WRITER = r"""
import sys, time, numpy as np
from megatron_grace._files import save_npz_atomic
def verify(path):
    print("writing", flush=True)
    time.sleep(60)
save_npz_atomic(sys.argv[1], {"a": np.arange(1000)}, verify=verify)
"""


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "x.npz"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([PY, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    left = [p.name for p in tmp_path.iterdir()]
    assert not target.exists() and len(left) == 1 and left[0].startswith(".x.npz.grace"), left
    # others that must survive: a live writer's temp (this process), a fresh owner-less temp of an
    # older version, an unrelated hidden file, another target's temp; an old owner-less one goes
    import socket
    import hashlib

    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
    keep = [f".x.npz.grace{os.getpid()}h{host}.abcdefgh.tmp.npz", ".x.npz.abcd1234.tmp.npz", ".x.npz.notours.tmp.npz",
            ".y.npz.zzzz1234.tmp.npz"]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    old = tmp_path / ".x.npz.old_1234.tmp.npz"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    save_npz_atomic(target, {"a": np.arange(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "x.npz"])
    assert remove_stale_temporaries(target, ".npz") == []


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError), atomic_path(target, ".json") as tmp:
        tmp.write_text("{")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ====================================================================== issue 12 item 6: detection never guesses
def test_stats_json_without_n_decode_tokens_is_derived_and_reported(tmp_path: Path, capsys) -> None:
    doc = {"model": "tiny", "k": 2, "layers": [{"layer": 0, "heat": [6, 4, 6, 4], "pairs": [[0, 2, 3, 1.6]]},
                                               {"layer": 1, "heat": [5, 5, 5, 5], "pairs": []}]}
    path = tmp_path / "q.json"
    path.write_text(json.dumps(doc))
    assert detect_format(path) == "qwen-coactivation"
    st = import_any(path)
    assert st.tokens.tolist() == [10, 10] and "n_decode_tokens absent" in st.notes[0]
    rc, out, _err = _cli(capsys, "stats", path)
    assert rc == 0 and "derived, not read: n_decode_tokens absent: tokens per layer derived as heat.sum(1) / k (2)" in out
    assert _cli(capsys, "import", path, "--out", tmp_path / "q.npz")[0] == 0
    assert ExpertStats.read(tmp_path / "q.npz").notes == st.notes  # kept in the file
    doc["layers"][1]["heat"] = [5, 5, 5, 4]  # 19 choices: not tokens x 2
    path.write_text(json.dumps(doc))
    _refused(*_cli(capsys, "stats", path)[::2], "layer 1", "not a multiple of top_k=2")


def _top1_ids(tokens: int, layers: int, experts: int = 12) -> np.ndarray:
    return np.random.default_rng(1).integers(0, experts, size=(tokens, layers))


@pytest.mark.parametrize("container", ["npy", "csv", "json", "npz"])
def test_integer_array_is_ambiguous_until_a_format_is_given(container: str, tmp_path: Path, capsys) -> None:
    ids = _top1_ids(600, 12)
    path = tmp_path / f"ids.{container}"
    if container == "npy":
        np.save(path, ids)
    elif container == "csv":
        path.write_text("\n".join(",".join(map(str, row)) for row in ids))
    elif container == "json":
        path.write_text(json.dumps(ids.tolist()))
    else:
        np.savez(path, ids=ids)
    _refused(*_cli(capsys, "import", path, "--top-k", "1", "--out", tmp_path / "o.npz")[::2],
             "ambiguous", "600 layers x 12 experts: --format load-matrix", "600 tokens x 12 layers: --format topk-ids")
    assert _cli(capsys, "import", path, "--format", "topk-ids", "--out", tmp_path / "t.npz")[0] == 0
    trace = RoutingTrace.read(tmp_path / "t.npz")
    assert (trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts) == (600, 12, 1, 12)
    np.testing.assert_array_equal(trace.expert_ids[:, :, 0], ids)
    rc, _out, err = _cli(capsys, "import", path, "--format", "load-matrix", "--top-k", "1", "--out", tmp_path / "m.npz")
    assert rc == 0 and err.count("\n") == 1 and "warning: " in err and "implausible load matrix: 600 layers" in err
    assert "--format topk-ids" in err


def test_top1_ids_read_as_load_matrix_of_2048_layers_is_refused(tmp_path: Path, capsys) -> None:
    np.save(path := tmp_path / "ids.npy", _top1_ids(2048, 12))
    _refused(*_cli(capsys, "import", path, "--format", "load-matrix", "--top-k", "1", "--out", tmp_path / "m.npz")[::2],
             "2048 layers", "--limit layers")


def test_unambiguous_arrays_are_detected(tmp_path: Path) -> None:
    np.save(frac := tmp_path / "frac.npy", np.array([[1.5, 2.0], [3.0, 0.5]]))
    assert detect_format(frac) == "load-matrix"  # fractional: counts (averaged), never ids
    np.savez(named := tmp_path / "named.npz", logical_count=np.ones((2, 4), dtype=np.int64))
    assert detect_format(named) == "load-matrix"
    ids = np.array([[[0, 1], [2, -1]], [[1, 3], [0, 2]]])
    ids[0, 1] = -1
    np.save(missing := tmp_path / "missing.npy", ids)
    assert detect_format(missing) == "topk-ids"  # -1 is no count
    np.save(steps := tmp_path / "steps.npy", np.array([[[3, 3, 1], [0, 2, 2]]]))
    assert detect_format(steps) == "load-matrix"  # a token never picks one expert twice


# ====================================================================== generated cases (fuzz)
_HOSTILE_NUMBERS = [-1, -(2**63), 2**31, 2**32 + 5, 2**63, 10**30, 1.7, float("inf"), float("nan"), True, None, "7", [], {}]


def _mutations(rng: random.Random, doc):
    """Copies of a JSON document with one number replaced by a hostile value (depth-first positions)."""
    paths: list[tuple] = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))
        elif isinstance(node, int | float) and not isinstance(node, bool):
            paths.append(path)

    walk(doc, ())
    for path in rng.sample(paths, min(len(paths), 12)):
        for value in rng.sample(_HOSTILE_NUMBERS, 5):
            new = json.loads(json.dumps(doc))
            node = new
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            yield new


def _seed_documents() -> dict[str, object]:
    return {
        "r.jsonl": [_vllm(0, 0, [0, 1]) | {"gating_probs": [0.6, 0.4]}, _vllm(1, 0, [2, 3]) | {"gating_probs": [0.5, 0.5]},
                    _vllm(0, 1, [1, 3]) | {"gating_probs": [0.7, 0.3]}],
        "s.json": {"num_experts": 4, "expert_usage_by_layer": {"0": {"0": 5, "1": 3}, "1": {"2": 8}}},
        "q.json": {"model": "tiny", "k": 2, "n_decode_tokens": 10, "layers": [{"layer": 0, "heat": [6, 4, 6, 4], "pairs": [[0, 2, 3, 1.6]]}]},
        "m.json": {"logical_count": [[3, 1, 2, 2], [1, 1, 4, 2]], "top_k": 2},
        "g.jsonl": [{"row_type": "header", "schema": "simllm-preplay-trace-v2", "provenance": {"expert_count": 4, "top_k": 2,
                     "moe_layer_indices": [0, 1]}},
                    {"request_id": "a", "phase": "decode", "token_index": 0, "routing": [{"layer_index": 0, "expert_ids": [0, 1]},
                                                                                        {"layer_index": 1, "expert_ids": [2, 3]}]},
                    {"row_type": "footer", "decode_token_count": 1}],
    }


def _check_generated(cases: list[tuple[list[str], Path, Path, object]], tmp_path: Path) -> None:
    """Run the generated ``grace import`` cases capped (:func:`run_capped`); each must exit 2 with one line
    naming its file, or exit 0 with an output that ``check(output)`` accepts."""
    results = run_capped([argv for argv, _, _, _ in cases], tmp_path)
    for (argv, source, out, check), (rc, err) in zip(cases, results, strict=True):
        if rc == 0:
            check(import_any(out))
        else:
            assert str(source) in _refused(rc, err), (argv, err)


def test_generated_hostile_documents(tmp_path: Path) -> None:
    """Every mutated document imports correctly or is refused in one line naming it, each case under a memory
    cap (address space, and a 1 GB memory limit) and a timeout: no traceback, crash or hang."""
    def valid(out) -> None:
        if isinstance(out, RoutingTrace):  # accepted: every id is a real, in-range integer
            assert out.expert_ids.dtype == np.int32 and out.expert_ids.max() < out.num_experts
        else:
            assert np.isfinite(out.load).all() and (out.load >= 0).all() and out.load.dtype == np.float64

    rng = random.Random(14)
    cases = []
    for name, doc in _seed_documents().items():
        variants = ([[*doc[:i], m, *doc[i + 1:]] for i, row in enumerate(doc) for m in _mutations(rng, row)]
                    if isinstance(doc, list) else list(_mutations(rng, doc)))
        for variant in variants:
            path = tmp_path / f"{len(cases)}-{name}"
            path.write_text("".join(json.dumps(r) + "\n" for r in variant) if name.endswith(".jsonl") else json.dumps(variant))
            out = tmp_path / f"{len(cases)}-out.npz"
            cases.append((["--limit", "memory_gb=1", "import", str(path), "--out", str(out)], path, out, valid))
    assert len(cases) > 200
    _check_generated(cases, tmp_path)


def test_generated_truncations_and_byte_flips(tmp_path: Path) -> None:
    """Truncated and bit-flipped copies of every binary container, capped as above: a clean refusal, or a read of
    exactly the original data (every .npz member is CRC-checked; an .npy has no checksum, so any valid load)."""
    rng = random.Random(7)
    src = _small_trace(tmp_path, "src.npz")
    trace = RoutingTrace.read(src)
    stats = ExpertStats.from_trace(trace)
    stats.save(tmp_path / "stats.npz")
    np.save(tmp_path / "m.npy", np.array([[3.5, 1, 2, 2], [1, 1, 4, 2]]))

    def same_trace(out) -> None:
        assert np.array_equal(out.expert_ids, trace.expert_ids) and out.num_experts == trace.num_experts

    def same_stats(out) -> None:
        assert np.array_equal(out.load, stats.load) and np.array_equal(out.coactivation, stats.coactivation)

    def valid_load(out) -> None:
        assert np.isfinite(out.load).all() and (out.load >= 0).all()

    cases = []
    for base, check in ((src, same_trace), (tmp_path / "stats.npz", same_stats), (tmp_path / "m.npy", valid_load)):
        blob = base.read_bytes()
        for i in range(40):
            data = bytearray(blob)
            if i % 2:
                data = data[: rng.randrange(len(data))]
            else:
                for _ in range(rng.randrange(1, 8)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            path = tmp_path / f"fuzz{len(cases)}{base.suffix}"
            path.write_bytes(bytes(data))
            out = tmp_path / f"{len(cases)}-out.npz"
            extra = ["--top-k", "2"] if base.suffix == ".npy" else []
            cases.append((["--limit", "memory_gb=1", "import", str(path), *extra, "--out", str(out)], path, out, check))
    _check_generated(cases, tmp_path)


def test_plan_mismatch_errors_name_the_plan_file(tmp_path, capsys):
    """A plan that does not fit the trace (simulate) or the layer's group (GraceDispatch) is named by its file."""
    from megatron_grace.layer.grace_dispatch import plan_slots
    from megatron_grace.plan.placement import PlacementPlan

    plan_path = tmp_path / "my-plan.json"
    PlacementPlan(Topology.parse("1x2"), 4, [[[0, 1], [2, 3]]] * 32).save(plan_path)
    trace = tmp_path / "t.npz"  # Mixtral's shape (32 layers, top-2 of 8), so only the plan does not fit
    ids = np.broadcast_to(np.array([0, 5], dtype=np.int32), (16, 32, 2)).copy()
    RoutingTrace(ids, num_experts=8, model="mixtral-8x7b").save(trace)
    code, _, err = _cli(capsys, "simulate", "--plan", str(plan_path), "--trace", str(trace))
    assert code == 2 and "my-plan.json" in err and "experts per layer" in err, err
    plan = PlacementPlan.read(plan_path)
    with pytest.raises(GraceInputError, match="my-plan.json.*expert-parallel group has 4 ranks"):
        plan_slots(plan, 0, 0, 4)
