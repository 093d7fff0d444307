"""Access to the optional compiled ops (``torch.ops.grace``) with a pure-torch fallback.

``GRACE_OPS`` selects the implementation: ``auto`` (default: compiled op when the extension
is built and supports the tensor's device, else pure torch), ``torch`` (always pure torch),
``native`` (compiled op or an error).
"""

from __future__ import annotations

import os

import torch

_LOADED: bool | None = None


def extension_available() -> bool:
    """True when ``megatron_grace._C`` is built and its ops are registered."""
    global _LOADED
    if _LOADED is None:
        try:
            from megatron_grace import _C  # noqa: F401

            _LOADED = hasattr(torch.ops.grace, "destination_histogram")
        except ImportError:
            _LOADED = False
    return _LOADED


def ops_mode() -> str:
    mode = os.environ.get("GRACE_OPS", "auto")
    if mode not in ("auto", "torch", "native"):
        raise ValueError(f"GRACE_OPS must be auto, torch or native, got {mode!r}")
    return mode


def use_native() -> bool:
    """Whether the compiled ops should be used (raises if forced but not built)."""
    mode = ops_mode()
    if mode == "torch":
        return False
    available = extension_available()
    if mode == "native" and not available:
        raise RuntimeError("GRACE_OPS=native but the megatron_grace._C extension is not built")
    return available


def destination_histogram(dest: torch.Tensor, num_destinations: int) -> torch.Tensor:
    """Count entries per destination.

    Args:
        dest: int32/int64 ``[n]`` with values in ``[-1, num_destinations)``; -1 = dropped.
        num_destinations: number of bins.

    Returns:
        int64 ``[num_destinations]``.
    """
    if use_native() and dest.device.type == "cpu":
        return torch.ops.grace.destination_histogram(dest, num_destinations)
    if dest.numel() and (int(dest.min()) < -1 or int(dest.max()) >= num_destinations):
        raise RuntimeError(f"destination_histogram: value out of range [-1, {num_destinations})")
    kept = dest[dest >= 0].long()
    return torch.bincount(kept, minlength=num_destinations)[:num_destinations]
