"""`GraceMoELayer`: expert-parallel MoE with replicas and locality-aware routing (framework neutral).

Per forward pass, on every rank of the expert-parallel group (rank ``g`` = GPU ``g`` of the plan):

1. **route**: pick a copy of every chosen expert with a replica-choice policy
   (:func:`megatron_grace.routing.choose_copies`) and look up its (GPU, slot), on the device;
2. **dispatch**: one fused permutation of the pairs by (destination rank, slot), a count exchange,
   one batched copy of the split sizes to the host and an uneven ``all_to_all_single`` (``flat``),
   or once per node to the peer GPU and then inside the node (``hierarchical``, see
   :mod:`megatron_grace.dispatch.hierarchical`, one host copy per phase); or, on the static
   decode path, equal-split all-to-alls into fixed-capacity buffers with no host copy at all
   (:mod:`megatron_grace.dispatch.static`);
3. **experts**: the rank's slots run as two grouped GEMMs (gate/up fused, then down);
4. **combine**: results return by the inverse all-to-all(s) and are summed per token with the
   gate weights in top-k order (deterministic, float32 accumulation, un-permutation fused in).

After each pass the rank's load predictor (device tensors) observes how many pairs this rank
sent to each GPU. With ``counters=True``, :attr:`GraceMoELayer.last_counters` holds the
traffic, per-slot load and (``timing=True``) phase times; off by default, since building them
reads values on the host. Per-step value checks run only in debug mode (``GRACE_DEBUG=1``).

The layer is forward-only (inference): it runs under ``torch.no_grad``. It imports neither
Megatron nor DeepSpeed; adapters wrap it.

Every rank must construct the same layers in the same order (set-up runs collectives).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from megatron_grace.dispatch import DISPATCH_MODES
from megatron_grace.dispatch.all_to_all import mark_phase
from megatron_grace.errors import GraceInputError
from megatron_grace.experts.exchange import exchange_packed, pack_owned_weights, primary_owners
from megatron_grace.experts.mlp import SlotExperts, WeightSource
from megatron_grace.layer.grace_dispatch import (
    ExpertShape,
    GraceDispatch,
    RouteDecision,
    agree_or_raise,
    plan_slots,
    rank_and_world,
)
from megatron_grace.layer.validation import _DTYPES
from megatron_grace.plan.placement import PlacementPlan

__all__ = ["DISPATCH_MODES", "GraceMoELayer", "RouteDecision"]


def _shape_of(experts: Any) -> ExpertShape | None:
    if not isinstance(experts, SlotExperts):
        return None
    return ExpertShape(experts.hidden_size, experts.ffn_size, experts.activation, experts.dtype, experts.bias)


def _check_experts(plan: PlacementPlan, layer: int, experts: SlotExperts, rank: int) -> None:
    """This rank's slots hold the plan's experts, in order, in a supported dtype."""
    expected = plan.gpu_experts[layer][rank]
    if not isinstance(experts, SlotExperts):
        raise GraceInputError(f"experts must be a SlotExperts, got {type(experts).__name__}")
    if experts.num_slots != len(expected):
        raise GraceInputError(f"rank {rank} hosts {len(expected)} expert slots at layer {layer} in the plan "
                              f"(experts {list(expected)}) but was given weights for {experts.num_slots} slots")
    for slot, (have, want) in enumerate(zip(experts.expert_ids, expected)):
        if have != want:
            raise GraceInputError(f"rank {rank}, layer {layer}, slot {slot}: the weights are for expert {have} "
                                  f"but the plan puts expert {want} there")
    if experts.dtype not in _DTYPES:
        raise GraceInputError(f"expert weights must be float32, bfloat16, float16 or float64, got {experts.dtype}")


class GraceMoELayer(GraceDispatch):
    """Expert-parallel MoE layer with replicas, locality-aware replica choice and flat/hierarchical dispatch.

    Args:
        plan, layer: the placement plan (GPU ``g`` = rank ``g`` of ``group``) and the MoE layer.
        experts: this rank's :class:`SlotExperts`, one slot per entry of
            ``plan.gpu_experts[layer][rank]``, in that order.
        **kwargs: the routing and dispatch options of :class:`GraceDispatch` (``group``, ``policy``,
            ``dispatch``, ``predictor``, ``hierarchical_groups``, ``counters``, ``timing``, ``decode``, ...).

    Set-up runs local checks and then one small all-gather, so a problem on any rank raises
    GraceInputError on every rank (never a hang).
    """

    def __init__(self, plan: PlacementPlan, layer: int, experts: SlotExperts, *,
                 local_check: Any = None, **kwargs: Any) -> None:
        def check(rank: int, world: int) -> None:
            _check_experts(plan, layer, experts, rank)
            if local_check is not None:
                local_check(rank, world)

        device = experts.device if isinstance(experts, SlotExperts) else torch.device("cpu")
        super().__init__(plan, layer, shape=_shape_of(experts), device=device, local_check=check, **kwargs)
        self.experts = experts

    @classmethod
    def from_full_weights(cls, plan: PlacementPlan, layer: int, weights: WeightSource, *, hidden_size: int, ffn_size: int,
                          activation: str = "swiglu", dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                          bias: bool = False, **kwargs: Any) -> GraceMoELayer:
        """Build the layer, loading every local slot (copies included) from the full dense state.

        Args:
            plan, layer: as for the constructor.
            weights: ``expert id -> {name: tensor}`` (mapping or callable; called only for this
                rank's experts); names and shapes in :mod:`megatron_grace.experts.mlp`.
            hidden_size, ffn_size, activation, dtype, device: the experts' shape and storage.
            bias: the experts add biases (``{name}_bias`` entries in ``weights``).
            **kwargs: constructor arguments (``group``, ``policy``, ``dispatch``, ...).
        """
        group = kwargs.get("group")
        rank, world = rank_and_world(group)
        try:
            ids = plan_slots(plan, layer, rank, world, kwargs.get("num_experts"), kwargs.get("num_model_layers"))
            experts = SlotExperts.from_full_weights(ids, weights, hidden_size, ffn_size, activation, dtype, device, bias)
        except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks, not hang them
            agree_or_raise(group, plan, layer, kwargs.get("dispatch", "flat"), ExpertShape(hidden_size, ffn_size, activation, dtype, bias),
                           exc if isinstance(exc, GraceInputError) else GraceInputError(
                               f"loading expert weights failed: {type(exc).__name__}: {exc}"), device)
            raise AssertionError("unreachable: agree_or_raise raises on a local error")  # pragma: no cover
        return cls(plan, layer, experts, **kwargs)

    @classmethod
    def from_owned_weights(cls, plan: PlacementPlan, layer: int, owned_weights: WeightSource, owner: np.ndarray, *,
                           hidden_size: int, ffn_size: int, activation: str = "swiglu", dtype: torch.dtype = torch.float32,
                           device: torch.device | str | None = None, bias: bool = False, **kwargs: Any) -> GraceMoELayer:
        """Build the layer where each rank holds only the experts it owns (collective).

        Each rank reads the experts ``owner`` gives it from ``owned_weights``; after the set-up
        checks have agreed on every rank, one uneven ``all_to_all_single``
        (:mod:`megatron_grace.experts.exchange`) sends every expert to the ranks holding its
        copies, so all copies are bit-identical.

        Args:
            owned_weights: ``expert id -> {name: tensor}``; must cover this rank's owned experts.
            owner: int ``[E]`` rank that holds each expert's weights, e.g.
                :func:`~megatron_grace.experts.exchange.contiguous_owners` (the frameworks'
                layout) or :func:`~megatron_grace.experts.exchange.primary_owners`.
            Other arguments: as :meth:`from_full_weights`.
        """
        group = kwargs.get("group")
        rank, world = rank_and_world(group)
        experts: Any = None
        packed = None
        problem: Exception | None = None
        try:
            ids = plan_slots(plan, layer, rank, world, kwargs.get("num_experts"), kwargs.get("num_model_layers"))
            experts = SlotExperts(ids, hidden_size, ffn_size, activation, dtype, device, bias)
            owner = np.asarray(owner, dtype=np.int64)
            if owner.shape != (plan.num_experts,) or owner.min(initial=0) < 0 or owner.max(initial=0) >= world:
                raise GraceInputError(f"owner must give a rank in [0, {world}) for each of the plan's {plan.num_experts} experts, "
                                      f"got shape {owner.shape}")
            packed = pack_owned_weights(plan.gpu_experts[layer], rank, owned_weights, owner, experts.shapes, experts.dtype, experts.device)
        except Exception as exc:  # noqa: BLE001 - reported on every rank by the constructor's agreement
            problem = exc

        def local_check(rank: int, world: int) -> None:
            if problem is not None:
                raise problem

        if experts is None:  # nothing to build: report the problem on every rank
            agree_or_raise(group, plan, layer, kwargs.get("dispatch", "flat"), ExpertShape(hidden_size, ffn_size, activation, dtype, bias),
                           problem, device)
        layer_obj = cls(plan, layer, experts, local_check=local_check, **kwargs)
        assert packed is not None
        for slot, row in enumerate(exchange_packed(packed, group, world)):
            experts.load_flat_slot(slot, row)
        return layer_obj

    @classmethod
    def broadcast_from_primary(cls, plan: PlacementPlan, layer: int, primary_weights: WeightSource, **kwargs: Any) -> GraceMoELayer:
        """:meth:`from_owned_weights` where each rank holds the experts whose primary copy (lowest GPU) it hosts."""
        return cls.from_owned_weights(plan, layer, primary_weights, primary_owners(plan, layer), **kwargs)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                positions: torch.Tensor | None = None, static: bool | None = None) -> torch.Tensor:
        """MoE output for this rank's tokens.

        Two paths compute the same result:

        - **dynamic** (default): uneven all-to-alls sized to the batch; one host synchronisation
          per all-to-all phase (the split sizes, one batched copy), none elsewhere.
        - **static** (decode): with ``decode`` options and at most ``decode.max_tokens`` tokens, a
          fixed capacity of rows per destination GPU, equal-split all-to-alls and fixed-size
          buffers: no host synchronisation at all, so the step can be captured in a CUDA graph
          (:class:`megatron_grace.layer.decode_graph.DecodeGraph`). Pairs beyond a destination's
          capacity are never dropped silently: they are counted in :attr:`overflow_pairs`
          (device), and :meth:`overflowed` / ``DecodeGraph`` re-run that step on the dynamic path.

        Args:
            hidden: ``[T, h]`` (or ``[..., h]``, flattened to T rows) hidden states, dtype of the experts.
            topk_ids: int ``[T, k]`` router choices (logical experts), -1 = dropped.
            topk_weights: float ``[T, k]`` gate weights (ignored where dropped).
            positions: optional int ``[T]`` token positions (``position`` policy).
            static: force the static (True) or dynamic (False) path; None = static when the
                layer has decode options and ``T <= decode.max_tokens``.

        Returns:
            ``[T, h]`` (shape of ``hidden``): ``sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden[t])``.

        Raises:
            GraceInputError: malformed inputs (shapes, dtype; expert ids out of range in debug
                mode). Raised locally before this pass's first collective; the other ranks are then
                left inside their all-to-all, so treat the error as fatal for the job (unlike the
                set-up checks, which are agreed across ranks).
        """
        shape = hidden.shape
        x, ids = self._check_inputs(hidden, topk_ids, topk_weights)
        T = x.shape[0]
        if static is None:
            static = self.decode is not None and T <= self.decode.max_tokens
        if static:
            return self._forward_static(x, ids, topk_weights, positions).reshape(shape)
        log = self.new_log()
        pairs, pairs_per_gpu, copy = self.route(ids, topk_weights, positions)
        mark_phase(log, "route")
        rows, slot_counts, host_counts, handle = self.dispatch(x, pairs, log)
        y = self.experts(rows, slot_counts, max(host_counts, default=0))
        mark_phase(log, "experts")
        out = self.combine(y, handle, log)
        self.end_pass(copy, pairs, pairs_per_gpu)
        mark_phase(log, "route")
        if log is not None:
            self.record_counters(log, T, pairs_per_gpu, host_counts)
        return out.reshape(shape)

    def _check_inputs(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape and dtype checks (host metadata only); ``(x [T, h], ids int64 [T, k])``."""
        h = self.experts.hidden_size
        if hidden.shape[-1] != h:
            raise GraceInputError(f"hidden states have width {hidden.shape[-1]}, the experts {h}")
        x = hidden.reshape(-1, h)
        T = x.shape[0]
        if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
            raise GraceInputError(f"topk_ids and topk_weights must both be [T={T}, k], got {tuple(topk_ids.shape)} and "
                                  f"{tuple(topk_weights.shape)}")
        if x.dtype != self.experts.dtype:
            raise GraceInputError(f"hidden states are {x.dtype}, the experts {self.experts.dtype}")
        return x, topk_ids.long()

    def _forward_static(self, x: torch.Tensor, ids: torch.Tensor, topk_weights: torch.Tensor, positions: torch.Tensor | None
                        ) -> torch.Tensor:
        """The decode path: static shapes, no host synchronisation (see :meth:`forward`)."""
        if self.static_dispatcher is None:
            raise GraceInputError("static (decode) forward needs the layer to be built with decode=DecodeOptions(...)")
        T, k = ids.shape
        pairs, pairs_per_gpu, copy = self.route(ids, topk_weights, positions)
        capacity = self.decode.capacity(T, k, self.world_size)
        rows, slot_counts, handle = self.static_dispatcher.dispatch(x, pairs, capacity)
        y = self.experts(rows, slot_counts, rows.shape[0])
        out = self.static_dispatcher.combine(y, handle)
        self.overflow_pairs.add_(handle.overflow[0])
        self.end_pass(copy, pairs, pairs_per_gpu)
        return out
