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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megatron_grace import _ops
from megatron_grace.dispatch import DISPATCH_MODES
from megatron_grace.dispatch.all_to_all import GroupSpec, TrafficLog, all_to_all_uneven, mark_phase
from megatron_grace.dispatch.flat import FlatDispatcher
from megatron_grace.dispatch.hierarchical import HierarchicalDispatcher, HierarchicalGroups
from megatron_grace.dispatch.pairs import RoutedPairs
from megatron_grace.dispatch.static import DecodeOptions, StaticDispatcher
from megatron_grace.errors import GraceInputError
from megatron_grace.experts.mlp import ACTIVATIONS, SlotExperts, WeightSource, fetch_expert
from megatron_grace.layer.counters import LayerCounters, link_types
from megatron_grace.layer.validation import _DTYPES, agree_across_ranks, code, comm_device, plan_hash
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.routing import POLICY_NAMES, RoutingOptions, LoadPredictor, ReplicaTable, choose_copies, copy_destinations


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


def _is_world(group: Any) -> bool:
    return group is None or group is dist.group.WORLD or dist.get_world_size(group) == dist.get_world_size()


def _rank_and_world(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise GraceInputError("GraceMoELayer needs an initialized torch.distributed process group (dist.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def _plan_slots(plan: PlacementPlan, layer: int, rank: int, world: int, num_experts: int | None,
                num_model_layers: int | None) -> tuple[int, ...]:
    """Local plan checks; the experts this rank hosts at ``layer``, one per slot."""
    if not isinstance(plan, PlacementPlan):
        raise GraceInputError(f"plan must be a PlacementPlan, got {type(plan).__name__}")
    topo = plan.topology
    if plan.num_gpus != world:
        raise GraceInputError(f"the plan is for {plan.num_gpus} GPUs ({topo.num_nodes} node(s) x {topo.gpus_per_node} GPU(s), topology "
                              f"{topo.name!r}) but the expert-parallel group has {world} ranks")
    if num_model_layers is not None and plan.num_layers != num_model_layers:
        raise GraceInputError(f"the plan has {plan.num_layers} MoE layer(s) but the model has {num_model_layers}")
    if not 0 <= layer < plan.num_layers:
        raise GraceInputError(f"layer {layer} is outside the plan's {plan.num_layers} MoE layer(s)")
    if num_experts is not None and plan.num_experts != num_experts:
        raise GraceInputError(f"the plan has {plan.num_experts} experts per layer but the model has {num_experts}")
    return plan.gpu_experts[layer][rank]


def _fingerprint(plan: PlacementPlan | Any, layer: int, world: int, hidden_size: int, ffn_size: int, activation: str,
                 dispatch: str, dtype: torch.dtype) -> dict[str, int]:
    fp = {"world_size": world, "layer": layer, "hidden_size": hidden_size, "ffn_size": ffn_size,
          "activation": code(activation, ACTIVATIONS), "dispatch": code(dispatch, DISPATCH_MODES), "dtype": code(dtype, _DTYPES)}
    if isinstance(plan, PlacementPlan):
        fp.update(plan_gpus=plan.num_gpus, gpus_per_node=plan.topology.gpus_per_node, plan_hash=plan_hash(plan),
                  num_experts=plan.num_experts, num_layers=plan.num_layers)
    return fp


class GraceMoELayer(nn.Module):
    """Expert-parallel MoE layer with replicas, locality-aware replica choice and flat/hierarchical dispatch.

    Args:
        plan: the placement plan (GPU ``g`` = rank ``g`` of ``group``; node-major).
        layer: which MoE layer of the plan this is.
        experts: this rank's :class:`SlotExperts`, one slot per entry of
            ``plan.gpu_experts[layer][rank]``, in that order.
        num_experts: the model's experts per layer (checked against the plan; None = skip).
        num_model_layers: the model's MoE layer count (checked against the plan; None = skip).
        group: the expert-parallel process group (None = default group).
        policy: replica-choice policy, one of :data:`megatron_grace.routing.POLICY_NAMES`.
        dispatch: ``flat`` or ``hierarchical``.
        predictor: a :class:`LoadPredictor` shared by the model's layers (the caller then calls
            ``predictor.end_step()`` after each forward pass); None = a private one that the layer
            steps itself.
        grace_options: knobs of the ``grace`` policy.
        seed: seed of the ``random`` policy.
        hierarchical_groups: pre-built sub-groups; needed for ``hierarchical`` when ``group`` is
            not the whole world (every process calls :meth:`HierarchicalGroups.build_all`).
        counters: fill :attr:`last_counters` (traffic per GPU and link, per-slot load) after each
            pass. Off by default: building them reads the split sizes and loads on the host.
        timing: also record phase times in the counters (synchronises the device at every phase
            boundary on a GPU); only with ``counters``.
        decode: a :class:`DecodeOptions` to serve batches of at most ``decode.max_tokens`` tokens
            with static shapes (fixed per-destination capacity; see :meth:`forward`); None = off.

    Set-up runs local checks and then one small all-gather, so a problem on any rank raises
    GraceInputError on every rank (never a hang).
    """

    def __init__(self, plan: PlacementPlan, layer: int, experts: SlotExperts, *, num_experts: int | None = None,
                 num_model_layers: int | None = None, group: Any = None, policy: str = "grace", dispatch: str = "flat",
                 predictor: LoadPredictor | None = None, grace_options: RoutingOptions | None = None, seed: int = 0,
                 hierarchical_groups: HierarchicalGroups | None = None, counters: bool = False, timing: bool = False,
                 decode: DecodeOptions | None = None) -> None:
        super().__init__()
        rank, world = _rank_and_world(group)
        error = None
        try:
            self._check_local(plan, layer, experts, rank, world, num_experts, num_model_layers, group, policy, dispatch, predictor,
                              hierarchical_groups)
        except GraceInputError as exc:
            error = str(exc)
        is_experts = isinstance(experts, SlotExperts)
        fp = _fingerprint(plan, layer, world, experts.hidden_size if is_experts else -1, experts.ffn_size if is_experts else -1,
                          experts.activation if is_experts else "", dispatch, experts.dtype if is_experts else None)
        agree_across_ranks(group, fp, error, experts.device if is_experts else comm_device(group))

        self.plan, self.layer_index, self.experts, self.group = plan, layer, experts, group
        self.rank, self.world_size = rank, world
        self.policy, self.dispatch_mode, self.seed = policy, dispatch, seed
        self.grace_options = grace_options or RoutingOptions()
        self.owns_predictor = predictor is None
        self.predictor = predictor if predictor is not None else LoadPredictor(plan, device=experts.device, group=group)
        if self.predictor.device != experts.device:
            self.predictor.to(experts.device)
        self.table = ReplicaTable.from_plan(plan, layer, device=experts.device)
        self.counters, self.timing = counters, counters and timing
        self.decode = decode
        self.step = 0
        # device-side state: the step counter the grace policy reads, and the decode overflow count
        self.register_buffer("step_counter", torch.zeros((), dtype=torch.int64, device=experts.device), persistent=False)
        self.register_buffer("overflow_pairs", torch.zeros((), dtype=torch.int64, device=experts.device), persistent=False)
        self.last_counters: LayerCounters | None = None
        self.last_route: RouteDecision | None = None
        max_slots = int(plan.slots_used[layer].max())
        local_slots = experts.num_slots
        gpn = plan.topology.gpus_per_node
        self._link = link_types(rank, world, gpn)
        flat_spec = GroupSpec(group, world, rank, tuple(range(world)))
        self.static_dispatcher = StaticDispatcher(flat_spec, max_slots, local_slots) if decode is not None else None
        if dispatch == "flat":
            self.dispatcher: FlatDispatcher | HierarchicalDispatcher = FlatDispatcher(flat_spec, max_slots, local_slots)
        else:
            groups = hierarchical_groups if hierarchical_groups is not None else HierarchicalGroups.build(gpn, group)
            self.dispatcher = HierarchicalDispatcher(groups, max_slots, local_slots)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _check_local(plan: PlacementPlan, layer: int, experts: SlotExperts, rank: int, world: int, num_experts: int | None,
                     num_model_layers: int | None, group: Any, policy: str, dispatch: str, predictor: LoadPredictor | None,
                     hierarchical_groups: HierarchicalGroups | None) -> None:
        expected = _plan_slots(plan, layer, rank, world, num_experts, num_model_layers)
        if policy not in POLICY_NAMES:
            raise GraceInputError(f"unknown replica-choice policy {policy!r}; known: {', '.join(POLICY_NAMES)}")
        if dispatch not in DISPATCH_MODES:
            raise GraceInputError(f"unknown dispatch mode {dispatch!r}; known: {', '.join(DISPATCH_MODES)}")
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
        if predictor is not None and (predictor.num_gpus != plan.num_gpus or predictor.num_layers != plan.num_layers):
            raise GraceInputError(f"the load predictor is for {predictor.num_layers} layers x {predictor.num_gpus} GPUs, "
                                  f"the plan has {plan.num_layers} x {plan.num_gpus}")
        if dispatch == "hierarchical" and hierarchical_groups is None and not _is_world(group):
            raise GraceInputError("hierarchical dispatch on a group smaller than the world needs hierarchical_groups= "
                                  "(HierarchicalGroups.build_all(all_ep_groups, gpus_per_node) called on every process)")
        if hierarchical_groups is not None and (hierarchical_groups.gpus_per_node != plan.topology.gpus_per_node
                                                or hierarchical_groups.num_nodes != plan.topology.num_nodes):
            raise GraceInputError(f"hierarchical_groups are for {hierarchical_groups.num_nodes} x {hierarchical_groups.gpus_per_node} "
                                  f"GPUs, the plan for {plan.topology.num_nodes} x {plan.topology.gpus_per_node}")

    @classmethod
    def from_full_weights(cls, plan: PlacementPlan, layer: int, weights: WeightSource, *, hidden_size: int, ffn_size: int,
                          activation: str = "swiglu", dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                          **kwargs: Any) -> GraceMoELayer:
        """Build the layer, loading every local slot (copies included) from the full dense state.

        Args:
            plan, layer: as for the constructor.
            weights: ``expert id -> {name: tensor}`` (mapping or callable; called only for this
                rank's experts); names and shapes in :mod:`megatron_grace.experts.mlp`.
            hidden_size, ffn_size, activation, dtype, device: the experts' shape and storage.
            **kwargs: constructor arguments (``group``, ``policy``, ``dispatch``, ...).
        """
        group = kwargs.get("group")
        rank, world = _rank_and_world(group)
        try:
            ids = _plan_slots(plan, layer, rank, world, kwargs.get("num_experts"), kwargs.get("num_model_layers"))
            experts = SlotExperts.from_full_weights(ids, weights, hidden_size, ffn_size, activation, dtype, device)
        except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks, not hang them
            problem = str(exc) if isinstance(exc, GraceInputError) else f"loading expert weights failed: {type(exc).__name__}: {exc}"
            fp = _fingerprint(plan, layer, world, hidden_size, ffn_size, activation, kwargs.get("dispatch", "flat"), dtype)
            agree_across_ranks(group, fp, problem, comm_device(group, device))
            raise AssertionError("unreachable: agree_across_ranks raises on a local error")  # pragma: no cover
        return cls(plan, layer, experts, **kwargs)

    @classmethod
    def broadcast_from_primary(cls, plan: PlacementPlan, layer: int, primary_weights: WeightSource, *, hidden_size: int,
                               ffn_size: int, activation: str = "swiglu", dtype: torch.dtype = torch.float32,
                               device: torch.device | str | None = None, **kwargs: Any) -> GraceMoELayer:
        """Build the layer where each rank holds only the experts whose primary copy it hosts.

        The primary copy of an expert is its copy on the lowest-numbered GPU
        (``plan.expert_gpus[layer, e, 0]``). Each rank reads the weights of its primary experts
        from ``primary_weights``; one uneven ``all_to_all_single`` then sends every expert from its
        primary rank to the ranks holding its other copies, so all copies are bit-identical.

        Args:
            primary_weights: ``expert id -> {name: tensor}``; must cover this rank's primary experts.
            Other arguments: as :meth:`from_full_weights`.
        """
        group = kwargs.get("group")
        rank, world = _rank_and_world(group)
        fp = _fingerprint(plan, layer, world, hidden_size, ffn_size, activation, kwargs.get("dispatch", "flat"), dtype)
        error = None
        experts = None
        try:
            ids = _plan_slots(plan, layer, rank, world, kwargs.get("num_experts"), kwargs.get("num_model_layers"))
            experts = SlotExperts(ids, hidden_size, ffn_size, activation, dtype, device)
            primary = plan.expert_gpus[layer, :, 0]  # [E]
            blobs: dict[int, torch.Tensor] = {}
            for e in np.nonzero(primary == rank)[0].tolist():
                state = fetch_expert(primary_weights, e)
                experts.check_expert_state(state, e)
                blobs[e] = torch.cat([state[n].detach().to(experts.device, dtype).reshape(-1) for n in experts.shapes])
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = str(exc) if isinstance(exc, GraceInputError) else f"loading expert weights failed: {type(exc).__name__}: {exc}"
        agree_across_ranks(group, fp, error, experts.device if experts is not None else comm_device(group, device))
        assert experts is not None
        # Send buffer: for every destination rank, its slots (ascending) whose expert's primary is here.
        send_rows, send_splits = [], []
        for d in range(world):
            mine = [blobs[e] for e in plan.gpu_experts[layer][d] if int(primary[e]) == rank]
            send_rows.extend(mine)
            send_splits.append(len(mine))
        src_of_slot = [int(primary[e]) for e in experts.expert_ids]
        recv_splits = [src_of_slot.count(r) for r in range(world)]
        B = experts.floats_per_expert
        send = torch.stack(send_rows) if send_rows else torch.zeros(0, B, dtype=dtype, device=experts.device)
        recv = all_to_all_uneven(send, send_splits, recv_splits, group, world)
        order = sorted(range(experts.num_slots), key=lambda s: (src_of_slot[s], s))  # arrival order: by source, then slot
        for row, s in enumerate(order):
            experts.load_flat_slot(s, recv[row])
        return cls(plan, layer, experts, **kwargs)

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
        log = TrafficLog(self.world_size, timing=self.timing, sync=self._sync()) if self.counters else None
        pairs, pairs_per_gpu, copy = self._route(ids, topk_weights, positions)
        mark_phase(log, "route")
        rows, slot_counts, host_counts, handle = self.dispatcher.dispatch(x, pairs, log)
        y = self.experts(rows, slot_counts, max(host_counts, default=0))
        mark_phase(log, "experts")
        out = self.dispatcher.combine(y, handle, log)
        self._end_pass(copy, pairs, pairs_per_gpu)
        mark_phase(log, "route")
        if log is not None:
            self._record_counters(log, T, pairs_per_gpu, host_counts)
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

    def _route(self, ids: torch.Tensor, topk_weights: torch.Tensor, positions: torch.Tensor | None
               ) -> tuple[RoutedPairs, torch.Tensor, torch.Tensor]:
        """Copy choice on the device: ``(pairs, pairs per GPU int64 [G], copy [T, k])``."""
        pred = None
        if self.policy == "grace":
            pred = self.predictor.predict(self.layer_index, pairs=(ids >= 0).sum().clamp(min=1))
        copy = choose_copies(self.policy, ids, self.rank, self.table, pred, step=self.step_counter, seed=self.seed,
                             positions=positions, options=self.grace_options)
        gpu, slot = copy_destinations(ids, copy, self.table)
        pairs = RoutedPairs.from_router(gpu, slot, topk_weights)
        return pairs, _ops.destination_histogram(pairs.gpu, self.world_size), copy

    def _end_pass(self, copy: torch.Tensor, pairs: RoutedPairs, pairs_per_gpu: torch.Tensor) -> None:
        """Both paths' bookkeeping: feed the load predictor (device add), keep the route, advance the step counters."""
        self.predictor.observe(pairs_per_gpu, layer=self.layer_index)
        if self.owns_predictor:
            self.predictor.end_step()
        self.step_counter.add_(1)
        self.last_route = RouteDecision(copy=copy, gpu=pairs.gpu.view(copy.shape), slot=pairs.slot.view(copy.shape))
        self.step += 1

    def _forward_static(self, x: torch.Tensor, ids: torch.Tensor, topk_weights: torch.Tensor, positions: torch.Tensor | None
                        ) -> torch.Tensor:
        """The decode path: static shapes, no host synchronisation (see :meth:`forward`)."""
        if self.static_dispatcher is None:
            raise GraceInputError("static (decode) forward needs the layer to be built with decode=DecodeOptions(...)")
        T, k = ids.shape
        pairs, pairs_per_gpu, copy = self._route(ids, topk_weights, positions)
        capacity = self.decode.capacity(T, k, self.world_size)
        rows, slot_counts, handle = self.static_dispatcher.dispatch(x, pairs, capacity)
        y = self.experts(rows, slot_counts, rows.shape[0])
        out = self.static_dispatcher.combine(y, handle)
        self.overflow_pairs.add_(handle.overflow[0])
        self._end_pass(copy, pairs, pairs_per_gpu)
        return out

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

    def _record_counters(self, log: TrafficLog, T: int, pairs_per_gpu: torch.Tensor, slot_counts: list[int]) -> None:
        """Opt-in bookkeeping (host reads): :attr:`last_counters`."""
        log.times["total"] = sum(log.times.values())
        per_gpu = pairs_per_gpu.cpu().numpy().astype(np.int64)
        self.last_counters = LayerCounters(
            step=self.step, layer=self.layer_index, rank=self.rank, mode=self.dispatch_mode, policy=self.policy, tokens=T,
            pairs=int(per_gpu.sum()), pairs_per_gpu=per_gpu, slot_load=np.asarray(slot_counts, dtype=np.int64),
            link=self._link, traffic=log, times=dict(log.times))

    def _sync(self):
        dev = self.experts.device
        if self.timing and dev.type == "cuda":
            return lambda: torch.cuda.synchronize(dev)
        return None

    def extra_repr(self) -> str:
        return (f"layer={self.layer_index}, rank={self.rank}/{self.world_size}, policy={self.policy}, dispatch={self.dispatch_mode}, "
                f"slots={self.experts.num_slots}")
