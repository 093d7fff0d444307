"""Megatron-Core version detection and the few API differences the adapter has to bridge.

Tested on megatron-core 0.16.1 and 0.19.0 (the 0.19.0 wheel installed with
``--ignore-requires-python`` on Python 3.11, plus ``triton`` which 0.19 imports; CPU/gloo; the
same tests and ``scripts/megatron_infer.py`` pass on both). The differences bridged here:

- layer specs: 0.16 uses ``ModuleSpec(module=MoELayer, submodules=MoESubmodules(...))``; 0.19
  uses ``functools.partial(MoELayer, submodules=MoESubmodules(...))`` (both handled by
  :func:`is_moe_layer_builder` and :mod:`.spec`);
- ``MoELayer.__init__`` gains ``is_mtp_layer`` and ``name`` keywords in 0.19 (passed through);
- the router returns ``(probs [T, E], routing_map bool [T, E])`` (``TopKRouter``) or, for
  0.19's ``InferenceTopKRouter`` in inference mode, ``(probs [T, k], indices int [T, k])``
  (both handled by :func:`router_output_to_topk`);
- ``TransformerLayer`` passes ``pg_collection`` to the MLP only for exact Megatron classes in
  0.16 (a subclass falls back to ``parallel_state``; ``patches/`` fixes that); 0.19 passes it to
  every MLP builder.

Everything here is feature detection; nothing compares version numbers to pick a code path.
"""

from __future__ import annotations

import functools
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
