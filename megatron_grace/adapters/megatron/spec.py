"""GRACE layer specs: swap Megatron's ``MoELayer`` for :class:`GraceMegatronMoELayer` in any spec.

Usage (Megatron-Core 0.16.x and 0.19.x)::

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron_grace.adapters.megatron import grace_spec, setup_grace

    spec = grace_spec(get_gpt_layer_local_spec(num_experts=128), plan="plan.json", dispatch="hierarchical")
    model = GPTModel(config, spec, vocab_size, max_sequence_length)
    ...  # load the checkpoint as usual (the state dict is Megatron's)
    setup_grace(model)  # every rank; then run inference as usual

:func:`grace_spec` accepts a transformer-layer spec, a decoder block spec
(``TransformerBlockSubmodules`` with ``layer_specs``), an MoE module spec, or a list of them, in
both spec styles: ``ModuleSpec(module=MoELayer, submodules=...)`` (0.16) and
``functools.partial(MoELayer, submodules=...)`` (0.19). The input is not modified; router,
experts and shared-expert sub-specs are kept.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from megatron_grace.adapters.megatron._compat import is_moe_layer_builder
from megatron_grace.adapters.megatron.layer import GraceMegatronMoELayer
from megatron_grace.adapters.megatron.options import GraceMegatronOptions, PlanSource, load_plan
from megatron_grace.errors import GraceInputError


def _options(plan: PlanSource | None, options: GraceMegatronOptions | Mapping[str, Any] | None, overrides: Mapping[str, Any]
             ) -> GraceMegatronOptions:
    opts = GraceMegatronOptions.coerce(options)
    if plan is not None:
        opts = opts.replace(plan=plan)
    opts = opts.replace(**overrides) if overrides else opts
    if opts.plan is not None:
        load_plan(opts.plan)  # a missing or malformed plan fails here, at spec time, not at set-up
    return opts


def _swap(obj: Any, opts: GraceMegatronOptions, count: list[int], depth: int = 0) -> Any:
    """A copy of ``obj`` with every MoELayer builder replaced (``count[0]`` counts them)."""
    if depth > 12:
        return obj
    if is_moe_layer_builder(obj):
        count[0] += 1
        if isinstance(obj, functools.partial):
            keywords = {**obj.keywords, "grace": opts}
            return functools.partial(GraceMegatronMoELayer, *obj.args, **keywords)
        if isinstance(obj, type):
            return functools.partial(GraceMegatronMoELayer, grace=opts)
        new = copy.copy(obj)
        new.module = GraceMegatronMoELayer
        new.params = {**(obj.params or {}), "grace": opts}
        return new
    if isinstance(obj, functools.partial):
        keywords = {k: _swap(v, opts, count, depth + 1) for k, v in obj.keywords.items()}
        return functools.partial(obj.func, *obj.args, **keywords)
    if isinstance(obj, (list, tuple)):
        items = [_swap(v, opts, count, depth + 1) for v in obj]
        return type(obj)(items) if isinstance(obj, list) else tuple(items)
    if type(obj).__name__ == "ModuleSpec":
        new = copy.copy(obj)
        new.submodules = _swap(obj.submodules, opts, count, depth + 1)
        return new
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            value = getattr(obj, f.name)
            if isinstance(value, (list, tuple, functools.partial)) or dataclasses.is_dataclass(value) \
                    or type(value).__name__ == "ModuleSpec" or is_moe_layer_builder(value):
                new_value = _swap(value, opts, count, depth + 1)
                if new_value is not value:
                    changes[f.name] = new_value
        return dataclasses.replace(obj, **changes) if changes else obj
    return obj


def grace_spec(spec: Any, plan: PlanSource | None = None, options: GraceMegatronOptions | Mapping[str, Any] | None = None,
               **overrides: Any) -> Any:
    """The same spec with every ``MoELayer`` replaced by :class:`GraceMegatronMoELayer`.

    Args:
        spec: a Megatron layer / block / MoE spec (ModuleSpec, functools.partial, dataclass, list).
        plan: the placement plan or its path (may also come later, via ``setup_grace(plan=...)``).
        options: :class:`GraceMegatronOptions` (or a mapping of its fields).
        **overrides: option fields (``dispatch="hierarchical"``, ``policy="grace"``, ...).

    Raises:
        GraceInputError: no ``MoELayer`` in the spec, or unknown option names.
    """
    opts = _options(plan, options, overrides)
    count = [0]
    out = _swap(spec, opts, count)
    if count[0] == 0:
        raise GraceInputError(f"no Megatron MoELayer found in the spec ({type(spec).__name__}); build it with num_experts set")
    return out


def get_grace_moe_module_spec(num_experts: int, plan: PlanSource | None = None, use_te: bool = False, **overrides: Any) -> Any:
    """A GRACE MoE module spec (``SequentialMLP`` experts, Megatron's ``TopKRouter``).

    Args:
        num_experts: experts per MoE layer.
        plan: placement plan or path.
        use_te: Transformer Engine linear layers for the experts (False = Megatron's local layers).
        **overrides: :class:`GraceMegatronOptions` fields.
    """
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    return grace_spec(get_moe_module_spec(use_te=use_te, num_experts=num_experts, moe_grouped_gemm=False), plan=plan, **overrides)
