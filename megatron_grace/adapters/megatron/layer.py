"""`GraceMegatronMoELayer`: Megatron-Core's ``MoELayer`` with GRACE dispatch, replicas and routing.

The subclass keeps everything Megatron builds (``TopKRouter``, shared experts, the
``SequentialMLP`` expert weights, Megatron's own token dispatcher, the process groups of its
``ProcessGroupCollection``), so checkpoints load exactly as for ``MoELayer``. After the weights
are loaded, :meth:`GraceMegatronMoELayer.setup_grace` (or :func:`setup_grace` for a whole model)
builds a framework-neutral :class:`~megatron_grace.layer.GraceMoELayer` over the
expert-parallel group and fills its slots from Megatron's expert weights
(:mod:`.weights`). The forward pass is then::

    hidden [s, b, h] -> Megatron router -> (ids, weights) [s*b, k] -> GraceMoELayer -> [s, b, h] (+ shared experts)

GRACE runs forward only (inference). ``layer.use_grace = False`` (or
:func:`set_grace_enabled`) switches back to Megatron's own dispatcher and experts on the same
weights, which is how outputs are compared.

The GRACE layer is deliberately *not* a registered sub-module: ``state_dict()`` and
``sharded_state_dict()`` keep Megatron's layout, and the slots live on the device of Megatron's
expert weights at set-up time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_grace.adapters.megatron._compat import router_output_to_topk
from megatron_grace.adapters.megatron.options import GraceMegatronOptions, PlanSource, load_plan, plan_layer_index
from megatron_grace.adapters.megatron.weights import (
    expert_ffn_size,
    expert_state_from_mlp,
    fill_slots_from_megatron,
    local_expert_mlps,
    megatron_activation,
)
from megatron_grace.dispatch.all_to_all import GroupSpec
from megatron_grace.dispatch.hierarchical import HierarchicalGroups
from megatron_grace.errors import GraceInputError
from megatron_grace.experts.mlp import ACTIVATIONS, SlotExperts
from megatron_grace.layer.counters import LayerCounters
from megatron_grace.layer.grace_moe import DISPATCH_MODES, GraceMoELayer
from megatron_grace.layer.validation import agree_across_ranks, code, plan_hash
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.routing import POLICY_NAMES

_DTYPE_CODES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ============================================================================ the layer
class GraceMegatronMoELayer(MoELayer):
    """Megatron-Core ``MoELayer`` whose forward pass runs GRACE (see the module docstring).

    Args:
        config, submodules, layer_number, pg_collection, **kwargs: as for ``MoELayer`` (0.19's
            ``is_mtp_layer`` and ``name`` pass through).
        grace: :class:`GraceMegatronOptions`, a mapping of its fields, or a plan / plan path.
    """

    def __init__(self, config: Any, submodules: Any = None, layer_number: int | None = None, pg_collection: Any = None,
                 grace: GraceMegatronOptions | Mapping[str, Any] | PlanSource | None = None, **kwargs: Any) -> None:
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection, **kwargs)
        self.grace_config = GraceMegatronOptions.coerce(grace)
        self.use_grace = self.grace_config.enabled
        self.grace_setup_info: dict[str, Any] = {}
        object.__setattr__(self, "_grace", None)  # not a registered sub-module (keeps Megatron's state dict)

    # ------------------------------------------------------------------ accessors
    @property
    def grace_layer(self) -> GraceMoELayer | None:
        """The framework-neutral GRACE layer (None before set-up)."""
        return self._grace

    @property
    def grace_counters(self) -> LayerCounters | None:
        """Traffic and load counters of the last GRACE forward pass on this rank."""
        return None if self._grace is None else self._grace.last_counters

    # ------------------------------------------------------------------ set-up
    def _local_setup(self, opts: GraceMegatronOptions, rank: int, world: int
                     ) -> tuple[PlacementPlan, int, int | None, SlotExperts, dict[int, dict[str, torch.Tensor]], dict[str, int]]:
        """Local checks and this rank's (empty) slots; raises GraceInputError naming the problem."""
        cfg = self.config
        plan = load_plan(opts.plan)
        activation = megatron_activation(cfg)
        h, f = int(cfg.hidden_size), expert_ffn_size(cfg)
        E = int(cfg.num_moe_experts)
        mlps = local_expert_mlps(self.experts)
        tp = getattr(self.experts, "tp_group", None)
        if tp is not None and dist.get_world_size(tp) != 1:
            raise GraceInputError(f"GRACE needs expert tensor parallelism 1, this layer has {dist.get_world_size(tp)}")
        if len(mlps) != self.num_local_experts:
            raise GraceInputError(f"SequentialMLP holds {len(mlps)} experts, the layer expects {self.num_local_experts}")
        layer, num_moe_layers = plan_layer_index(cfg, self.layer_number, opts.layer_map)
        topo = plan.topology
        if plan.num_experts != E:
            raise GraceInputError(f"the plan has {plan.num_experts} experts per layer but the model has {E} (num_moe_experts)")
        if plan.num_gpus != world:
            raise GraceInputError(f"the plan is for {plan.num_gpus} GPUs ({topo.num_nodes} nodes x {topo.gpus_per_node}) but the "
                                  f"expert-parallel group has {world} ranks")
        if num_moe_layers is not None and plan.num_layers != num_moe_layers:
            raise GraceInputError(f"the plan has {plan.num_layers} MoE layers but the model has {num_moe_layers}")
        if not 0 <= layer < plan.num_layers:
            raise GraceInputError(f"MoE layer {layer} (layer number {self.layer_number}) is outside the plan's {plan.num_layers} layers")
        if opts.dispatch not in DISPATCH_MODES:
            raise GraceInputError(f"unknown dispatch mode {opts.dispatch!r}; known: {', '.join(DISPATCH_MODES)}")
        if opts.policy not in POLICY_NAMES:
            raise GraceInputError(f"unknown replica-choice policy {opts.policy!r}; known: {', '.join(POLICY_NAMES)}")
        w = mlps[0].linear_fc1.weight
        if w.numel() == 0:
            raise GraceInputError("Megatron's expert weights were released; set up GRACE before release_megatron_experts()")
        states = {int(e): expert_state_from_mlp(m, activation, h, f) for e, m in zip(self.local_expert_indices, mlps, strict=True)}
        experts = SlotExperts(plan.gpu_experts[layer][rank], h, f, activation, w.dtype, w.device)
        shape = {"layer": layer, "hidden_size": h, "ffn_size": f, "activation": code(activation, ACTIVATIONS)}
        return plan, layer, num_moe_layers, experts, states, shape

    def setup_grace(self, *, hierarchical_groups: HierarchicalGroups | None = None, **overrides: Any) -> GraceMoELayer:
        """Build the GRACE layer from Megatron's current expert weights (collective over the EP group).

        Call it on every rank of the expert-parallel group, after the checkpoint is loaded (again
        after any weight change). A problem on any rank (plan for another expert count or EP
        size, unsupported expert settings, unreadable plan) raises GraceInputError on every rank.

        Args:
            hierarchical_groups: sub-groups for ``hierarchical`` dispatch; needed when the EP
                group is not the whole world (:func:`setup_grace` builds them for all EP groups).
            **overrides: :class:`GraceMegatronOptions` fields to change first (``plan``,
                ``dispatch``, ``policy``, ...).

        Returns:
            The :class:`~megatron_grace.layer.GraceMoELayer` now used by ``forward``.
        """
        opts = self.grace_config.replace(**overrides) if overrides else self.grace_config
        group = self.ep_group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        error, plan, experts, states, shape = None, None, None, {}, {}
        layer, num_moe_layers = -1, None
        try:
            plan, layer, num_moe_layers, experts, states, shape = self._local_setup(opts, rank, world)
        except GraceInputError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - must reach the other ranks instead of hanging them
            error = f"GRACE set-up failed: {type(exc).__name__}: {exc}"
        fp = {"world_size": world, "dispatch": code(opts.dispatch, DISPATCH_MODES), **shape}
        if plan is not None:
            fp.update(plan_gpus=plan.num_gpus, gpus_per_node=plan.topology.gpus_per_node, plan_hash=plan_hash(plan),
                      num_experts=plan.num_experts, num_layers=plan.num_layers)
        if experts is not None:
            fp["dtype"] = code(experts.dtype, _DTYPE_CODES)
        device = experts.device if experts is not None else _comm_device(group)
        agree_across_ranks(group, fp, error, device)
        assert plan is not None and experts is not None
        moved = fill_slots_from_megatron(experts, plan, layer, states, self.num_local_experts, group, rank, world)
        if opts.dispatch == "hierarchical" and hierarchical_groups is None and _group_is_world(group):
            hierarchical_groups = HierarchicalGroups.build(plan.topology.gpus_per_node, group)
        grace = GraceMoELayer(plan, layer, experts, num_experts=int(self.config.num_moe_experts), num_model_layers=num_moe_layers,
                              group=group, policy=opts.policy, dispatch=opts.dispatch, grace_options=opts.routing, seed=opts.seed,
                              hierarchical_groups=hierarchical_groups, counters=opts.counters,
                              timing=opts.timing)
        self.grace_config = opts
        self.use_grace = opts.enabled
        object.__setattr__(self, "_grace", grace)
        self.grace_setup_info = {"plan_layer": layer, "slots": experts.num_slots, "experts": list(experts.expert_ids),
                                 "activation": experts.activation, **moved}
        return grace

    def release_megatron_experts(self) -> None:
        """Free Megatron's expert weights after set-up (GRACE-only inference; saves one copy of the experts).

        Afterwards ``use_grace = False``, ``state_dict()`` and a new :meth:`setup_grace` are unavailable.
        """
        if self._grace is None:
            raise GraceInputError("set up GRACE before releasing Megatron's expert weights")
        for mlp in local_expert_mlps(self.experts):
            for lin in (mlp.linear_fc1, mlp.linear_fc2):
                lin.weight.data = lin.weight.data.new_empty(0)

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """MoE output.

        Args:
            hidden_states: ``[s, b, h]`` (any ``[..., h]``).
            intermediate_tensors, padding_mask: as for ``MoELayer.forward`` (GRACE rejects
                ``intermediate_tensors``, i.e. partial CUDA-graph capture; ``padding_mask``
                ``[b, s]`` goes to the router).

        Returns:
            ``(output [s, b, h], None)``.
        """
        if not self.use_grace:
            if local_expert_mlps(self.experts)[0].linear_fc1.weight.numel() == 0:
                raise GraceInputError("Megatron's expert weights were released: this layer can only run GRACE")
            return super().forward(hidden_states, *args, **kwargs)
        intermediate_tensors = kwargs.pop("intermediate_tensors", args[0] if len(args) > 0 else None)
        padding_mask = kwargs.pop("padding_mask", args[1] if len(args) > 1 else None)
        if intermediate_tensors is not None:
            raise GraceInputError("the GRACE MoE layer does not support partial CUDA-graph capture (intermediate_tensors)")
        if self.training and torch.is_grad_enabled():
            raise GraceInputError("the GRACE MoE layer is inference-only: call model.eval() (or set use_grace=False to train)")
        if self._grace is None:
            self.setup_grace()
        return self._grace_forward(hidden_states, padding_mask), None

    def _grace_forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        shape = hidden_states.shape
        shared = self.shared_experts(hidden_states) if self.use_shared_expert else None
        if padding_mask is not None:
            padding_mask = padding_mask.transpose(0, 1).bool()  # [b, s] -> [s, b], as MoELayer.forward
            probs, routing = self.router(hidden_states, padding_mask)
        else:
            probs, routing = self.router(hidden_states)
        ids, weights = router_output_to_topk(probs, routing, int(self.config.num_moe_experts), int(self.config.moe_router_topk))
        out = self._grace(hidden_states.reshape(-1, shape[-1]), ids, weights).reshape(shape)
        if shared is not None:
            out = out + shared
        return out


# ============================================================================ model level
def _modules(model: Any) -> Iterable[torch.nn.Module]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        yield from chunk.modules()


def grace_layers(model: Any) -> list[GraceMegatronMoELayer]:
    """The GRACE MoE layers of a model (or a list of virtual-pipeline chunks), by layer number."""
    found = [m for m in _modules(model) if isinstance(m, GraceMegatronMoELayer)]
    return sorted(found, key=lambda m: (m.layer_number is None, m.layer_number or 0))


def set_grace_enabled(model: Any, enabled: bool) -> None:
    """Run GRACE (True) or Megatron's own dispatcher and experts (False) in every GRACE layer."""
    for layer in grace_layers(model):
        layer.use_grace = bool(enabled)


def grace_counters(model: Any) -> dict[int, LayerCounters]:
    """Plan layer -> counters of the last GRACE forward pass on this rank."""
    out = {}
    for layer in grace_layers(model):
        c = layer.grace_counters
        if c is not None:
            out[c.layer] = c
    return out


def setup_grace(model: Any, **overrides: Any) -> list[GraceMegatronMoELayer]:
    """Set up every GRACE layer of a model (collective: call on every rank, after loading weights).

    Builds, once for the whole world, the hierarchical sub-groups of every expert-parallel group
    (needed for ``dispatch="hierarchical"`` when the EP group is not the whole world), then
    calls :meth:`GraceMegatronMoELayer.setup_grace` layer by layer.

    Args:
        model: a Megatron model, or a list of virtual-pipeline chunks.
        **overrides: :class:`GraceMegatronOptions` fields for every layer (``plan``, ``dispatch``, ...).

    Returns:
        The GRACE layers of this rank, by layer number.
    """
    layers = grace_layers(model)
    opts = [layer.grace_config.replace(**overrides) if overrides else layer.grace_config for layer in layers]
    groups = None
    want = 0
    gpn = None
    if layers and any(o.dispatch == "hierarchical" for o in opts):
        try:
            gpn = load_plan(opts[0].plan).topology.gpus_per_node
            want = 1
        except GraceInputError:
            want = 1  # the layer set-up below reports the plan problem on every rank
    if dist.get_world_size() > 1:
        flag = torch.tensor([want], dtype=torch.int64, device=_comm_device(None))
        dist.all_reduce(flag)
        want = int(flag.item())
    if want:
        ep = layers[0].ep_group if layers else None
        groups = build_hierarchical_groups_all(ep, gpn)
    for layer in layers:
        layer.setup_grace(hierarchical_groups=groups, **overrides)
    return layers


# ============================================================================ hierarchical groups
_ALL_GROUPS_CACHE: dict[tuple[tuple[int, ...], int], HierarchicalGroups] = {}


def build_hierarchical_groups_all(ep_group: Any, gpus_per_node: int | None) -> HierarchicalGroups | None:
    """Hierarchical sub-groups for this rank's EP group, created for all EP groups of the world.

    ``dist.new_group`` is collective over the default group, so every process must create every
    sub-group in the same order, including processes of other expert-parallel groups (data or
    pipeline parallel copies). Each rank contributes ``(its EP group's global ranks, gpus per
    node)`` (or nothing, when it has no GRACE layer) through one ``all_gather_object``; then all
    ranks create the inter-node and intra-node groups of every distinct entry, in sorted order.

    Returns:
        This rank's :class:`HierarchicalGroups`, or None when it has no GRACE layer.

    Raises:
        GraceInputError: an EP group whose size is not a multiple of its plan's GPUs per node
            (raised on every rank).
    """
    mine = None
    if ep_group is not None and gpus_per_node is not None:
        mine = (tuple(dist.get_process_group_ranks(ep_group)), int(gpus_per_node))
    entries: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(entries, mine)
    distinct = sorted({e for e in entries if e is not None})
    for members, gpn in distinct:
        if gpn < 1 or len(members) % gpn:
            raise GraceInputError(f"hierarchical dispatch needs the expert-parallel group size ({len(members)}) to be a multiple "
                                  f"of the plan's GPUs per node ({gpn})")
    me = dist.get_rank()
    result = None
    for members, gpn in distinct:
        key = (members, gpn)
        if key in _ALL_GROUPS_CACHE:
            if me in members:
                result = _ALL_GROUPS_CACHE[key]
            continue
        W = len(members)
        P, N = gpn, W // gpn
        here = me in members
        idx = members.index(me) if here else -1
        n_me, p_me = divmod(idx, P) if here else (-1, -1)
        inter = GroupSpec(group=None, size=1, rank=0, peers=(idx,)) if (here and N == 1) else None
        intra = GroupSpec(group=None, size=1, rank=0, peers=(idx,)) if (here and P == 1) else None
        if N > 1:
            for p in range(P):
                gpus = [n * P + p for n in range(N)]
                g = dist.new_group([members[x] for x in gpus])
                if here and p == p_me:
                    inter = GroupSpec(group=g, size=N, rank=n_me, peers=tuple(gpus))
        if P > 1:
            for n in range(N):
                gpus = [n * P + p for p in range(P)]
                g = dist.new_group([members[x] for x in gpus])
                if here and n == n_me:
                    intra = GroupSpec(group=g, size=P, rank=p_me, peers=tuple(gpus))
        if here:
            assert inter is not None and intra is not None
            built = HierarchicalGroups(num_nodes=N, gpus_per_node=P, inter=inter, intra=intra)
            _ALL_GROUPS_CACHE[key] = built
            result = built
        else:
            _ALL_GROUPS_CACHE[key] = None  # type: ignore[assignment] - created for others' sake
    return result


def _group_is_world(group: Any) -> bool:
    return group is None or dist.get_world_size(group) == dist.get_world_size()


def _comm_device(group: Any) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
