"""The simulator against a brute-force Python-loop reference, its invariants, decision dumps,
bad input, and the ``simulate`` / ``compare`` commands."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from conftest import random_ids
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_grace import ExpertStats, GraceInputError, RoutingTrace
from megatron_grace.cli.main import main
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.plan.replication import predicted_gpu_load
from megatron_grace.plan.topology import LinkModel, ModelShape, Topology
from megatron_grace.routing import RoutingOptions
from megatron_grace.simulation import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    SimulationResult,
    load_decisions,
    recount_decisions,
    resolve_model_shape,
    simulate,
    token_start_gpus,
)
from megatron_grace.simulation.compare import compare_planners, split_source


# ------------------------------------------------------------------------------------ helpers
def topo(nodes: int, gpn: int) -> Topology:
    return Topology(name=f"test-{nodes}x{gpn}", num_nodes=nodes, gpus_per_node=gpn, intra_node=LinkModel(100e9, 1e-6),
                    inter_node=LinkModel(10e9, 7e-6), gpu_flops=1e14)


def shape(L: int, E: int, k: int) -> ModelShape:
    return ModelShape("tiny", L, E, k, hidden_size=64, expert_ffn_size=96)


def random_plan(rng: np.random.Generator, topology: Topology, E: int, L: int, max_extra: int = 2) -> PlacementPlan:
    """Unequal experts per GPU (primary GPU drawn at random) plus 0..max_extra copies of random experts."""
    G = topology.num_gpus
    layers = []
    for _ in range(L):
        gpus: list[list[int]] = [[] for _ in range(G)]
        for e, g in enumerate(rng.integers(0, G, E)):
            gpus[g].append(e)
        for e in rng.choice(E, size=E // 2, replace=False):
            free = [g for g in range(G) if e not in gpus[g]]
            for g in rng.choice(free, size=min(len(free), int(rng.integers(0, max_extra + 1))), replace=False):
                gpus[g].append(int(e))
        layers.append(gpus)
    return PlacementPlan(topology=topology, num_experts=E, gpu_experts=layers, planner="random")


def reference(gpu: np.ndarray, src: np.ndarray, topology: Topology, ms: ModelShape) -> dict[str, np.ndarray]:
    """Brute force, one token and one pair at a time: every figure of the simulator per layer."""
    T, L, k = gpu.shape
    G, gpn, tb = topology.num_gpus, topology.gpus_per_node, ms.token_bytes
    bw_i, bw_e = topology.intra_node.bandwidth_bytes_per_s, topology.inter_node.bandwidth_bytes_per_s
    lat_i, lat_e = topology.intra_node.latency_s, topology.inter_node.latency_s
    names = ["pairs_total", "pairs_local", "pairs_intra_node", "pairs_inter_node", "msgs_gpu_intra_node", "msgs_gpu_inter_node",
             "msgs_node", "compute_s", "pp_intra_bytes", "pp_inter_bytes", "pp_dispatch_s", "pp_layer_s", "h_intra_bytes",
             "h_inter_bytes", "h_dispatch_s", "h_layer_s", "pp_max_intra", "pp_max_inter", "h_max_intra", "h_max_inter"]
    out: dict[str, list] = {n: [] for n in names}
    out["gpu_load"] = []
    for layer in range(L):
        load = [0] * G
        pp = {n: [0] * G for n in ("is", "ir", "es", "er")}
        hi = {n: [0] * G for n in ("is", "ir", "es", "er")}
        c = dict.fromkeys(("local", "intra", "inter", "mgi", "mge", "mnode", "hintra"), 0)
        for t in range(T):
            s = int(src[t])
            sn = s // gpn
            dests = [int(d) for d in gpu[t, layer] if d >= 0]
            for d in dests:
                load[d] += 1
                if d == s:
                    c["local"] += 1
                elif d // gpn == sn:
                    c["intra"] += 1
                    pp["is"][s] += 1
                    pp["ir"][d] += 1
                else:
                    c["inter"] += 1
                    pp["es"][s] += 1
                    pp["er"][d] += 1
            remote_gpus = set(dests) - {s}
            for d in remote_gpus:
                if d // gpn == sn:
                    c["mgi"] += 1
                    hi["is"][s] += 1
                    hi["ir"][d] += 1
                    c["hintra"] += 1
                else:
                    c["mge"] += 1
            for n in {d // gpn for d in dests} - {sn}:
                c["mnode"] += 1
                peer = n * gpn + s % gpn
                hi["es"][s] += 1
                hi["er"][peer] += 1
                for d in remote_gpus:
                    if d // gpn == n and d != peer:
                        hi["is"][peer] += 1
                        hi["ir"][d] += 1
                        c["hintra"] += 1
        compute = max(load) * ms.expert_flops_per_token / topology.gpu_flops
        pp_i = max(max(a, b) for a, b in zip(pp["is"], pp["ir"])) * tb
        pp_e = max(max(a, b) for a, b in zip(pp["es"], pp["er"])) * tb
        pp_t = max(pp_i / bw_i, pp_e / bw_e) + max(lat_i if c["intra"] else 0.0, lat_e if c["inter"] else 0.0)
        h_i = max(max(a, b) for a, b in zip(hi["is"], hi["ir"])) * tb
        h_e = max(max(a, b) for a, b in zip(hi["es"], hi["er"])) * tb
        h_t = h_e / bw_e + (lat_e if c["mnode"] else 0.0) + h_i / bw_i + (lat_i if c["hintra"] else 0.0)
        row = {"pairs_total": sum(load), "pairs_local": c["local"], "pairs_intra_node": c["intra"], "pairs_inter_node": c["inter"],
               "msgs_gpu_intra_node": c["mgi"], "msgs_gpu_inter_node": c["mge"], "msgs_node": c["mnode"], "compute_s": compute,
               "pp_intra_bytes": c["intra"] * tb, "pp_inter_bytes": c["inter"] * tb, "pp_dispatch_s": pp_t,
               "pp_layer_s": 2 * pp_t + compute, "h_intra_bytes": c["hintra"] * tb, "h_inter_bytes": c["mnode"] * tb,
               "h_dispatch_s": h_t, "h_layer_s": 2 * h_t + compute, "pp_max_intra": pp_i, "pp_max_inter": pp_e,
               "h_max_intra": h_i, "h_max_inter": h_e}
        for n in names:
            out[n].append(row[n])
        out["gpu_load"].append(load)
    return {n: np.array(v) for n, v in out.items()}


def assert_matches_reference(result: SimulationResult, ref: dict[str, np.ndarray]) -> None:
    for name in ("pairs_total", "pairs_local", "pairs_intra_node", "pairs_inter_node", "msgs_gpu_intra_node",
                 "msgs_gpu_inter_node", "msgs_node", "gpu_load"):
        np.testing.assert_array_equal(getattr(result, name), ref[name], err_msg=name)
    np.testing.assert_allclose(result.compute_s, ref["compute_s"], rtol=1e-12)
    for mode, p in (("flat", "pp"), ("hierarchical", "h")):
        cost = result.modes[mode]
        np.testing.assert_array_equal(cost.intra_bytes, ref[f"{p}_intra_bytes"], err_msg=f"{mode} intra bytes")
        np.testing.assert_array_equal(cost.inter_bytes, ref[f"{p}_inter_bytes"], err_msg=f"{mode} inter bytes")
        np.testing.assert_array_equal(cost.max_gpu_intra_bytes, ref[f"{p}_max_intra"], err_msg=f"{mode} max intra")
        np.testing.assert_array_equal(cost.max_gpu_inter_bytes, ref[f"{p}_max_inter"], err_msg=f"{mode} max inter")
        np.testing.assert_allclose(cost.dispatch_s, ref[f"{p}_dispatch_s"], rtol=1e-12, err_msg=f"{mode} dispatch")
        np.testing.assert_allclose(cost.combine_s, ref[f"{p}_dispatch_s"], rtol=1e-12)
        np.testing.assert_allclose(cost.layer_s, ref[f"{p}_layer_s"], rtol=1e-12, err_msg=f"{mode} layer time")
        totals = cost.totals()
        assert totals["intra_bytes"] == ref[f"{p}_intra_bytes"].sum() and totals["inter_bytes"] == ref[f"{p}_inter_bytes"].sum()
        assert totals["layer_s"] == pytest.approx(ref[f"{p}_layer_s"].sum(), rel=1e-12)
    s = result.summary()
    assert s["pairs"] == ref["pairs_total"].sum() and s["msgs_node"] == ref["msgs_node"].sum()
    assert s["msgs_gpu"] == ref["msgs_gpu_intra_node"].sum() + ref["msgs_gpu_inter_node"].sum()


def check_locality_tiers(ids: np.ndarray, gpu: np.ndarray, src: np.ndarray, plan: PlacementPlan, own_gpu: bool = True) -> None:
    """Every decision hosts its expert, -1 exactly where missing, and the locality tiers hold: the
    token's own node when it hosts a copy, and (``own_gpu``) the token's own GPU when it hosts one."""
    gpn = plan.topology.gpus_per_node
    T, L, k = ids.shape
    for layer in range(L):
        for t in range(T):
            for j in range(k):
                e, g = int(ids[t, layer, j]), int(gpu[t, layer, j])
                if e < 0:
                    assert g == -1
                    continue
                hosts = plan.hosts(layer, e)
                assert g in hosts
                s = int(src[t])
                if s in hosts and own_gpu:
                    assert g == s
                elif any(h // gpn == s // gpn for h in hosts):
                    assert g // gpn == s // gpn


# ------------------------------------------------------------------------------------ counts
@pytest.mark.parametrize("seed,nodes,gpn,placement", [(0, 2, 2, "round-robin"), (1, 3, 2, "request"), (2, 2, 3, "round-robin"),
                                                      (3, 1, 4, "request"), (4, 4, 1, "round-robin")])
def test_counts_match_bruteforce_reference(seed, nodes, gpn, placement):
    rng = np.random.default_rng(seed)
    T, L, E, k = 150, 3, 10, 3
    topology = topo(nodes, gpn)
    plan = random_plan(rng, topology, E, L)
    ids = random_ids(rng, T, L, E, k, missing=0.15)
    trace = RoutingTrace(ids, E, request_ids=rng.integers(0, 7, T), model="tiny")
    ms = shape(L, E, k)
    load = rng.random((L, E)) * 100
    result = simulate(plan, trace, ms, token_placement=placement, expert_load=load, keep_decisions=True)
    assert result.policy == DEFAULT_POLICY == "grace"
    check_locality_tiers(ids, result.decisions, result.src_gpu, plan, own_gpu=False)  # grace may offload a hot GPU to its node
    paper = simulate(plan, trace, ms, token_placement=placement, expert_load=load, keep_decisions=True,
                     options=RoutingOptions(offload_threshold=float("inf")))
    check_locality_tiers(ids, paper.decisions, paper.src_gpu, plan)
    assert_matches_reference(result, reference(result.decisions, result.src_gpu, topology, ms))
    one = simulate(plan, trace, ms, token_placement=placement, expert_load=load, dispatch="hierarchical")
    assert list(one.modes) == ["hierarchical"]
    np.testing.assert_array_equal(one.modes["hierarchical"].layer_s, result.modes["hierarchical"].layer_s)


@pytest.mark.parametrize("nodes,gpn", [(3, 3), (2, 70)])
def test_counts_match_reference_for_arbitrary_decisions(rng, nodes, gpn):
    """The counting half alone, on decisions no policy would make (duplicates, any hosting GPU), also with > 127 GPUs."""
    from megatron_grace.simulation import count_decisions

    topology = topo(nodes, gpn)
    gpu = rng.integers(-1, topology.num_gpus, (200, 2, 5))
    src = rng.integers(0, topology.num_gpus, 200)
    ms = shape(2, 16, 5)
    assert_matches_reference(count_decisions(gpu, src, topology, ms), reference(gpu, src, topology, ms))


@settings(max_examples=40, deadline=None)
@given(nodes=st.integers(1, 3), gpn=st.integers(1, 3), T=st.integers(1, 25), L=st.integers(1, 2), k=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1))
def test_counts_match_reference_property(nodes, gpn, T, L, k, seed):
    from megatron_grace.simulation import count_decisions

    r = np.random.default_rng(seed)
    topology = topo(nodes, gpn)
    gpu = r.integers(-1, topology.num_gpus, (T, L, k))
    src = r.integers(0, topology.num_gpus, T)
    ms = shape(L, 8, k)
    assert_matches_reference(count_decisions(gpu, src, topology, ms), reference(gpu, src, topology, ms))


def test_missing_records_send_nothing():
    topology = topo(2, 2)
    plan = PlacementPlan(topology, 4, [[[0], [1], [2], [3]]])
    ids = np.array([[[-1, -1]], [[2, 3]]], dtype=np.int32)
    r = simulate(plan, RoutingTrace(ids, 4), shape(1, 4, 2), keep_decisions=True)
    np.testing.assert_array_equal(r.decisions[0], [[-1, -1]])
    assert r.pairs_total[0] == 2 and r.msgs_node[0] == 1  # token 1 on GPU 1 (node 0) needs node 1 once
    assert r.modes["hierarchical"].inter_bytes[0] == r.model_shape.token_bytes
    assert r.modes["flat"].inter_bytes[0] == 2 * r.model_shape.token_bytes
    # hierarchical: crosses to the peer GPU 3 (same local index 1), which forwards once to GPU 2
    assert r.modes["hierarchical"].intra_bytes[0] == r.model_shape.token_bytes
    with pytest.warns(DeprecationWarning, match="per-pair"):  # the old name of flat dispatch
        old = simulate(plan, RoutingTrace(ids, 4), shape(1, 4, 2), dispatch="per-pair")
    assert list(old.modes) == ["flat"] and old.modes["flat"].inter_bytes[0] == r.modes["flat"].inter_bytes[0]


def test_pair_crossings_do_not_depend_on_placement_without_copies_but_messages_do():
    """Tokens spread evenly over GPUs: without copies, the share of pairs crossing nodes is the
    same for every placement; grouping co-activated experts on a node cuts deduplicated
    messages; copies on every node with locality-aware (grace) routing cut pair crossings to zero."""
    rng = np.random.default_rng(7)
    topology = topo(2, 2)
    G, E, k, L = 4, 8, 3, 1
    clusters = [[0, 3, 5, 6], [1, 2, 4, 7]]  # each token picks k experts of one cluster
    base = np.array([[rng.choice(clusters[t % 2], k, replace=False)] for t in range(60)], dtype=np.int32)
    ids = np.repeat(base, G, axis=0)  # every token once on every GPU (round-robin start)
    trace = RoutingTrace(ids, E, model="tiny")
    ms = shape(L, E, k)
    grouped = PlacementPlan(topology, E, [[[0, 3], [5, 6], [1, 2], [4, 7]]], planner="grouped")
    scattered = PlacementPlan(topology, E, [[[0, 1], [2, 3], [4, 5], [6, 7]]], planner="scattered")
    shuffled = PlacementPlan(topology, E, [[[7], [0, 2, 5], [1, 6], [3, 4]]], planner="unequal")
    results = [simulate(plan, trace, ms) for plan in (grouped, scattered, shuffled)]
    pairs = ids.shape[0] * k
    for r in results:
        assert r.pairs_total[0] == pairs
        assert r.pairs_inter_node[0] == pairs // 2  # (1 - 1/nodes) of all pairs, whatever the placement
    assert results[0].msgs_node[0] < results[1].msgs_node[0]
    assert results[0].msgs_node[0] == ids.shape[0] // 2  # grouped: each token needs exactly one node, half start elsewhere
    assert results[0].modes["hierarchical"].inter_bytes[0] < results[1].modes["hierarchical"].inter_bytes[0]
    assert results[0].modes["flat"].inter_bytes[0] == results[1].modes["flat"].inter_bytes[0]
    copied = PlacementPlan(topology, E, [[[0, 3, 1, 2], [5, 6, 4, 7], [1, 2, 0, 3], [4, 7, 5, 6]]], planner="copies")
    r = simulate(copied, trace, ms)
    assert r.pairs_inter_node[0] == 0 and r.msgs_node[0] == 0


def test_random_traces_pair_crossings_match_expectation_without_copies(rng):
    """On a uniform-start random trace the crossing share is close to (1 - 1/N) for any placement."""
    topology = topo(4, 2)
    E, L, k, T = 32, 2, 4, 4000
    ids = random_ids(rng, T, L, E, k)
    trace = RoutingTrace(ids, E)
    ms = shape(L, E, k)
    for seed in range(3):
        plan = random_plan(np.random.default_rng(seed), topology, E, L, max_extra=0)
        r = simulate(plan, trace, ms)
        assert r.summary()["share_inter_node"] == pytest.approx(0.75, abs=0.02)


# ------------------------------------------------------------------------------------ policy
def test_grace_splits_remote_traffic_by_spare_predicted_capacity():
    """The simulator's grace is the routing module's: remote pairs of one group are spread over the
    copies in proportion to their GPUs' spare capacity under the static load prediction."""
    topology = topo(3, 1)
    # expert 0 on GPUs 1 and 2; GPU 1 also hosts experts 1 and 2, GPU 2 expert 3; tokens all start on GPU 0
    plan = PlacementPlan(topology, 5, [[[4], [0, 1, 2], [0, 3]]])
    T = 1000
    ids = np.zeros((T, 1, 1), dtype=np.int32)
    trace = RoutingTrace(ids, 5, request_ids=np.zeros(T, dtype=np.int64))

    def expected_share2(pred: np.ndarray) -> float:
        spare = (1 + RoutingOptions().headroom) * pred.max() - pred
        return spare[2] / (spare[1] + spare[2])

    r = simulate(plan, trace, shape(1, 5, 1), token_placement="request", keep_decisions=True)
    pred = predicted_gpu_load(plan.expert_gpus[0], 3)
    np.testing.assert_allclose(pred, [1.0, 2.5, 1.5])
    got = np.bincount(r.decisions[:, 0, 0], minlength=3)
    assert got[0] == 0 and abs(got[2] - expected_share2(pred) * T) <= 3
    assert abs((r.decisions[:50, 0, 0] == 2).sum() - 50 * expected_share2(pred)) <= 3  # interleaved, not in blocks
    # a predicted load that makes GPU 1 the emptier one moves the traffic there
    load = np.array([1.0, 0.0, 0.0, 10.0, 1.0])
    r2 = simulate(plan, trace, shape(1, 5, 1), token_placement="request", keep_decisions=True, expert_load=load[None])
    pred2 = predicted_gpu_load(plan.expert_gpus[0], 3, load)
    assert abs(np.bincount(r2.decisions[:, 0, 0], minlength=3)[1] - (1 - expected_share2(pred2)) * T) <= 3


def test_predicted_gpu_load_is_the_planners():
    """One static prediction: equal shares per copy, -1 anywhere means no copy; checked expert count."""
    hosts = np.array([[0, 2], [1, -1], [-1, 2]])
    np.testing.assert_allclose(predicted_gpu_load(hosts, 4, np.array([4.0, 1.0, 3.0])), [2.0, 1.0, 5.0, 0.0])
    np.testing.assert_allclose(predicted_gpu_load(hosts, 3), [0.5, 1.0, 1.5])
    with pytest.raises(GraceInputError, match="expert_load has 2 entries"):
        predicted_gpu_load(hosts, 3, np.ones(2))


def test_token_start_gpus():
    np.testing.assert_array_equal(token_start_gpus(6, 4), [0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(token_start_gpus(5, 2, "request", np.array([9, 9, 3, 5, 3])), [0, 0, 1, 0, 1])
    with pytest.raises(GraceInputError, match="request ids"):
        token_start_gpus(3, 2, "request")
    with pytest.raises(GraceInputError, match="unknown token placement"):
        token_start_gpus(3, 2, "sideways")


def test_custom_policy_plugs_in_and_is_checked():
    topology = topo(2, 2)
    plan = PlacementPlan(topology, 4, [[[0, 1], [1], [2, 3], [3, 0]]])
    trace = RoutingTrace(np.array([[[0, 3]], [[1, 2]]], dtype=np.int32), 4)

    def first_copy(topk_ids, src_gpu, layer_hosts, topology, context):
        return np.where(topk_ids >= 0, layer_hosts[np.maximum(topk_ids, 0), 0], -1)

    r = simulate(plan, trace, shape(1, 4, 2), policy=first_copy, keep_decisions=True)
    np.testing.assert_array_equal(r.decisions[:, 0], [[0, 2], [0, 2]])

    def wrong(topk_ids, src_gpu, layer_hosts, topology, context):
        return np.zeros_like(topk_ids)

    with pytest.raises(ValueError, match="does not host expert"):
        simulate(plan, trace, shape(1, 4, 2), policy=wrong)
    assert set(POLICY_NAMES) == {"primary", "random", "position", "static-local", "grace"}


def test_routing_module_policies_land_on_hosting_gpus(rng):
    from megatron_grace.simulation import policy_names

    topology = topo(2, 2)
    plan = random_plan(rng, topology, 8, 2)
    trace = RoutingTrace(random_ids(rng, 100, 2, 8, 2, missing=0.1), 8)
    for name in policy_names():
        r = simulate(plan, trace, shape(2, 8, 2), policy=name, keep_decisions=True)  # the simulator checks hosting
        assert r.policy == name and r.pairs_total.sum() == (trace.expert_ids >= 0).sum()


# ------------------------------------------------------------------------------------ dumps
def test_dump_decisions_round_trip_recounts_the_report(tmp_path, rng):
    topology = topo(2, 3)
    plan = random_plan(rng, topology, 12, 3)
    trace = RoutingTrace(random_ids(rng, 120, 3, 12, 4, missing=0.1), 12, model="tiny")
    ms = shape(3, 12, 4)
    result = simulate(plan, trace, ms, keep_decisions=True)
    path = tmp_path / "decisions.npz"
    result.dump_decisions(path)
    gpu, src, meta = load_decisions(path)
    assert gpu.dtype == np.int16 and gpu.shape == (120, 3, 4) and src.shape == (120,)
    assert meta["planner"] == "random" and meta["policy"] == "grace"
    with np.load(path, allow_pickle=False) as data:  # plain arrays: anyone can recount
        assert set(data.files) >= {"gpu", "src_gpu"}
    assert_matches_reference(result, reference(gpu, src, topology, ms))
    again = recount_decisions(path)
    assert again.summary() | {"policy": "", "planner": ""} == result.summary() | {"policy": "", "planner": ""}
    assert again.to_dict()["per_layer"] == result.to_dict()["per_layer"]
    json.loads(result.to_json())
    with pytest.raises(ValueError, match="keep_decisions"):
        simulate(plan, trace, ms).dump_decisions(tmp_path / "x.npz")


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_errors(tmp_path, rng):
    topology = topo(2, 2)
    plan = random_plan(rng, topology, 8, 2)
    ms = shape(2, 8, 2)
    with pytest.raises(GraceInputError, match="plan is for 8 experts per layer but the trace has 10.*up to 9"):
        ids = random_ids(rng, 20, 2, 10, 2)
        ids[0, 0] = [9, 8]
        simulate(plan, RoutingTrace(ids, 10), ms)
    with pytest.raises(GraceInputError, match="plan has 2 MoE layers but the trace has 3"):
        simulate(plan, RoutingTrace(random_ids(rng, 20, 3, 8, 2), 8), ms)
    trace = RoutingTrace(random_ids(rng, 20, 2, 8, 2), 8, model="my-own-model")
    with pytest.raises(GraceInputError, match="model shape"):
        simulate(plan, trace)
    with pytest.raises(GraceInputError, match="unknown model shape"):
        simulate(plan, trace, "gpt-5")
    with pytest.raises(GraceInputError, match="unknown replica-choice policy"):
        simulate(plan, trace, ms, policy="telepathy")
    with pytest.raises(GraceInputError, match="unknown dispatch mode"):
        simulate(plan, trace, ms, dispatch="carrier-pigeon")
    with pytest.raises(GraceInputError, match="expert_load must have shape"):
        simulate(plan, trace, ms, expert_load=np.ones((2, 7)))
    bad = tmp_path / "bad.npz"
    np.savez(bad, format=np.array("grace-trace/1"))
    with pytest.raises(GraceInputError, match="not a decisions dump"):
        load_decisions(bad)


def test_model_shape_from_trace_name():
    assert resolve_model_shape(None, "Qwen/Qwen3-30B-A3B").name == "qwen3-30b-a3b"
    assert resolve_model_shape(None, "mistralai/Mixtral-8x7B-Instruct-v0.1").name == "mixtral-8x7b"
    assert resolve_model_shape("deepseek-v3").name == "deepseek-v3"


# ------------------------------------------------------------------------------------ CLI
def test_cli_simulate(tmp_path, rng, capsys):
    topology = Topology.preset("a100-2x4")
    plan = random_plan(rng, topology, 32, 2)
    plan.save(tmp_path / "plan.json")
    trace = RoutingTrace(random_ids(rng, 300, 2, 32, 8), 32, model="granite-3.0-1b-a400m")
    trace.save(tmp_path / "trace.npz")
    args = ["simulate", "--plan", str(tmp_path / "plan.json"), "--trace", str(tmp_path / "trace.npz"), "--per-layer",
            "--dump-decisions", str(tmp_path / "d.npz"), "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "flat" in out and "hierarchical" in out and "token->node" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["msgs_node"] == recount_decisions(tmp_path / "d.npz").summary()["msgs_node"]
    assert main(["simulate", "--plan", str(tmp_path / "plan.json"), "--trace", str(tmp_path / "trace.npz"),
                 "--model-shape", "qwen3-30b-a3b"]) == 2  # 128 experts: not this 32-expert trace
    assert "qwen3-30b-a3b has 128 experts" in capsys.readouterr().err
    assert main(["simulate", "--plan", str(tmp_path / "plan.json"), "--trace", str(tmp_path / "trace.npz"),
                 "--dispatch", "hierarchical", "--token-placement", "request", "--model-shape", "granite-3.0-1b-a400m"]) == 0
    assert "flat" not in capsys.readouterr().out.split("dispatch ")[-1].split("(bytes")[0]

    other = random_plan(rng, topology, 16, 2)
    other.save(tmp_path / "plan16.json")
    assert main(["simulate", "--plan", str(tmp_path / "plan16.json"), "--trace", str(tmp_path / "trace.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "16 experts" in err


def _fake_planners(monkeypatch) -> list[str]:
    """A tiny planner module standing in for megatron_grace.plan.planners: round-robin placement,
    'copy0' adds a copy of expert 0 on every GPU that has room."""
    calls: list[str] = []

    def plan_placement(stats, topology, planner, **options):
        calls.append(planner)
        E, L, G = stats.num_experts, stats.num_layers, topology.num_gpus
        gpus = [[e for e in range(E) if e % G == g] for g in range(G)]
        if planner == "copy0":
            gpus = [g if 0 in g or len(g) >= topology.capacity() else g + [0] for g in gpus]
        elif planner != "rr":
            raise GraceInputError(f"unknown planner {planner!r}")
        return PlacementPlan(topology, E, [gpus] * L, planner=planner)

    monkeypatch.setitem(sys.modules, "megatron_grace.plan.planners",
                        types.SimpleNamespace(plan_placement=plan_placement, PLANNERS={"rr": None, "copy0": None}))
    return calls


def test_compare_with_a_local_planner(monkeypatch, rng, tmp_path, capsys):
    calls = _fake_planners(monkeypatch)
    trace = RoutingTrace(random_ids(rng, 400, 2, 16, 4), 16, model="granite-3.0-1b-a400m")
    plan_stats, measure = split_source(trace)
    assert measure.num_tokens == 200 and plan_stats.tokens[0] == 200
    cmp = compare_planners(plan_stats, measure, Topology.preset("a100-2x4"), extra_slots=1, planners=["rr", "copy0"])
    assert calls == ["rr", "copy0"] and cmp.baseline == ("rr", "flat")
    assert cmp.row("rr", "flat")["speedup"] == 1.0 and len(cmp.rows()) == 4
    assert cmp.row("copy0", "hierarchical")["copies"] == 2 * 7
    assert cmp.results["copy0"].pairs_local.sum() > cmp.results["rr"].pairs_local.sum()
    assert "speedup vs rr flat" in cmp.format_table()

    trace.save(tmp_path / "t.npz")
    assert main(["compare", "--trace", str(tmp_path / "t.npz"), "--topology", "a100-2x4", "--extra-slots", "1",
                 "--planners", "rr,copy0", "--plot", str(tmp_path / "plots"), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "copy0" in out and "hierarchical" in out
    for name in ("load.png", "traffic.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["planner"] for r in json.loads((tmp_path / "c.json").read_text())["rows"]} == {"rr", "copy0"}
    assert main(["compare", "--trace", str(tmp_path / "t.npz"), "--topology", "a100-2x4", "--extra-slots", "1",
                 "--planners", "nope"]) == 2


def test_compare_from_statistics_synthesizes_then_splits(monkeypatch, rng, tmp_path, capsys):
    _fake_planners(monkeypatch)
    seen = {}

    def synthesize_trace(stats, num_tokens, seed=0, **kw):
        seen["args"] = (num_tokens, seed)
        return RoutingTrace(random_ids(np.random.default_rng(seed), num_tokens, stats.num_layers, stats.num_experts, stats.top_k),
                            stats.num_experts, model=stats.model)

    monkeypatch.setitem(sys.modules, "megatron_grace.trace.synthesis", types.SimpleNamespace(synthesize_trace=synthesize_trace))
    stats = ExpertStats.from_trace(RoutingTrace(random_ids(rng, 100, 2, 16, 4), 16, model="granite-3.0-1b-a400m"))
    stats.save(tmp_path / "s.npz")
    assert main(["compare", "--stats", str(tmp_path / "s.npz"), "--tokens", "300", "--seed", "5", "--topology", "a100-2x4",
                 "--extra-slots", "0", "--planners", "rr"]) == 0
    assert seen["args"] == (300, 5) and "150 measured tokens" in capsys.readouterr().out
