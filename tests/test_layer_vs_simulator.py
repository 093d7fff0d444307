"""The distributed GRACE layer's measured traffic equals the simulator's counts, plan by plan.

Four gloo ranks (2 nodes x 2 GPUs) run the layer on the vanilla, eplb and grace plans of a
synthetic skewed trace with both dispatch modes; the decisions the ranks made are recounted by
the simulator (``count_decisions``), whose hidden-state bytes per link type must equal the
sum of the ranks' measured dispatch bytes exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _dist_utils import run_distributed

H, F, E, K, TOKENS_PER_RANK = 16, 8, 16, 4, 96


def _setup():
    from megatron_grace.plan.planners import plan_placement
    from megatron_grace.plan.topology import Topology
    from megatron_grace.statistics.expert_stats import ExpertStats
    from megatron_grace.trace.routing_trace import RoutingTrace

    rng = np.random.default_rng(11)
    popularity = rng.dirichlet(np.full(E, 0.4))
    tokens = 4 * TOKENS_PER_RANK * 3
    keys = rng.random((tokens, E)) ** (1.0 / popularity)  # weighted sampling without replacement
    ids = np.argsort(-keys, axis=1)[:, :K].astype(np.int32)[:, None, :]
    trace = RoutingTrace(ids, E, model="toy")
    stats = ExpertStats.from_trace(trace.select_tokens(slice(0, tokens // 2)))
    base = Topology.preset("a100-2x4")
    topo = Topology(name="2x2", num_nodes=2, gpus_per_node=2, intra_node=base.intra_node, inter_node=base.inter_node,
                    gpu_flops=base.gpu_flops).with_extra_slots(E, 1)
    plans = {name: plan_placement(stats, topo, name) for name in ("vanilla", "eplb", "grace")}
    batch = ids[tokens // 2: tokens // 2 + 4 * TOKENS_PER_RANK, 0]
    return plans, batch


def worker(rank: int, world: int) -> dict:
    from megatron_grace.layer import GraceMoELayer
    from megatron_grace.layer.reference import random_expert_weights

    plans, batch = _setup()
    weights = random_expert_weights(E, H, F, seed=0)
    mine = torch.from_numpy(batch[rank * TOKENS_PER_RANK:(rank + 1) * TOKENS_PER_RANK].astype(np.int64))
    gen = torch.Generator().manual_seed(rank)
    hidden = torch.randn(TOKENS_PER_RANK, H, generator=gen)
    gates = torch.rand(TOKENS_PER_RANK, K, generator=gen)
    out = {}
    for name, plan in plans.items():
        for mode in ("flat", "hierarchical"):
            layer = GraceMoELayer.from_full_weights(plan, 0, weights, hidden_size=H, ffn_size=F, policy="grace", dispatch=mode,
                                                    counters=True)
            layer(hidden, mine, gates)
            c = layer.last_counters
            out[(name, mode)] = {"gpu": layer.last_route.gpu.numpy().copy(), "bytes": c.kind_bytes_sent_by_link("dispatch")}
    return out


def test_layer_traffic_matches_simulator_counts():
    from megatron_grace.plan.topology import ModelShape, Topology
    from megatron_grace.simulation.simulator import count_decisions

    results = run_distributed(worker, world_size=4, timeout=120)
    shape = ModelShape("toy", 1, E, K, H, F, dtype_bytes=4)  # float32 rows of width H
    base = Topology.preset("a100-2x4")
    topo = Topology(name="2x2", num_nodes=2, gpus_per_node=2, intra_node=base.intra_node, inter_node=base.inter_node,
                    gpu_flops=base.gpu_flops)
    src = np.repeat(np.arange(4), TOKENS_PER_RANK)
    seen_inter = {}
    for key in results[0]:
        decisions = np.concatenate([results[r][key]["gpu"] for r in range(4)])[:, None, :]
        sim = count_decisions(decisions, src, topo, shape, dispatch=key[1]).modes[key[1]]
        measured = {link: sum(results[r][key]["bytes"][link] for r in range(4)) for link in ("intra_node", "inter_node")}
        assert measured["intra_node"] == int(sim.intra_bytes.sum()), key
        assert measured["inter_node"] == int(sim.inter_bytes.sum()), key
        seen_inter[key] = measured["inter_node"]
    # the comparison is not vacuous: hierarchical dispatch sends fewer inter-node bytes
    for name in ("vanilla", "eplb", "grace"):
        assert 0 < seen_inter[(name, "hierarchical")] < seen_inter[(name, "flat")]
