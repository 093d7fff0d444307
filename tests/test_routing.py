"""Replica-choice policies, load predictor and the LP optimum."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from megatron_grace.errors import GraceInputError
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.plan.topology import ModelShape, Topology
from megatron_grace.routing import POLICY_NAMES, RoutingOptions, LoadPredictor, ReplicaTable, choose_copies, copy_destinations, static_gpu_load
from megatron_grace.routing.optimal import optimal_assignment


def random_plan(rng: np.random.Generator, nodes: int, gpn: int, experts: int, layers: int = 2, extra: int = 2) -> PlacementPlan:
    """Every expert once (shuffled, unequal counts per GPU allowed) plus random copies on other GPUs."""
    topo = Topology.preset("a100-2x4")
    topo = Topology(name="t", num_nodes=nodes, gpus_per_node=gpn, intra_node=topo.intra_node, inter_node=topo.inter_node,
                    gpu_flops=topo.gpu_flops)
    G = nodes * gpn
    layers_out = []
    for _ in range(layers):
        gpus: list[list[int]] = [[] for _ in range(G)]
        for e in rng.permutation(experts):
            gpus[int(rng.integers(G))].append(int(e))
        for _ in range(extra * G):
            e, g = int(rng.integers(experts)), int(rng.integers(G))
            if e not in gpus[g]:
                gpus[g].append(e)
        layers_out.append(gpus)
    return PlacementPlan(topo, experts, layers_out)


def random_batch(rng, tokens, experts, k, drop=0.05):
    ids = np.argsort(rng.random((tokens, experts)), axis=1)[:, :k]
    ids[rng.random((tokens, k)) < drop] = -1
    return torch.from_numpy(ids)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_decision_hosts_its_expert_and_is_reproducible(policy):
    rng = np.random.default_rng(7)
    for trial in range(6):
        plan = random_plan(rng, nodes=1 + trial % 3, gpn=1 + trial % 4, experts=9 + trial)
        table = ReplicaTable.from_plan(plan, layer=trial % 2)
        ids = random_batch(rng, tokens=int(rng.integers(0, 300)), experts=plan.num_experts, k=3)
        src = torch.from_numpy(rng.integers(0, plan.num_gpus, ids.shape[0]))
        pred = torch.from_numpy(rng.random(plan.num_gpus) * 10)
        copy = choose_copies(policy, ids, src, table, predicted_load=pred, step=trial, seed=3)
        gpu, slot = copy_destinations(ids, copy, table)
        assert ((copy >= 0) == (ids >= 0)).all() and ((gpu >= 0) == (ids >= 0)).all()
        for t, j in zip(*np.nonzero(ids.numpy() >= 0)):
            e, g, s = int(ids[t, j]), int(gpu[t, j]), int(slot[t, j])
            assert plan.gpu_experts[trial % 2][g][s] == e  # the copy really holds expert e
        again = choose_copies(policy, ids, src, table, predicted_load=pred, step=trial, seed=3)
        assert torch.equal(copy, again)


def test_grace_tiers_local_then_node_then_remote():
    # 2 nodes x 2 GPUs. expert 0 on GPUs 0 and 2; expert 1 on GPUs 1 and 3; expert 2 only on 3.
    table = ReplicaTable.from_hosts(torch.tensor([[0, 2], [1, 3], [3, -1]]), gpus_per_node=2, num_gpus=4)
    ids = torch.tensor([[0], [1], [0], [2]])
    src = torch.tensor([0, 0, 1, 0])
    copy = choose_copies("grace", ids, src, table, options=RoutingOptions(offload_threshold=float("inf")))
    gpu, _ = copy_destinations(ids, copy, table)
    assert gpu[:, 0].tolist() == [0, 1, 0, 3]  # own GPU; same node; same node; the only (remote) copy


def test_grace_spreads_remote_pairs_in_proportion_to_spare_capacity():
    table = ReplicaTable.from_hosts(torch.tensor([[2, 3]]), gpus_per_node=2, num_gpus=4)
    ids = torch.zeros((10_000, 1), dtype=torch.int64)
    pred = torch.tensor([0.0, 0.0, 10.0, 30.0])
    options = RoutingOptions(headroom=0.5)
    copy = choose_copies("grace", ids, 0, table, predicted_load=pred, options=options)
    spare = 1.5 * 30 - pred[2:]  # 35, 15
    share = (copy == 0).double().mean().item()
    assert share == pytest.approx(float(spare[0] / spare.sum()), abs=2e-3)
    # random spreads evenly, ignoring the predictor
    rnd = choose_copies("random", ids, 0, table, seed=1)
    assert (rnd == 0).double().mean().item() == pytest.approx(0.5, abs=0.03)


def test_grace_offloads_from_a_predicted_bottleneck_inside_the_node():
    table = ReplicaTable.from_hosts(torch.tensor([[0, 1]]), gpus_per_node=2, num_gpus=4)
    ids = torch.zeros((1000, 1), dtype=torch.int64)
    hot_local = torch.tensor([10.0, 1.0, 1.0, 1.0])
    copy = choose_copies("grace", ids, 0, table, predicted_load=hot_local)
    assert 0.5 < (copy == 1).double().mean() < 1.0  # most but not all to the cool peer
    paper = choose_copies("grace", ids, 0, table, predicted_load=hot_local, options=RoutingOptions(offload_threshold=float("inf")))
    assert (paper == 0).all()  # the paper's rule: always the local copy


def test_static_local_is_fixed_per_source_and_expert_and_position_cycles():
    table = ReplicaTable.from_hosts(torch.tensor([[2, 3, -1], [0, 1, 2]]), gpus_per_node=4, num_gpus=8)
    ids = torch.tensor([[0]] * 50 + [[1]] * 50)
    copy = choose_copies("static-local", ids, 5, table)
    assert copy[:50].unique().numel() == 1 and copy[50:].unique().numel() == 1
    pos = choose_copies("position", ids, 5, table)
    assert pos[:6, 0].tolist() == [0, 1, 0, 1, 0, 1] and pos[50:53, 0].tolist() == [2, 0, 1]


def test_policy_bad_input_is_named():
    """Shapes are checked always; values (a host sync on a GPU) in debug mode."""
    from megatron_grace._debug import set_debug

    table = ReplicaTable.from_hosts(torch.tensor([[0, 1]]), gpus_per_node=2, num_gpus=2)
    ids = torch.zeros((4, 1), dtype=torch.int64)
    with pytest.raises(GraceInputError, match="one entry per GPU"):
        choose_copies("grace", ids, 0, table, predicted_load=torch.ones(3))
    with pytest.raises(GraceInputError, match="unknown replica-choice policy"):
        choose_copies("nearest", ids, 0, table)
    set_debug(True)
    try:
        _bad_values_are_named(table, ids)
    finally:
        set_debug(None)


def _bad_values_are_named(table, ids):
    with pytest.raises(GraceInputError, match="NaN"):
        choose_copies("grace", ids, 0, table, predicted_load=torch.tensor([float("nan"), 1.0]))
    with pytest.raises(GraceInputError, match="one entry per GPU"):
        choose_copies("grace", ids, 0, table, predicted_load=torch.ones(3))
    with pytest.raises(GraceInputError, match="out of range"):
        choose_copies("grace", torch.tensor([[3]]), 0, table)
    with pytest.raises(GraceInputError, match="src_gpu out of range"):
        choose_copies("grace", ids, 5, table)
    with pytest.raises(GraceInputError, match="unknown replica-choice policy"):
        choose_copies("nearest", ids, 0, table)


def test_load_predictor_ema_start_up_and_errors():
    rng = np.random.default_rng(0)
    plan = random_plan(rng, 1, 4, 8, layers=2)
    expert_load = np.arange(16, dtype=np.float64).reshape(2, 8) + 1
    pred = LoadPredictor(plan, expert_load=expert_load, alpha=0.5)
    start = static_gpu_load(plan, expert_load)
    np.testing.assert_allclose(pred.predict_share(1), start[1] / start[1].sum())
    obs = np.array([[4.0, 0, 0, 0], [1, 1, 1, 1]])
    pred.observe(obs)
    pred.end_step()
    np.testing.assert_allclose(pred.predict_share(0), 0.5 * start[0] / start[0].sum() + 0.5 * np.array([1, 0, 0, 0]))
    assert float(pred.predict(0, pairs=100).sum()) == pytest.approx(100)
    with pytest.raises(GraceInputError, match="NaN"):
        pred.observe(np.full((2, 4), np.nan))
    with pytest.raises(GraceInputError, match="negative"):
        pred.observe(-np.ones((2, 4)))
    with pytest.raises(GraceInputError, match="another topology"):
        pred.observe(np.ones((2, 8)))
    with pytest.raises(GraceInputError, match="plan needs"):
        LoadPredictor(plan, expert_load=np.ones((3, 8)))


def test_load_predictor_falls_back_to_plan_when_stale():
    plan = random_plan(np.random.default_rng(1), 1, 2, 4, layers=1)
    pred = LoadPredictor(plan, stale_after=3)
    pred.observe(np.array([[10.0, 0.0]]))
    pred.end_step()
    assert pred.predict_share(0)[0] > 0.5
    for _ in range(3):
        pred.end_step()  # forward passes without observations
    with pytest.warns(RuntimeWarning, match="falling back"):
        share = pred.predict_share(0)
    np.testing.assert_allclose(share, static_gpu_load(plan)[0] / static_gpu_load(plan)[0].sum())


def test_window_and_static_modes():
    plan = random_plan(np.random.default_rng(2), 1, 2, 4, layers=1)
    win = LoadPredictor(plan, mode="window", window=2)
    static = LoadPredictor(plan, mode="static")
    for obs in ([[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 1.0]]):
        for p in (win, static):
            p.observe(np.array(obs))
            p.end_step()
    np.testing.assert_allclose(win.predict_share(0), [0.0, 1.0])
    np.testing.assert_allclose(static.predict_share(0), static_gpu_load(plan)[0] / static_gpu_load(plan)[0].sum())


def _integer_optimum(ids, src, hosts, topo, shape):
    from itertools import product

    from megatron_grace.simulation.simulator import count_decisions

    pairs = [(t, j) for t in range(ids.shape[0]) for j in range(ids.shape[1]) if ids[t, j] >= 0]
    options = [[int(g) for g in hosts[ids[t, j]] if g >= 0] for t, j in pairs]
    best = np.inf
    for choice in product(*options):
        gpu = np.full(ids.shape, -1)
        for (t, j), g in zip(pairs, choice):
            gpu[t, j] = g
        res = count_decisions(gpu[:, None, :], src, topo, shape, dispatch="flat")
        best = min(best, res.modes["flat"].totals()["layer_s"])
    return best


def test_lp_optimum_is_a_lower_bound_of_every_integer_assignment():
    rng = np.random.default_rng(5)
    topo = Topology(name="t", num_nodes=2, gpus_per_node=2, intra_node=Topology.preset("a100-2x4").intra_node,
                    inter_node=Topology.preset("a100-2x4").inter_node, gpu_flops=1e9)  # slow GPUs: compute matters
    shape = ModelShape.preset("qwen3-30b-a3b")
    for _ in range(4):
        hosts = np.array([[0, 3], [1, 2], [2, -1], [3, 0]])
        hosts = np.sort(np.where(hosts < 0, 99, hosts), axis=1)
        hosts[hosts == 99] = -1
        ids = np.argsort(rng.random((5, 4)), axis=1)[:, :2]
        src = rng.integers(0, 4, 5)
        lp = optimal_assignment(ids, src, hosts, topo, shape)
        best = _integer_optimum(ids, src, hosts, topo, shape)
        assert lp.layer_s <= best * (1 + 1e-9)
        assert lp.layer_s >= 0.5 * best  # the relaxation is not vacuous on such small cases
        assert lp.gpu_load.sum() == pytest.approx((ids >= 0).sum())


def test_simulator_runs_every_routing_policy_on_every_plan(tmp_path, capsys):
    from megatron_grace.cli.main import main
    from megatron_grace.simulation import simulate
    from megatron_grace.trace.routing_trace import RoutingTrace

    rng = np.random.default_rng(3)
    plan = random_plan(rng, nodes=2, gpn=2, experts=12, layers=2)
    ids = np.argsort(rng.random((300, 2, 12)), axis=2)[:, :, :3].astype(np.int32)
    trace = RoutingTrace(ids, 12, model="qwen3-30b-a3b")
    shares = {}
    for policy in POLICY_NAMES:
        res = simulate(plan, trace, "qwen3-30b-a3b", policy=policy, keep_decisions=True)
        hosted = plan.expert_gpus[np.arange(2)[None, :, None], ids]  # [T, L, k, R]
        assert (hosted == res.decisions[..., None]).any(-1).all()  # every decision hosts its expert
        shares[policy] = res.summary()["share_inter_node"]
    assert shares["grace"] <= shares["random"]
    trace.save(tmp_path / "t.npz")
    ExpertStats_path = tmp_path / "s.npz"
    from megatron_grace.statistics.expert_stats import ExpertStats

    ExpertStats.from_trace(trace).save(ExpertStats_path)
    assert main(["compare", "--trace", str(tmp_path / "t.npz"), "--topology", "a100-2x4", "--extra-slots", "1",
                 "--planners", "vanilla,grace", "--policy", "primary,grace", "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "policy primary" in out and "policy grace" in out
    import json

    report = json.loads((tmp_path / "c.json").read_text())
    assert set(report["policies"]) == {"primary", "grace"}


def _predictor_worker(rank: int, world: int) -> list[float]:
    plan = random_plan(np.random.default_rng(1), 1, 2, 4, layers=1)
    pred = LoadPredictor(plan, sync_every=2, alpha=1.0)
    pred.observe(np.array([[3.0, 0.0]]) if rank == 0 else np.array([[0.0, 1.0]]))
    pred.end_step()  # step 1: no merge yet
    before = pred.predict_share(0).tolist()
    if rank == 0:  # rank 1 observes nothing on the merge step: the merge must not hang
        pred.observe(np.array([[0.0, 0.0]]))
    pred.end_step()  # step 2: all-reduce of [[3, 1]]
    return before + pred.predict_share(0).tolist()


def test_load_predictor_merges_counts_across_gloo_ranks():
    from _dist_utils import run_distributed

    results = run_distributed(_predictor_worker, world_size=2, timeout=60)
    assert results[0][2:] == results[1][2:] == pytest.approx([0.75, 0.25])
    assert results[0][:2] == results[1][:2]  # before the merge both still predict the plan's shares
