"""PlacementPlan export to the DeepSeek-EPLB / SGLang arrays, and the CLI that writes them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_grace.cli.main import main
from megatron_grace.errors import GraceInputError
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.plan.topology import Topology


def _plan(gpu_experts, slots=3):
    return PlacementPlan(Topology.preset("a100-2x4").with_slots(slots), 12, gpu_experts)


def test_eplb_arrays_are_mutually_consistent():
    # 8 GPUs, 12 experts, copies of 0 and 5, unequal counts per GPU
    layer = [[0, 1], [2, 3, 0], [4, 5], [6, 7], [8, 5], [9], [10, 11], [1, 3]]
    plan = _plan([layer, layer[::-1]])
    arrays = plan.to_eplb_arrays()
    phy, log2phy, count = arrays["physical_to_logical_map"], arrays["logical_to_all_physical_map"], arrays["logical_count"]
    S = phy.shape[1] // plan.num_gpus
    assert phy.shape == (2, 8 * S) and count.shape == (2, 12)
    for l in range(2):
        np.testing.assert_array_equal(count[l], np.bincount(phy[l][phy[l] >= 0], minlength=12))
        for e in range(12):
            slots = log2phy[l, e][log2phy[l, e] >= 0]
            assert len(slots) == count[l, e] and (phy[l, slots] == e).all()
            assert sorted(int(p) // S for p in slots) == plan.hosts(l, e)  # physical slot -> hosting GPU


def test_sglang_json_needs_equal_counts(tmp_path):
    equal = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    data = _plan([equal]).to_sglang_json()
    assert np.array(data["physical_to_logical_map"]).shape == (1, 24)
    with pytest.raises(GraceInputError, match="same number of experts on every GPU"):
        _plan([[[0, 1], [2, 3, 4], [5], [6], [7], [8], [9, 10], [11]]]).to_sglang_json()


def test_plan_cli_writes_plan_and_exports(tmp_path, capsys):
    out, npz, js = tmp_path / "p.json", tmp_path / "eplb.npz", tmp_path / "sglang.json"
    assert main(["plan", "--topology", "a100-2x4", "--extra-slots", "0", "--planner", "eplb", "--out", str(out),
                 "--export-eplb", str(npz), "--export-sglang", str(js)]) == 0
    plan = PlacementPlan.read(out)
    with np.load(npz, allow_pickle=False) as data:
        np.testing.assert_array_equal(data["physical_to_logical_map"], plan.to_eplb_arrays()["physical_to_logical_map"])
    assert json.loads(js.read_text())["physical_to_logical_map"] == plan.to_sglang_json()["physical_to_logical_map"]


def test_bad_outputs_and_budgets_are_named(tmp_path, capsys):
    assert main(["plan", "--extra-slots", "0", "--planner", "vanilla", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["plan", "--extra-slots", "0", "--planner", "vanilla", "--out", str(blocker / "plan.json")]) == 2
    assert "cannot write here" in capsys.readouterr().err
    assert main(["plan", "--memory-gb", "inf", "--model-shape", "qwen3-30b-a3b"]) == 2
    assert "finite" in capsys.readouterr().err
    with pytest.raises(GraceInputError, match="check the units"):
        Topology.preset("a100-2x4").with_memory(1e300, 1e-300)


def test_plan_file_with_bad_metadata_or_nan_budget(tmp_path):
    good = _plan([[[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10], [11], []]]).to_dict()
    for mutate, message in ((lambda d: d.update(metadata=[1, 2]), "wrong schema"),
                            (lambda d: d["topology"].update(memory_per_gpu_bytes=float("nan"), expert_bytes=1.0, slots_per_gpu=None),
                             "finite")):
        data = json.loads(json.dumps(good))
        mutate(data)
        path = tmp_path / "p.json"
        path.write_text(json.dumps(data))
        with pytest.raises(GraceInputError, match=message):
            PlacementPlan.read(path)
