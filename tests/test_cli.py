"""What a new user meets in the ``grace`` command: topologies, defaults, model names, in-sample
warnings, strict JSON, start-up without torch, and the demo's headline arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, random_ids

from megatron_grace import ExpertStats, RoutingTrace
from megatron_grace._files import save_json_atomic
from megatron_grace.cli.main import main
from megatron_grace.errors import GraceInputError
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.plan.topology import LINK_PROFILES, TOPOLOGY_PRESETS, Topology, parse_links


def _strict_load(path):
    def reject(name):
        raise AssertionError(f"non-standard JSON constant {name} in {path}")

    return json.loads(path.read_text(), parse_constant=reject)


# ------------------------------------------------------------------------------------ topology
def test_presets_are_nxg_with_their_link_profile():
    a100 = TOPOLOGY_PRESETS["a100-2x4"]
    assert (a100.num_nodes, a100.gpus_per_node) == (2, 4)
    assert a100.inter_node.bandwidth_bytes_per_s == 25e9 / 8 / 4  # one 25 Gbit/s NIC shared by 4 GPUs
    assert a100.intra_node.bandwidth_bytes_per_s == 300e9 and a100.gpu_flops == 156e12
    h200 = TOPOLOGY_PRESETS["h200-4x8"]
    assert h200.inter_node.bandwidth_bytes_per_s == 400e9 / 8 and h200.num_gpus == 32  # one 400 Gbit/s NIC per GPU
    for name in ("a100-2x4", "h200-4x8", "h200-32x8"):
        assert Topology.parse(name) == Topology.preset(name)
    same = Topology.parse("2x4", "a100-25g")
    assert (same.intra_node, same.inter_node, same.gpu_flops) == (a100.intra_node, a100.inter_node, a100.gpu_flops)


@pytest.mark.parametrize("nodes,gpus", [(1, 4), (1, 8), (2, 4), (4, 8), (3, 2)])
def test_nxg_with_named_links(nodes, gpus):
    for name, profile in LINK_PROFILES.items():
        topo = Topology.parse(f"{nodes}x{gpus}", name)
        assert (topo.num_nodes, topo.gpus_per_node, topo.num_gpus) == (nodes, gpus, nodes * gpus)
        expected = profile.inter_bandwidth_bytes_per_s / (gpus if profile.inter_per_node else 1)
        assert topo.inter_node.bandwidth_bytes_per_s == pytest.approx(expected)
        assert topo.intra_node == profile.intra_node and topo.gpu_flops == profile.gpu_flops
        assert topo.name == f"{nodes}x{gpus}/{name}"


def test_links_overrides_and_units():
    topo = Topology.parse("2x4", "intra=400GB/s,inter=25GB/s")  # bytes: GB/s
    assert topo.intra_node.bandwidth_bytes_per_s == 400e9 and topo.inter_node.bandwidth_bytes_per_s == 25e9
    topo = Topology.parse("2x4", "h200-ib,inter=200Gbit/s/node,inter-latency=10us,intra-latency=0ns,flops=1.5P")
    assert topo.inter_node.bandwidth_bytes_per_s == pytest.approx(200e9 / 8 / 4)  # bits, shared by 4 GPUs
    assert topo.inter_node.latency_s == pytest.approx(10e-6) and topo.intra_node.latency_s == 0
    assert topo.intra_node.bandwidth_bytes_per_s == 450e9 and topo.gpu_flops == 1.5e15  # rest from h200-ib
    assert Topology.parse("1x8", "inter=25Gb/s").inter_node.bandwidth_bytes_per_s == pytest.approx(25e9 / 8)
    # a preset with --links keeps its shape, takes the new links
    moved = Topology.parse("a100-2x4", "h200-ib")
    assert (moved.num_nodes, moved.gpus_per_node, moved.intra_node) == (2, 4, LINK_PROFILES["h200-ib"].intra_node)
    assert parse_links(None).name == "a100-25g"


@pytest.mark.parametrize("spec,links,needle", [
    ("3", None, "NxG"), ("0x4", None, "at least 1"), ("2x", None, "NxG"), ("a100-4x4", None, "preset"),
    ("2x4", "nvlink", "unknown link profile 'nvlink'"), ("2x4", "intra=fast", "bandwidth"),
    ("2x4", "inter=25Gbps", "bandwidth"), ("2x4", "inter=-1GB/s", "bandwidth"), ("2x4", "inter-latency=5", "time"),
    ("2x4", "flops=0", "positive"), ("2x4", "speed=1GB/s", "unknown key 'speed'"), ("2x4", "h200-ib,a100-ib", "KEY=VALUE"),
    ("2x4", "intra=1e999GB/s", "finite"),
])
def test_bad_topology_or_links_names_the_problem(spec, links, needle):
    with pytest.raises(GraceInputError, match=needle):
        Topology.parse(spec, links)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 600-token, 3-layer, 16-expert top-2 trace (model granite-3.0-1b-a400m) and its statistics."""
    d = tmp_path_factory.mktemp("small")
    trace = RoutingTrace(random_ids(np.random.default_rng(5), 600, 3, 16, 2), 16, model="granite-3.0-1b-a400m")
    trace.save(d / "t.npz")
    ExpertStats.from_trace(trace).save(d / "s.npz")
    return d, trace


@pytest.mark.parametrize("spec,gpus", [("1x4", 4), ("1x8", 8), ("2x4", 8)])
def test_plan_for_the_job_you_launch(small, tmp_path, capsys, spec, gpus):
    d, _ = small
    out = tmp_path / "plan.json"
    assert main(["plan", "--stats", str(d / "s.npz"), "--topology", spec, "--extra-slots", "1", "--out", str(out)]) == 0
    plan = PlacementPlan.read(out)
    assert plan.num_gpus == gpus and plan.topology.name.startswith(spec)  # what the adapters check against the world size
    assert plan.topology.capacity() == -(-16 // gpus) + 1  # an even split plus the extra slot
    assert f"{spec}/a100-25g" in capsys.readouterr().out


def test_every_topology_command_takes_the_same_forms(small, tmp_path, capsys):
    d, _ = small
    assert main(["plan", "--stats", str(d / "s.npz"), "--topology", "1x2", "--links", "h200-ib,inter=100Gbit/s",
                 "--out", str(tmp_path / "p.json"), "--no-per-layer"]) == 0
    plan = PlacementPlan.read(tmp_path / "p.json")
    assert plan.topology.inter_node.bandwidth_bytes_per_s == pytest.approx(100e9 / 8)
    assert main(["compare", "--trace", str(d / "t.npz"), "--topology", "1x2", "--links", "h200-ib,inter=100Gbit/s",
                 "--planners", "vanilla,eplb", "--dispatch", "flat", "--json", str(tmp_path / "c.json")]) == 0
    report = _strict_load(tmp_path / "c.json")
    assert report["topology"]["inter_node"]["bandwidth_bytes_per_s"] == pytest.approx(100e9 / 8)
    capsys.readouterr()
    for command in (["plan", "--stats", str(d / "s.npz")], ["compare", "--trace", str(d / "t.npz")]):
        assert main([*command, "--topology", "2x4", "--links", "fast"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "unknown link profile 'fast'" in err


# ------------------------------------------------------------------------------------ vocabulary and defaults
def test_compare_defaults_match_plan(small, tmp_path, capsys):
    d, _ = small
    assert main(["compare", "--trace", str(d / "t.npz"), "--planners", "vanilla,grace", "--json", str(tmp_path / "c.json")]) == 0
    report = _strict_load(tmp_path / "c.json")
    assert report["topology"]["name"] == "a100-2x4" and report["extra_slots"] == 1 and report["policy"] == "grace"
    out = capsys.readouterr().out
    assert "ms/layer" in out and "busiest" in out


def test_help_texts():
    def help_of(*command):
        proc = subprocess.run([sys.executable, "-m", "megatron_grace", *command, "--help"], capture_output=True, text=True,
                              cwd=REPO_ROOT)
        assert proc.returncode == 0, proc.stderr
        return " ".join(proc.stdout.split())

    assert "top 10% of experts" in help_of("stats") and "%%" not in help_of("stats")
    compare = help_of("compare")
    assert "--token-placement {round-robin,request} where tokens start" in compare
    assert "default a100-2x4" in compare and "NxG" in compare and "--links" in compare
    simulate = help_of("simulate")
    assert "--load-prediction" in simulate and "grace (default" in simulate
    top = help_of()
    for command in ("import", "stats", "synthesize", "plan", "simulate", "compare", "demo"):
        assert f" {command} " in top


def test_help_version_and_data_commands_do_not_import_torch(tmp_path):
    """Start-up: help, version and the data-only commands never import torch (the 3-5 s part)."""
    d = tmp_path
    RoutingTrace(random_ids(np.random.default_rng(0), 50, 2, 8, 2), 8, model="x").save(d / "t.npz")
    commands = [["--help"], ["--version"], ["import", "--help"], ["stats", "--help"], ["plan", "--help"],
                ["simulate", "--help"], ["compare", "--help"], ["synthesize", "--help"], ["demo", "--help"],
                ["stats"], ["stats", str(d / "t.npz")], ["import", str(d / "t.npz"), "--stats", "--out", str(d / "s.npz")]]
    code = ("import sys; from megatron_grace.cli.main import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    for command in commands:
        proc = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, cwd=REPO_ROOT)
        assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH", (command, proc.stderr[-500:])


# ------------------------------------------------------------------------------------ model names
def _write_records(path, trace: RoutingTrace) -> None:
    """The trace as vLLM per-(token, layer) JSONL records (which carry no model name)."""
    with open(path, "w") as fh:
        for t in range(trace.num_tokens):
            for layer in range(trace.num_layers):
                fh.write(json.dumps({"dataset": "d", "problem_id": 0, "layer": layer, "token_idx": t,
                                     "experts": trace.expert_ids[t, layer].tolist(), "gating_probs": [0.5, 0.5]}) + "\n")


def test_model_name_flag(small, tmp_path, capsys):
    d, trace = small
    _write_records(tmp_path / "r.jsonl", trace.select_tokens(slice(0, 200)))
    assert main(["import", str(tmp_path / "r.jsonl"), "--num-experts", "16", "--out", str(tmp_path / "u.npz")]) == 0
    assert "--model NAME" in capsys.readouterr().out  # says the source has no model name
    assert RoutingTrace.read(tmp_path / "u.npz").model == "unknown"
    plan = tmp_path / "p.json"
    assert main(["plan", "--stats", str(d / "s.npz"), "--out", str(plan), "--no-per-layer"]) == 0
    capsys.readouterr()
    assert main(["simulate", "--plan", str(plan), "--trace", str(tmp_path / "u.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model NAME" in err and "grace import" in err
    assert main(["simulate", "--plan", str(plan), "--trace", str(tmp_path / "u.npz"), "--model", "granite-3.0-1b-a400m"]) == 0
    assert "granite-3.0-1b-a400m" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "r.jsonl"), "--num-experts", "16", "--model", "ibm/granite-3.0-1b-a400m",
                 "--out", str(tmp_path / "n.npz")]) == 0
    assert RoutingTrace.read(tmp_path / "n.npz").model == "ibm/granite-3.0-1b-a400m"
    assert main(["simulate", "--plan", str(plan), "--trace", str(tmp_path / "n.npz")]) == 0
    capsys.readouterr()
    assert main(["stats", str(tmp_path / "u.npz"), "--model", "renamed"]) == 0
    assert capsys.readouterr().out.startswith("renamed:")


# ------------------------------------------------------------------------------------ in-sample warning
def test_simulate_warns_when_measuring_on_the_planning_tokens(small, tmp_path, capsys):
    d, trace = small
    first, rest = trace.split(0.5)
    first.save(tmp_path / "first.npz")
    rest.save(tmp_path / "rest.npz")
    plan = tmp_path / "p.json"
    assert main(["plan", "--trace", str(tmp_path / "first.npz"), "--out", str(plan), "--no-per-layer"]) == 0
    assert PlacementPlan.read(plan).metadata["planned_on"]["tokens"] == first.num_tokens
    capsys.readouterr()
    for measured, warned in (("first.npz", True), ("rest.npz", False)):
        assert main(["simulate", "--plan", str(plan), "--trace", str(tmp_path / measured)]) == 0
        assert ("in-sample" in capsys.readouterr().err) == warned, measured
    assert main(["simulate", "--plan", str(plan), "--trace", str(d / "t.npz")]) == 0  # the whole trace holds the first half
    assert "in-sample: 100%" in capsys.readouterr().err
    assert main(["simulate", "--plan", str(plan), "--trace", str(tmp_path / "rest.npz"), "--stats", str(d / "s.npz")]) == 0
    assert "--load-prediction" in capsys.readouterr().err  # the old flag still works, and says its new name


# ------------------------------------------------------------------------------------ output
def test_json_is_strict(tmp_path):
    save_json_atomic(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5, {"c": float("-inf")}], "d": (2.0,)})
    assert _strict_load(tmp_path / "x.json") == {"a": None, "b": [None, 1.5, {"c": None}], "d": [2.0]}


def test_stats_json_has_null_for_missing_metrics(tmp_path, capsys):
    assert main(["stats", "--json", str(tmp_path / "s.json")]) == 0  # bundled Qwen3: no MI data
    report = _strict_load(tmp_path / "s.json")
    assert report["overall"]["mutual_info_bits"] == {"min": None, "median": None, "max": None}
    assert report["per_layer"]["mutual_info_bits"] == [None] * 48
    assert "MI(l,l+1) needs per-token ids" in capsys.readouterr().out


def test_synthesize_prints_a_summary_and_writes_the_report(small, tmp_path, capsys):
    d, _ = small
    assert main(["synthesize", str(d / "s.npz"), "--tokens", "500", "--out", str(tmp_path / "t.npz"),
                 "--report", str(tmp_path / "f.json")]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) <= 4 and "{" not in out and "load: max relative error" in out
    report = _strict_load(tmp_path / "f.json")
    assert len(report["layers"]) == 3 and set(report) == {"overall", "layers", "definitions"}


def test_demo_headline_splits_the_total():
    from megatron_grace.cli.cmd_demo import format_headline, headline_figures

    def row(t, inter=100, busiest=10, msgs=50):
        return {"layer_s": t, "msgs_node": msgs, "inter_bytes": inter, "max_gpu_inter_bytes": busiest, "load_max_over_mean": 1.1}

    rows = {("vanilla", "flat"): row(10.0), ("vanilla", "hierarchical"): row(4.0), ("eplb", "flat"): row(8.0),
            ("eplb", "hierarchical"): row(3.0), ("grace", "flat"): row(8.0, inter=80), ("grace", "hierarchical"): row(2.5, msgs=40)}
    h = headline_figures(rows)
    assert h["grace_vs_eplb_hier_speedup"] == pytest.approx(1.2) and h["grace_vs_eplb_flat_speedup"] == 1.0
    assert h["dispatch_part_vanilla_flat_to_hier"] == 2.5 and h["placement_part_vanilla_hier_to_grace_hier"] == 1.6
    assert h["grace_hier_vs_vanilla_flat_speedup"] == pytest.approx(4.0)
    assert h["grace_vs_eplb_flat_inter_bytes_reduction"] == pytest.approx(0.2)
    assert h["grace_vs_eplb_flat_busiest_gpu_inter_bytes_reduction"] == 0
    text = format_headline(h)
    assert text.startswith("grace vs eplb (same dispatch, same budget): 1.20x") and "4.00x = 2.50x" in text
