"""`grace import` and `grace stats`: real files in, tables and plots out, exit code 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, shared_trace

from megatron_grace import ExpertStats, RoutingTrace
from megatron_grace.cli.main import main


def test_stats_on_bundled_data_prints_table_matching_published_skew(capsys, tmp_path):
    assert main(["stats", "--plot", str(tmp_path / "plots"), "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "qwen3-30b-a3b: 48 MoE layers x 128 experts, top-8" in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("min", "median", "max")]
    skew = {row[0]: float(row[1]) for row in rows}
    assert skew == {"min": 3.07, "median": 5.69, "max": 7.71}  # ../shared/traces/README.md
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["overall"]["skew"]["median"] == pytest.approx(5.686, abs=1e-3)
    assert report["overall"]["max_lift"]["max"] == pytest.approx(845, rel=1e-3)  # "pair lift up to 845"
    for name in ("load_heatmap.png", "load_bars.png", "coactivation.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_import_mixtral_records_to_trace_and_stats(tmp_path, capsys):
    gsm = shared_trace("mixtral-8x7b/gsm8k_2_routing.jsonl")
    hev = shared_trace("mixtral-8x7b/humaneval_2_routing.jsonl")
    out = tmp_path / "mixtral.npz"
    assert main(["import", str(gsm), str(hev), "--num-experts", "8", "--out", str(out)]) == 0
    trace = RoutingTrace.read(out)
    assert (trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts) == (585, 32, 2, 8)
    stats_out = tmp_path / "mixtral-stats.npz"
    assert main(["import", str(gsm), str(hev), "--num-experts", "8", "--stats", "--out", str(stats_out)]) == 0
    stats = ExpertStats.read(stats_out)
    np.testing.assert_array_equal(stats.load, ExpertStats.from_trace(trace).load)
    capsys.readouterr()
    assert main(["stats", str(out)]) == 0
    assert "MI(l,l+1)" in capsys.readouterr().out


def test_import_stats_only_sources(tmp_path):
    qwen = shared_trace("qwen3-30b-a3b/coactivation_qwen3-30b-a3b.json")
    switch = shared_trace("switch-base-128/expert_statistics_3d.json")
    assert main(["import", str(qwen), "--out", str(tmp_path / "q.npz")]) == 0
    q = ExpertStats.read(tmp_path / "q.npz")
    assert q.coactivation_observed is not None and q.transitions is None
    assert main(["import", str(switch), "--out", str(tmp_path / "sw.npz")]) == 0
    sw = ExpertStats.read(tmp_path / "sw.npz")
    assert sw.num_experts == 128 and sw.coactivation is None
    skew = sw.load.max(1) / sw.load.mean(1)
    assert 5.5 < skew.min() and skew.max() < 32  # README: max/mean 6 to 31 per layer


def test_load_matrix_with_top_k(tmp_path):
    path = tmp_path / "logical_count.json"
    path.write_text(json.dumps({"logical_count": [[4, 2, 2, 0], [1, 1, 3, 3]]}))
    assert main(["import", str(path), "--top-k", "2", "--out", str(tmp_path / "lm.npz")]) == 0
    stats = ExpertStats.read(tmp_path / "lm.npz")
    np.testing.assert_array_equal(stats.tokens, [4, 4])


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "empty"),
        (b'{"dataset": "gsm8k", "problem_id": 0, "layer": 0, "experts": [7, 0], "gating_probs": [0.8, 0.2], "token_idx": 0}\n{"dataset": "gs', "line 2"),
        (b'{"dataset": "gsm8k", "problem_id": 0, "layer": 0, "experts": [99, 0], "gating_probs": [0.8, 0.2], "token_idx": 0}\n', "out of range"),
        (b'{"dataset": "gsm8k", "problem_id": 0, "layer": 0, "experts": [1, 0], "gating_probs": [0.8, 0.2], "token_idx": 0}\n'
         b'{"dataset": "gsm8k", "problem_id": 0, "layer": 1, "experts": [1, 0, 2], "gating_probs": [0.8, 0.2, 0.0], "token_idx": 0}\n', "k"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "megatron_grace", "import", str(path), "--format", "vllm-records-jsonl",
                           "--num-experts", "8", "--out", str(tmp_path / "o.npz")], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and expected in lines[0], proc.stderr
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("writer, expected", [
    (lambda p: p.write_text(json.dumps({"logical_count": [[1.0, float("nan")]]}).replace("NaN", "NaN")), "NaN"),
    (lambda p: p.write_text(json.dumps({"logical_count": [[1, -4]], "top_k": 1})), "negative"),
])
def test_cli_bad_loads_exit_2(tmp_path, writer, expected, capsys):
    path = tmp_path / "lc.json"
    writer(path)
    assert main(["stats", str(path), "--format", "load-matrix"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and expected in err


def test_missing_file_exit_2(capsys, tmp_path):
    assert main(["stats", str(tmp_path / "nope.npz")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_help_of_every_command_is_consistent():
    for command in ("import", "stats", "synthesize", "demo"):
        proc = subprocess.run([sys.executable, "-m", "megatron_grace", command, "--help"], capture_output=True, text=True, cwd=REPO_ROOT)
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: grace {command}")


def test_synthesize_and_demo_commands(tmp_path, capsys):
    out = tmp_path / "synth.npz"
    assert main(["synthesize", "--tokens", "3000", "--seed", "3", "--out", str(out)]) == 0
    trace = RoutingTrace.read(out)
    assert (trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts) == (3000, 48, 8, 128)
    assert main(["synthesize", "--tokens", "0", "--out", str(out)]) == 2
    assert main(["demo", "--tokens", "3000", "--out", str(tmp_path / "demo")]) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["statistics"]["skew"]["median"] == pytest.approx(5.686, abs=1e-3)
    assert report["synthesis"]["overall"]["layers"] == 48
    assert (tmp_path / "demo" / "plots" / "coactivation.png").exists()


def test_demo_with_too_few_tokens(tmp_path, capsys):
    """1 token is refused in one line; 2 tokens run, and an unmeasurable load error says so instead of 'nan%'."""
    assert main(["demo", "--tokens", "1", "--out", str(tmp_path / "d1")]) == 2
    assert "at least 2 tokens" in capsys.readouterr().err
    assert main(["demo", "--tokens", "2", "--out", str(tmp_path / "d2")]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and "too few tokens to measure" in out
