"""Calibration of the simulator's cost model: line fits, cluster fit, predictions through the simulator, ranking."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_grace.errors import GraceInputError
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.plan.topology import LinkModel, ModelShape, Topology
from megatron_grace.simulation import calibration as cal
from megatron_grace.simulation.simulator import simulate
from megatron_grace.trace.routing_trace import RoutingTrace

SHAPE = ModelShape("toy", 1, 4, 1, hidden_size=8, expert_ffn_size=4, dtype_bytes=4)  # 32 bytes per token row


def topo(nodes: int, gpn: int, intra=LinkModel(1e6, 1e-3), inter=LinkModel(1e5, 2e-3), flops: float = 1e9) -> Topology:
    return Topology(name=f"{nodes}x{gpn}", num_nodes=nodes, gpus_per_node=gpn, intra_node=intra, inter_node=inter, gpu_flops=flops)


@pytest.mark.parametrize("relative", [False, True])
def test_fit_line_recovers_exact_line(relative):
    x = np.array([0.0, 1e3, 1e4, 1e5, 1e6])
    fit = cal.fit_line(x, 3e-4 + 2e-8 * x, relative=relative)
    assert fit.intercept == pytest.approx(3e-4, rel=1e-9)
    assert fit.slope == pytest.approx(2e-8, rel=1e-9)
    assert fit.max_rel_error < 1e-9 and fit.points == 5
    assert fit(2e5) == pytest.approx(3e-4 + 4e-3)


def test_fit_line_noisy_data_least_squares_and_no_negative_latency():
    rng = np.random.default_rng(0)
    x = np.repeat([1e4, 1e5, 1e6, 4e6], 5)
    y = (5e-4 + x / 1e8) * (1 + 0.02 * rng.standard_normal(x.size))
    fit = cal.fit_line(x, y)
    assert 1 / fit.slope == pytest.approx(1e8, rel=0.05)
    # times proportional to size with a slight downward bend: the intercept would be negative
    x2 = np.array([1e3, 1e4, 1e5])
    fit2 = cal.fit_line(x2, np.array([0.9e-6, 0.95e-5, 1e-4]))
    assert fit2.intercept == 0.0 and fit2.slope > 0


@pytest.mark.parametrize("size,seconds,msg", [
    ([1.0, 1.0], [1.0, 2.0], "two distinct sizes"),
    ([1.0, 2.0], [1.0, 0.0], "times > 0"),
    ([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], "do not grow"),
])
def test_fit_line_bad_input(size, seconds, msg):
    with pytest.raises(GraceInputError, match=msg):
        cal.fit_line(size, seconds)


def test_fit_cluster_recovers_links_and_flops():
    intra, inter, flops, fixed = LinkModel(5e8, 4e-3), LinkModel(3e7, 6e-3), 2e10, 5e-4
    sizes = np.array([1e4, 1e5, 1e6, 1e7])
    rows = np.array([256, 1024, 4096, 16384])
    micro = {"intra": [[b, intra.time(b)] for b in sizes], "inter": [[b, inter.time(b)] for b in sizes],
             "compute": [[n, fixed + n * SHAPE.expert_flops_per_token / flops] for n in rows]}
    fit = cal.fit_cluster(micro, SHAPE)
    assert fit.intra_node.bandwidth_bytes_per_s == pytest.approx(5e8, rel=1e-6)
    assert fit.intra_node.latency_s == pytest.approx(4e-3, rel=1e-6)
    assert fit.inter_node.bandwidth_bytes_per_s == pytest.approx(3e7, rel=1e-6)
    assert fit.inter_node.latency_s == pytest.approx(6e-3, rel=1e-6)
    assert fit.gpu_flops == pytest.approx(2e10, rel=1e-6)
    assert fit.compute_fixed_s == pytest.approx(5e-4, rel=1e-6)
    t = fit.topology(topo(2, 4))
    assert (t.num_nodes, t.gpus_per_node, t.intra_node, t.inter_node) == (2, 4, fit.intra_node, fit.inter_node)
    assert fit.to_dict()["inter_node"]["latency_s"] == pytest.approx(6e-3, rel=1e-6)
    # the fit as --links text parses back to the same model
    from megatron_grace.plan.topology import parse_links

    parsed = parse_links(fit.links_spec()).topology(2, 4)
    for got, want in ((parsed.intra_node, fit.intra_node), (parsed.inter_node, fit.inter_node)):
        assert got.bandwidth_bytes_per_s == pytest.approx(want.bandwidth_bytes_per_s, rel=1e-5)
        assert got.latency_s == pytest.approx(want.latency_s, rel=1e-5)
    assert parsed.gpu_flops == pytest.approx(2e10, rel=1e-5)
    # one GPU per node: no intra samples, the base topology keeps its intra-node link
    one = cal.fit_cluster({**micro, "intra": []}, SHAPE)
    assert one.intra_node is None and one.topology(topo(2, 1)).intra_node == topo(2, 1).intra_node
    with pytest.raises(GraceInputError, match="'inter' samples"):
        cal.fit_cluster({**micro, "inter": micro["inter"][:1]}, SHAPE)


def _plan(t: Topology, gpu_experts: list[list[int]]) -> PlacementPlan:
    return PlacementPlan(t, 4, [gpu_experts], planner="hand")


def test_predict_layer_s_hand_computed_and_shared_nic():
    """2 nodes x 2 GPUs, expert e on GPU e, top-1; tokens on GPU i mod 4.

    Batch: 8 tokens; tokens 0 and 4 (GPU 0) choose expert 2 (node 1), all others choose their own
    GPU's expert. Flat dispatch: GPU 0 sends 2 rows over the inter-node link, nothing else moves.
    """
    t = topo(2, 2)
    plan = _plan(t, [[0], [1], [2], [3]])
    ids = (np.arange(8) % 4).astype(np.int64)
    ids[[0, 4]] = 2
    batch = ids.reshape(1, 8, 1, 1)
    row = SHAPE.token_bytes
    compute = 4 * SHAPE.expert_flops_per_token / t.gpu_flops  # GPU 2: its own tokens 2, 6 and tokens 0, 4
    per_gpu = cal.predict_layer_s(plan, batch, SHAPE, mode="flat", policy="primary", shared_nic=False)
    assert per_gpu["dispatch_s"] == pytest.approx(2e-3 + 2 * row / 1e5)
    assert per_gpu["combine_s"] == pytest.approx(per_gpu["dispatch_s"])
    assert per_gpu["compute_s"] == pytest.approx(compute)
    assert per_gpu["layer_s"] == pytest.approx(2 * per_gpu["dispatch_s"] + compute)
    # the node's 2 GPUs share one NIC: 2 rows from node 0 = 1 row per GPU
    shared = cal.predict_layer_s(plan, batch, SHAPE, mode="flat", policy="primary", shared_nic=True, compute_fixed_s=1e-3)
    assert shared["dispatch_s"] == pytest.approx(2e-3 + 1 * row / 1e5)
    assert shared["compute_s"] == pytest.approx(compute + 1e-3)
    # two batches: the mean over steps
    other = np.tile((np.arange(8) % 4).reshape(1, 8, 1, 1), (1, 1, 1, 1))
    both = cal.predict_layer_s(plan, np.concatenate([batch, other]), SHAPE, mode="flat", policy="primary", shared_nic=False)
    assert both["dispatch_s"] == pytest.approx(per_gpu["dispatch_s"] / 2)
    with pytest.raises(GraceInputError, match="steps, tokens, layers, k"):
        cal.predict_layer_s(plan, batch[0], SHAPE, mode="flat")


def test_shared_nic_never_slower_and_equal_when_balanced():
    rng = np.random.default_rng(3)
    t = topo(2, 2)
    plan = _plan(t.with_extra_slots(4, 0), [[0], [1], [2], [3]])
    for _ in range(5):
        ids = rng.integers(0, 4, size=(64, 1, 1)).astype(np.int32)
        trace = RoutingTrace(ids, 4, model="toy")
        for mode in ("flat", "hierarchical"):
            a = simulate(plan, trace, SHAPE, policy="primary", dispatch=mode).modes[mode]
            b = simulate(plan, trace, SHAPE, policy="primary", dispatch=mode, shared_nic=True).modes[mode]
            assert np.all(b.dispatch_s <= a.dispatch_s + 1e-15)
            assert np.array_equal(a.inter_bytes, b.inter_bytes)  # totals are the same, only the time model differs
    # every GPU sends the same: per-GPU and shared-NIC models agree
    ids = np.array([[2], [3], [0], [1]] * 4, dtype=np.int32)[:, None, :]  # GPU g's tokens go to GPU g+2 mod 4
    trace = RoutingTrace(ids, 4, model="toy")
    a = simulate(plan, trace, SHAPE, policy="primary", dispatch="flat").modes["flat"]
    b = simulate(plan, trace, SHAPE, policy="primary", dispatch="flat", shared_nic=True).modes["flat"]
    assert a.dispatch_s[0] == pytest.approx(b.dispatch_s[0]) and a.inter_bytes[0] > 0


def test_kendall_tau_and_compare_ranking():
    assert cal.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert cal.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert cal.kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    rows = [
        {"phase": "decode", "plan": "a", "mode": "flat", "layer_ms_median": 10.0, "predicted_layer_ms": 11.0},
        {"phase": "decode", "plan": "b", "mode": "flat", "layer_ms_median": 20.0, "predicted_layer_ms": 14.0},
        {"phase": "prefill", "plan": "a", "mode": "flat", "layer_ms_median": 10.0, "predicted_layer_ms": 30.0},
        {"phase": "prefill", "plan": "b", "mode": "flat", "layer_ms_median": 20.0, "predicted_layer_ms": 21.0},
    ]
    out = cal.compare_ranking(rows)
    assert out["decode"]["within_25pct"] == 1 and out["decode"]["same_order"] and out["decode"]["kendall_tau"] == 1.0
    assert out["decode"]["max_abs_error"] == pytest.approx(0.3)
    assert out["prefill"]["within_25pct"] == 1 and not out["prefill"]["same_order"]
    assert out["prefill"]["measured_order"] == ["a/flat", "b/flat"] and out["prefill"]["predicted_order"] == ["b/flat", "a/flat"]


def test_plot_results_writes_png(tmp_path):
    rows = [{"phase": ph, "plan": f"{p}+0", "planner": p, "mode": m, "tokens_per_s_median": 100.0 + i, "tokens_per_s_min": 90.0,
             "tokens_per_s_max": 120.0, "layer_ms_median": 5.0 + i, "predicted_layer_ms": 5.5 + i}
            for ph in ("decode", "prefill") for i, (p, m) in enumerate([("vanilla", "flat"), ("grace", "hierarchical")])]
    path = tmp_path / "p.png"
    cal.plot_results(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
