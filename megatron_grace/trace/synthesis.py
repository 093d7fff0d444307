"""Synthesize a per-token routing trace from routing statistics.

Some sources publish only statistics (Qwen3-30B-A3B: per-expert load and a thresholded list of
co-activated pairs). Planners and simulators need per-token expert choices, so
:func:`synthesize_trace` builds a population of ``num_tokens`` tokens, each choosing ``top_k``
distinct experts per layer, whose per-layer load and pairwise co-activation reproduce the
source's, and :func:`synthesis_fidelity` measures how well it does.

Method, per layer (layers are independent: cross-layer ``transitions`` are ignored, so the
experts a token chooses at different layers are independent of each other):

1. **Targets.** Integer load quotas ``q[e]`` (largest-remainder rounding of
   ``share[e] * num_tokens * k``, summing to ``num_tokens * k``); listed (observed) pair counts
   scaled by ``num_tokens / stats.tokens``. Unlisted pairs of a thresholded source are "below
   threshold", not zero: they get a *quasi-independence* fill ``r[i, j] = x[i] * x[j]`` fitted
   so that every expert's pairs add up to ``(k - 1) * q[e]`` (an identity every trace obeys),
   capped below the source's listing threshold, plus a penalty from that threshold on. The
   threshold is inferred from the data: a pair would have been listed when its count reaches
   the layer's smallest listed count and its lift the smallest listed lift.
2. **Construction.** Each token draws its first expert in proportion to the quotas, then each
   further expert as the best of ``candidates`` candidates drawn from the target co-activation
   rows of experts it already has, scored by the summed log-lift against them. Vectorized over
   tokens (a Python loop over the k slots only).
3. **Local search.** Sweeps of swap moves: in every token, replace a random expert ``a`` by an
   expert ``b`` proposed from the co-activation row of another expert of the token (part of
   the rows re-pointed at pairs still below target). A move is accepted when it lowers the
   chi-square objective ``sum_listed (C - t)^2 / t + gamma * sum_unlisted (C - r)^2 / r +
   threshold penalty + w_load * sum_e (load - q)^2 / q``. The change of one move is exact; the
   moves of a block of tokens are evaluated together against the counts before the block.
   Stops when the listed pairs' count-weighted relative error reaches ``tolerance``.
4. **Exact load repair.** Batches of swaps from over-quota to under-quota experts, cheapest
   objective increase first, capped by each expert's surplus and deficit, until every load
   equals its integer quota.

The result is a fitted population, not a sample of a fitted probability model: its listed pair
counts can be closer to the targets than an ideal independent sample of the same size would be
(whose error is Poisson noise; :func:`synthesis_fidelity` reports that floor next to the
error). Slot order within a token carries no meaning (it is randomly rotated per token); gate
weights are not synthesized (``None``). Tokens are shuffled at the end, so any split of the trace
is a random split. Everything is numpy; layers run in threads.

Big traces are made in chunks of at most :data:`CHUNK_TOKENS` tokens (:class:`TraceSynthesis`):
each chunk is a population fitted as above to the targets scaled to its size, with its exact
share of the layer's load quotas, so memory stays bounded by a few chunks and
:func:`synthesize_to_file` writes a trace of any length without holding it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from megatron_grace import limits
from megatron_grace._files import PathLike, StreamedArray, check_disk_space
from megatron_grace._progress import progress_bar
from megatron_grace._segments import rank_in_group
from megatron_grace.errors import GraceInputError
from megatron_grace.statistics.expert_stats import ExpertStats
from megatron_grace.trace.routing_trace import RoutingTrace, ids_disk_dtype, write_trace

_TABLE = 256  # entries per row of the co-activation sampling tables (a power of two)
_GLOBAL_TABLE = 4096  # entries of the load sampling table (a power of two)


@dataclass(frozen=True)
class SynthesisConfig:
    """Knobs of :func:`synthesize_trace` (the defaults are tuned on Qwen3-30B-A3B).

    Attributes:
        sweeps: at most this many local-search sweeps (one swap proposal per token each).
        tolerance: stop the search once the listed pairs' count-weighted relative error
            ``sum |C - t| / sum t`` is at most this (before the load repair).
        blocks: token blocks per sweep; the objective's marginal costs are refreshed per block.
        deficit_share: share of the co-activation proposal tables re-pointed, every sweep, at
            the pairs still below their target.
        candidates: candidates per slot in the construction (best of them is kept).
        global_share: share of proposals drawn from the load distribution instead of a
            co-activation row (keeps every active expert reachable).
        unlisted_weight: weight ``gamma`` of the quasi-independence fill of unlisted pairs.
        load_weight: weight of the load term during the local search.
        bound_weight: weight of the penalty on unlisted pairs reaching the listing threshold.
        bound_margin: fill cap, as a fraction of the listing threshold.
        repair_rounds: at most this many exact-load repair rounds.
    """

    sweeps: int = 40
    tolerance: float = 0.03
    blocks: int = 4
    deficit_share: float = 0.5
    candidates: int = 3
    global_share: float = 0.05
    unlisted_weight: float = 0.05
    load_weight: float = 3.0
    bound_weight: float = 4.0
    bound_margin: float = 0.8
    repair_rounds: int = 60

    def __post_init__(self) -> None:
        for name in ("sweeps", "blocks", "candidates", "repair_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if name == "sweeps" else 1):
                raise GraceInputError(f"SynthesisConfig.{name} must be an integer >= {0 if name == 'sweeps' else 1}, got {value!r}")
        for name in ("tolerance", "deficit_share", "global_share", "unlisted_weight", "load_weight", "bound_weight", "bound_margin"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating)) or not np.isfinite(value) or value < 0:
                raise GraceInputError(f"SynthesisConfig.{name} must be a finite number >= 0, got {value!r}")
        for name in ("deficit_share", "global_share"):
            if getattr(self, name) > 1:
                raise GraceInputError(f"SynthesisConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")


# ---------------------------------------------------------------------------------------------
# targets


@dataclass(frozen=True)
class _Targets:
    """What one layer of the synthesized population must reproduce (synthesized-token scale).

    Attributes:
        quota: int64 ``[E]`` exact load of each expert (sums to tokens * k).
        listed: float64 ``[E, E]`` target counts of the observed pairs (0 elsewhere).
        observed: bool ``[E, E]`` pairs whose count is a target (symmetric, no diagonal).
        fill: float64 ``[E, E]`` soft targets of the unobserved pairs (0 on observed ones).
        bound: float64 ``[E, E]`` count at which an unobserved pair would have been listed
            by the source (``inf`` where there is no threshold).
    """

    quota: np.ndarray
    listed: np.ndarray
    observed: np.ndarray
    fill: np.ndarray
    bound: np.ndarray


def _quotas(share: np.ndarray, total: int, cap: int) -> np.ndarray:
    """int64 ``[E]`` non-negative integers summing to ``total``, each ``<= cap``, near ``share * total``."""
    return _round_to_total(np.minimum(share * total, cap), total, cap)


def _chunk_quota(remaining: np.ndarray, remaining_tokens: int, tokens: int) -> np.ndarray:
    """int64 ``[E]``: the part of the quotas ``remaining`` ``[E]`` (of ``remaining_tokens`` tokens) that a chunk of
    ``tokens`` of them takes, ``remaining * tokens / remaining_tokens`` rounded to sum to ``tokens * k``.

    Each entry lies between ``floor`` and ``ceil`` of that ratio, so it is ``<= tokens`` and leaves
    ``<= remaining_tokens - tokens`` for the rest (every later chunk stays feasible)."""
    k_total = int(remaining.sum()) * tokens // remaining_tokens  # exact: remaining.sum() == remaining_tokens * k
    return _round_to_total(remaining.astype(np.float64) * tokens / remaining_tokens, k_total, tokens)


def _round_to_total(raw: np.ndarray, total: int, cap: int) -> np.ndarray:
    """int64 ``[E]``: ``raw`` ``[E]`` (each ``<= cap``) rounded by largest remainder to integers summing to ``total``."""
    quota = np.floor(raw).astype(np.int64)
    remainder = raw - quota
    remainder[quota >= cap] = -1.0  # never round a full expert up
    missing = int(total - quota.sum())
    order = np.argsort(-remainder, kind="stable")
    quota[order[:missing]] += 1
    return quota


def _listing_threshold(stats: ExpertStats) -> tuple[np.ndarray, float] | None:
    """Per-layer smallest listed count ``[L]`` and the smallest listed lift, for thresholded sources."""
    if stats.coactivation is None or stats.coactivation_observed is None:
        return None
    obs = stats.coactivation_observed
    if not obs.any():
        return None
    counts = np.where(obs, stats.coactivation, np.inf).reshape(stats.num_layers, -1).min(axis=1)
    lift = stats.lift()
    min_lift = float(np.nanmin(np.where(obs, lift, np.nan)))
    return counts, min_lift


def _quasi_independence(residual: np.ndarray, allowed: np.ndarray, iterations: int = 300) -> np.ndarray:
    """float64 ``[E, E]`` ``x_i x_j`` on ``allowed`` (symmetric bool) with row sums ``residual`` ``[E]``.

    Geometric-mean damped fixed point ``x_i <- sqrt(x_i * residual_i / sum_j allowed_ij x_j)``.
    """
    x = np.sqrt(np.maximum(residual, 0.0)) + 1e-12
    allowed_f = allowed.astype(np.float64)
    for _ in range(iterations):
        sums = allowed_f @ x
        x = np.sqrt(x * np.divide(residual, sums, out=np.zeros_like(x), where=sums > 0))
    return allowed_f * np.outer(x, x)


def _layer_targets(stats: ExpertStats, layer: int, num_tokens: int, threshold: tuple[np.ndarray, float] | None,
                   config: SynthesisConfig, quota: np.ndarray | None = None) -> _Targets:
    """Targets of one layer for a population of ``num_tokens`` tokens; ``quota`` int64 ``[E]`` (summing to
    ``num_tokens * k``) replaces the layer's own rounding of its load shares. Raises GraceInputError when
    the layer cannot be synthesized."""
    _layer_targets_check(stats, layer)
    k, E = stats.top_k, stats.num_experts
    load, tokens = stats.load[layer], float(stats.tokens[layer])
    active = load > 0
    share = load / load.sum()
    if quota is None:
        quota = _quotas(share, num_tokens * k, num_tokens)
    scale = num_tokens / tokens
    off_diag = ~np.eye(E, dtype=bool)
    both_active = active[:, None] & active[None, :] & off_diag
    if stats.coactivation is None:
        observed = np.zeros((E, E), dtype=bool)
        listed = np.zeros((E, E))
    else:
        observed = off_diag.copy() if stats.coactivation_observed is None else stats.coactivation_observed[layer] & off_diag
        listed = np.where(observed, stats.coactivation[layer] * scale, 0.0)
    bound = np.full((E, E), np.inf)
    if threshold is not None:
        min_counts, min_lift = threshold
        if np.isfinite(min_counts[layer]):
            indep = np.outer(quota, quota) / num_tokens
            bound = np.maximum(min_counts[layer] * scale, min_lift * indep)
    free = both_active & ~observed
    residual = np.maximum((k - 1) * quota - listed.sum(axis=1), 0.0)
    fill = _quasi_independence(residual, free)
    fill = np.minimum(fill, config.bound_margin * bound)
    bound = np.where(free, bound, np.inf)
    return _Targets(quota=quota, listed=listed, observed=observed, fill=fill, bound=bound)


# ---------------------------------------------------------------------------------------------
# sampling tables and objective


def _inverse_cdf_tables(weights: np.ndarray, size: int = _TABLE) -> np.ndarray:
    """int32 ``[R, size]``: row r maps a uniform bin to an index drawn with ``weights[r]`` ``[R, E]``.

    Rows must have a positive sum. Entries are the inverse CDF at the bin midpoints, so an index
    whose weight is below about ``1 / size`` of its row may be unreachable through the table.
    """
    R, E = weights.shape
    cdf = np.cumsum(weights, axis=1)
    cdf /= cdf[:, -1:]
    offset = np.arange(R, dtype=np.float64)[:, None]
    grid = (np.arange(size) + 0.5) / size
    idx = np.searchsorted((cdf + offset).ravel(), (grid[None, :] + offset).ravel(), side="right").reshape(R, size)
    idx -= np.arange(R)[:, None] * E
    return np.clip(idx, 0, E - 1).astype(np.int32)


@dataclass
class _Layer:
    """Mutable state of one layer's population and objective."""

    targets: _Targets
    config: SynthesisConfig
    global_table: np.ndarray  # int32 [_GLOBAL_TABLE], experts by quota
    base_rows: np.ndarray     # int32 [E, _TABLE], experts by target co-activation with the row's expert
    row_table: np.ndarray     # int32 [E * _TABLE] flattened rows used by the proposals
    score: np.ndarray         # float32 [E * E] flattened log-lift of the full target matrix
    pair_target: np.ndarray   # float64 [E, E] listed count on observed pairs, fill elsewhere
    pair_weight: np.ndarray   # float64 [E, E] chi-square weight (0 on the diagonal)
    bound_at: np.ndarray      # float64 [E, E] count from which the bound penalty applies
    bound_weight: np.ndarray | None  # float64 [E, E] (0 where unbounded) or None when no bound
    load_weight: np.ndarray   # float64 [E]
    load_forbidden: np.ndarray  # float64 [E]: +inf for experts with zero quota, else 0
    S: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))  # int32 [k, T]
    load: np.ndarray = field(default_factory=lambda: np.zeros(0))             # float64 [E]
    C: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))           # float64 [E, E]

    @property
    def E(self) -> int:
        return int(self.targets.quota.shape[0])

    def recount(self) -> None:
        """Recompute ``load`` and ``C`` from ``S`` (vectorized bincounts)."""
        self.load, self.C = _counts(self.S, self.E)

    def marginal_costs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Objective change tables at the current counts.

        Returns ``(inc, dec, load_inc, load_dec)``: float64 ``[E, E]`` change when a pair count
        goes up / down by one (zero diagonal), float64 ``[E]`` when a load goes up / down by one.
        """
        dev = self.C - self.pair_target
        inc = (2 * dev + 1) * self.pair_weight
        dec = (1 - 2 * dev) * self.pair_weight
        if self.bound_weight is not None:
            excess = self.C - self.bound_at
            over2 = np.maximum(excess, 0.0) ** 2
            inc += (np.maximum(excess + 1, 0.0) ** 2 - over2) * self.bound_weight
            dec += (np.maximum(excess - 1, 0.0) ** 2 - over2) * self.bound_weight
        ldev = self.load - self.targets.quota
        load_inc = (2 * ldev + 1) * self.load_weight + self.load_forbidden
        load_dec = (1 - 2 * ldev) * self.load_weight
        return inc, dec, load_inc, load_dec

    def apply(self, slot: np.ndarray, token: np.ndarray, new: np.ndarray) -> None:
        """Replace ``S[slot, token]`` by ``new`` (all ``[n]``; distinct tokens) and update the counts."""
        if token.size == 0:
            return
        E = self.E
        old = self.S[slot, token]
        rest = self.S[:, token]  # [k, n], still holding old at its slot
        newl, oldl = new.astype(np.int64), old.astype(np.int64)
        self.load += np.bincount(newl, minlength=E) - np.bincount(oldl, minlength=E)
        # + (new, r) - (old, r) for every r in the token; the slot itself adds (new, old) - (old, old)
        delta = (np.bincount((newl * E + rest).ravel("K"), minlength=E * E)
                 - np.bincount((oldl * E + rest).ravel("K"), minlength=E * E)
                 - np.bincount(newl * E + oldl, minlength=E * E)).reshape(E, E)
        np.fill_diagonal(delta, 0)
        self.C += delta + delta.T
        self.S[slot, token] = new


def _counts(S: np.ndarray, E: int) -> tuple[np.ndarray, np.ndarray]:
    """Load float64 ``[E]`` and symmetric co-activation float64 ``[E, E]`` of a population ``S`` ``[k, T]``."""
    k = S.shape[0]
    load = np.bincount(S.ravel(), minlength=E).astype(np.float64)
    C = np.zeros((E, E))
    for a in range(k):
        for b in range(a + 1, k):
            C += np.bincount(S[a].astype(np.int64) * E + S[b], minlength=E * E).reshape(E, E)
    return load, C + C.T


def _prepare(targets: _Targets, config: SynthesisConfig) -> _Layer:
    """Sampling tables and construction scores of one layer."""
    q = targets.quota.astype(np.float64)
    E = q.shape[0]
    full = targets.listed + targets.fill  # [E, E] target co-activation, zero diagonal
    rows = np.where(full.sum(axis=1, keepdims=True) > 0, full, q[None, :] * ~np.eye(E, dtype=bool))
    logq = np.log(np.maximum(q, 1.0))
    score = np.log(np.maximum(full, 1e-2)) - logq[:, None] - logq[None, :]  # log-lift up to a constant
    np.fill_diagonal(score, -np.inf)  # a candidate already chosen scores -inf
    base_rows = _inverse_cdf_tables(rows)
    off_diag = ~np.eye(E, dtype=bool)
    pair_target = np.where(targets.observed, targets.listed, targets.fill)
    pair_weight = np.where(targets.observed, 1.0 / np.maximum(targets.listed, 1.0),
                           config.unlisted_weight / np.maximum(targets.fill, 1.0)) * off_diag
    finite = np.isfinite(targets.bound) & off_diag
    bound_at = np.where(finite, targets.bound - 1.0, 0.0)
    bound_weight = np.where(finite, config.bound_weight / np.maximum(bound_at, 1.0), 0.0) if finite.any() else None
    return _Layer(
        targets=targets, config=config,
        global_table=_inverse_cdf_tables(q[None, :], _GLOBAL_TABLE)[0],
        base_rows=base_rows,
        row_table=base_rows.ravel(),
        score=score.astype(np.float32).ravel(),
        pair_target=pair_target, pair_weight=pair_weight, bound_at=bound_at, bound_weight=bound_weight,
        load_weight=config.load_weight / np.maximum(q, 1.0),
        load_forbidden=np.where(q > 0, 0.0, np.inf),
    )


# ---------------------------------------------------------------------------------------------
# the three phases


def _propose(state: _Layer, anchors: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Experts ``[...]`` proposed from the anchors' co-activation rows, or globally, using random ``bits``."""
    entry = bits & (_GLOBAL_TABLE - 1)  # bits 0-11 (the row tables use 0-7); int64, as every index here
    from_global = ((bits >> 12) & 0xFFF) < int(state.config.global_share * 4096)
    return np.where(from_global, state.global_table[entry], state.row_table[anchors * _TABLE + (entry & (_TABLE - 1))])


def _construct(state: _Layer, num_tokens: int, k: int, rng: np.random.Generator) -> None:
    """Build the initial population ``S`` ``[k, T]``: slot 0 by quota, then best of a few guided candidates."""
    E, m = state.E, max(1, state.config.candidates)
    S = np.empty((k, num_tokens), dtype=np.int32)
    S[0] = state.global_table[rng.integers(0, _GLOBAL_TABLE, num_tokens)]
    for s in range(1, k):
        todo = np.arange(num_tokens)
        for attempt in range(64):
            n = todo.size
            chosen = S[:s] if attempt == 0 else np.ascontiguousarray(S[:s, todo])  # [s, n]
            bits = rng.integers(0, 2**62, size=(m, n), dtype=np.int64)
            if s > 1:
                anchors = np.take_along_axis(chosen, ((bits >> 24) & 0xFFFF) % s, axis=0)  # [m, n]
            else:
                anchors = np.broadcast_to(chosen, (m, n))
            cand = _propose(state, anchors, bits)  # [m, n]
            idx = np.empty((s, m, n), dtype=np.int64)  # int64 indices for np.take (see _search_block)
            np.add((chosen * E)[:, None, :], cand[None, :, :], out=idx)
            score = np.take(state.score, idx).sum(axis=0)  # [m, n]
            score += ((bits >> 40) & 0xFF) * 1e-6  # tiny random tie-break
            best = score.argmax(axis=0)
            ok = np.isfinite(np.take_along_axis(score, best[None, :], axis=0)[0])
            S[s, todo[ok]] = np.take_along_axis(cand, best[None, :], axis=0)[0][ok]
            todo = todo[~ok]
            if todo.size == 0:
                break
        if todo.size:  # rare: fill with random unchosen active experts
            S[s, todo] = _random_unchosen(S[:s, todo], state.targets.quota > 0, rng)
    state.S = S
    state.recount()


def _random_unchosen(chosen: np.ndarray, active: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int32 ``[n]``: per column of ``chosen`` ``[s, n]``, a random active expert not in it."""
    n, E = chosen.shape[1], active.shape[0]
    keys = rng.random((n, E)) + np.where(active, 0.0, 2.0)[None, :]
    keys[np.arange(n)[None, :], chosen] = 3.0
    return keys.argmin(axis=1).astype(np.int32)


def _local_search(state: _Layer, rng: np.random.Generator) -> None:
    """Greedy swap sweeps lowering the objective (see the module docstring).

    Each sweep visits the tokens in ``config.blocks`` contiguous blocks; the marginal-cost tables
    are refreshed before every block, so that moves of one block see the effect of the previous
    ones (fewer tokens overshooting the same pair at once).
    """
    S = state.S
    k, T = S.shape
    if k < 2:
        return
    observed = np.triu(state.targets.observed, 1)
    if not observed.any():
        return  # no co-activation data: keep the construction's quasi-independent pairs
    target = state.targets.listed[observed]
    blocks = max(1, min(state.config.blocks, T))
    edges = np.linspace(0, T, blocks + 1).astype(np.int64)
    for _ in range(state.config.sweeps):
        if np.abs(state.C[observed] - target).sum() <= state.config.tolerance * target.sum():
            break
        if state.config.deficit_share > 0:
            _refresh_rows(state, rng)
        for lo, hi in zip(edges[:-1], edges[1:]):
            _search_block(state, S[:, lo:hi], lo, rng)
    state.row_table = state.base_rows.ravel()


def _refresh_rows(state: _Layer, rng: np.random.Generator) -> None:
    """Point a share ``deficit_share`` of every row table at the pairs below their target."""
    E = state.E
    need = np.maximum(state.pair_target - state.C, 0.0) * (state.pair_weight > 0) + 1e-3 * state.pair_target
    need[:, state.targets.quota == 0] = 0.0
    rows = np.where(need.sum(axis=1, keepdims=True) > 0, need, state.targets.quota[None, :].astype(np.float64))
    mix = rng.random((E, _TABLE)) < state.config.deficit_share
    state.row_table = np.where(mix, _inverse_cdf_tables(rows), state.base_rows).ravel()


def _search_block(state: _Layer, block: np.ndarray, offset: int, rng: np.random.Generator) -> None:
    """One swap proposal per token of ``block`` (a ``[k, n]`` view of ``S`` starting at token ``offset``)."""
    E = state.E
    k, n = block.shape
    inc, dec, load_inc, load_dec = state.marginal_costs()
    np.fill_diagonal(inc, np.inf)  # proposing an expert the token already has: +inf (or nan), never accepted
    table = (inc + 1j * dec).astype(np.complex64).ravel()
    cols = np.arange(n)
    bits = rng.integers(0, 2**62, size=n, dtype=np.int64)
    slot = ((bits >> 24) & 0xFFFF) % k
    other = (slot + 1 + ((bits >> 40) & 0xFFFF) % (k - 1)) % k
    a = block[slot, cols].astype(np.int64)
    b = _propose(state, block[other, cols], bits).astype(np.int64)
    BE = block.astype(np.int64) * E  # int64 indices: np.take on int32 ones converts them first (several times slower)
    gain_b = np.take(table, BE + b).sum(axis=0)  # sum_r inc[r, b] (+ i dec[r, b])
    gain_a = np.take(table, BE + a).sum(axis=0)
    with np.errstate(invalid="ignore"):  # inf - inf where b == a: nan, never accepted
        delta = gain_b.real - table[a * E + b].real + gain_a.imag + load_inc[b] + load_dec[a]
        move = np.flatnonzero(delta < 0)
    state.apply(slot[move], move + offset, b[move])


def _repair_loads(state: _Layer, rng: np.random.Generator) -> bool:
    """Swap over-quota experts for under-quota ones until every load equals its quota.

    Returns whether it got there within ``config.repair_rounds`` rounds.
    """
    S, E = state.S, state.E
    k, T = S.shape
    q = state.targets.quota
    flat = S.reshape(-1)
    for _ in range(state.config.repair_rounds):
        diff = (state.load - q).astype(np.int64)
        if not diff.any():
            return True
        surplus, deficit = np.maximum(diff, 0), np.maximum(-diff, 0)
        pos = np.flatnonzero(surplus[flat] > 0)
        want = 4 * int(surplus.sum())
        if pos.size > want:
            pos = pos[rng.random(pos.size) < want / pos.size]
        slot, token = pos // T, pos % T
        a = flat[pos]
        under = _inverse_cdf_tables(deficit[None, :].astype(np.float64))[0]
        inc, dec, _, _ = state.marginal_costs()
        table = (inc + 1j * dec).astype(np.complex64).ravel()
        best_b = np.full(pos.size, -1, dtype=np.int64)
        best_delta = np.full(pos.size, np.inf)
        rest = S[:, token].astype(np.int64)  # int64 indices for np.take (see _search_block)
        gain_a = np.take(table, rest * E + a).sum(axis=0).imag
        needy = np.flatnonzero(deficit > 0)
        for c in range(4):  # a few candidates per position, keep the cheapest valid one
            if c % 2 == 0:  # by deficit
                b = under[rng.integers(0, _TABLE, pos.size)].astype(np.int64)
                b = np.where(deficit[b] > 0, b, needy[0])
            else:  # uniformly over the under-quota experts (reaches those with a tiny deficit)
                b = needy[rng.integers(0, needy.size, pos.size)]
            valid = ~(rest == b).any(axis=0)
            delta = np.take(table, rest * E + b).sum(axis=0).real - table[a * E + b].real + gain_a
            better = valid & (delta < best_delta)
            best_b[better], best_delta[better] = b[better], delta[better]
        ok = best_b >= 0
        order = np.flatnonzero(ok)[np.argsort(best_delta[ok], kind="stable")]
        order = order[_first_per_group(token[order])]
        order = order[_rank_in_group(a[order]) < surplus[a[order]]]
        order = order[_rank_in_group(best_b[order]) < deficit[best_b[order]]]
        state.apply(slot[order], token[order], best_b[order].astype(np.int32))
    return not (state.load - q).any()


def _rank_in_group(keys: np.ndarray) -> np.ndarray:
    """int64 ``[n]``: how many earlier entries share each entry's key (order preserved);
    :func:`megatron_grace._segments.rank_in_group` on a numpy array."""
    return rank_in_group(torch.from_numpy(np.ascontiguousarray(keys, dtype=np.int64))).numpy()


def _first_per_group(keys: np.ndarray) -> np.ndarray:
    """bool ``[n]``: True at the first occurrence of each key."""
    return _rank_in_group(keys) == 0


def _synthesize_layer(stats: ExpertStats, layer: int, num_tokens: int, threshold: tuple[np.ndarray, float] | None,
                      config: SynthesisConfig, seed: np.random.SeedSequence, quota: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer's population of ``num_tokens`` tokens (``quota`` as in :func:`_layer_targets`).

    Returns ``(S, load, C)``: int32 ``[k, T]`` population, float64 ``[E]`` load and float64
    ``[E, E]`` co-activation counts of it."""
    rng = np.random.default_rng(seed)
    targets = _layer_targets(stats, layer, num_tokens, threshold, config, quota)
    state = _prepare(targets, config)
    _construct(state, num_tokens, stats.top_k, rng)
    _local_search(state, rng)
    if not _repair_loads(state, rng):
        off = int(np.abs(state.load - targets.quota).sum()) // 2
        warnings.warn(f"synthesis: layer {layer} misses its exact load quotas by {off} expert choices", RuntimeWarning,
                      stacklevel=2)
    # Shuffle the tokens (the search visits them in blocks, in order; any split of the trace, e.g.
    # "plan on the first half, measure on the second", must be a random split) and rotate each
    # token's slots (slot order carries no meaning).
    S = state.S[:, rng.permutation(num_tokens)]
    shift = rng.integers(0, S.shape[0], num_tokens)
    rows = (np.arange(S.shape[0])[:, None] + shift[None, :]) % S.shape[0]
    return np.take_along_axis(S, rows, axis=0), state.load, state.C


# ---------------------------------------------------------------------------------------------
# public API

CHUNK_TOKENS = 100_000
"""Default tokens per independently fitted population (:class:`TraceSynthesis`). Around 10^5 tokens
a population costs the least time per token (smaller ones pay the per-sweep fixed costs, larger
ones fall out of the caches), and a chunk's arrays stay small."""


def chunk_sizes(num_tokens: int, chunk_tokens: int) -> list[int]:
    """Sizes of the ``ceil(num_tokens / chunk_tokens)`` chunks ``num_tokens`` splits into, as equal as possible."""
    n = -(-num_tokens // chunk_tokens)
    base, extra = divmod(num_tokens, n)
    return [base + 1 if i < extra else base for i in range(n)]


class TraceSynthesis:
    """A synthesis of ``num_tokens`` tokens, produced in chunks of tokens; iterate it to get them.

    The tokens are split into ``ceil(num_tokens / chunk_tokens)`` chunks of nearly equal size
    (:func:`chunk_sizes`). Every chunk is, at every layer, a population fitted as the module
    docstring says, to the targets scaled to the chunk's size; its load quotas are the chunk's
    share of the layer's exact quotas for all ``num_tokens`` tokens (:func:`_chunk_quota`), so
    the whole trace meets every quota exactly, as one population would. Chunks are fitted
    independently (their own seeds), so the listed pair counts of the whole trace are sums of
    fits: their relative error is at most that of one chunk's fit. With one chunk
    (``num_tokens <= chunk_tokens``) the result is the unchunked synthesis, token for token.

    Only about three chunks are ever in memory (the one being consumed, the one being fitted,
    the next), so a file can be written without holding the trace (:func:`synthesize_to_file`).

    Iterating yields ``dtype`` arrays ``[chunk tokens, L, k]`` in token order (deterministic for
    the same inputs, seed and ``chunk_tokens``, with any ``workers``); after a complete
    iteration :meth:`counts` holds the load and co-activation of what was produced.
    """

    def __init__(self, stats: ExpertStats, num_tokens: int, seed: int = 0, *, config: SynthesisConfig | None = None,
                 workers: int | None = None, chunk_tokens: int = CHUNK_TOKENS, dtype: np.dtype | type = np.int32,
                 progress: bool = False, keep_whole: bool = False) -> None:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens <= 0:
            raise GraceInputError(f"num_tokens must be a positive integer, got {num_tokens!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise GraceInputError(f"seed must be a non-negative integer, got {seed!r}")
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, (int, np.integer)) or chunk_tokens <= 0:
            raise GraceInputError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
        self.stats, self.num_tokens, self.seed = stats, int(num_tokens), int(seed)
        self.config = config or SynthesisConfig()
        self.chunk_tokens, self.dtype, self.progress = int(chunk_tokens), np.dtype(dtype), progress
        L, k = stats.num_layers, stats.top_k
        self.workers = max(1, min(workers if workers is not None else min(2, os.cpu_count() or 1), L))
        self.sizes = chunk_sizes(self.num_tokens, self.chunk_tokens)
        _check_memory(self.num_tokens, self.sizes[0], L, k, stats.num_experts, self.workers, self.dtype, keep_whole)
        self.threshold = _listing_threshold(stats)
        for layer in range(L):  # validate every layer before spending time on any
            _layer_targets_check(stats, layer)
        self._load: np.ndarray | None = None
        self._coactivation: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(tokens, layers, k)`` of the whole trace."""
        return self.num_tokens, self.stats.num_layers, self.stats.top_k

    def trace_fields(self) -> dict[str, Any]:
        """``model``, ``source`` and ``extra`` of the synthesized trace (keyword arguments of :class:`RoutingTrace`)."""
        what = self.stats.source or self.stats.model
        return {"model": self.stats.model, "source": f"synthesized from {what}",
                "extra": {"synthesis": {"seed": self.seed, "num_tokens": self.num_tokens, "chunk_tokens": self.chunk_tokens,
                                        "config": asdict(self.config),
                                        "ignored": ["transitions"] if self.stats.transitions is not None else []}}}

    def _seeds(self) -> list[list[np.random.SeedSequence]]:
        """``[chunk][layer]`` seeds; with one chunk the layer seeds of the unchunked synthesis."""
        layer_seeds = np.random.SeedSequence(self.seed).spawn(self.stats.num_layers)
        if len(self.sizes) == 1:
            return [layer_seeds]
        per_layer = [s.spawn(len(self.sizes)) for s in layer_seeds]
        return [[per_layer[layer][j] for layer in range(self.stats.num_layers)] for j in range(len(self.sizes))]

    def _quotas(self) -> Iterator[list[np.ndarray]]:
        """Per chunk, in order, the int64 ``[E]`` quota of every layer (see :func:`_chunk_quota`)."""
        stats, T, k = self.stats, self.num_tokens, self.stats.top_k
        remaining = [_quotas(stats.load[l] / stats.load[l].sum(), T * k, T) for l in range(stats.num_layers)]
        left = T
        for j, size in enumerate(self.sizes):
            if j == len(self.sizes) - 1:
                yield remaining
                return
            part = [_chunk_quota(rem, left, size) for rem in remaining]
            remaining = [rem - p for rem, p in zip(remaining, part)]
            left -= size
            yield part

    def __iter__(self) -> Iterator[np.ndarray]:
        stats, (_, L, k) = self.stats, self.shape
        E = stats.num_experts
        self._load, self._coactivation = None, None
        load, co = np.zeros((L, E)), np.zeros((L, E, E))
        seeds, quotas = self._seeds(), self._quotas()

        def run(j: int, layer: int, quota: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            S, layer_load, layer_co = _synthesize_layer(stats, layer, self.sizes[j], self.threshold, self.config, seeds[j][layer], quota)
            out[:, layer, :] = S.T
            return layer_load, layer_co

        def submit(j: int) -> tuple[np.ndarray, list[Future]]:
            out = np.empty((self.sizes[j], L, k), dtype=self.dtype)
            return out, [pool.submit(run, j, layer, quota, out) for layer, quota in enumerate(next(quotas))]

        bar = progress_bar(len(self.sizes) * L, "synthesizing layers", "layer", self.progress)
        pool = ThreadPoolExecutor(max_workers=self.workers)
        try:
            pending = [submit(0)]
            for j in range(len(self.sizes)):
                if j + 1 < len(self.sizes):
                    pending.append(submit(j + 1))  # fitted while chunk j is consumed
                out, futures = pending.pop(0)
                for layer, future in enumerate(futures):
                    layer_load, layer_co = future.result()
                    load[layer] += layer_load
                    co[layer] += layer_co
                    bar.update(1)
                yield out
                del out
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        self._load, self._coactivation = load, co

    def counts(self) -> ExpertStats:
        """Load and co-activation (no transitions) of the synthesized trace, counted while it was fitted; the
        same as ``ExpertStats.from_trace(trace, transitions=False)``. Needs a complete iteration first."""
        if self._load is None:
            raise RuntimeError("TraceSynthesis.counts() needs a complete iteration first")
        fields = self.trace_fields()
        return ExpertStats(load=self._load, tokens=np.full(self.stats.num_layers, float(self.num_tokens)), top_k=self.stats.top_k,
                           coactivation=self._coactivation, model=fields["model"], source=fields["source"])


def synthesize_trace(stats: ExpertStats, num_tokens: int, seed: int = 0, progress: bool = False,
                     config: SynthesisConfig | None = None, workers: int | None = None,
                     chunk_tokens: int = CHUNK_TOKENS) -> RoutingTrace:
    """Synthesize ``num_tokens`` tokens whose per-layer load and co-activation match ``stats``.

    Args:
        stats: source statistics; ``load`` is required, ``coactivation`` (full or thresholded
            with ``coactivation_observed``) is used when present, ``transitions`` is ignored
            (layers are synthesized independently).
        num_tokens: tokens to synthesize (> 0).
        seed: random seed; the same inputs and seed give an identical trace (also with any
            ``workers``: every layer has its own seed derived from ``seed``).
        progress: show a progress bar over layers (tqdm).
        config: algorithm knobs, :class:`SynthesisConfig` defaults when None.
        workers: layers synthesized concurrently in threads (numpy releases the GIL in the
            heavy kernels); default ``min(2, os.cpu_count())``.
        chunk_tokens: tokens per independently fitted population (:class:`TraceSynthesis`);
            traces of at most this many tokens are one population.

    Returns:
        RoutingTrace with int32 ``expert_ids`` ``[num_tokens, L, k]`` (distinct, no -1),
        ``gate_weights=None``, every token in request 0, phase decode.

    Raises:
        GraceInputError: ``num_tokens <= 0`` or a negative seed; a layer with no tokens, with
            fewer than ``top_k`` experts of nonzero load, or with an expert above ``1 / top_k``
            of the choices (each names the layer).
    """
    run = TraceSynthesis(stats, num_tokens, seed, config=config, workers=workers, chunk_tokens=chunk_tokens, progress=progress,
                         keep_whole=True)
    ids = np.empty(run.shape, dtype=np.int32)
    start = 0
    for chunk in run:
        ids[start:start + len(chunk)] = chunk
        start += len(chunk)
    return RoutingTrace(expert_ids=ids, num_experts=stats.num_experts, gate_weights=None, **run.trace_fields())


def synthesize_to_file(stats: ExpertStats, num_tokens: int, path: PathLike, seed: int = 0, progress: bool = False,
                       config: SynthesisConfig | None = None, workers: int | None = None,
                       chunk_tokens: int = CHUNK_TOKENS) -> ExpertStats:
    """:func:`synthesize_trace` written straight to a trace file, chunk by chunk, never holding the whole trace.

    The file is the one ``synthesize_trace(...).save(path)`` writes for the same arguments. Returns the
    counts of the written trace (:meth:`TraceSynthesis.counts`), e.g. for :func:`synthesis_fidelity`.
    """
    run = TraceSynthesis(stats, num_tokens, seed, config=config, workers=workers, chunk_tokens=chunk_tokens, progress=progress,
                         dtype=ids_disk_dtype(stats.num_experts))
    ids = StreamedArray(run.shape, run.dtype, run)
    check_disk_space(path, ids.nbytes,
                     f"a synthesized trace of {num_tokens} tokens x {stats.num_layers} layers x top-{stats.top_k} (uncompressed)")
    write_trace(path, ids, stats.num_experts, **run.trace_fields())
    return run.counts()


def _check_memory(num_tokens: int, chunk: int, L: int, k: int, E: int, workers: int, dtype: np.dtype, whole: bool) -> None:
    """Refuse a synthesis whose output and working arrays would exceed the memory limit, before any allocation.

    Three chunks ``[chunk, L, k]`` of ``dtype`` in flight, the whole int32 ``[tokens, L, k]`` output when
    ``whole``, and per concurrently synthesized layer a few int32/int64 ``[k, chunk]`` arrays and float64
    ``[E, E]`` target and count matrices; float64 ``[L, E, E]`` counts.
    """
    limits.check_count("tokens", num_tokens, f"num_tokens {num_tokens}")
    what = f"a synthesized trace of {num_tokens} tokens x {L} layers x top-{k}"
    out = limits.check_shape((num_tokens, L, k), np.int32, what) if whole else 0
    chunks = 3 * limits.check_shape((chunk, L, k), dtype, what)
    per_layer = 6 * 8 * k * chunk + 10 * 8 * E * E
    limits.check_bytes(out + chunks + workers * per_layer + 8 * L * E * E,
                       f"synthesizing {num_tokens} tokens x {L} layers x top-{k} of {E} experts ({workers} layers at a time)")


def _layer_targets_check(stats: ExpertStats, layer: int) -> None:
    """The cheap input checks of :func:`_layer_targets` (raise GraceInputError naming the layer)."""
    k = stats.top_k
    load, tokens = stats.load[layer], float(stats.tokens[layer])
    if tokens <= 0 or load.sum() <= 0:
        raise GraceInputError(f"layer {layer} has no routed tokens; cannot synthesize it", stats.source or None)
    n_active = int((load > 0).sum())
    if n_active < k:
        raise GraceInputError(
            f"layer {layer}: only {n_active} experts have nonzero load, fewer than top_k={k}; "
            f"no token can choose {k} distinct experts", stats.source or None)
    share = load / load.sum()
    if share.max() * k > 1 + 1e-9:
        e = int(np.argmax(share))
        raise GraceInputError(
            f"layer {layer}: expert {e} receives {share[e]:.1%} of the expert choices, more than 1/top_k = {1 / k:.1%}; "
            "a token cannot choose it twice", stats.source or None)


# ---------------------------------------------------------------------------------------------
# fidelity


def _poisson_mean_abs_dev(mean: np.ndarray) -> np.ndarray:
    """float64 ``[n]``: ``E|X - m|`` for ``X ~ Poisson(m)``, exactly ``2 m pmf(floor(m); m)``."""
    m = np.asarray(mean, dtype=np.float64)
    fl = np.floor(m)
    log_fact = np.frompyfunc(math.lgamma, 1, 1)(fl + 1).astype(np.float64)
    with np.errstate(divide="ignore"):
        log_pmf = np.where(m > 0, fl * np.log(np.maximum(m, 1e-300)) - m - log_fact, -np.inf)
    return 2.0 * m * np.exp(log_pmf)


@dataclass(frozen=True)
class SynthesisFidelity:
    """How well a synthesized trace reproduces its source statistics (see :func:`synthesis_fidelity`).

    Attributes:
        layers: one dict of metrics per layer (keys as in ``overall``, over that layer).
        overall: metrics over all layers (maxima of per-layer maxima; pooled ratios and medians).
        definitions: what every metric means.
    """

    layers: list[dict[str, float]]
    overall: dict[str, float]
    definitions: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"overall", "layers", "definitions"}`` with NaN (undefined metric) as None."""
        def clean(row: dict[str, Any]) -> dict[str, Any]:
            return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}

        return {"overall": clean(self.overall), "layers": [clean(r) for r in self.layers], "definitions": dict(self.definitions)}


def _nanmax(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(max(finite)) if finite else float("nan")


_DEFINITIONS = {
    "load_max_rel_err": "max over experts with expected synthesized count >= min_expected_load of |synth share - target share| / target share",
    "load_max_abs_err_over_mean": "max over ALL experts of |synth count - expected count| / mean expected count of the layer",
    "load_zero_target_chosen": "experts with zero target load that the trace chooses (count of experts)",
    "pair_weighted_rel_err": "listed pairs: sum |c - t| / sum t, t = source count * trace tokens / source tokens",
    "pair_poisson_weighted_rel_err": "the same for an ideal independent sample: sum E|Poisson(t) - t| / sum t (noise floor of sampling)",
    "pair_median_rel_err": "listed pairs: median of |c - t| / t",
    "pair_within_10pct_big": "listed pairs with t >= min_pair_target: share with |c - t| / t <= 0.10",
    "pair_big_count": "listed pairs with t >= min_pair_target",
    "unlisted_listable_share": "unlisted pairs of experts with nonzero load whose synthesized count (rescaled to source tokens) "
                               ">= the layer's smallest listed count and whose synthesized lift >= the smallest listed lift, "
                               "i.e. that the source would have listed; share of unlisted pairs",
    "unlisted_listable_count": "number of such pairs",
    "unlisted_max_lift": "max synthesized lift over unlisted pairs with rescaled count >= the layer's smallest listed count",
}


def _layer_fidelity(stats: ExpertStats, got: ExpertStats, layer: int, share_t: np.ndarray, share_s: np.ndarray,
                    threshold: tuple[np.ndarray, float] | None, min_expected_load: float,
                    min_pair_target: float) -> tuple[dict[str, float], dict[str, Any]]:
    """One layer's metrics (see ``_DEFINITIONS``) and its sums for the pooled overall metrics."""
    E = stats.num_experts
    iu = np.triu_indices(E, 1)
    T = got.tokens[layer]
    expected = share_t * got.load[layer].sum()
    sel = expected >= min_expected_load
    rel = np.abs(share_s - share_t) / share_t  # inf / nan where the target is 0 (not selected)
    part: dict[str, Any] = {}
    row: dict[str, float] = {
        "layer": layer,
        "load_max_rel_err": float(rel[sel].max()) if sel.any() else float("nan"),
        "load_max_abs_err_over_mean": float(np.abs(got.load[layer] - expected).max() / expected.mean()),
        "load_zero_target_chosen": int(((share_t == 0) & (got.load[layer] > 0)).sum()),
    }
    if stats.coactivation is not None:
        scale = T / stats.tokens[layer]
        obs = np.ones((E, E), bool) if stats.coactivation_observed is None else stats.coactivation_observed[layer]
        obs_u = obs[iu]
        t = stats.coactivation[layer][iu][obs_u] * scale
        c = got.coactivation[layer][iu][obs_u]
        pos = t > 0
        prel = np.abs(c - t)[pos] / t[pos]
        big = t >= min_pair_target
        pois = float(_poisson_mean_abs_dev(t).sum())
        row.update({
            "pair_weighted_rel_err": float(np.abs(c - t).sum() / t.sum()) if t.sum() > 0 else float("nan"),
            "pair_poisson_weighted_rel_err": float(pois / t.sum()) if t.sum() > 0 else float("nan"),
            "pair_median_rel_err": float(np.median(prel)) if prel.size else float("nan"),
            "pair_within_10pct_big": float((np.abs(c - t)[big] <= 0.1 * t[big]).mean()) if big.any() else float("nan"),
            "pair_big_count": int(big.sum()),
        })
        part["abs"] = float(np.abs(c - t).sum())
        part["tot"] = float(t.sum())
        part["pois"] = pois
        part["rel"] = prel
        part["within"] = int((np.abs(c - t)[big] <= 0.1 * t[big]).sum())
        part["big"] = int(big.sum())
        if threshold is not None and stats.coactivation_observed is not None:
            min_counts, min_lift = threshold
            active = stats.load[layer] > 0
            unl = (~obs & active[:, None] & active[None, :])[iu]
            cu = got.coactivation[layer][iu][unl]
            n = got.load[layer]
            indep = (n[:, None] * n[None, :] / T)[iu][unl]
            lift = np.where(indep > 0, cu / indep, 0.0)
            countable = cu / scale >= min_counts[layer] - 1e-9
            listable = countable & (lift >= min_lift)
            row.update({
                "unlisted_listable_share": float(listable.mean()) if unl.any() else 0.0,
                "unlisted_listable_count": int(listable.sum()),
                "unlisted_max_lift": float(lift[countable].max()) if countable.any() else 0.0,
            })
            part["listable"] = int(listable.sum())
            part["unlisted"] = int(unl.sum())
    return row, part


def synthesis_fidelity(stats: ExpertStats, trace: RoutingTrace | ExpertStats, min_expected_load: float = 1000.0,
                       min_pair_target: float = 100.0) -> SynthesisFidelity:
    """Compare a (synthesized) trace's load and co-activation with the source statistics.

    ``trace`` is the trace, or its counts (``ExpertStats.from_trace(trace)``, or
    :meth:`TraceSynthesis.counts` of a synthesis written straight to a file).

    Targets are rescaled to the trace's token count (``trace tokens / stats.tokens`` per layer).
    With few expected counts, Poisson noise dominates any relative error, so load errors are
    reported over experts with expected count ``>= min_expected_load`` (plus an absolute error
    over all experts relative to the mean load) and pair errors are pooled (count-weighted), as
    a median, and as the share within 10% among pairs with target ``>= min_pair_target``.
    See ``SynthesisFidelity.definitions`` for the exact formulas.
    """
    if trace.num_layers != stats.num_layers or trace.num_experts != stats.num_experts:
        raise GraceInputError(
            f"trace shape (layers={trace.num_layers}, experts={trace.num_experts}) does not match the statistics "
            f"(layers={stats.num_layers}, experts={stats.num_experts})")
    got = trace if isinstance(trace, ExpertStats) else ExpertStats.from_trace(trace, transitions=False)
    threshold = _listing_threshold(stats)
    per_layer: list[dict[str, float]] = []
    pooled: dict[str, Any] = {"abs": 0.0, "tot": 0.0, "pois": 0.0, "rel": [], "within": 0, "big": 0, "listable": 0, "unlisted": 0}
    share_target, share_got = stats.load_share(), got.load_share()
    for layer in range(stats.num_layers):
        with np.errstate(divide="ignore", invalid="ignore"):  # empty layers give NaN metrics
            row, part = _layer_fidelity(stats, got, layer, share_target[layer], share_got[layer], threshold,
                                        min_expected_load, min_pair_target)
        per_layer.append(row)
        for key, value in part.items():
            if key == "rel":
                pooled["rel"].append(value)
            else:
                pooled[key] += value
    overall: dict[str, float] = {
        "layers": stats.num_layers,
        "tokens": int(got.tokens.max()),
        "load_max_rel_err": _nanmax([r["load_max_rel_err"] for r in per_layer]),
        "load_max_abs_err_over_mean": float(max(r["load_max_abs_err_over_mean"] for r in per_layer)),
        "load_zero_target_chosen": int(sum(r["load_zero_target_chosen"] for r in per_layer)),
        "min_expected_load": float(min_expected_load),
        "min_pair_target": float(min_pair_target),
    }
    if stats.coactivation is not None:
        allrel = np.concatenate(pooled["rel"]) if pooled["rel"] else np.zeros(0)
        overall.update({
            "pair_weighted_rel_err": pooled["abs"] / pooled["tot"] if pooled["tot"] else float("nan"),
            "pair_poisson_weighted_rel_err": pooled["pois"] / pooled["tot"] if pooled["tot"] else float("nan"),
            "pair_median_rel_err": float(np.median(allrel)) if allrel.size else float("nan"),
            "pair_within_10pct_big": pooled["within"] / pooled["big"] if pooled["big"] else float("nan"),
            "pair_big_count": pooled["big"],
            "pair_weighted_rel_err_worst_layer": _nanmax([r["pair_weighted_rel_err"] for r in per_layer]),
        })
        if pooled["unlisted"]:
            overall.update({
                "unlisted_listable_share": pooled["listable"] / pooled["unlisted"],
                "unlisted_listable_count": pooled["listable"],
                "unlisted_max_lift": float(max(r.get("unlisted_max_lift", 0.0) for r in per_layer)),
            })
    return SynthesisFidelity(layers=per_layer, overall=overall, definitions=dict(_DEFINITIONS))
