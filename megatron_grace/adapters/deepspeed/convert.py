"""`setup_grace`: convert the ``deepspeed.moe.layer.MoE`` modules of a model into GRACE layers (collective).

For every ``MoE`` (in ``model.named_modules()`` order = plan layer 0, 1, ...), on every rank:

1. find DeepSpeed's expert-parallel group of its ``ep_size``
   (``deepspeed.utils.groups._get_expert_parallel_group(moe.expert_group_name)``, the group
   ``MoE.set_deepspeed_parallelism`` / ``deepspeed.initialize`` created; GPU ``g`` of the plan is
   rank ``g`` of that group);
2. recognise the expert MLP (:mod:`.experts`) and read the experts this rank owns in DeepSpeed's
   layout (expert ``e`` on EP rank ``e // (E / ep_size)``);
3. build the core layer with :meth:`GraceMoELayer.from_owned_weights` (its set-up checks agree
   across the group, then one all-to-all moves every expert to the ranks holding its copies);
4. once every layer is built, replace ``moe.deepspeed_moe`` with a :class:`.layer.GraceMOELayer`;
   DeepSpeed's expert modules are released.

A model already converted can be converted again (another plan or dispatch mode): the weights
then come from the GRACE slots (each expert from its copy on the lowest GPU of the old plan).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size
from torch import nn

from megatron_grace._files import PathLike
from megatron_grace.dispatch.hierarchical import HierarchicalGroups
from megatron_grace.errors import GraceInputError
from megatron_grace.experts.exchange import contiguous_owners, primary_owners
from megatron_grace.layer import GraceMoELayer
from megatron_grace.layer.grace_dispatch import agree_or_raise
from megatron_grace.plan.placement import PlacementPlan

from .experts import identify_expert
from .gate import gate_args, inference_gate
from .layer import GraceMOELayer


def moe_modules(model: nn.Module) -> list[tuple[str, MoE]]:
    """The model's DeepSpeed MoE modules, ``(qualified name, module)``, in module order (= plan layers)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def expert_parallel_group(moe: MoE) -> Any:
    """DeepSpeed's expert-parallel group of ``moe`` (raises, identically on every rank, when DeepSpeed made none)."""
    if moe.expert_group_name not in groups._get_expert_parallel_group_dict():
        raise GraceInputError(f"DeepSpeed has not created the expert-parallel group {moe.expert_group_name!r}: call "
                              "moe.set_deepspeed_parallelism() on every rank (deepspeed.initialize does) before setup_grace")
    return groups._get_expert_parallel_group(moe.expert_group_name)


def _check_model(moes: list[tuple[str, MoE]]) -> None:
    """Model-level limits (the same on every rank: raised locally)."""
    if not moes:
        raise GraceInputError("the model has no deepspeed.moe.layer.MoE module to convert")
    shapes = {(m.num_experts, m.ep_size) for _, m in moes}
    if len(shapes) > 1:
        raise GraceInputError(f"the model's MoE layers differ in (num_experts, ep_size) {sorted(shapes)}; one GRACE plan "
                              "has one expert count and one GPU count")
    tp = bwc_tensor_model_parallel_world_size(groups.mpu)
    if tp > 1:
        raise GraceInputError(f"tensor parallelism (groups.mpu, tensor-parallel size {tp}) is not supported: GRACE runs "
                              "DeepSpeed MoE with expert parallelism (and data parallelism) only")


def _source(moe: MoE, plan: Any, ep_group: Any) -> dict[str, Any]:
    """What the core needs from one MoE: shape, this rank's owned expert weights, the owner map, the gate."""
    current = moe.deepspeed_moe
    rank = dist.get_rank(ep_group)
    if isinstance(current, GraceMOELayer):  # converted before: weights from the GRACE slots
        old = current.grace
        slots = old.experts
        owner = primary_owners(old.plan, old.layer_index)
        owned = {e: slots.expert_state(s) for s, e in enumerate(old.local_experts) if owner[e] == rank}
        return dict(owned=owned, owner=owner, hidden_size=slots.hidden_size, ffn_size=slots.ffn_size,
                    activation=slots.activation, dtype=slots.dtype, device=slots.device, bias=slots.bias,
                    gate_args=current.gate_args, wg=current.gate.wg)
    args = gate_args(current.gate, moe.num_experts)
    experts = list(current.experts.deepspeed_experts)
    mlp = identify_expert(experts[0], args["model_dim"])
    base = rank * moe.num_local_experts
    owned = {}
    for i, module in enumerate(experts):
        try:
            owned[base + i] = mlp.state(module)
        except GraceInputError as exc:
            raise GraceInputError(f"expert {base + i}: {exc}") from None
    device = experts[0].get_parameter(f"{mlp.linears['fc1' if mlp.activation == 'gelu' else 'gate']}.weight").device
    return dict(owned=owned, owner=contiguous_owners(moe.num_experts, moe.ep_size), hidden_size=mlp.hidden_size,
                ffn_size=mlp.ffn_size, activation=mlp.activation, dtype=mlp.dtype, device=device, bias=mlp.bias,
                gate_args=args, wg=current.gate.wg)


def _patched_slots(path: PathLike | str, layer: int, rank: int, plan: PlacementPlan, activation: str) -> Any:
    """A weight source reading this rank's slots of ``layer`` from a patched checkpoint on first use (errors reach every rank)."""
    cache: dict[str, Any] = {}

    def weights(expert: int) -> Any:
        if "slots" not in cache:
            from megatron_grace.checkpoint.loader import load_rank_slots

            cache["slots"] = load_rank_slots(path, layer, rank, plan=plan, activation=activation)
        return cache["slots"][expert]

    return weights


def setup_grace(model: nn.Module, plan: PlacementPlan | PathLike, *, dispatch: str = "flat", policy: str = "grace",
                drop_tokens: bool = False, checkpoint: PathLike | str | None = None, **layer_kwargs: Any) -> list[GraceMOELayer]:
    """Convert every DeepSpeed ``MoE`` of ``model`` into a GRACE layer, in place (collective: every rank calls it).

    Args:
        model: a model holding ``deepspeed.moe.layer.MoE`` modules, weights loaded, its
            expert-parallel groups created (``deepspeed.initialize`` or ``moe.set_deepspeed_parallelism()``).
        plan: a :class:`PlacementPlan` or its JSON path: ``num_layers`` = the number of MoE modules,
            ``num_experts`` = their ``num_experts``, ``num_gpus`` = their ``ep_size``.
        dispatch: ``flat`` or ``hierarchical``.
        policy: replica-choice policy (:data:`megatron_grace.routing.POLICY_NAMES`).
        drop_tokens: False (default): never drop a token; True: drop exactly the routes DeepSpeed's
            gate drops with the model's capacity settings (see :mod:`.gate`).
        checkpoint: a checkpoint patched for ``plan`` (``grace checkpoint patch``): each rank reads
            only its own slots from it instead of moving DeepSpeed's loaded experts.
        **layer_kwargs: more :class:`GraceMoELayer` arguments (``counters``, ``timing``, ``decode``,
            ``predictor``, ``grace_options``, ``seed``).

    Returns:
        The new ``moe.deepspeed_moe`` modules, in plan-layer order.

    Raises:
        GraceInputError: on every rank, naming the MoE module and the problem (unsupported expert
            or gate, plan for another expert count, layer count or GPU count than ``ep_size``, ...).
            The model is left unchanged.
    """
    if not isinstance(plan, PlacementPlan):
        plan = PlacementPlan.read(plan)
    moes = moe_modules(model)
    _check_model(moes)
    ep_group = expert_parallel_group(moes[0][1])
    hier = HierarchicalGroups.for_group(ep_group, plan.topology.gpus_per_node if dispatch == "hierarchical" else None)
    rank = dist.get_rank(ep_group)
    built = []
    for layer, (name, moe) in enumerate(moes):
        try:
            try:
                src = _source(moe, plan, ep_group)
            except Exception as exc:  # noqa: BLE001 - reported on every rank by the core's set-up agreement
                agree_or_raise(ep_group, plan, layer, dispatch, None, exc)
            if checkpoint is not None and src["bias"]:
                raise GraceInputError("the experts have biases, which patched checkpoints do not carry (grace checkpoint "
                                      "moves expert weight matrices only): load DeepSpeed's own checkpoint and call setup_grace "
                                      "without checkpoint=")
            shape = dict(hidden_size=src["hidden_size"], ffn_size=src["ffn_size"], activation=src["activation"], dtype=src["dtype"],
                         bias=src["bias"], device=src["device"], group=ep_group, dispatch=dispatch, policy=policy, hierarchical_groups=hier,
                         num_experts=moe.num_experts, num_model_layers=len(moes), **layer_kwargs)
            if checkpoint is not None:
                grace = GraceMoELayer.from_full_weights(plan, layer, _patched_slots(checkpoint, layer, rank, plan, src["activation"]),
                                                        **shape)
            else:
                grace = GraceMoELayer.from_owned_weights(plan, layer, src["owned"], src["owner"], **shape)
        except GraceInputError as exc:
            raise GraceInputError(f"DeepSpeed MoE {name or '<model>'!r} (ep_size {moe.ep_size}, {moe.num_experts} experts): {exc}") from None
        gate = inference_gate(src["gate_args"], src["wg"], drop_tokens)
        built.append(GraceMOELayer(gate, grace, gate_args=src["gate_args"], ep_group=ep_group, ep_group_name=moe.expert_group_name,
                                   ep_size=moe.ep_size))
    for (_, moe), new in zip(moes, built):
        moe.deepspeed_moe = new
    return built
