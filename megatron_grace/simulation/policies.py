"""Replica choice in the simulator: the routing module's policies, run as the layer runs them.

For every MoE layer the simulator hands the router output to
:func:`megatron_grace.routing.choose_copies` and :func:`~megatron_grace.routing.copy_destinations`
on the layer's :class:`~megatron_grace.routing.ReplicaTable` (:func:`choose_gpus`), the code the
distributed layer runs; there is no second implementation here. The policies are those of
:data:`megatron_grace.routing.POLICY_NAMES` (``primary``, ``random``, ``position``,
``static-local``, ``grace``), documented in :mod:`megatron_grace.routing.policies`.

What the simulator feeds them: ``grace`` gets the layer's static predicted GPU load
(:func:`megatron_grace.plan.replication.predicted_gpu_load` of the given expert load, else 1 per
expert), ``position`` the token indices in the trace, ``random`` the seed; ``step`` is the
layer index.

A research policy can also be a plain function (see :class:`CustomPolicy`); the simulator checks
its output like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from megatron_grace.errors import GraceInputError
from megatron_grace.plan.replication import predicted_gpu_load
from megatron_grace.plan.topology import Topology
from megatron_grace.routing import POLICY_NAMES, ReplicaTable, RoutingOptions, choose_copies, copy_destinations

if TYPE_CHECKING:
    from megatron_grace.plan.placement import PlacementPlan

from megatron_grace.names import DEFAULT_POLICY  # noqa: E402


@dataclass(frozen=True)
class PolicyContext:
    """What a custom policy may know besides the token's experts and start GPU.

    Attributes:
        layer: MoE layer index.
        expert_load: float ``[E]`` predicted load of each expert at this layer, or None.
        token_index: int64 ``[T]`` position of each token in the trace.
        seed: the simulation's seed.
        plan: the whole placement plan, or None.
    """

    layer: int
    expert_load: np.ndarray | None
    token_index: np.ndarray
    seed: int = 0
    plan: PlacementPlan | None = None


#: A custom policy: ``policy(topk_ids int [T, k], src_gpu int [T], layer_hosts int [E, R],
#: topology, context) -> gpu int [T, k]``, -1 exactly where ``topk_ids`` is -1, otherwise a GPU
#: hosting that expert (``layer_hosts`` = ``PlacementPlan.expert_gpus[layer]``).
CustomPolicy = Callable[[np.ndarray, np.ndarray, np.ndarray, Topology, PolicyContext], np.ndarray]


def policy_names() -> list[str]:
    """Every replica-choice policy the simulator (and the layer) can run."""
    return list(POLICY_NAMES)


def check_policy(policy: str | CustomPolicy) -> str:
    """The name of ``policy`` (a custom function's ``__name__``); GraceInputError for an unknown name."""
    if callable(policy):
        return getattr(policy, "__name__", "custom")
    if policy not in POLICY_NAMES:
        raise GraceInputError(f"unknown replica-choice policy {policy!r}; known: {', '.join(POLICY_NAMES)}")
    return policy


def choose_gpus(policy: str, topk_ids: np.ndarray, src_gpu: torch.Tensor, plan: PlacementPlan, layer: int, *,
                expert_load: np.ndarray | None = None, seed: int = 0, positions: torch.Tensor | None = None,
                options: RoutingOptions | None = None) -> np.ndarray:
    """int64 ``[T, k]``: the GPU processing each (token, expert) pair of one layer, -1 for missing records.

    Args:
        policy: a name in :data:`~megatron_grace.routing.POLICY_NAMES`.
        topk_ids: int ``[T, k]`` expert ids of the layer, -1 = missing.
        src_gpu: int64 ``[T]`` start GPU of each token.
        plan: the placement; ``layer`` its layer.
        expert_load: float ``[E]`` expert load behind ``grace``'s prediction (None = 1 per expert).
        seed, positions, options: as in :func:`~megatron_grace.routing.choose_copies`.
    """
    return _route(policy, topk_ids, src_gpu, ReplicaTable.from_plan(plan, layer), plan.expert_gpus[layer], layer,
                  expert_load=expert_load, seed=seed, positions=positions, options=options)


def _route(policy: str, topk_ids: np.ndarray, src_gpu: torch.Tensor, table: ReplicaTable, layer_hosts: np.ndarray, layer: int, *,
           expert_load: np.ndarray | None, seed: int = 0, positions: torch.Tensor | None = None,
           options: RoutingOptions | None = None) -> np.ndarray:
    """:func:`choose_gpus` on a layer's table and its ``[E, R]`` host array."""
    ids = torch.from_numpy(np.asarray(topk_ids, dtype=np.int64))
    predicted = None
    if policy == "grace":
        predicted = torch.from_numpy(predicted_gpu_load(layer_hosts, table.num_gpus, expert_load))
    copy = choose_copies(policy, ids, src_gpu, table, predicted_load=predicted, step=layer, seed=seed, positions=positions,
                         options=options)
    gpu, _ = copy_destinations(ids, copy, table)
    return gpu.numpy()


SERVING_PAIRS_PER_LAYER = 200_000
"""Pair budget of :func:`serving_gpu_load`'s demand batch per layer (sets the pairs per group)."""


def serving_gpu_load(layer_hosts: np.ndarray, topology: Topology, expert_load: np.ndarray | None = None, *,
                     policy: str = DEFAULT_POLICY, layer: int = 0, options: RoutingOptions | None = None,
                     pairs_per_group: int | None = None) -> tuple[np.ndarray, float]:
    """Predicted per-GPU load of one layer under a serving policy, from expert loads alone.

    The policy itself (:func:`~megatron_grace.routing.choose_copies`, as the layer and the
    simulator run it, with the simulator's load prediction) routes a *demand batch*: tokens
    start on GPU ``t mod G`` (round-robin), so every GPU ``g`` sends ``expert_load[e] / G`` of
    each expert's pairs. Experts with one copy go to it; for an expert with copies, every
    source GPU sends ``pairs_per_group`` pairs, each carrying an equal part of that demand, so
    the result is the policy's split of the demand, quantized to ``1 / pairs_per_group``.

    Args:
        layer_hosts: int ``[E, R]`` hosting GPU of every copy, -1 padded (``plan.expert_gpus[l]``).
        topology: the cluster (G, GPUs per node).
        expert_load: float ``[E]`` demand per expert (None: 1 each); it is also the load
            behind the ``grace`` policy's prediction, as in :func:`~megatron_grace.simulation.simulate`
            with ``expert_load``.
        policy, layer, options: as in :func:`choose_gpus` (``layer`` is the policy's step).
        pairs_per_group: pairs per (source GPU, copied expert); default: as many as fit
            :data:`SERVING_PAIRS_PER_LAYER`, between 2 and 32.

    Returns:
        ``(gpu_load, cross_node_share)``: float64 ``[G]`` predicted load (same units as
        ``expert_load``) and the share of the demand predicted to be processed on another node.
    """
    hosts = np.asarray(layer_hosts, dtype=np.int64)
    E = hosts.shape[0]
    G, gpn = topology.num_gpus, topology.gpus_per_node
    w = np.ones(E) if expert_load is None else np.asarray(expert_load, dtype=np.float64).reshape(-1)
    if w.shape != (E,):
        raise GraceInputError(f"expert_load has {w.shape[0]} entries, the plan has {E} experts")
    copies = (hosts >= 0).sum(axis=1)
    load = np.zeros(G)
    single = np.flatnonzero(copies == 1)
    np.add.at(load, hosts[single, 0], w[single])
    total = float(w.sum())
    cross = float(w[single].sum()) * (1.0 - gpn / G)  # a single copy is remote for the tokens of the other nodes
    multi = np.flatnonzero((copies > 1) & (w > 0))
    if multi.size:
        n = pairs_per_group or int(np.clip(SERVING_PAIRS_PER_LAYER // (multi.size * G), 2, 32))
        expert = np.repeat(multi, G * n)  # [P] grouped by expert, then source GPU, then pair
        src = np.tile(np.repeat(np.arange(G), n), multi.size)
        weight = w[expert] / (G * n)
        table = ReplicaTable.from_hosts(torch.from_numpy(hosts), gpn, G)
        gpu = _route(policy, expert[:, None], torch.from_numpy(src), table, hosts, layer, expert_load=w, options=options)[:, 0]
        load += np.bincount(gpu, weights=weight, minlength=G)
        cross += float(weight[gpu // gpn != src // gpn].sum())
    return load, (cross / total if total > 0 else 0.0)


__all__ = ["DEFAULT_POLICY", "POLICY_NAMES", "SERVING_PAIRS_PER_LAYER", "CustomPolicy", "PolicyContext", "check_policy", "choose_gpus",
           "policy_names", "serving_gpu_load"]
