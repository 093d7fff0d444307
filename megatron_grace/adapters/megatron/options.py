"""GRACE options of a Megatron MoE layer, plan loading and Megatron layer numbering (no Megatron import).

- :class:`GraceMegatronOptions`: what a GRACE layer spec carries (plan, policy, dispatch, ...);
- :func:`load_plan`: a plan from an instance or a JSON path (cached per file version);
- :func:`moe_layer_pattern` / :func:`plan_layer_index`: which plan layer a Megatron MoE layer is,
  from its 1-based global ``layer_number`` and ``config.moe_layer_freq``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_grace.errors import GraceInputError
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.routing import RoutingOptions

PlanSource = PlacementPlan | str | os.PathLike


@dataclass(frozen=True)
class GraceMegatronOptions:
    """How a Megatron MoE layer runs GRACE.

    Attributes:
        plan: the placement plan, or the path of a plan JSON (read once per process and file
            version). GPU ``g`` of the plan = rank ``g`` of the layer's expert-parallel group.
        policy: replica-choice policy (:data:`megatron_grace.routing.POLICY_NAMES`).
        dispatch: ``flat`` or ``hierarchical``.
        seed: seed of the ``random`` policy.
        counters: fill the layer counters (traffic, per-slot load) after each pass; off by default
            (they read sizes on the host).
        timing: also record phase times in the counters (synchronises a GPU per phase).
        routing: knobs of the ``grace`` policy (None = defaults).
        layer_map: Megatron ``layer_number`` (1-based, global) -> plan layer; None = count MoE
            layers with ``config.moe_layer_freq``.
        checkpoint: a checkpoint patched for this plan (``grace checkpoint patch``): set-up reads
            each rank's own slots from it instead of moving the loaded experts (None = move them).

    Unknown ``policy`` / ``dispatch`` values raise GraceInputError when the options are made
    (at spec time), naming the valid ones.
    """

    plan: PlanSource | None = None
    policy: str = "grace"
    dispatch: str = "flat"
    seed: int = 0
    counters: bool = False
    timing: bool = False
    routing: RoutingOptions | None = None
    layer_map: Mapping[int, int] | None = None
    checkpoint: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        from megatron_grace.dispatch import DISPATCH_MODES
        from megatron_grace.routing import POLICY_NAMES

        if self.dispatch not in DISPATCH_MODES:
            raise GraceInputError(f"unknown dispatch mode {self.dispatch!r}; valid: {', '.join(DISPATCH_MODES)}")
        if self.policy not in POLICY_NAMES:
            raise GraceInputError(f"unknown replica-choice policy {self.policy!r}; valid: {', '.join(POLICY_NAMES)}")
        if self.plan is not None and not isinstance(self.plan, (PlacementPlan, str, os.PathLike)):
            raise GraceInputError(f"plan must be a PlacementPlan or a path, got {type(self.plan).__name__}")

    def replace(self, **changes: Any) -> GraceMegatronOptions:
        """A copy with some fields changed (unknown names raise GraceInputError)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise GraceInputError(f"unknown GRACE option(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    @staticmethod
    def coerce(value: GraceMegatronOptions | Mapping[str, Any] | PlanSource | None) -> GraceMegatronOptions:
        """Options from an instance, a mapping of fields, a plan (or path), or None (no plan yet)."""
        if value is None:
            return GraceMegatronOptions()
        if isinstance(value, GraceMegatronOptions):
            return value
        if isinstance(value, Mapping):
            return GraceMegatronOptions().replace(**dict(value))
        if isinstance(value, (PlacementPlan, str, os.PathLike)):
            return GraceMegatronOptions(plan=value)
        raise GraceInputError(f"GRACE options must be GraceMegatronOptions, a mapping or a plan, got {type(value).__name__}")


_PLAN_CACHE: dict[tuple[str, int, int], PlacementPlan] = {}


def load_plan(plan: PlanSource | None) -> PlacementPlan:
    """A PlacementPlan from an instance or a path (cached per resolved path, mtime and size)."""
    if plan is None:
        raise GraceInputError("no placement plan given: pass plan= to the GRACE layer spec, register() or setup_grace()")
    if isinstance(plan, PlacementPlan):
        return plan
    if not isinstance(plan, (str, os.PathLike)):
        raise GraceInputError(f"plan must be a PlacementPlan or a path, got {type(plan).__name__}")
    path = Path(plan).expanduser().resolve()
    try:
        st = path.stat()
    except OSError as exc:
        raise GraceInputError(f"cannot read the plan ({exc.strerror or exc})", path) from None
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _PLAN_CACHE:
        _PLAN_CACHE[key] = PlacementPlan.read(path)
    return _PLAN_CACHE[key]


def moe_layer_pattern(config: Any) -> list[int]:
    """``[num_layers]`` 1/0 flags: which transformer layers are MoE (from ``moe_layer_freq``)."""
    L = int(config.num_layers)
    freq = getattr(config, "moe_layer_freq", 1)
    if isinstance(freq, int):
        if freq < 1:
            raise GraceInputError(f"moe_layer_freq must be >= 1, got {freq}")
        return [1 if i % freq == 0 else 0 for i in range(L)]
    if isinstance(freq, (list, tuple)):
        pattern = [int(x) for x in freq]
        if len(pattern) != L:
            raise GraceInputError(f"moe_layer_freq lists {len(pattern)} layers, the model has {L}")
        return pattern
    raise GraceInputError(f"moe_layer_freq must be an int or a list, got {type(freq).__name__} (give layer_map= instead)")


def plan_layer_index(config: Any, layer_number: int | None, layer_map: Mapping[int, int] | None) -> tuple[int, int | None]:
    """``(plan layer, MoE layers in the model or None)`` of a Megatron MoE layer.

    Args:
        layer_number: Megatron's 1-based global layer number (``set_layer_number``).
        layer_map: explicit ``layer_number -> plan layer`` (then the model's MoE layer count is not checked).
    """
    if layer_map is not None:
        if layer_number is None or int(layer_number) not in layer_map:
            raise GraceInputError(f"layer_map has no entry for layer number {layer_number}")
        return int(layer_map[int(layer_number)]), None
    if layer_number is None:
        raise GraceInputError("the MoE layer has no layer_number (call set_layer_number, or pass layer_map=)")
    pattern = moe_layer_pattern(config)
    idx = int(layer_number) - 1
    if not 0 <= idx < len(pattern):
        raise GraceInputError(f"layer number {layer_number} is outside the model's {len(pattern)} layers "
                              "(a multi-token-prediction layer? pass layer_map=)")
    if pattern[idx] != 1:
        raise GraceInputError(f"layer number {layer_number} is not an MoE layer by moe_layer_freq (pass layer_map=)")
    return sum(pattern[:idx]), sum(pattern)


__all__ = ["GraceMegatronOptions", "PlanSource", "load_plan", "moe_layer_pattern", "plan_layer_index"]
