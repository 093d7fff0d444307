"""Replica-choice policies: map a rank's router output to one copy per (token, expert) pair.

Every policy is one vectorized pass over all pairs (no Python loop over tokens)::

    copy = choose_copies(policy, topk_ids [T, k], src_gpu [T], table, ...)   # int64 [T, k]
    gpu  = table.hosts[topk_ids, copy]                                          # via copy_destinations

``copy`` is the index into the expert's row of :class:`ReplicaTable` (``-1`` exactly where
``topk_ids`` is ``-1``, a dropped pair). Policies only pick *which copy*: the set of experts a
token reaches never changes, so the model output is unchanged.

Policies (:data:`POLICY_NAMES`):

- ``primary``: always copy 0 (no replication benefit; a reference).
- ``random``: a uniform random copy per pair (SGLang ``dynamic``); seeded by ``(seed, step)``.
- ``position``: token position mod copy count (vLLM).
- ``static-local``: the copy on the token's GPU, else one on its node, else a fixed spread;
  the choice depends only on (source GPU, expert), as SGLang's ``static`` per-rank map.
- ``grace``: tiers as ``static-local`` (own GPU, else own node, else remote); inside a tier the
  pairs of one (expert, source GPU) group are spread over the candidate copies in proportion
  to the *spare capacity* of their GPUs under the load predictor,
  ``spare_g = (1 + headroom) * max(pred) - pred_g``, deterministically: pair ``r`` of the group
  (in token order) takes the candidate whose share of the cumulative quotas contains
  ``u_r = frac(offset + (r + 1/2) * phi)`` (a golden-ratio low-discrepancy sequence; ``offset``
  depends on expert, source GPU and step only), so a batch's load lands where the predictor
  says there is room, with no randomness. Beyond the paper: the local copy is given up for
  the node tier when the local GPU is predicted to be the bottleneck
  (``pred[src] > offload_threshold * mean(pred)``) and a same-node copy sits below the mean.

``grace`` runs the compiled ``grace::grace_choose_copies`` kernel (C++ on CPU tensors, CUDA on
GPU tensors) when :mod:`megatron_grace._ops` selects it; it returns exactly the integers of the
pure-torch code (:func:`grace_choose_copies_torch`), which stays the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_grace import _ops
from megatron_grace._debug import debug_enabled
from megatron_grace._segments import rank_in_group
from megatron_grace.errors import GraceInputError
from megatron_grace.routing.replica_table import ReplicaTable

from megatron_grace.names import POLICY_NAMES  # noqa: E402  (the names live in the light vocabulary module)

_PHI = 0.6180339887498949  # golden ratio conjugate
_R2_A, _R2_B = 0.7548776662466927, 0.5698402909980532  # plastic-number (R2) sequence constants


@dataclass(frozen=True)
class RoutingOptions:
    """Knobs of the ``grace`` policy.

    Attributes:
        headroom: spare capacity is measured up to ``(1 + headroom) * max(predicted load)``;
            larger values spread more evenly, smaller ones fill the emptiest GPUs first.
            Default 0.25.
        offload_threshold: leave the local copy for the node tier when the local GPU's predicted
            load exceeds this multiple of the mean and a same-node copy is below the mean;
            ``inf`` disables (the paper's behaviour). Default 1.3.
    """

    headroom: float = 0.25
    offload_threshold: float = 1.3


def _check_inputs(topk_ids: torch.Tensor, src_gpu: torch.Tensor | int, table: ReplicaTable) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids int64 [T, k], src int64 [T])``; shapes are always checked, values only in debug mode (they need a host sync)."""
    if topk_ids.dim() != 2:
        raise GraceInputError(f"topk_ids must be [tokens, k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64, torch.int16):
        raise GraceInputError(f"topk_ids must be integers, got {topk_ids.dtype}")
    ids = topk_ids.long()
    T = ids.shape[0]
    if isinstance(src_gpu, torch.Tensor):
        src = src_gpu.to(device=ids.device, dtype=torch.int64)
        src = src.expand(T) if src.dim() == 0 else src
    else:
        src = torch.full((T,), int(src_gpu), dtype=torch.int64, device=ids.device)
    if src.shape != (T,):
        raise GraceInputError(f"src_gpu must be a scalar or [tokens]={T}, got shape {tuple(src.shape)}")
    if debug_enabled():
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= table.num_experts):
            raise GraceInputError(f"topk_ids out of range [-1, {table.num_experts})")
        if T and (int(src.min()) < 0 or int(src.max()) >= table.num_gpus):
            raise GraceInputError(f"src_gpu out of range [0, {table.num_gpus})")
    return ids, src


def _pick_by_quota(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column whose cumulative-weight interval contains ``u * total``; weights ``[P, R]`` >= 0.

    A row of zeros (no candidate: a dropped pair) picks column 0, as the compiled kernels do.
    """
    none = weights.sum(1, keepdim=True) == 0
    weights = torch.cat([torch.where(none, torch.ones_like(weights[:, :1]), weights[:, :1]), weights[:, 1:]], dim=1)
    cw = torch.cumsum(weights, dim=1)
    total = cw[:, -1:]
    target = torch.minimum(u[:, None] * total, total * (1 - 1e-9))
    return (cw <= target).sum(dim=1).clamp(max=weights.shape[1] - 1)


def tier_masks(ids: torch.Tensor, src: torch.Tensor, hosts: torch.Tensor, gpus_per_node: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate copies per pair by locality.

    Args:
        ids: int64 ``[T, k]`` experts (-1 dropped); src: int64 ``[T]`` source GPU;
        hosts: int64 ``[E, R]`` hosting GPUs (-1 padded); gpus_per_node: GPUs per node (node-major numbering).

    Returns ``(cand [T, k, R] hosting GPUs, present, on_gpu, on_node)`` where the masks are bool
    ``[T, k, R]``: copy exists; copy is on the token's GPU; copy is on the token's node.
    """
    cand = hosts[ids.clamp(min=0)]  # [T, k, R]
    present = (cand >= 0) & (ids >= 0)[..., None]
    on_gpu = present & (cand == src[:, None, None])
    gpn = gpus_per_node
    on_node = present & (torch.div(cand, gpn, rounding_mode="floor") == torch.div(src, gpn, rounding_mode="floor")[:, None, None])
    return cand, present, on_gpu, on_node


def choose_copies(
    policy: str,
    topk_ids: torch.Tensor,
    src_gpu: torch.Tensor | int,
    table: ReplicaTable,
    predicted_load: torch.Tensor | None = None,
    step: int | torch.Tensor = 0,
    seed: int = 0,
    positions: torch.Tensor | None = None,
    options: RoutingOptions | None = None,
) -> torch.Tensor:
    """Pick a copy for every (token, expert) pair.

    Runs entirely on ``topk_ids``' device with no host synchronisation for every policy, so it
    can be captured in a CUDA graph. Value checks (ids and GPUs in range, finite predictions)
    run only in debug mode (:mod:`megatron_grace._debug`).

    Args:
        policy: one of :data:`POLICY_NAMES`.
        topk_ids: int ``[T, k]`` router choices, -1 = dropped.
        src_gpu: int scalar or int ``[T]`` (or 0-d) tensor: the GPU (global rank) each token is on.
        table: the layer's :class:`ReplicaTable` (on the same device as ``topk_ids``).
        predicted_load: float ``[G]`` predicted pairs per GPU (``grace``); None = equal.
        step: forward-pass counter, an int or a 0-d tensor on the device (varies ``random`` and
            ``grace``'s offsets between steps; a tensor keeps a captured graph valid across steps).
        seed: seed of ``random``.
        positions: int ``[T]`` token positions for ``position`` (default ``arange(T)``).
        options: :class:`RoutingOptions` for ``grace``.

    Returns:
        int64 ``[T, k]`` copy index into ``table.hosts[expert]``; -1 where ``topk_ids`` is -1.
    """
    ids, src = _check_inputs(topk_ids, src_gpu, table)
    T, k = ids.shape
    if policy == "grace":
        pred = _check_predicted_load(predicted_load, table.num_gpus, ids.device)
        if table.max_copies > 1:
            spare, params, offload = _grace_parameters(pred, options or RoutingOptions(), table.max_copies, step)
            return _ops.grace_choose_copies(ids, src, table.hosts, table.copies, spare, pred, params, table.gpus_per_node, offload)
    valid = ids >= 0
    copies = table.copies[ids.clamp(min=0)]  # [T, k]
    if policy in ("primary", "grace") or table.max_copies == 1:
        out = torch.zeros_like(ids)
    elif policy == "static-local":
        out = torch.where(copies > 1, _static_local(ids, src, table), torch.zeros_like(ids))
    elif policy == "random":
        u = _counter_uniform(int(seed), step, T * k, ids.device).view(T, k)
        out = torch.minimum((u * copies).long(), copies - 1)
    elif policy == "position":
        pos = torch.arange(T, device=ids.device) if positions is None else torch.as_tensor(positions, device=ids.device).long()
        if pos.shape != (T,):
            raise GraceInputError(f"positions must be [tokens]={T}, got {tuple(pos.shape)}")
        out = torch.remainder(pos[:, None], copies)
    else:
        raise GraceInputError(f"unknown replica-choice policy {policy!r}; known: {', '.join(POLICY_NAMES)}")
    return torch.where(valid, out, torch.full_like(out, -1))


def copy_destinations(topk_ids: torch.Tensor, copy: torch.Tensor, table: ReplicaTable) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gpu, slot)`` int64 ``[T, k]`` of the chosen copies; -1 for dropped pairs."""
    ids = topk_ids.long()
    safe_e, safe_c = ids.clamp(min=0), copy.clamp(min=0)
    gpu = table.hosts[safe_e, safe_c]
    slot = table.slots[safe_e, safe_c]
    dropped = ids < 0
    return gpu.masked_fill(dropped, -1), slot.masked_fill(dropped, -1)


def _wrap64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    return x - (1 << 64) if x >= 1 << 63 else x


_MIX_A, _MIX_B, _MIX_C = _wrap64(0x9E3779B97F4A7C15), _wrap64(0xBF58476D1CE4E5B9), _wrap64(0x94D049BB133111EB)


def _counter_uniform(seed: int, step: int | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """float64 ``[n]`` pseudo-uniform values in [0, 1) for ``(seed, step, index)``: a splitmix64-style hash on the
    device (int64 arithmetic wraps), so the ``random`` policy needs no host generator, no host copy and no
    host read of a device ``step``; the same ``(seed, step)`` gives the same draws on every device."""
    step_t = step.to(device=device, dtype=torch.int64) if isinstance(step, torch.Tensor) else \
        torch.full((), int(step), dtype=torch.int64, device=device)
    h = (torch.arange(n, dtype=torch.int64, device=device) + 1) * _MIX_A + (step_t * 1_000_003 + seed) * _MIX_B
    h = (h ^ (h >> 30)) * _MIX_B
    h = (h ^ (h >> 27)) * _MIX_C
    h = h ^ (h >> 31)
    return ((h >> 10) & ((1 << 53) - 1)).double() * (1.0 / (1 << 53))  # bit 63 is 0 after the last xor-shift


def _hash_uniform(key: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-uniform value in [0, 1) per integer key (R2 sequence), float64."""
    return torch.frac(key.double() * _R2_A + 0.5)


def _check_predicted_load(predicted_load: torch.Tensor | None, num_gpus: int, device: torch.device) -> torch.Tensor:
    """float64 ``[G]`` predicted load on ``device`` (ones when None); a wrong shape raises, and in debug mode
    NaN, infinite or negative values raise too."""
    if predicted_load is None:
        return torch.ones(num_gpus, dtype=torch.float64, device=device)
    pred = torch.as_tensor(predicted_load).to(device=device, dtype=torch.float64)
    if pred.shape != (num_gpus,):
        raise GraceInputError(f"predicted_load must have one entry per GPU ({num_gpus}), got shape {tuple(pred.shape)} (a plan for another topology?)")
    if debug_enabled() and (not torch.isfinite(pred).all() or (pred < 0).any()):
        raise GraceInputError("predicted_load contains NaN, infinite or negative values")
    return pred


def _static_local(ids: torch.Tensor, src: torch.Tensor, table: ReplicaTable) -> torch.Tensor:
    """The ``static-local`` copy of every pair ``ids [T, k]`` from ``src [T]`` (dense; callers mask single-copy and dropped pairs)."""
    cand, present, on_gpu, on_node = tier_masks(ids, src, table.hosts, table.gpus_per_node)
    mask = torch.where(on_gpu.any(-1, keepdim=True), on_gpu, torch.where(on_node.any(-1, keepdim=True), on_node, present))
    key = src[:, None] * table.num_experts + ids.clamp(min=0)  # fixed per (source GPU, expert)
    u = _hash_uniform(key).reshape(-1)
    w = mask.reshape(-1, mask.shape[-1]).double()
    return _pick_by_quota(w, u).reshape(ids.shape)


def _grace_parameters(pred: torch.Tensor, options: RoutingOptions, max_copies: int, step: int | torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(spare [G] float64, params [3] float64 = (step, mean, hot_threshold), offload)`` of the ``grace`` policy for
    predicted loads ``pred [G]``; all on ``pred``'s device, no host synchronisation."""
    mean = pred.mean()
    top = pred.max()
    spare = ((1.0 + options.headroom) * top - pred).clamp(min=0) + 1e-9 * (top + 1.0)  # [G], > 0
    offload = options.offload_threshold != float("inf") and max_copies > 1
    hot = options.offload_threshold * mean if offload else torch.full_like(mean, float("inf"))
    step_t = step.to(device=pred.device, dtype=torch.float64).reshape(()) if isinstance(step, torch.Tensor) else \
        torch.full((), float(step), dtype=torch.float64, device=pred.device)
    return spare, torch.stack([step_t, mean, hot]), offload


def grace_choose_copies_torch(ids: torch.Tensor, src: torch.Tensor, hosts: torch.Tensor, copies: torch.Tensor, spare: torch.Tensor,
                              pred: torch.Tensor, params: torch.Tensor, gpn: int, offload: bool) -> torch.Tensor:
    """Pure-torch ``grace`` choice for all pairs ``ids [T, k]``: the reference of the compiled
    ``grace::grace_choose_copies`` (same arguments, see :func:`megatron_grace._ops.grace_choose_copies`).

    Dense over all pairs (no ``nonzero``): every pair is evaluated and single-copy or dropped
    pairs are masked at the end (0 and -1). A dropped pair gets group key -1, so it never shifts
    the in-group rank of a real pair.

    Args:
        ids: int64 ``[T, k]`` experts, -1 = dropped.  src: int64 ``[T]`` source GPU.
        hosts: int64 ``[E, R]``; copies: int64 ``[E]``; spare, pred: float64 ``[G]``.
        params: float64 ``[3]``: ``(step, mean predicted load, hot threshold)``.
        gpn: GPUs per node.  offload: whether a hot local GPU may hand its pairs to a roomy same-node copy.

    Returns:
        int64 ``[T, k]`` copy index; -1 for dropped pairs, 0 for single-copy experts.
    """
    ids = ids.long()
    src = src.long()
    spare, pred, params = spare.double(), pred.double(), params.double()
    step, mean, hot_threshold = params[0], params[1], params[2]
    valid = ids >= 0
    safe = ids.clamp(min=0)
    cand, present, on_gpu, on_node = tier_masks(ids, src, hosts, gpn)
    has_gpu = on_gpu.any(-1, keepdim=True)
    has_node = on_node.any(-1, keepdim=True)
    mask = torch.where(has_gpu, on_gpu, torch.where(has_node, on_node, present))
    if offload:
        safe_cand = cand.clamp(min=0)
        local_hot = pred[src] > hot_threshold  # [T]
        roomy_peer = (on_node & ~on_gpu & (pred[safe_cand] < mean)).any(-1, keepdim=True)  # [T, k, 1]
        mask = torch.where(has_gpu & roomy_peer & local_hot[:, None, None], on_node, mask)
    weights = torch.where(mask, spare[cand.clamp(min=0)], torch.zeros((), dtype=torch.float64, device=ids.device))
    num_experts = hosts.shape[0]
    key = torch.where(valid, src[:, None] * num_experts + safe, torch.full_like(ids, -1)).reshape(-1)  # group = (source GPU, expert)
    rank = rank_in_group(key)
    offset = torch.frac(key.double() * _R2_A + step * _R2_B)
    u = torch.frac(offset + (rank.double() + 0.5) * _PHI)
    chosen = _pick_by_quota(weights.reshape(-1, weights.shape[-1]), u).reshape(ids.shape)
    multi = copies[safe] > 1
    return torch.where(valid, torch.where(multi, chosen, torch.zeros_like(chosen)), torch.full_like(chosen, -1))
