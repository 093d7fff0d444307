"""`GraceDispatch`: replica choice, token dispatch and combine of one MoE layer, without the experts.

This is everything GRACE does around the expert computation, on every rank of the
expert-parallel group (rank ``g`` = GPU ``g`` of the plan):

1. :meth:`GraceDispatch.route`: pick a copy of every chosen expert with a replica-choice policy
   (:func:`megatron_grace.routing.choose_copies`) and look up its (GPU, slot), on the device;
2. :meth:`GraceDispatch.dispatch`: move one hidden row per (token, expert) pair to the GPU of
   its copy (``flat``, or node-then-GPU ``hierarchical``), grouped by local slot; returns a handle;
3. the caller runs its experts on the rows (:class:`~megatron_grace.layer.GraceMoELayer` its
   :class:`~megatron_grace.experts.mlp.SlotExperts`, the Megatron-Core token dispatcher
   Megatron's own experts);
4. :meth:`GraceDispatch.combine`: return the results and sum them per token with the gate weights
   (top-k order, float32 accumulation), taking the handle;
5. :meth:`GraceDispatch.end_pass`: feed the load predictor, advance the step counters.

Set-up validates once (plan, group, options, the caller's local checks) and agrees across ranks
with one small all-gather, so a problem on any rank raises GraceInputError on every rank.
The hot path has no per-step validation (``GRACE_DEBUG=1`` turns value checks on in the ops).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megatron_grace import _ops
from megatron_grace.dispatch import DISPATCH_MODES
from megatron_grace.dispatch.all_to_all import GroupSpec, TrafficLog
from megatron_grace.dispatch.flat import FlatDispatcher
from megatron_grace.dispatch.hierarchical import HierarchicalDispatcher, HierarchicalGroups
from megatron_grace.dispatch.pairs import RoutedPairs
from megatron_grace.dispatch.static import DecodeOptions, StaticDispatcher
from megatron_grace.errors import GraceInputError
from megatron_grace.experts.mlp import ACTIVATIONS
from megatron_grace.layer.counters import LayerCounters, link_types
from megatron_grace.layer.validation import _DTYPES, agree_across_ranks, code, comm_device, plan_hash
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.routing import POLICY_NAMES, LoadPredictor, ReplicaTable, RoutingOptions, choose_copies, copy_destinations


@dataclass(frozen=True)
class RouteDecision:
    """The replica choice of the last forward pass (``layer.last_route``).

    Attributes:
        copy: int64 ``[T, k]`` copy index into the expert's hosts, -1 where dropped.
        gpu: int64 ``[T, k]`` destination GPU, -1 where dropped.
        slot: int64 ``[T, k]`` slot on that GPU, -1 where dropped.
    """

    copy: torch.Tensor
    gpu: torch.Tensor
    slot: torch.Tensor


@dataclass(frozen=True)
class ExpertShape:
    """What every rank's experts must agree on (part of the set-up fingerprint)."""

    hidden_size: int
    ffn_size: int
    activation: str
    dtype: torch.dtype
    bias: bool = False


def is_world(group: Any) -> bool:
    """Whether ``group`` spans the whole default group (None counts as the world)."""
    return group is None or group is dist.group.WORLD or dist.get_world_size(group) == dist.get_world_size()


def rank_and_world(group: Any) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; a clear error without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        raise GraceInputError("GRACE needs an initialized torch.distributed process group (dist.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def plan_slots(plan: PlacementPlan, layer: int, rank: int, world: int, num_experts: int | None = None,
               num_model_layers: int | None = None) -> tuple[int, ...]:
    """Local plan checks; the logical experts this rank hosts at ``layer``, one per slot."""
    if not isinstance(plan, PlacementPlan):
        raise GraceInputError(f"plan must be a PlacementPlan, got {type(plan).__name__}")
    topo = plan.topology
    if plan.num_gpus != world:
        raise GraceInputError(f"the plan is for {plan.num_gpus} GPUs ({topo.num_nodes} node(s) x {topo.gpus_per_node} GPU(s), topology "
                              f"{topo.name!r}) but the expert-parallel group has {world} ranks", plan.source)
    if num_model_layers is not None and plan.num_layers != num_model_layers:
        raise GraceInputError(f"the plan has {plan.num_layers} MoE layer(s) but the model has {num_model_layers}", plan.source)
    if not 0 <= layer < plan.num_layers:
        raise GraceInputError(f"layer {layer} is outside the plan's {plan.num_layers} MoE layer(s)", plan.source)
    if num_experts is not None and plan.num_experts != num_experts:
        raise GraceInputError(f"the plan has {plan.num_experts} experts per layer but the model has {num_experts}", plan.source)
    return plan.gpu_experts[layer][rank]


def setup_fingerprint(plan: PlacementPlan | Any, layer: int, world: int, dispatch: str, shape: ExpertShape | None) -> dict[str, int]:
    """The integers every rank must agree on at set-up (see :func:`agree_across_ranks`)."""
    fp = {"world_size": world, "layer": layer, "dispatch": code(dispatch, DISPATCH_MODES)}
    if shape is not None:
        fp.update(hidden_size=shape.hidden_size, ffn_size=shape.ffn_size, activation=code(shape.activation, ACTIVATIONS),
                  dtype=code(shape.dtype, _DTYPES), expert_bias=int(shape.bias))
    if isinstance(plan, PlacementPlan):
        fp.update(plan_gpus=plan.num_gpus, gpus_per_node=plan.topology.gpus_per_node, plan_hash=plan_hash(plan),
                  num_experts=plan.num_experts, num_layers=plan.num_layers)
    return fp


def agree_or_raise(group: Any, plan: Any, layer: int, dispatch: str, shape: ExpertShape | None, problem: BaseException | str | None,
                   device: torch.device | str | None = None) -> None:
    """Report this rank's set-up problem (or success) to every rank; raise GraceInputError everywhere on any problem.

    ``problem``: None, a message, or the exception a local step raised (a GraceInputError's
    message is kept; any other exception is named with its type).
    """
    if isinstance(problem, GraceInputError):
        problem = str(problem)
    elif isinstance(problem, BaseException):
        problem = f"GRACE set-up failed: {type(problem).__name__}: {problem}"
    _, world = rank_and_world(group)
    agree_across_ranks(group, setup_fingerprint(plan, layer, world, dispatch, shape), problem, comm_device(group, device))


class GraceDispatch(nn.Module):
    """Replica choice + dispatch + combine of one MoE layer on one rank (see the module docstring).

    Args:
        plan: the placement plan (GPU ``g`` = rank ``g`` of ``group``; node-major).
        layer: which MoE layer of the plan this is.
        shape: the experts' shape and dtype (checked to agree across ranks; None = not checked).
        device: where routing state and the rows live.
        local_check: optional ``f(rank, world)`` run before the cross-rank agreement; a
            GraceInputError it raises (or any exception) fails set-up on every rank.
        num_experts: the model's experts per layer (checked against the plan; None = skip).
        num_model_layers: the model's MoE layer count (checked against the plan; None = skip).
        group: the expert-parallel process group (None = default group).
        policy: replica-choice policy, one of :data:`megatron_grace.routing.POLICY_NAMES`.
        dispatch: ``flat`` or ``hierarchical``.
        predictor: a :class:`LoadPredictor` shared by the model's layers (the caller then calls
            ``predictor.end_step()`` after each forward pass); None = a private one stepped here.
        grace_options: knobs of the ``grace`` policy.
        seed: seed of the ``random`` policy.
        hierarchical_groups: pre-built sub-groups for ``hierarchical`` (None = built here when
            ``group`` is the world; otherwise use :meth:`HierarchicalGroups.for_group` on every process).
        counters: fill :attr:`last_counters` after each pass (reads split sizes on the host).
        timing: also record phase times (synchronises the device per phase on a GPU).
        decode: :class:`DecodeOptions` for the static decode path; None = off.
    """

    def __init__(self, plan: PlacementPlan, layer: int, *, shape: ExpertShape | None, device: torch.device | str,
                 local_check: Callable[[int, int], None] | None = None, num_experts: int | None = None,
                 num_model_layers: int | None = None, group: Any = None, policy: str = "grace", dispatch: str = "flat",
                 predictor: LoadPredictor | None = None, grace_options: RoutingOptions | None = None, seed: int = 0,
                 hierarchical_groups: HierarchicalGroups | None = None, counters: bool = False, timing: bool = False,
                 decode: DecodeOptions | None = None) -> None:
        super().__init__()
        rank, world = rank_and_world(group)
        device = torch.device(device)
        problem: BaseException | None = None
        try:
            plan_slots(plan, layer, rank, world, num_experts, num_model_layers)
            self._check_options(plan, group, policy, dispatch, predictor, hierarchical_groups)
            if local_check is not None:
                local_check(rank, world)
        except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks, not hang them
            problem = exc
        agree_or_raise(group, plan, layer, dispatch, shape, problem, device)

        self.plan, self.layer_index, self.group, self.device = plan, layer, group, device
        self.rank, self.world_size = rank, world
        self.policy, self.dispatch_mode, self.seed = policy, dispatch, seed
        self.grace_options = grace_options or RoutingOptions()
        self.owns_predictor = predictor is None
        self.predictor = predictor if predictor is not None else LoadPredictor(plan, device=device, group=group)
        if self.predictor.device != device:
            self.predictor.to(device)
        self.table = ReplicaTable.from_plan(plan, layer, device=device)
        self.counters, self.timing = counters, counters and timing
        self.decode = decode
        self.step = 0
        # device-side state: the step counter the grace policy reads, and the decode overflow count
        self.register_buffer("step_counter", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("overflow_pairs", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.last_counters: LayerCounters | None = None
        self.last_route: RouteDecision | None = None
        self.local_experts = tuple(plan.gpu_experts[layer][rank])
        self.max_slots = int(plan.slots_used[layer].max())
        local_slots = len(self.local_experts)
        gpn = plan.topology.gpus_per_node
        self._link = link_types(rank, world, gpn)
        flat_spec = GroupSpec(group, world, rank, tuple(range(world)))
        self.static_dispatcher = StaticDispatcher(flat_spec, self.max_slots, local_slots) if decode is not None else None
        if dispatch == "flat":
            self.dispatcher: FlatDispatcher | HierarchicalDispatcher = FlatDispatcher(flat_spec, self.max_slots, local_slots)
        else:
            groups = hierarchical_groups if hierarchical_groups is not None else HierarchicalGroups.build(gpn, group)
            self.dispatcher = HierarchicalDispatcher(groups, self.max_slots, local_slots)

    @staticmethod
    def _check_options(plan: PlacementPlan, group: Any, policy: str, dispatch: str, predictor: LoadPredictor | None,
                       hierarchical_groups: HierarchicalGroups | None) -> None:
        if policy not in POLICY_NAMES:
            raise GraceInputError(f"unknown replica-choice policy {policy!r}; known: {', '.join(POLICY_NAMES)}")
        if dispatch not in DISPATCH_MODES:
            raise GraceInputError(f"unknown dispatch mode {dispatch!r}; known: {', '.join(DISPATCH_MODES)}")
        if predictor is not None and (predictor.num_gpus != plan.num_gpus or predictor.num_layers != plan.num_layers):
            raise GraceInputError(f"the load predictor is for {predictor.num_layers} layers x {predictor.num_gpus} GPUs, "
                                  f"the plan has {plan.num_layers} x {plan.num_gpus}")
        if dispatch == "hierarchical" and hierarchical_groups is None and not is_world(group):
            raise GraceInputError("hierarchical dispatch on a group smaller than the world needs hierarchical_groups= "
                                  "(HierarchicalGroups.for_group(ep_group, gpus_per_node) called on every process)")
        if hierarchical_groups is not None and (hierarchical_groups.gpus_per_node != plan.topology.gpus_per_node
                                                or hierarchical_groups.num_nodes != plan.topology.num_nodes):
            raise GraceInputError(f"hierarchical_groups are for {hierarchical_groups.num_nodes} x {hierarchical_groups.gpus_per_node} "
                                  f"GPUs, the plan for {plan.topology.num_nodes} x {plan.topology.gpus_per_node}")

    # ------------------------------------------------------------------ the phases
    def route(self, ids: torch.Tensor, topk_weights: torch.Tensor, positions: torch.Tensor | None = None
              ) -> tuple[RoutedPairs, torch.Tensor, torch.Tensor]:
        """Copy choice on the device.

        Args:
            ids: int64 ``[T, k]`` logical experts, -1 = dropped.
            topk_weights: float ``[T, k]`` gate weights.
            positions: optional int ``[T]`` token positions (``position`` policy).

        Returns:
            ``(pairs [T*k], pairs per GPU int64 [G], copy [T, k])``.
        """
        pred = None
        if self.policy == "grace":
            pred = self.predictor.predict(self.layer_index, pairs=(ids >= 0).sum().clamp(min=1))
        copy = choose_copies(self.policy, ids, self.rank, self.table, pred, step=self.step_counter, seed=self.seed,
                             positions=positions, options=self.grace_options)
        gpu, slot = copy_destinations(ids, copy, self.table)
        pairs = RoutedPairs.from_router(gpu, slot, topk_weights)
        return pairs, _ops.destination_histogram(pairs.gpu, self.world_size), copy

    def dispatch(self, x: torch.Tensor, pairs: RoutedPairs, log: TrafficLog | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int], Any]:
        """Move the rows: ``(rows [m, h]`` grouped by local slot, ``slot_counts`` int64 ``[S]`` (device),
        the same as host ints, handle)."""
        return self.dispatcher.dispatch(x, pairs, log)

    def combine(self, expert_out: torch.Tensor, handle: Any, log: TrafficLog | None = None) -> torch.Tensor:
        """``[m, h]`` expert outputs in :meth:`dispatch` order -> ``[T, h]`` weighted sums per token."""
        return self.dispatcher.combine(expert_out, handle, log)

    def end_pass(self, copy: torch.Tensor, pairs: RoutedPairs, pairs_per_gpu: torch.Tensor) -> None:
        """Feed the load predictor (device add), keep the route, advance the step counters."""
        self.predictor.observe(pairs_per_gpu, layer=self.layer_index)
        if self.owns_predictor:
            self.predictor.end_step()
        self.step_counter.add_(1)
        self.last_route = RouteDecision(copy=copy, gpu=pairs.gpu.view(copy.shape), slot=pairs.slot.view(copy.shape))
        self.step += 1

    def overflowed(self, reset: bool = True) -> bool:
        """Whether any static (decode) step since the last call had pairs beyond a destination's capacity.

        Reads one device scalar (a host synchronisation): call it once per model step, where the
        engine synchronises anyway (e.g. on the sampled tokens); :class:`~megatron_grace.layer.
        decode_graph.DecodeGraph` does this for all layers at once and re-runs the step on the
        dynamic path when it is true.
        """
        value = int(self.overflow_pairs.item())
        if reset:
            self.overflow_pairs.zero_()
        return value > 0

    def new_log(self) -> TrafficLog | None:
        """A traffic log for this pass when counters are on, else None."""
        return TrafficLog(self.world_size, timing=self.timing, sync=self._sync()) if self.counters else None

    def record_counters(self, log: TrafficLog, T: int, pairs_per_gpu: torch.Tensor, slot_counts: list[int]) -> None:
        """Opt-in bookkeeping (host reads): :attr:`last_counters`."""
        log.times["total"] = sum(log.times.values())
        per_gpu = pairs_per_gpu.cpu().numpy().astype(np.int64)
        self.last_counters = LayerCounters(
            step=self.step, layer=self.layer_index, rank=self.rank, mode=self.dispatch_mode, policy=self.policy, tokens=T,
            pairs=int(per_gpu.sum()), pairs_per_gpu=per_gpu, slot_load=np.asarray(slot_counts, dtype=np.int64),
            link=self._link, traffic=log, times=dict(log.times))

    def _sync(self):
        if self.timing and self.device.type == "cuda":
            return lambda: torch.cuda.synchronize(self.device)
        return None

    def extra_repr(self) -> str:
        return (f"layer={self.layer_index}, rank={self.rank}/{self.world_size}, policy={self.policy}, dispatch={self.dispatch_mode}, "
                f"slots={len(self.local_experts)}")
