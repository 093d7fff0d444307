"""`GraceMOELayer`: stands in for DeepSpeed's ``MOELayer`` (``MoE.deepspeed_moe``).

``deepspeed.moe.layer.MoE.forward`` stays DeepSpeed's: it calls ``self.deepspeed_moe(hidden,
used_token)``, mixes in the residual MLP when ``use_residual`` (PR-MoE), and returns
``(output, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts)``. This module keeps that
contract: DeepSpeed's gate routes (:mod:`.gate`), the core :class:`~megatron_grace.layer.GraceMoELayer`
moves the tokens to the plan's expert copies and back, and ``l_aux`` / ``exp_counts`` are the
gate's. Both are registered submodules, so ``model.to()``, ``state_dict()`` and ``eval()`` see them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megatron_grace.errors import GraceInputError
from megatron_grace.layer import GraceMoELayer

from .gate import route


class GraceMOELayer(nn.Module):
    """DeepSpeed's ``MOELayer`` interface on top of a GRACE layer (inference).

    Args:
        gate: DeepSpeed's ``TopKGate`` configured for inference (:func:`.gate.inference_gate`).
        grace: the core layer, built in DeepSpeed's expert-parallel group.
        gate_args: the original gate's constructor arguments (to rebuild it for a new plan).
        ep_group, ep_group_name, ep_size: DeepSpeed's expert-parallel group of this MoE.

    Attributes:
        l_aux: the gate's auxiliary loss of the last forward pass (scalar tensor).
        exp_counts: the gate's routes per expert of the last pass, ``[E]`` (on this rank).
    """

    def __init__(self, gate: nn.Module, grace: GraceMoELayer, *, gate_args: dict[str, Any], ep_group: Any, ep_group_name: str,
                 ep_size: int) -> None:
        super().__init__()
        self.gate = gate
        self.grace = grace
        self.gate_args = dict(gate_args)
        self.ep_group, self.ep_group_name, self.ep_size = ep_group, ep_group_name, ep_size
        self.l_aux: torch.Tensor | None = None
        self.exp_counts: torch.Tensor | None = None

    def _set_ep_group(self, ep_group: Any) -> None:
        """DeepSpeed's hook (``MoE.set_deepspeed_parallelism``): only the group the layer was built in is accepted."""
        if ep_group is not self.ep_group:
            raise GraceInputError(f"this GRACE layer lives in DeepSpeed's expert-parallel group {self.ep_group_name!r}; "
                                  "convert the model again (setup_grace) to use another group")

    def forward(self, hidden: torch.Tensor, used_token: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., h]`` -> ``[..., h]``: ``sum_j w[t, j] * expert_{ids[t, j]}(x[t])`` with DeepSpeed's routes (no grad)."""
        x = hidden.reshape(-1, hidden.shape[-1])
        self.l_aux, ids, weights, self.exp_counts = route(self.gate, x, used_token)
        return self.grace(x, ids, weights).reshape(hidden.shape)

    @property
    def last_counters(self):
        """The core layer's counters of the last pass (built with ``counters=True``), else None."""
        return self.grace.last_counters
