"""Run the GRACE layer on real gloo process groups and check it against the dense reference.

Used by ``grace demo``: ``world`` CPU ranks each take a slice of a routing trace's tokens,
run the distributed layer (every dispatch mode, one replica policy) on random weights, and
report the largest relative error to :class:`DenseReferenceMoE` plus the measured traffic
per link type, next to the simulator's count of the same decisions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from megatron_grace.layer.launch import run_distributed
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.plan.topology import ModelShape


def _worker(rank: int, world: int, plan: PlacementPlan, ids: np.ndarray, layers: list[int], hidden: int, ffn: int,
            policy: str, modes: tuple[str, ...]) -> dict[str, Any]:
    from megatron_grace.layer import DenseReferenceMoE, GraceMoELayer, random_expert_weights

    per_rank = ids.shape[0] // world
    out: dict[str, Any] = {}
    for layer in layers:
        weights = random_expert_weights(plan.num_experts, hidden, ffn, seed=layer)
        reference = DenseReferenceMoE(weights, plan.num_experts, hidden, ffn)
        mine = torch.from_numpy(ids[rank * per_rank:(rank + 1) * per_rank, layer].astype(np.int64))
        gen = torch.Generator().manual_seed(1000 * layer + rank)
        x = torch.randn(per_rank, hidden, generator=gen)
        gates = torch.softmax(torch.randn(mine.shape, generator=gen), dim=1)
        expected = reference(x, mine, gates)
        for mode in modes:
            moe = GraceMoELayer.from_full_weights(plan, layer, weights, hidden_size=hidden, ffn_size=ffn, policy=policy, dispatch=mode,
                                                  num_experts=plan.num_experts, num_model_layers=plan.num_layers,
                                                  counters=True, timing=True)
            y = moe(x, mine, gates)
            err = float((y.double() - expected).norm() / expected.norm().clamp_min(1e-30))
            c = moe.last_counters
            out[f"{layer}/{mode}"] = {"rel_err": err, "gpu": moe.last_route.gpu.numpy().copy(),
                                      "bytes": c.kind_bytes_sent_by_link("dispatch"), "ms": 1e3 * c.times.get("total", float("nan"))}
    return out


def check_layer_on_gloo(plan: PlacementPlan, ids: np.ndarray, layers: list[int], *, hidden: int = 64, ffn: int = 32,
                        policy: str = "grace", modes: tuple[str, ...] = ("flat", "hierarchical"), timeout: float = 300.0) -> dict[str, Any]:
    """Run the layer on ``plan.num_gpus`` gloo ranks; return errors, traffic and the simulator's counts.

    Args:
        plan: placement for ``plan.topology`` (one rank per GPU).
        ids: int ``[T, L, k]`` router choices; rank r takes tokens ``[r * T/G, (r+1) * T/G)``.
        layers: layers to run.
        hidden, ffn: expert sizes (random SwiGLU weights, float32).
        policy: replica-choice policy.
        modes: dispatch modes.

    Returns:
        ``{"layer/mode": {"max_rel_err", "bytes": {link: measured}, "simulated_bytes": {link: ...}, "ms"}}``.
    """
    from megatron_grace.simulation.simulator import count_decisions

    world = plan.num_gpus
    per_rank = ids.shape[0] // world
    ids = np.ascontiguousarray(ids[: per_rank * world])
    results = run_distributed(_worker, world_size=world, args=(plan, ids, layers, hidden, ffn, policy, tuple(modes)), timeout=timeout)
    shape = ModelShape("demo", plan.num_layers, plan.num_experts, ids.shape[2], hidden, ffn, dtype_bytes=4)
    src = np.repeat(np.arange(world), per_rank)
    report: dict[str, Any] = {}
    for key in results[0]:
        mode = key.split("/")[1]
        decisions = np.concatenate([results[r][key]["gpu"] for r in range(world)])[:, None, :]
        cost = count_decisions(decisions, src, plan.topology, shape, dispatch=mode).modes[mode]
        report[key] = {
            "max_rel_err": max(results[r][key]["rel_err"] for r in range(world)),
            "bytes": {link: int(sum(results[r][key]["bytes"][link] for r in range(world))) for link in ("intra_node", "inter_node")},
            "simulated_bytes": {"intra_node": int(cost.intra_bytes.sum()), "inter_node": int(cost.inter_bytes.sum())},
            "max_rank_ms": max(results[r][key]["ms"] for r in range(world)),
        }
    return report
