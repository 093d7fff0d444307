"""`GraceMegatronMoELayer`: Megatron-Core's ``MoELayer`` whose token dispatcher can be GRACE's.

Megatron-Core 0.16 and 0.19 pick a layer's token dispatcher from ``moe_token_dispatcher_type``
inside ``MoELayer.__init__`` (the spec has no dispatcher field), so the GRACE spec
(:mod:`.spec`) swaps ``MoELayer`` for this subclass. Until :meth:`~GraceMegatronMoELayer.setup_grace`
it *is* a ``MoELayer``: Megatron's router, dispatcher, experts and checkpoints, unchanged.
Set-up (explicit, eager, collective over the expert-parallel group, after the weights are loaded):

1. validates the plan and options on every rank and agrees across ranks (the core's
   :class:`~megatron_grace.layer.GraceDispatch`, one all-gather);
2. moves the expert weights from Megatron's layout (expert ``e`` on rank ``e // (E / ep)``) to
   the plan's slots with the core's one weight scatter (:mod:`megatron_grace.experts.exchange`)
   into a new Megatron expert module of the same kind (``SequentialMLP``, ``GroupedMLP``,
   ``TEGroupedMLP``) built for the largest slot count; the old one is dropped, so the weights
   are held once;
3. installs a :class:`~.dispatcher.GraceTokenDispatcher`.

``MoELayer.forward``, ``TopKRouter``, shared experts and the experts' own compute stay Megatron's.
:meth:`~GraceMegatronMoELayer.setup_grace` again with another plan re-places the experts from
the current slots; :meth:`~GraceMegatronMoELayer.teardown_grace` moves them back to Megatron's
layout and dispatcher (bit-exact), e.g. before saving a checkpoint with Megatron.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_grace.adapters.megatron._compat import build_experts, model_modules
from megatron_grace.adapters.megatron.dispatcher import GraceTokenDispatcher
from megatron_grace.adapters.megatron.options import GraceMegatronOptions, PlanSource, load_plan, plan_layer_index
from megatron_grace.adapters.megatron.weights import expert_ffn_size, expert_matrices, expert_state, load_expert_state, megatron_activation
from megatron_grace.dispatch.hierarchical import HierarchicalGroups
from megatron_grace.errors import GraceInputError
from megatron_grace.experts.exchange import (
    PackedWeights,
    contiguous_owners,
    contiguous_slots,
    exchange_packed,
    pack_owned_weights,
    primary_owners,
)
from megatron_grace.experts.mlp import expert_weight_shapes, unpack_expert
from megatron_grace.layer.counters import LayerCounters
from megatron_grace.layer.grace_dispatch import ExpertShape, GraceDispatch, agree_or_raise


class GraceMegatronMoELayer(MoELayer):
    """Megatron-Core ``MoELayer`` that runs GRACE after :meth:`setup_grace` (see the module docstring).

    Args:
        config, submodules, layer_number, pg_collection, **kwargs: as for ``MoELayer`` (0.19's
            ``is_mtp_layer`` and ``name`` pass through).
        grace: :class:`GraceMegatronOptions`, a mapping of its fields, or a plan / plan path
            (defaults for :meth:`setup_grace`).
    """

    def __init__(self, config: Any, submodules: Any = None, layer_number: int | None = None, pg_collection: Any = None,
                 grace: GraceMegatronOptions | Mapping[str, Any] | PlanSource | None = None, **kwargs: Any) -> None:
        if pg_collection is None:  # what MoELayer does; kept for building the slot experts with the same groups
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection, **kwargs)
        self.grace_config = GraceMegatronOptions.coerce(grace)
        self.grace: GraceDispatch | None = None  # registered sub-module once set up
        self.grace_setup_info: dict[str, Any] = {}
        self._pg_collection = pg_collection
        self._megatron_dispatcher = self.token_dispatcher

    # ------------------------------------------------------------------ accessors
    @property
    def grace_counters(self) -> LayerCounters | None:
        """Traffic and load counters of the last GRACE pass on this rank (with ``counters=True``)."""
        return None if self.grace is None else self.grace.last_counters

    def _group(self) -> Any:
        return self._megatron_dispatcher.ep_group

    def _layout(self) -> tuple[list[list[int]], np.ndarray]:
        """The current layout: every rank's logical expert per local expert, and each expert's owner (its primary copy)."""
        E, ep = int(self.config.num_moe_experts), dist.get_world_size(self._group())
        if self.grace is None:
            return contiguous_slots(E, ep), contiguous_owners(E, ep)
        plan, layer = self.grace.plan, self.grace.layer_index
        return [list(x) for x in plan.gpu_experts[layer]], primary_owners(plan, layer)

    def _shape(self) -> ExpertShape:
        """The experts' shape; GraceInputError for Megatron settings GRACE does not run."""
        tp = getattr(self.experts, "tp_group", None)
        if tp is not None and dist.get_world_size(tp) != 1:
            raise GraceInputError(f"GRACE needs expert tensor parallelism 1, this layer has {dist.get_world_size(tp)}")
        return ExpertShape(int(self.config.hidden_size), expert_ffn_size(self.config), megatron_activation(self.config),
                           expert_matrices(self.experts)[0][0].dtype)

    def _pack_for(self, target: list[list[int]], shape: ExpertShape) -> PackedWeights:
        """This rank's side of moving the experts from the current layout to ``target`` (local)."""
        slots, owners = self._layout()
        rank = dist.get_rank(self._group())
        mats = expert_matrices(self.experts)
        owned = {e: expert_state(*mats[i], shape.activation, shape.hidden_size, shape.ffn_size)
                 for i, e in enumerate(slots[rank]) if int(owners[e]) == rank}
        return pack_owned_weights(target, rank, owned, owners, expert_weight_shapes(shape.activation, shape.hidden_size,
                                  shape.ffn_size), shape.dtype, self._device())

    @torch.no_grad()
    def setup_grace(self, plan: PlanSource | None = None, *, hierarchical_groups: HierarchicalGroups | None = None,
                    **overrides: Any) -> GraceDispatch:
        """Place the experts by ``plan`` and run GRACE from now on (collective over the expert-parallel group).

        Call on every rank of the expert-parallel group after the weights are loaded. A problem on
        any rank (a plan for another expert count or EP size, unsupported expert settings, an
        unreadable plan) raises GraceInputError on every rank, before any weight moves.

        Args:
            plan: the placement plan or its path (default: the spec's ``plan``).
            hierarchical_groups: sub-groups for ``hierarchical`` dispatch when the EP group is not
                the whole world (:func:`setup_grace` builds them for the whole model).
            **overrides: :class:`GraceMegatronOptions` fields (``dispatch``, ``policy``, ``counters``, ...).

        Returns:
            The layer's :class:`~megatron_grace.layer.GraceDispatch`.
        """
        if plan is not None:
            overrides["plan"] = plan
        opts = self.grace_config.replace(**overrides) if overrides else self.grace_config
        group = self._group()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        new_plan, layer, num_moe_layers, packed, loaded, problem, shape = None, -1, None, None, None, None, None
        try:
            shape = self._shape()
            new_plan = load_plan(opts.plan)
            layer, num_moe_layers = plan_layer_index(self.config, self.layer_number, opts.layer_map)
            fits = 0 <= layer < new_plan.num_layers and new_plan.num_gpus == world  # else GraceDispatch names the problem
            if opts.checkpoint is not None and fits:  # each rank reads only its own slots
                from megatron_grace.checkpoint.loader import load_rank_slots

                loaded = load_rank_slots(opts.checkpoint, layer, rank, plan=new_plan, activation=shape.activation)
            elif opts.checkpoint is None:
                packed = self._pack_for(new_plan.gpu_experts[layer] if fits else [[]] * world, shape)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below, never a hang
            problem = exc
        if new_plan is None:
            agree_or_raise(group, None, layer, opts.dispatch, shape, problem or GraceInputError("no plan"), self._device())

        def local_check(rank: int, world: int) -> None:
            if problem is not None:
                raise problem

        engine = GraceDispatch(new_plan, layer, shape=shape, device=self._device(), local_check=local_check,
                               num_experts=int(self.config.num_moe_experts), num_model_layers=num_moe_layers, group=group,
                               policy=opts.policy, dispatch=opts.dispatch, grace_options=opts.routing, seed=opts.seed,
                               hierarchical_groups=hierarchical_groups, counters=opts.counters, timing=opts.timing)
        assert shape is not None and (packed is not None or loaded is not None)
        if loaded is not None:
            states = [loaded[e] for e in engine.local_experts]
        else:
            shapes = expert_weight_shapes(shape.activation, shape.hidden_size, shape.ffn_size)
            states = [unpack_expert(row, shapes) for row in exchange_packed(packed, group, world)]
        self._install_experts(states, engine.max_slots, shape)
        self.grace, self.grace_config = engine, opts
        self.token_dispatcher = GraceTokenDispatcher(engine, engine.max_slots, self.config, self._pg_collection)
        self.grace_setup_info = {"plan_layer": layer, "slots": len(engine.local_experts), "experts": list(engine.local_experts),
                                 "padded_to": engine.max_slots, "activation": shape.activation,
                                 "received": int(sum(packed.recv_splits)) if packed else 0,
                                 "sent": int(sum(packed.send_splits)) if packed else 0,
                                 "checkpoint_bytes_read": loaded.bytes_read if loaded is not None else 0}
        return engine

    @torch.no_grad()
    def teardown_grace(self) -> None:
        """Move the experts back to Megatron's layout and dispatcher (collective; bit-exact; no-op if not set up)."""
        if self.grace is None:
            return
        group = self._group()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        shape = self._shape()
        target = contiguous_slots(int(self.config.num_moe_experts), world)
        shapes = expert_weight_shapes(shape.activation, shape.hidden_size, shape.ffn_size)
        rows = exchange_packed(self._pack_for(target, shape), group, world)
        self._install_experts([unpack_expert(row, shapes) for row in rows], len(target[rank]), shape)
        self.grace = None
        self.token_dispatcher = self._megatron_dispatcher
        self.grace_setup_info = {}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """Megatron's distributed-checkpoint state; after set-up, experts are keyed by *logical* expert.

        Every slot's weights are saved under its logical expert's global index, exactly as
        Megatron's ``SequentialMLP`` keys them, so a GRACE-served model saves a standard checkpoint
        (loadable by a plain Megatron model of any EP size, or by GRACE with another plan). A
        copy's shards get a non-zero ``replica_id`` (the primary copy, on the lowest GPU, writes);
        padding slots are not saved.
        """
        if self.grace is None:
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if type(self.experts).__name__ != "SequentialMLP":
            raise GraceInputError(f"saving a GRACE-placed {type(self.experts).__name__} with dist_checkpointing is not "
                                  "supported; call teardown_grace() first (back to Megatron's layout)")
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

        experts = self._modules.pop("experts")
        try:
            out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            self._modules["experts"] = experts
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton = bool((metadata or {}).get("singleton_local_shards", False))
        E = int(self.config.num_moe_experts)
        hosts = self.grace.plan.expert_gpus[self.grace.layer_index]  # [E, copies] GPUs holding each expert, ascending
        rank, dp = self.grace.rank, experts.dp_group
        base = f"{prefix}experts."
        for i, e in enumerate(self.grace.local_experts):
            copy = int(np.nonzero(hosts[e] == rank)[0][0])  # 0 = primary copy
            local = f"{base}local_experts.{i}."
            sharded = f"{base}experts.{e}." if singleton else f"{base}experts."
            offsets = sharded_offsets if singleton else (*sharded_offsets, (len(sharded_offsets), e, E))
            part = experts.local_experts[i].sharded_state_dict(local, offsets, metadata)
            replace_prefix_for_sharding(part, local, sharded)
            for sh in part.values():
                sh.replica_id = (*sh.replica_id[:2], dp.rank() + copy * dp.size())
            out.update(part)
        return out

    def _device(self) -> torch.device:
        return expert_matrices(self.experts)[0][0].device

    def _install_experts(self, states: list[Mapping[str, torch.Tensor]], num_local: int, shape: ExpertShape) -> None:
        """A new Megatron expert module of the same kind for ``num_local`` experts; expert ``i`` loaded from ``states[i]``."""
        experts = build_experts(self.submodules.experts, num_local, self.config, self._pg_collection)
        experts = experts.to(device=self._device(), dtype=shape.dtype)
        for i, (fc1, fc2) in enumerate(expert_matrices(experts)):
            if i < len(states):
                load_expert_state(fc1, fc2, states[i], shape.activation)
            else:  # padding slot: never receives a token
                fc1.zero_()
                fc2.zero_()
        experts.train(self.training)
        self.experts = experts
        self.num_local_experts = num_local


# ============================================================================ model level
def grace_layers(model: Any) -> list[GraceMegatronMoELayer]:
    """The GRACE-capable MoE layers of a model (or a list of virtual-pipeline chunks), by layer number."""
    found = [m for m in model_modules(model) if isinstance(m, GraceMegatronMoELayer)]
    return sorted(found, key=lambda m: (m.layer_number is None, m.layer_number or 0))


def grace_counters(model: Any) -> dict[int, LayerCounters]:
    """Plan layer -> counters of the last GRACE pass on this rank."""
    return {c.layer: c for c in (layer.grace_counters for layer in grace_layers(model)) if c is not None}


def setup_grace(model: Any, plan: PlanSource | None = None, **overrides: Any) -> list[GraceMegatronMoELayer]:
    """Set up every GRACE layer of a model (collective over the world: call on every rank, after loading weights).

    It first builds, once, the hierarchical sub-groups of every expert-parallel group that needs
    them (the core's :meth:`HierarchicalGroups.for_group`, one world all-gather), then calls
    :meth:`GraceMegatronMoELayer.setup_grace` layer by layer.

    Args:
        model: a Megatron model, or a list of virtual-pipeline chunks.
        plan: the placement plan or its path (default: the spec's).
        **overrides: :class:`GraceMegatronOptions` fields for every layer (``dispatch``, ``policy``, ...).

    Returns:
        The GRACE layers of this rank, by layer number.
    """
    if plan is not None:
        overrides["plan"] = plan
    layers = grace_layers(model)
    opts = [layer.grace_config.replace(**overrides) if overrides else layer.grace_config for layer in layers]
    gpn = None  # GPUs per node of this rank's hierarchical plan; None = no hierarchical layer (or a bad plan, reported below)
    if layers and opts[0].dispatch == "hierarchical":
        with contextlib.suppress(GraceInputError):
            gpn = load_plan(opts[0].plan).topology.gpus_per_node
    groups = HierarchicalGroups.for_group(layers[0]._group() if layers else None, gpn)  # world-collective, every rank
    for layer in layers:
        layer.setup_grace(hierarchical_groups=groups, **overrides)
    return layers


def teardown_grace(model: Any) -> None:
    """Every GRACE layer back to Megatron's layout and dispatcher (collective)."""
    for layer in grace_layers(model):
        layer.teardown_grace()
