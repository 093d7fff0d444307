"""`ReplicaTable`: one layer's copies of every expert, as torch tensors for routing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_grace.errors import GraceInputError
from megatron_grace.plan.placement import PlacementPlan


@dataclass(frozen=True)
class ReplicaTable:
    """Where the copies of each expert of one MoE layer live.

    Attributes:
        hosts: int64 ``[E, R]``; GPU of each copy, ascending, padded with -1 (R = max copies).
        slots: int64 ``[E, R]``; slot index of each copy on its GPU, -1 padded.
        copies: int64 ``[E]``; number of copies (>= 1).
        gpus_per_node: GPUs per node (GPUs are numbered node-major).
        num_gpus: G.
    """

    hosts: torch.Tensor
    slots: torch.Tensor
    copies: torch.Tensor
    gpus_per_node: int
    num_gpus: int

    @property
    def num_experts(self) -> int:
        return int(self.hosts.shape[0])

    @property
    def max_copies(self) -> int:
        return int(self.hosts.shape[1])

    @staticmethod
    def from_plan(plan: PlacementPlan, layer: int, device: torch.device | str = "cpu") -> ReplicaTable:
        """The table of ``plan`` at ``layer``."""
        if not 0 <= layer < plan.num_layers:
            raise GraceInputError(f"layer {layer} is outside the plan's {plan.num_layers} layers")
        hosts = torch.as_tensor(plan.expert_gpus[layer], dtype=torch.int64, device=device)
        slots = torch.as_tensor(plan.expert_slots[layer], dtype=torch.int64, device=device)
        return ReplicaTable(hosts=hosts, slots=slots, copies=(hosts >= 0).sum(dim=1), gpus_per_node=plan.topology.gpus_per_node,
                            num_gpus=plan.topology.num_gpus)

    @staticmethod
    def from_hosts(hosts: torch.Tensor, gpus_per_node: int, num_gpus: int) -> ReplicaTable:
        """A table from a ``[E, R]`` host array (-1 padded at the end of each row); slots unknown (-1)."""
        hosts = torch.as_tensor(hosts, dtype=torch.int64)
        present = hosts >= 0
        if hosts.dim() != 2 or not present[:, 0].all():
            raise GraceInputError("hosts must be [E, R] with at least one copy per expert in column 0")
        return ReplicaTable(hosts=hosts, slots=torch.where(present, 0, -1), copies=present.sum(dim=1), gpus_per_node=gpus_per_node,
                            num_gpus=num_gpus)
