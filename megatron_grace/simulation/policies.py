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
    table = ReplicaTable.from_plan(plan, layer)
    ids = torch.from_numpy(np.asarray(topk_ids, dtype=np.int64))
    predicted = None
    if policy == "grace":
        predicted = torch.from_numpy(predicted_gpu_load(plan.expert_gpus[layer], plan.num_gpus, expert_load))
    copy = choose_copies(policy, ids, src_gpu, table, predicted_load=predicted, step=layer, seed=seed, positions=positions,
                         options=options)
    gpu, _ = copy_destinations(ids, copy, table)
    return gpu.numpy()


__all__ = ["DEFAULT_POLICY", "POLICY_NAMES", "CustomPolicy", "PolicyContext", "check_policy", "choose_gpus", "policy_names"]
