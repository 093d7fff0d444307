"""Access to the optional compiled ops (``torch.ops.grace``) with a pure-torch fallback.

``GRACE_OPS`` selects the implementation for every op: ``auto`` (default: the CUDA kernel for
CUDA tensors and the C++ kernel for CPU tensors when the extension ``megatron_grace._C`` is
built with them, else pure torch), ``torch`` (always pure torch), ``native`` (the compiled
kernel for the tensor's device, or a ``RuntimeError``).

Ops (schemas are defined once, in ``csrc/grace_ops.cpp``):

- ``destination_histogram(dest [n], D) -> counts [D]``
- ``sort_by_key(key [n], K) -> (order [n], counts [K])`` (stable)
- ``permute_by_key(x [N, ...], key [n], K, r) -> (out [n, ...], position [n], counts [K])`` (fused
  histogram + stable positions + row gather; item ``i`` reads row ``i // r``)
- ``gather_rows(x [N, ...], index [m], order [n]?) -> [n, ...]`` (permute into the send buffer)
- ``scatter_rows(y [n, ...], order [n]) -> [n, ...]`` (un-permute)
- ``weighted_combine(values, row, pos, weight, R, width, out_dtype, value_index?) -> [R, h]``
- ``grace_choose_copies(topk_ids [T, k], src [T], hosts [E, R], copies [E], spare [G], pred [G], params [3], gpn, offload) -> [T, k]``

**No host synchronisation** on CUDA, in the compiled kernels and in the pure-torch references
alike: no ``.item()``, no ``nonzero``/boolean-mask indexing, no ``bincount``, no data-dependent
output shapes, so the ops run ahead of the host and can be captured in CUDA graphs. Values (ids,
keys, indices) are therefore validated only in **debug mode** (``GRACE_DEBUG=1`` or
:func:`set_debug`): the wrappers then check them on the host (a sync) and raise ``RuntimeError``
naming the op, the argument and the allowed range, before any kernel runs, on CPU and CUDA alike.
Without debug mode the CUDA kernels fire a device-side assert on an out-of-range value and skip
the element (they never read or write out of bounds), the C++ CPU kernels raise, and the
pure-torch references skip (histograms) or fail as torch's own indexing does.

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
_OP_NAMES = ("destination_histogram", "sort_by_key", "permute_by_key", "gather_rows", "scatter_rows", "weighted_combine",
             "grace_choose_copies")

from megatron_grace._debug import debug_enabled, set_debug  # noqa: E402,F401 - the package's one debug switch, re-exported


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


# Ops whose C++ CPU kernel is not faster than torch (benchmarks/results/kernels.json: gather_rows 0.56x at
# 1024 and 0.88x at 4096 tokens, bf16, hidden 1024): ``GRACE_OPS=auto`` keeps torch's index_select for them on CPU.
TORCH_FASTER_ON_CPU = frozenset({"gather_rows"})


@torch.compiler.assume_constant_result  # a fixed property of the build: torch.compile bakes it in (no graph break)
def native_for(device: torch.device | str, op: str = "gather_rows") -> bool:
    """Whether ``op`` runs compiled for tensors on ``device``: per ``GRACE_OPS``, the extension and its kernels
    (in ``auto`` mode not for :data:`TORCH_FASTER_ON_CPU` on CPU).

    Raises ``RuntimeError`` under ``GRACE_OPS=native`` when there is no kernel for that device.
    """
    if not use_native():
        return False
    device_type = torch.device(device).type
    if device_type == "cpu" and op in TORCH_FASTER_ON_CPU and ops_mode() == "auto":
        return False
    if has_kernel(device_type, op):
        return True
    if ops_mode() == "native":
        raise RuntimeError(f"GRACE_OPS=native but megatron_grace._C has no {device_type.upper()} kernel for grace::{op} "
                           f"(the CUDA kernels are built only where torch has CUDA and nvcc is found)")
    return False


# ---------------------------------------------------------------------------------------------- debug checks
# Host reads of device values: these run only in debug mode (a synchronisation on a GPU).


def _check_range(op: str, name: str, t: torch.Tensor, lo: int, hi: int) -> None:
    """Raise ``RuntimeError`` naming ``op``, ``name`` and ``[lo, hi)`` if a value of ``t`` is outside."""
    if t.numel() == 0:
        return
    v = t.reshape(-1).long()
    bad = (v < lo) | (v >= hi)
    if bool(bad.any()):
        first = int(v[bad][0])
        raise RuntimeError(f"{op}: {name} value {first} out of range [{lo}, {hi})")


def _check_permutation(op: str, name: str, order: torch.Tensor, n: int) -> None:
    _check_range(op, name, order, 0, n)
    counts = torch.bincount(order.reshape(-1).long(), minlength=n)
    if n and bool((counts != 1).any()):
        value = int(torch.argmax((counts > 1).to(torch.uint8)))
        raise RuntimeError(f"{op}: {name} must be a permutation of [0, {n}), value {value} repeats")


def _check_int_1d(op: str, name: str, t: torch.Tensor) -> None:
    """Metadata only (no sync): a 1-D integer tensor."""
    if t.dim() != 1 or t.dtype not in (torch.int16, torch.int32, torch.int64):
        raise RuntimeError(f"{op}: {name} must be a 1-D integer tensor, got {t.dim()}-D {t.dtype}")


# ---------------------------------------------------------------------------------------------- pure-torch references
# Sync-free on CUDA: scatter_add_/scatter_/index_select/sort only, fixed output shapes.


def _histogram_torch(v: torch.Tensor, bins: int) -> torch.Tensor:
    """int64 ``[bins]`` counts of the values in ``[0, bins)``; other values are dropped (not counted)."""
    v = v.reshape(-1).long()
    valid = (v >= 0) & (v < bins)
    slot = torch.where(valid, v, torch.full_like(v, bins))  # bins = a trash bin
    out = torch.zeros(bins + 1, dtype=torch.int64, device=v.device)
    out.scatter_add_(0, slot, torch.ones_like(slot))
    return out[:bins]


def _weighted_combine_torch(values: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, num_rows: int,
                            width: int, out_dtype: torch.dtype, value_index: torch.Tensor | None) -> torch.Tensor:
    """The reference of ``grace::weighted_combine``: a ``[R, width]`` entry table (entries with
    ``value_index == -1`` or out-of-range fields left out), then ``width`` gathers accumulated in
    float32 (float64 for float64 values) in position order, exactly as
    :func:`megatron_grace.dispatch.permute.padded_weighted_sum_torch`."""
    acc = torch.promote_types(values.dtype, torch.float32)
    width = max(width, 1)
    n, m, h = row.numel(), values.shape[0], values.shape[1]
    dev = values.device
    row, pos = row.long(), pos.long()
    vrow = value_index.long() if value_index is not None else torch.arange(n, device=dev)
    valid = (vrow >= 0) & (vrow < m) & (row >= 0) & (row < num_rows) & (pos >= 0) & (pos < width)
    slots = num_rows * width
    slot = torch.where(valid, row * width + pos, torch.full_like(row, slots))  # slots = a trash slot
    table = torch.full((slots + 1,), n, dtype=torch.int64, device=dev)  # n = the zero entry
    table.scatter_(0, slot, torch.arange(n, device=dev))
    table = table[:slots].view(num_rows, width)
    vrow_ext = torch.cat([torch.where(valid, vrow, torch.full_like(vrow, m)), vrow.new_full((1,), m)])  # m = the zero row
    ext = torch.cat([values.to(acc), values.new_zeros((1, h), dtype=acc)])
    w_ext = torch.cat([weight.to(acc).reshape(-1), weight.new_zeros(1, dtype=acc)])
    out = torch.zeros(num_rows, h, dtype=acc, device=dev)
    for j in range(width):  # positions (<= top-k or node count), not tokens
        p = table[:, j]
        out += w_ext.index_select(0, p)[:, None] * ext.index_select(0, vrow_ext.index_select(0, p))
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------- ops


def destination_histogram(dest: torch.Tensor, num_destinations: int) -> torch.Tensor:
    """Count entries per destination.

    Args:
        dest: int32/int64 ``[n]`` with values in ``[-1, num_destinations)``; -1 = dropped.
        num_destinations: number of bins.

    Returns:
        int64 ``[num_destinations]``.
    """
    if debug_enabled():
        _check_range("destination_histogram", "dest", dest, -1, num_destinations)
    if native_for(dest.device, "destination_histogram"):
        return torch.ops.grace.destination_histogram(dest, num_destinations)
    return _histogram_torch(dest, num_destinations)


def sort_by_key(key: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort by a small integer key (a counting sort in the C++ and CUDA kernels).

    Args:
        key: int ``[n]`` with values in ``[0, num_keys)``.
        num_keys: K.

    Returns:
        ``(order, counts)``: int64 ``[n]`` input index of each sorted position (equal keys keep
        input order, as ``torch.sort(key, stable=True).indices``) and int64 ``[K]`` entries per key.
    """
    if debug_enabled():
        _check_range("sort_by_key", "key", key, 0, num_keys)
    if native_for(key.device, "sort_by_key"):
        return torch.ops.grace.sort_by_key(key, num_keys)
    key = key.long()
    return torch.sort(key, stable=True).indices, _histogram_torch(key, num_keys)


def permute_by_key(x: torch.Tensor, key: torch.Tensor, num_keys: int, items_per_row: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused dispatch permute: stable sort of items by key and the row gather, in one op.

    Item ``i`` reads row ``i // items_per_row`` of ``x`` (``items_per_row`` = top-k for token rows).

    Args:
        x: ``[N, ...]`` rows, any dtype.
        key: int ``[n]`` with values in ``[0, num_keys)``, ``n <= N * items_per_row``.
        num_keys: K.
        items_per_row: r >= 1.

    Returns:
        ``(out, position, counts)``: ``out [n, ...]`` with ``out[position[i]] = x[i // r]`` (items
        grouped by ascending key, equal keys in item order), int64 ``position [n]`` the sorted index
        of each item (the inverse of :func:`sort_by_key`'s order), int64 ``counts [K]`` items per key.
    """
    op = "permute_by_key"
    _check_int_1d(op, "key", key)
    if items_per_row < 1:
        raise RuntimeError(f"{op}: items_per_row must be >= 1, got {items_per_row}")
    n = key.shape[0]
    if n and (n - 1) // items_per_row >= x.shape[0]:
        raise RuntimeError(f"{op}: {n} items at {items_per_row} per row need {-(-n // items_per_row)} rows of x, x has {x.shape[0]}")
    if debug_enabled():
        _check_range(op, "key", key, 0, num_keys)
    if native_for(x.device, op):
        return torch.ops.grace.permute_by_key(x, key, num_keys, items_per_row)
    key = key.long()
    order = torch.sort(key, stable=True).indices
    position = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=key.device))
    out = x.index_select(0, torch.div(order, items_per_row, rounding_mode="floor"))
    return out, position, _histogram_torch(key, num_keys)


def gather_rows(x: torch.Tensor, index: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """Permute: ``out[i] = x[index[order[i]]]`` (or ``x[index[i]]`` without ``order``).

    Args:
        x: ``[N, ...]`` rows (e.g. hidden states ``[T, h]``), any dtype.
        index: int ``[m]`` row of ``x`` per item, in ``[0, N)``.
        order: optional int ``[n]`` items in send order (e.g. :func:`sort_by_key`'s order), in ``[0, m)``.

    Returns:
        ``[n, ...]`` (``n = m`` without ``order``), the send buffer.
    """
    if debug_enabled():
        if order is not None:
            _check_range("gather_rows", "order", order, 0, index.shape[0])
            _check_range("gather_rows", "index", index.long().index_select(0, order.long()), 0, x.shape[0])
        else:
            _check_range("gather_rows", "index", index, 0, x.shape[0])
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
    if debug_enabled():
        _check_permutation("scatter_rows", "order", order, y.shape[0])
    if native_for(y.device, "scatter_rows"):
        return torch.ops.grace.scatter_rows(y, order)
    return torch.empty_like(y).index_copy_(0, order.long(), y)


def weighted_combine(values: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, num_rows: int, width: int,
                     out_dtype: torch.dtype, value_index: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic segmented weighted sum ``out[r] = sum_{p: row[p] = r} weight[p] * values[value_index[p] or p]``.

    Terms of one output row are added in ascending ``pos`` (0, 1, ...) in float32 (float64 for
    float64 values); no atomics, so the result does not depend on threads or launch shape, and the
    C++, CUDA and pure-torch paths are bit-identical.

    Args:
        values: ``[m, h]`` float32/bfloat16/float16/float64 rows.
        row: int ``[n]`` output row per entry, in ``[0, num_rows)``.
        pos: int ``[n]`` position of the entry inside its row, in ``[0, width)``, unique per row.
        weight: float ``[n]``.
        num_rows: R.
        width: positions per row (top-k, node count, ...).
        out_dtype: dtype of the result.
        value_index: optional int ``[n]`` row of ``values`` per entry, in ``[-1, m)`` (fuses an
            un-permute); -1 = no term (a dropped pair of a dense layout: its row and pos are
            ignored). Without it ``m == n`` and entry ``p`` uses ``values[p]``.

    Returns:
        ``[R, h]`` in ``out_dtype``; rows without entries are 0.
    """
    op = "weighted_combine"
    if debug_enabled():
        m, w = values.shape[0], max(width, 1)
        active_row, active_pos = row.long(), pos.long()
        if value_index is not None:
            _check_range(op, "value_index", value_index, -1, m)
            keep = value_index.long() != -1
            active_row, active_pos = active_row[keep], active_pos[keep]
        _check_range(op, "row", active_row, 0, num_rows)
        _check_range(op, "pos", active_pos, 0, w)
        if active_row.numel():
            slots, counts = torch.unique(active_row * w + active_pos, return_counts=True)
            if bool((counts > 1).any()):
                dup = int(slots[counts > 1][0])
                raise RuntimeError(f"{op}: two entries share row {dup // w} and pos {dup % w}")
    if native_for(values.device, op):
        return torch.ops.grace.weighted_combine(values, row, pos, weight, num_rows, width, out_dtype, value_index)
    return _weighted_combine_torch(values, row, pos, weight, num_rows, width, out_dtype, value_index)


def grace_choose_copies(topk_ids: torch.Tensor, src_gpu: torch.Tensor, hosts: torch.Tensor, copies: torch.Tensor, spare: torch.Tensor,
                        pred: torch.Tensor, params: torch.Tensor, gpus_per_node: int, offload: bool) -> torch.Tensor:
    """The ``grace`` replica choice (see :mod:`megatron_grace.routing.policies`) for every pair.

    Args:
        topk_ids: int ``[T, k]`` experts in ``[-1, E)``, -1 = dropped.
        src_gpu: int ``[T]`` GPU of each token, in ``[0, G)``.
        hosts: int64 ``[E, R]`` GPUs of each expert's copies, -1 padded at the end.
        copies: int64 ``[E]`` copy counts.
        spare: float64 ``[G]`` spare capacity per GPU (the quota weights, > 0).
        pred: float64 ``[G]`` predicted load per GPU.
        params: float64 ``[3]`` on the tensors' device: ``(step, mean, hot_threshold)`` -- the
            forward-pass counter (an integer value), the mean predicted load and
            ``offload_threshold * mean``. A tensor, so the kernel reads them on the device.
        gpus_per_node: GPUs per node (GPUs numbered node-major).
        offload: whether the local copy may be given up for a roomier same-node copy.

    Returns:
        int64 ``[T, k]``: the copy index; -1 for dropped pairs, 0 for single-copy experts. Dropped
        pairs take no part in any other pair's group rank.
    """
    op = "grace_choose_copies"
    if params.dim() != 1 or params.numel() != 3:
        raise RuntimeError(f"{op}: params must be a float64 tensor [3] = (step, mean, hot_threshold), got shape {tuple(params.shape)}")
    if debug_enabled():
        E, G = hosts.shape[0], spare.shape[0]
        _check_range(op, "topk_ids", topk_ids, -1, E)
        _check_range(op, "src_gpu", src_gpu, 0, G)
        _check_range(op, "hosts", hosts, -1, G)
    if native_for(topk_ids.device, op):
        return torch.ops.grace.grace_choose_copies(topk_ids, src_gpu, hosts, copies, spare, pred, params, gpus_per_node, offload)
    from megatron_grace.routing.policies import grace_choose_copies_torch

    return grace_choose_copies_torch(topk_ids.long(), src_gpu.long(), hosts, copies, spare, pred, params, gpus_per_node, offload)


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

    @reg("grace::permute_by_key")
    def _(x, key, num_keys, items_per_row):
        n = key.shape[0]
        return (x.new_empty((n, *x.shape[1:])), key.new_empty((n,), dtype=torch.int64),
                key.new_empty((num_keys,), dtype=torch.int64))

    @reg("grace::gather_rows")
    def _(x, index, order=None):
        n = order.shape[0] if order is not None else index.shape[0]
        return x.new_empty((n, *x.shape[1:]))

    @reg("grace::scatter_rows")
    def _(y, order):
        return torch.empty_like(y, memory_format=torch.contiguous_format)

    @reg("grace::weighted_combine")
    def _(values, row, pos, weight, num_rows, width, out_dtype, value_index=None):
        return values.new_empty((num_rows, values.shape[1]), dtype=out_dtype)

    @reg("grace::grace_choose_copies")
    def _(topk_ids, src_gpu, hosts, copies, spare, pred, params, gpus_per_node, offload):
        return topk_ids.new_empty(topk_ids.shape, dtype=torch.int64)
