"""Access to the optional compiled ops (``torch.ops.grace``) with a pure-torch fallback.

``GRACE_OPS`` selects the implementation for every op: ``auto`` (default: the CUDA kernel for
CUDA tensors and the C++ kernel for CPU tensors when the extension ``megatron_grace._C`` is
built with them, else pure torch), ``torch`` (always pure torch), ``native`` (the compiled
kernel for the tensor's device, or a ``RuntimeError``).

Ops (schemas are defined once, in ``csrc/grace_ops.cpp``):

- ``destination_histogram(dest [n], D) -> counts [D]``
- ``sort_by_key(key [n], K) -> (order [n], counts [K])`` (stable)
- ``gather_rows(x [N, ...], index [m], order [n]?) -> [n, ...]`` (permute into the send buffer)
- ``scatter_rows(y [n, ...], order [n]) -> [n, ...]`` (un-permute)
- ``weighted_combine(values, row, pos, weight, R, width, out_dtype, value_index?) -> [R, h]``
- ``grace_choose_copies(topk_ids [T, k], src [T], hosts [E, R], copies [E], spare [G], pred [G], ...) -> [T, k]``

Every compiled op returns exactly what its pure-torch reference returns (integers; floats are
bit-identical because both sides add the same float32 terms in the same order without FMA).
Fake (meta) implementations are registered here so ``torch.compile`` can trace the ops. The ops
have **no autograd formulas**: the GRACE layer is inference-only, so calling them on tensors that
require grad under autograd raises (use ``GRACE_OPS=torch`` to differentiate through the layer).
"""

from __future__ import annotations

import os

import torch

_LOADED: bool | None = None
_OP_NAMES = ("destination_histogram", "sort_by_key", "gather_rows", "scatter_rows", "weighted_combine", "grace_choose_copies")


def extension_available() -> bool:
    """True when ``megatron_grace._C`` is built and all its ops are registered."""
    global _LOADED
    if _LOADED is None:
        try:
            from megatron_grace import _C  # noqa: F401

            _LOADED = all(hasattr(torch.ops.grace, name) for name in _OP_NAMES)
        except ImportError:
            _LOADED = False
        if _LOADED:
            _register_fakes()
    return _LOADED


def has_kernel(device_type: str, op: str = "gather_rows") -> bool:
    """Whether the built extension has a kernel of ``op`` for ``device_type`` (``"cpu"`` or ``"cuda"``)."""
    if not extension_available():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"grace::{op}", key)


def ops_mode() -> str:
    """The ``GRACE_OPS`` setting: ``auto``, ``torch`` or ``native``."""
    mode = os.environ.get("GRACE_OPS", "auto")
    if mode not in ("auto", "torch", "native"):
        raise ValueError(f"GRACE_OPS must be auto, torch or native, got {mode!r}")
    return mode


def use_native() -> bool:
    """Whether the compiled ops should be used at all (raises if forced but not built)."""
    mode = ops_mode()
    if mode == "torch":
        return False
    available = extension_available()
    if mode == "native" and not available:
        raise RuntimeError("GRACE_OPS=native but the megatron_grace._C extension is not built")
    return available


def native_for(device: torch.device | str, op: str = "gather_rows") -> bool:
    """Whether ``op`` runs compiled for tensors on ``device``: per ``GRACE_OPS``, the extension and its kernels.

    Raises ``RuntimeError`` under ``GRACE_OPS=native`` when there is no kernel for that device.
    """
    if not use_native():
        return False
    device_type = torch.device(device).type
    if has_kernel(device_type, op):
        return True
    if ops_mode() == "native":
        raise RuntimeError(f"GRACE_OPS=native but megatron_grace._C has no {device_type.upper()} kernel for grace::{op} "
                           f"(the CUDA kernels are built only where torch has CUDA and nvcc is found)")
    return False


# ---------------------------------------------------------------------------------------------- ops


def destination_histogram(dest: torch.Tensor, num_destinations: int) -> torch.Tensor:
    """Count entries per destination.

    Args:
        dest: int32/int64 ``[n]`` with values in ``[-1, num_destinations)``; -1 = dropped.
        num_destinations: number of bins.

    Returns:
        int64 ``[num_destinations]``.
    """
    if native_for(dest.device, "destination_histogram"):
        return torch.ops.grace.destination_histogram(dest, num_destinations)
    if dest.numel() and (int(dest.min()) < -1 or int(dest.max()) >= num_destinations):
        raise RuntimeError(f"destination_histogram: value out of range [-1, {num_destinations})")
    kept = dest[dest >= 0].long()
    return torch.bincount(kept, minlength=num_destinations)[:num_destinations]


def sort_by_key(key: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort by a small integer key (a counting sort in the C++ kernel).

    Args:
        key: int ``[n]`` with values in ``[0, num_keys)``.
        num_keys: K.

    Returns:
        ``(order, counts)``: int64 ``[n]`` input index of each sorted position (equal keys keep
        input order, as ``torch.sort(key, stable=True).indices``) and int64 ``[K]`` entries per key.
    """
    if native_for(key.device, "sort_by_key"):
        return torch.ops.grace.sort_by_key(key, num_keys)
    key = key.long()
    if key.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=key.device), torch.zeros(num_keys, dtype=torch.int64, device=key.device)
    if int(key.min()) < 0 or int(key.max()) >= num_keys:
        raise RuntimeError(f"sort_by_key: key out of range [0, {num_keys})")
    return torch.sort(key, stable=True).indices, torch.bincount(key, minlength=num_keys)


def gather_rows(x: torch.Tensor, index: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """Permute: ``out[i] = x[index[order[i]]]`` (or ``x[index[i]]`` without ``order``).

    Args:
        x: ``[N, ...]`` rows (e.g. hidden states ``[T, h]``), any dtype.
        index: int ``[m]`` row of ``x`` per item, in ``[0, N)``.
        order: optional int ``[n]`` items in send order (e.g. :func:`sort_by_key`'s order).

    Returns:
        ``[n, ...]`` (``n = m`` without ``order``), the send buffer.
    """
    if native_for(x.device, "gather_rows"):
        return torch.ops.grace.gather_rows(x, index, order)
    idx = index.long() if order is None else index.long().index_select(0, order.long())
    return x.index_select(0, idx)


def scatter_rows(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Un-permute: ``out[order[i]] = y[i]``.

    Args:
        y: ``[n, ...]`` rows in sorted order.
        order: int ``[n]``, a permutation of ``[0, n)``.

    Returns:
        ``[n, ...]`` in the original order.
    """
    if native_for(y.device, "scatter_rows"):
        return torch.ops.grace.scatter_rows(y, order)
    out = torch.empty_like(y)
    out[order.long()] = y
    return out


def weighted_combine(values: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, num_rows: int, width: int,
                     out_dtype: torch.dtype, value_index: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic segmented weighted sum ``out[r] = sum_{p: row[p] = r} weight[p] * values[value_index[p] or p]``.

    Terms of one output row are added in ascending ``pos`` (0, 1, ...) in float32 (float64 for
    float64 values); no atomics, so the result does not depend on threads or launch shape.

    Args:
        values: ``[m, h]`` float32/bfloat16/float16/float64 rows.
        row: int ``[n]`` output row per entry, in ``[0, num_rows)``.
        pos: int ``[n]`` position of the entry inside its row, in ``[0, width)``, unique per row.
        weight: float ``[n]``.
        num_rows: R.
        width: positions per row (top-k, node count, ...).
        out_dtype: dtype of the result.
        value_index: optional int ``[n]`` row of ``values`` per entry (fuses an un-permute);
            without it ``m == n`` and entry ``p`` uses ``values[p]``.

    Returns:
        ``[R, h]`` in ``out_dtype``; rows without entries are 0.
    """
    if native_for(values.device, "weighted_combine"):
        return torch.ops.grace.weighted_combine(values, row, pos, weight, num_rows, width, out_dtype, value_index)
    from megatron_grace.dispatch.permute import padded_weighted_sum_torch

    if value_index is not None:
        values = values.index_select(0, value_index.long())
    return padded_weighted_sum_torch(values, row.long(), pos.long(), weight, num_rows, width, out_dtype)


def grace_choose_copies(topk_ids: torch.Tensor, src_gpu: torch.Tensor, hosts: torch.Tensor, copies: torch.Tensor, spare: torch.Tensor,
                        pred: torch.Tensor, gpus_per_node: int, step: int, mean: float, hot_threshold: float, offload: bool) -> torch.Tensor:
    """The ``grace`` replica choice (see :mod:`megatron_grace.routing.policies`) for every pair.

    Args:
        topk_ids: int ``[T, k]`` experts, -1 = dropped.
        src_gpu: int ``[T]`` GPU of each token.
        hosts: int64 ``[E, R]`` GPUs of each expert's copies, -1 padded at the end.
        copies: int64 ``[E]`` copy counts.
        spare: float64 ``[G]`` spare capacity per GPU (the quota weights, > 0).
        pred: float64 ``[G]`` predicted load per GPU.
        gpus_per_node: GPUs per node (GPUs numbered node-major).
        step: forward-pass counter.
        mean: mean predicted load; hot_threshold: ``offload_threshold * mean``.
        offload: whether the local copy may be given up for a roomier same-node copy.

    Returns:
        int64 ``[T, k]``: the copy index; -1 for dropped pairs, 0 for single-copy experts.
    """
    if native_for(topk_ids.device, "grace_choose_copies"):
        return torch.ops.grace.grace_choose_copies(topk_ids, src_gpu, hosts, copies, spare, pred, gpus_per_node, step, mean,
                                                   hot_threshold, offload)
    from megatron_grace.routing.policies import grace_choose_copies_torch

    return grace_choose_copies_torch(topk_ids.long(), src_gpu.long(), hosts, copies, spare, pred, gpus_per_node, step, mean,
                                     hot_threshold, offload)


# ---------------------------------------------------------------------------------------------- fakes

_FAKES_REGISTERED = False


def _register_fakes() -> None:
    """Shape-only implementations so ``torch.compile`` can trace the compiled ops (no data-dependent shapes)."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED or not hasattr(torch, "library") or not hasattr(torch.library, "register_fake"):
        return
    _FAKES_REGISTERED = True
    reg = torch.library.register_fake

    @reg("grace::destination_histogram")
    def _(dest, num_destinations):
        return dest.new_empty((num_destinations,), dtype=torch.int64)

    @reg("grace::sort_by_key")
    def _(key, num_keys):
        return key.new_empty((key.shape[0],), dtype=torch.int64), key.new_empty((num_keys,), dtype=torch.int64)

    @reg("grace::gather_rows")
    def _(x, index, order=None):
        n = order.shape[0] if order is not None else index.shape[0]
        return x.new_empty((n, *x.shape[1:]))

    @reg("grace::scatter_rows")
    def _(y, order):
        return torch.empty_like(y)

    @reg("grace::weighted_combine")
    def _(values, row, pos, weight, num_rows, width, out_dtype, value_index=None):
        return values.new_empty((num_rows, values.shape[1]), dtype=out_dtype)

    @reg("grace::grace_choose_copies")
    def _(topk_ids, src_gpu, hosts, copies, spare, pred, gpus_per_node, step, mean, hot_threshold, offload):
        return topk_ids.new_empty(topk_ids.shape, dtype=torch.int64)
