"""Find host synchronisations on any device: the aten calls that would block the host on a GPU.

``torch.cuda.set_sync_debug_mode`` counts synchronisations only on a CUDA device. This audit sees
the same culprits on a CPU, so CPU tests can keep the hot path free of them: it records every
aten call that, on a CUDA tensor, copies a value to the host (``item``/``int()``/``bool()``,
``nonzero``, boolean-mask indexing, ``masked_select``, ``bincount``, ``unique``,
``repeat_interleave`` without ``output_size``, copies to the CPU). Calls of
:func:`megatron_grace.dispatch.all_to_all.to_host` (the one intended copy per all-to-all) are
counted apart, by :func:`count_host_copies`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_ALWAYS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.bincount.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default, aten.masked_scatter.default,
}


def _is_bool_tensor(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bool


class SyncAudit(TorchDispatchMode):
    """Context manager: ``with SyncAudit() as audit: ...``; then ``audit.count`` and ``audit.ops`` (name -> calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        if self._syncs(func, args, kwargs):
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _syncs(func, args, kwargs) -> bool:  # noqa: ANN001
        if func in _ALWAYS:
            return True
        packet = func.overloadpacket
        if packet in (aten.index, aten._unsafe_index) and len(args) > 1:
            return any(_is_bool_tensor(i) for i in args[1] if i is not None)
        if packet in (aten.index_put, aten.index_put_, aten._index_put_impl_) and len(args) > 1:
            return any(_is_bool_tensor(i) for i in args[1] if i is not None)
        if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor:
            return kwargs.get("output_size") is None
        if packet in (aten._to_copy, aten.to) and isinstance(args[0], torch.Tensor):
            target = kwargs.get("device")
            return args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu"
        return False


@contextlib.contextmanager
def count_host_copies() -> Iterator[list[int]]:
    """Count calls of the dispatch's one intended device-to-host copy; yields a one-element list (the count)."""
    from megatron_grace.dispatch import all_to_all

    calls = [0]
    original = all_to_all.to_host

    def counted(t: torch.Tensor) -> list[int]:
        calls[0] += 1
        return original(t)

    all_to_all.to_host = counted
    try:
        yield calls
    finally:
        all_to_all.to_host = original
