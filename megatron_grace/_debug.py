"""The debug switch: per-step value checks on the hot path run only when it is on.

``GRACE_DEBUG=1`` in the environment (read once, at first use) or :func:`set_debug` turns on
checks that read device values on the host (a synchronisation on a GPU): expert ids and source
GPUs in range, predicted loads finite, op indices in range, plans agreeing across ranks at every
step. Off by default: untrusted inputs (plans, tables, weights) are validated once at set-up, and
the CUDA kernels guard their memory accesses with device-side asserts.
"""

from __future__ import annotations

import os

_override: bool | None = None


def debug_enabled() -> bool:
    """Whether per-step checks run (``GRACE_DEBUG=1`` or :func:`set_debug(True) <set_debug>`)."""
    if _override is not None:
        return _override
    return os.environ.get("GRACE_DEBUG", "0").strip().lower() in ("1", "true", "yes", "on")


def set_debug(enabled: bool | None) -> None:
    """Force the debug switch on or off; ``None`` goes back to the ``GRACE_DEBUG`` environment variable."""
    global _override
    _override = enabled
