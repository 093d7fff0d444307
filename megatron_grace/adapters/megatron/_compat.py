"""Megatron-Core version detection and the few API differences the adapter bridges.

Feature detection only (no version-number branches), for megatron-core 0.16.x and 0.19.x:

- layer specs: 0.16 ``ModuleSpec(module=MoELayer, submodules=...)``, 0.19
  ``functools.partial(MoELayer, submodules=...)`` (:func:`is_moe_layer_builder`, :mod:`.spec`);
- ``MoELayer.__init__`` gains ``is_mtp_layer`` and ``name`` in 0.19 (passed through);
- the router returns ``(probs [T, E], routing_map bool [T, E])`` (``TopKRouter``) or, for 0.19's
  ``InferenceTopKRouter`` in inference mode, ``(probs [T, k], indices [T, k])``
  (:func:`router_output_to_topk`);
- the experts' builder: 0.16 a ``ModuleSpec`` for ``build_module``, 0.19 a callable
  ``(num_local_experts, config, pg_collection=...)`` (:func:`build_experts`);
- 0.16's ``TransformerLayer`` passes ``pg_collection`` only to exact Megatron MLP classes (a
  subclass uses ``parallel_state``'s groups, the same ones by default; ``patches/`` fixes it).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import torch

from megatron_grace.errors import GraceInputError

PINNED_VERSION = "0.16.1"  # the release the patch in patches/ is made against


def megatron_core_version() -> str | None:
    """The installed megatron-core version string, or None when it is not installed."""
    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        pass
    try:
        from megatron.core import package_info  # type: ignore[import-not-found]

        return str(package_info.__version__)
    except Exception:  # noqa: BLE001 - not installed or unusual layout
        return None


def require_megatron() -> None:
    """Raise GraceInputError with an install hint unless ``megatron.core`` imports."""
    try:
        import megatron.core  # noqa: F401
        from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: F401
    except ImportError as exc:
        raise GraceInputError(f"the Megatron-Core adapter needs megatron-core (pip install megatron-core): {exc}") from None


def moe_layer_class() -> type:
    """Megatron-Core's ``MoELayer``."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return MoELayer


def is_moe_layer_builder(obj: Any) -> bool:
    """Whether ``obj`` builds a Megatron ``MoELayer`` (class, ModuleSpec or functools.partial)."""
    MoELayer = moe_layer_class()
    target = obj
    if isinstance(obj, functools.partial):
        target = obj.func
    else:
        module = getattr(obj, "module", None)
        if module is not None and type(obj).__name__ == "ModuleSpec":
            target = module
    return isinstance(target, type) and issubclass(target, MoELayer)


def model_modules(model: Any) -> Iterator[torch.nn.Module]:
    """Every module of a model or of a list of virtual-pipeline chunks."""
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        yield from chunk.modules()


def build_experts(builder: Any, num_local_experts: int, config: Any, pg_collection: Any) -> Any:
    """A new expert module from the layer's ``submodules.experts`` (0.16 ``ModuleSpec`` or 0.19 builder)."""
    if type(builder).__name__ == "ModuleSpec" or isinstance(builder, type):
        from megatron.core.transformer.spec_utils import build_module

        return build_module(builder, num_local_experts, config, pg_collection=pg_collection)
    return builder(num_local_experts, config, pg_collection=pg_collection)


def router_output_to_topk(probs: torch.Tensor, routing: torch.Tensor, num_experts: int, topk: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's output as dense top-k ids and weights, on the device (one ``topk``, no sort, no host read).

    Args:
        probs: ``[T, E]`` (only read where routed) for a ``routing_map``, or ``[T, k]`` with ``indices``.
        routing: bool ``[T, E]`` routing map (``TopKRouter``) or int ``[T, k]`` expert indices
            (0.19's ``InferenceTopKRouter`` in inference mode).
        num_experts: E.
        topk: the configured k (``moe_router_topk``).

    Returns:
        ``(ids int64 [T, k], weights [T, k])``: the routed experts in ascending id order, -1
        (weight 0) where a token has fewer than k (padding tokens, dropped pairs).
    """
    if routing.dtype == torch.bool:
        routing = routing.reshape(-1, num_experts)
        p = probs.reshape(routing.shape)
        device = routing.device
        score = torch.where(routing, torch.arange(num_experts, 0, -1, device=device, dtype=torch.float32),
                            torch.zeros((), device=device))  # lower id = higher score; 0 = not routed
        val, ids = score.topk(min(int(topk), num_experts), dim=1, sorted=True)
        valid = val > 0
        ids = torch.where(valid, ids, torch.full_like(ids, -1))
        weights = torch.where(valid, p.gather(1, ids.clamp(min=0)), torch.zeros((), dtype=p.dtype, device=device))
        return ids, weights
    if routing.is_floating_point():
        raise GraceInputError(f"router returned a {routing.dtype} routing tensor; expected a bool map or int indices")
    ids = routing.reshape(-1, routing.shape[-1]).long()
    return ids, probs.reshape(ids.shape)


def transformer_layer_passes_pg_collection_to_subclasses() -> bool:
    """Whether this Megatron's ``TransformerLayer`` gives a ``MoELayer`` subclass its ``pg_collection``.

    False on an unpatched 0.16.x (the subclass then uses ``parallel_state``'s groups, which is
    what ``MoELayer`` itself does when built without one); True on 0.19.x and with
    ``patches/megatron-core-0.16.1-grace.patch`` applied.
    """
    import inspect

    from megatron.core.transformer import transformer_layer

    try:
        source = inspect.getsource(transformer_layer.TransformerLayer.__init__)
    except (OSError, TypeError):
        return False
    if "submodules.mlp.module in (MoELayer" in source:
        return False
    return True
