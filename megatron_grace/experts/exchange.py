"""Moving expert weights from the ranks that own them to the slots of a placement plan.

Frameworks store a MoE layer's experts in a fixed expert-parallel layout: Megatron-Core and
DeepSpeed put expert ``e`` on rank ``e // (E / ep)`` (:func:`contiguous_owners`). A GRACE plan
puts other experts on each rank, in unequal numbers, with copies. This module moves every
expert, once, from its owner to every rank whose slots hold it (one uneven
``all_to_all_single`` per layer), so all copies are bit-identical. It is the one weight scatter
of the project: :meth:`megatron_grace.layer.GraceMoELayer.from_owned_weights`, the Megatron-Core
token dispatcher and the DeepSpeed adapter all call it.

Two steps, so that a local problem (a missing or misshapen expert) is agreed across ranks before
anyone enters the collective:

1. :func:`pack_owned_weights` (local): flatten the experts this rank owns, in send order;
2. :func:`exchange_packed` (collective): the all-to-all; one flat ``[floats_per_expert]`` row per
   local slot, in slot order.

Wire format of one expert: its matrices in the dict layout of :mod:`megatron_grace.experts.mlp`
(``gate [h, f]``, ``up [h, f]``, ``down [f, h]``, or ``fc1``, ``fc2``), flattened and concatenated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron_grace.dispatch.all_to_all import all_to_all_uneven
from megatron_grace.errors import GraceInputError
from megatron_grace.experts.mlp import WeightSource, check_expert_state, fetch_expert
from megatron_grace.plan.placement import PlacementPlan


def contiguous_owners(num_experts: int, ep_size: int) -> np.ndarray:
    """int64 ``[E]``: the rank that holds each expert in the frameworks' standard layout (``e // (E / ep)``)."""
    if ep_size < 1 or num_experts % ep_size:
        raise GraceInputError(f"{num_experts} experts cannot be split evenly over {ep_size} expert-parallel ranks")
    return np.arange(num_experts, dtype=np.int64) // (num_experts // ep_size)


def contiguous_slots(num_experts: int, ep_size: int) -> list[list[int]]:
    """For each rank, its experts in the frameworks' standard layout (``[r * n, (r + 1) * n)``, ``n = E / ep``)."""
    owner = contiguous_owners(num_experts, ep_size)
    return [np.nonzero(owner == r)[0].tolist() for r in range(ep_size)]


def primary_owners(plan: PlacementPlan, layer: int) -> np.ndarray:
    """int64 ``[E]``: each expert's primary copy, its copy on the lowest-numbered GPU."""
    return np.asarray(plan.expert_gpus[layer, :, 0], dtype=np.int64)


@dataclass
class PackedWeights:
    """One rank's side of the exchange (see :func:`pack_owned_weights`).

    Attributes:
        send: ``[n_send, B]`` flat experts in destination order (rank 0's slots first, each
            destination's slots ascending).
        send_splits, recv_splits: rows to / from each rank.
        arrival: local slot of each received row, in arrival order (by source rank, then slot).
        width: B, values per expert.
    """

    send: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    arrival: list[int]
    width: int


@torch.no_grad()
def pack_owned_weights(slots: Sequence[Sequence[int]], rank: int, owned: WeightSource, owner: np.ndarray,
                       shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype, device: torch.device | str) -> PackedWeights:
    """Flatten the experts this rank owns for every rank whose slots hold them (local; no communication).

    Args:
        slots: for each rank, the logical expert of each of its slots (``plan.gpu_experts[layer]``
            for a GRACE plan, :func:`contiguous_slots` for the frameworks' layout).
        rank: this rank.
        owned: ``expert id -> {name: tensor}`` (mapping or callable); read only for the experts
            ``owner`` gives to this rank.
        owner: int ``[E]`` rank holding each expert's source weights.
        shapes: name -> shape of one expert's weights (matrices, then biases if any).
        dtype, device: of the wire rows (the slots' storage).

    Raises:
        GraceInputError: a missing expert, or wrong names / shapes.
    """
    world = len(slots)
    width = int(sum(math.prod(shape) for shape in shapes.values()))
    blobs: dict[int, torch.Tensor] = {}
    for e in np.nonzero(owner == rank)[0].tolist():
        state = fetch_expert(owned, e)
        check_expert_state(state, e, shapes)
        blobs[e] = torch.cat([state[n].detach().to(device=device, dtype=dtype).contiguous().reshape(-1) for n in shapes])
    rows, send_splits = [], []
    for d in range(world):
        mine = [blobs[e] for e in slots[d] if int(owner[e]) == rank]
        rows.extend(mine)
        send_splits.append(len(mine))
    local = slots[rank]
    src = [int(owner[e]) for e in local]
    recv_splits = [src.count(r) for r in range(world)]
    arrival = sorted(range(len(local)), key=lambda s: (src[s], s))
    send = torch.stack(rows) if rows else torch.zeros(0, width, dtype=dtype, device=device)
    return PackedWeights(send=send, send_splits=send_splits, recv_splits=recv_splits, arrival=arrival, width=width)


@torch.no_grad()
def exchange_packed(packed: PackedWeights, group: Any, world: int) -> list[torch.Tensor]:
    """The collective step: every rank calls it together. Returns one flat ``[B]`` row per local slot, in slot order."""
    recv = all_to_all_uneven(packed.send, packed.send_splits, packed.recv_splits, group, world)
    out: list[torch.Tensor] = [recv[0]] * len(packed.arrival)
    for row, slot in enumerate(packed.arrival):
        out[slot] = recv[row]
    return out
