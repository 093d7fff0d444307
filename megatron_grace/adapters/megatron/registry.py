"""Runtime registration: make Megatron-Core's own spec builders produce GRACE MoE layers.

For code that builds its specs inside Megatron (Megatron-LM's ``pretrain_gpt.py``, inference
servers calling ``get_gpt_decoder_block_spec`` / ``get_gpt_layer_local_spec`` /
``get_gpt_layer_with_transformer_engine_spec``), without editing Megatron's files::

    import megatron_grace.adapters.megatron as grace
    grace.register(plan="plan.json", dispatch="hierarchical")
    ...  # build the model as usual; load the checkpoint
    grace.setup_grace(model)  # every rank, after loading: GRACE from now on

:func:`register` wraps ``megatron.core.models.gpt.moe_module_specs.get_moe_module_spec_for_backend``
(and rebinds it in every loaded ``megatron`` module that imported it by name), so every MoE spec
built afterwards has :class:`GraceMegatronMoELayer` in place of ``MoELayer``.
:func:`unregister` restores Megatron's function. Specs built before :func:`register` are not
changed (use :func:`~megatron_grace.adapters.megatron.grace_spec` on them).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from megatron_grace.adapters.megatron.options import GraceMegatronOptions, PlanSource
from megatron_grace.adapters.megatron.spec import _options, grace_spec

_TARGET = "get_moe_module_spec_for_backend"
_state: dict[str, Any] = {"original": None, "wrapper": None, "options": None}


def _rebind(old: Any, new: Any) -> int:
    count = 0
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "megatron" or name.startswith("megatron.")):
            continue
        if getattr(module, _TARGET, None) is old:
            setattr(module, _TARGET, new)
            count += 1
    return count


def register(plan: PlanSource | None = None, options: GraceMegatronOptions | Mapping[str, Any] | None = None,
             **overrides: Any) -> GraceMegatronOptions:
    """Install GRACE into Megatron-Core's MoE spec builders (idempotent; a second call updates the options).

    Args:
        plan: placement plan or path used by every GRACE layer built from now on.
        options: :class:`GraceMegatronOptions` or a mapping of its fields.
        **overrides: option fields (``dispatch``, ``policy``, ``layer_map``, ...).

    Returns:
        The options now in force.
    """
    from megatron.core.models.gpt import moe_module_specs

    opts = _options(plan, options, overrides)
    _state["options"] = opts
    if _state["wrapper"] is None:
        original = getattr(moe_module_specs, _TARGET)

        def get_moe_module_spec_for_backend(*args: Any, **kwargs: Any) -> Any:
            return grace_spec(original(*args, **kwargs), options=_state["options"])

        get_moe_module_spec_for_backend.__doc__ = (original.__doc__ or "") + "\n\n(GRACE: MoELayer replaced by GraceMegatronMoELayer)"
        get_moe_module_spec_for_backend.__wrapped__ = original  # type: ignore[attr-defined]
        _state["original"], _state["wrapper"] = original, get_moe_module_spec_for_backend
        _rebind(original, get_moe_module_spec_for_backend)
    return opts


def unregister() -> None:
    """Restore Megatron's spec builder (GRACE layers already built keep working)."""
    if _state["wrapper"] is not None:
        _rebind(_state["wrapper"], _state["original"])
    _state.update(original=None, wrapper=None, options=None)


def is_registered() -> bool:
    """Whether :func:`register` is in force."""
    return _state["wrapper"] is not None


def registered_options() -> GraceMegatronOptions | None:
    """The options of :func:`register`, or None."""
    return _state["options"]
