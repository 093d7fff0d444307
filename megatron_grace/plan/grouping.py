"""Size-bounded, load-aware affinity partitioning: the grouping engine of the planners.

:func:`partition` splits ``n`` experts into ``K`` groups whose sizes lie in per-group bounds
``[lo[k], hi[k]]`` and maximizes

    J = sum over same-group pairs i < j of a[i, j]            (kept affinity)
      + sum over experts e of anchor[e, group(e)]              (optional per-group attraction)
      - balance_weight / K * sum over groups g of (W_g - 1)^2  (load imbalance)

where ``a`` is the affinity normalized by the caller (the planners divide by the layer's total
pair mass, so the kept-affinity term is a fraction in [0, 1]) and ``W_g`` is the group's load
in units of the mean group load (so a perfectly balanced grouping has all ``W_g = 1``).

It follows the GRACE-MoE recipe: spectral clustering (normalized-affinity eigenvectors, then
seeded k-means++) for the initial groups, a repair pass that brings every group inside its
size bounds (an oversized group keeps its most affine experts; the rest go to a pool and are
placed greedily where they add the most to the objective; undersized groups then receive the
weakest members of groups that can spare one), and a local-improvement pass of best single
moves and best pairwise swaps that keeps every size bound (and, with ``load_slack``, never
leaves a group heavier than ``max(mean + load_slack, heaviest group now)``). Gains are computed
for all candidates at once from ``M = a @ onehot(labels)`` (``[n, K]``, updated in O(n) per
move), so one step costs O(n K) for moves and O(n^2) for swaps, never O(n^3).
:func:`refine` runs the improvement pass alone on a given grouping.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

_TOL = 1e-12
_SWAP_MISSES = 16
"""Stale candidates a swap batch skips before it ends and the gains are recomputed."""
_BLOCK_SWAP_MIN_PER_GROUP = 48
"""From this many experts per group on, swap passes first try :meth:`_State.block_swap_candidates`."""
_BLOCK_SWAP_M = 24
"""Candidates per side and group pair of a block swap pass."""
_SPECTRAL_MIN_PER_GROUP = 4
"""Below 4 experts per group the greedy start plus local search is as good and much cheaper."""


def size_bounds(num_experts: int, num_gpus: int, capacity: int, ratio: float) -> tuple[int, int, int]:
    """GRACE-MoE's per-GPU group-size bounds.

    With ``Ē = num_experts / num_gpus`` and ``d = max(1, round(Ē * ratio))`` a GPU hosts between
    ``lo = max(0, floor(Ē) - d)`` and ``hi = min(capacity, ceil(Ē) + d)`` experts of its own group
    (``floor``/``ceil`` only matter when ``Ē`` is fractional).

    Returns:
        ``(lo, hi, d)``.
    """
    mean = num_experts / num_gpus
    d = max(1, int(round(mean * ratio)))
    lo = max(0, int(np.floor(mean + 1e-9)) - d)
    hi = min(int(capacity), int(np.ceil(mean - 1e-9)) + d)
    return lo, hi, d


def equal_sizes(n: int, k: int) -> np.ndarray:
    """int64 ``[k]``: sizes summing to ``n`` that differ by at most one (larger ones first)."""
    sizes = np.full(k, n // k, dtype=np.int64)
    sizes[: n % k] += 1
    return sizes


def partition(
    affinity: np.ndarray,
    load: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    *,
    balance_weight: float = 0.0,
    anchor: np.ndarray | None = None,
    init: str = "spectral",
    local_search: bool = True,
    load_slack: float | None = None,
    rng: np.random.Generator | None = None,
    max_steps: int | None = None,
) -> np.ndarray:
    """Split ``n`` experts into ``K`` size-bounded groups, maximizing the objective of the module doc.

    Args:
        affinity: float64 ``[n, n]``, symmetric; the diagonal is ignored. Negative entries
            (pairs to keep apart) are allowed; spectral initialization uses the positive part.
        load: float64 ``[n]``, non-negative; in units of the mean group load (sum = K for a
            perfectly scaled level; any positive scale works, only ``balance_weight`` relates to it).
        lo, hi: int ``[K]``; group-size bounds with ``lo <= hi`` and ``sum(lo) <= n <= sum(hi)``.
        balance_weight: weight of the load-imbalance penalty (0: affinity only).
        anchor: optional float64 ``[n, K]``; bonus of expert e being in group k (same units as
            the normalized affinity), e.g. between-layer affinity to the previous layer's groups.
        init: ``"spectral"`` (spectral clustering), or ``"greedy"`` (heaviest expert to the
            lightest group with room; used automatically when there is no affinity signal or
            fewer than 4 experts per group).
        local_search: run the move/swap improvement pass after the repair.
        load_slack: optional hard balance rule of the improvement pass: no step leaves a group
            heavier than ``max(mean + load_slack, current heaviest group)``, in load units.
        rng: random generator for k-means++ seeding (deterministic default seed 0).
        max_steps: cap on improvement steps (default ``20 n + 100``).

    Returns:
        int64 ``[n]``: group of each expert, every group size inside its bounds.
    """
    A = np.array(affinity, dtype=np.float64, copy=True)
    n = A.shape[0]
    np.fill_diagonal(A, 0.0)
    w = np.asarray(load, dtype=np.float64)
    lo = np.asarray(lo, dtype=np.int64)
    hi = np.asarray(hi, dtype=np.int64)
    K = lo.shape[0]
    if not (lo.sum() <= n <= hi.sum() and (lo <= hi).all()):
        raise ValueError(f"infeasible size bounds for {n} experts: lo={lo.tolist()} hi={hi.tolist()}")
    if K == 1 or n == 0:
        return np.zeros(n, dtype=np.int64)
    rng = rng if rng is not None else np.random.default_rng(0)
    has_affinity = bool((A > 0).any())
    if init == "spectral" and has_affinity and n >= _SPECTRAL_MIN_PER_GROUP * K:
        labels = _spectral_labels(A, K, rng)
    elif init in ("spectral", "greedy"):
        labels = _greedy_labels(w, lo, hi, anchor)
    else:
        raise ValueError(f"unknown init {init!r}")
    state = _State(A, w, labels, K, balance_weight / K, anchor)
    state.repair(lo, hi)
    if local_search:
        state.improve(lo, hi, max_steps if max_steps is not None else 20 * n + 100, load_slack)
    return state.labels


def refine(
    affinity: np.ndarray,
    load: np.ndarray,
    labels: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    *,
    balance_weight: float = 0.0,
    anchor: np.ndarray | None = None,
    load_slack: float | None = None,
    max_steps: int | None = None,
) -> np.ndarray:
    """Local improvement (moves and swaps) of a given valid grouping; same objective as :func:`partition`.

    Args:
        affinity: float64 ``[n, n]`` (a large negative entry keeps two items apart, e.g. two
            copies of one expert).
        load: float64 ``[n]``; labels: int ``[n]`` current groups (sizes inside ``[lo, hi]``).
        anchor: optional float64 ``[n, K]`` per-group bonus.
        load_slack: as in :func:`partition`.

    Returns:
        int64 ``[n]`` improved groups.
    """
    A = np.array(affinity, dtype=np.float64, copy=True)
    np.fill_diagonal(A, 0.0)
    lo = np.asarray(lo, dtype=np.int64)
    hi = np.asarray(hi, dtype=np.int64)
    n, K = A.shape[0], lo.shape[0]
    if K == 1 or n == 0:
        return np.asarray(labels, dtype=np.int64).copy()
    state = _State(A, np.asarray(load, dtype=np.float64), np.asarray(labels), K, balance_weight / K, anchor)
    state.improve(lo, hi, max_steps if max_steps is not None else 20 * n + 100, load_slack)
    return state.labels


# ---------------------------------------------------------------------------- initialization
def _greedy_labels(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, anchor: np.ndarray | None) -> np.ndarray:
    """Longest-processing-time packing: heaviest expert first, to the lightest group with room.

    Groups below ``lo`` are served first so that the result already respects the lower bounds
    whenever the upper bounds allow it; ties go to the group with the largest anchor, then the
    lowest index.
    """
    n, K = w.shape[0], lo.shape[0]
    order = np.lexsort((np.arange(n), -w))
    labels = np.empty(n, dtype=np.int64)
    size = np.zeros(K, dtype=np.int64)
    W = np.zeros(K)
    need = int(lo.sum())
    for e in order:
        remaining = n - int(size.sum())
        room = size < hi
        # when the remaining experts are just enough to fill the lower bounds, only fill those
        if remaining <= need:
            room &= size < lo
        key = np.where(room, W, np.inf)
        if anchor is not None:
            key = key - 1e-9 * anchor[e]
        g = int(np.argmin(key))
        labels[e] = g
        if size[g] < lo[g]:
            need -= 1
        size[g] += 1
        W[g] += w[e]
    return labels


def _spectral_labels(A: np.ndarray, K: int, rng: np.random.Generator) -> np.ndarray:
    """Spectral clustering: top-K eigenvectors of the normalized (regularized) affinity, k-means.

    Negative affinities (pairs co-activated less than independence predicts) are clipped to 0
    here; the affinity gets a small uniform term (10% of the mean degree spread over all pairs)
    so that experts with no positive affinity (never-chosen experts) stay connected.
    """
    n = A.shape[0]
    A = np.maximum(A, 0.0)
    deg = A.sum(axis=1)
    reg = 0.1 * deg.mean() / n
    Ar = A + reg
    np.fill_diagonal(Ar, 0.0)
    d = Ar.sum(axis=1)
    dinv = 1.0 / np.sqrt(np.maximum(d, 1e-300))
    Nm = Ar * dinv[:, None] * dinv[None, :]
    _, vecs = scipy.linalg.eigh(Nm, subset_by_index=[n - K, n - 1], check_finite=False)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    X = vecs / np.maximum(norms, 1e-12)
    return kmeans(X, K, rng)


def kmeans(X: np.ndarray, K: int, rng: np.random.Generator, n_init: int = 2, iters: int = 40) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; the best of ``n_init`` runs by inertia.

    Args:
        X: float64 ``[n, dim]`` points.
        K: clusters (``K <= n``).

    Returns:
        int64 ``[n]`` cluster labels (an emptied cluster is re-seeded with the farthest point).
    """
    n = X.shape[0]
    sq = (X * X).sum(axis=1)
    best_labels, best_inertia = None, np.inf
    for _ in range(n_init):
        centers = np.empty((K, X.shape[1]))
        centers[0] = X[rng.integers(n)]
        d2 = ((X - centers[0]) ** 2).sum(axis=1)
        for c in range(1, K):
            total = d2.sum()
            idx = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
            centers[c] = X[idx]
            d2 = np.minimum(d2, ((X - centers[c]) ** 2).sum(axis=1))
        labels = np.full(n, -1, dtype=np.int64)
        for _ in range(iters):
            dist = sq[:, None] - 2.0 * X @ centers.T + (centers * centers).sum(axis=1)[None, :]
            new = np.argmin(dist, axis=1)
            counts = np.bincount(new, minlength=K)
            for c in np.flatnonzero(counts == 0):  # re-seed empty clusters with the worst-served point
                far = int(np.argmax(dist[np.arange(n), new]))
                new[far] = c
                dist[far] = -np.inf
                counts = np.bincount(new, minlength=K)
            if np.array_equal(new, labels):
                break
            labels = new
            onehot = np.zeros((n, K))
            onehot[np.arange(n), labels] = 1.0
            centers = (onehot.T @ X) / np.maximum(counts, 1)[:, None]
        inertia = float(((X - centers[labels]) ** 2).sum())
        if inertia < best_inertia - 1e-12:
            best_labels, best_inertia = labels.copy(), inertia
    assert best_labels is not None
    return best_labels


# ---------------------------------------------------------------------------- repair and local search
class _State:
    """A grouping with its incremental tables.

    Attributes:
        A: ``[n, n]`` affinity (zero diagonal); w: ``[n]`` load; labels: ``[n]``;
        M: ``[n, K]`` affinity of each expert to each group (itself excluded);
        size: ``[K]``; W: ``[K]`` group loads; mu: load-penalty weight per group;
        anchor: ``[n, K]`` or None.
    """

    def __init__(self, A: np.ndarray, w: np.ndarray, labels: np.ndarray, K: int, mu: float, anchor: np.ndarray | None) -> None:
        n = A.shape[0]
        self.A, self.w, self.K, self.mu, self.anchor = A, w, K, float(mu), anchor
        self.labels = labels.astype(np.int64).copy()
        onehot = np.zeros((n, K))
        onehot[np.arange(n), self.labels] = 1.0
        self.M = A @ onehot
        self.size = np.bincount(self.labels, minlength=K).astype(np.int64)
        self.W = np.bincount(self.labels, weights=w, minlength=K)
        self.idx = np.arange(n)

    def move(self, e: int, b: int) -> None:
        a = int(self.labels[e])
        col = self.A[:, e]
        self.M[:, a] -= col
        self.M[:, b] += col
        self.labels[e] = b
        self.size[a] -= 1
        self.size[b] += 1
        self.W[a] -= self.w[e]
        self.W[b] += self.w[e]

    def move_gains(self, rows: np.ndarray | None = None) -> np.ndarray:
        """``[n, K]`` objective gain of moving expert e to group k (own group -> -inf)."""
        lab = self.labels
        own = self.M[self.idx, lab]
        gain = self.M - own[:, None]
        if self.anchor is not None:
            gain += self.anchor - self.anchor[self.idx, lab][:, None]
        if self.mu:
            w = self.w[:, None]
            gain -= self.mu * 2.0 * w * (self.W[None, :] - self.W[lab][:, None] + w)
        gain[self.idx, lab] = -np.inf
        return gain

    def swap_gains(self, cap: float | None = None) -> np.ndarray:
        """``[n, n]`` objective gain of exchanging experts e and f (same group, or a group over ``cap`` after it: -inf)."""
        lab = self.labels
        own = self.M[self.idx, lab]
        Q = self.M[:, lab]  # Q[e, f] = M[e, lab f] - M[e, lab e]
        Q -= own[:, None]
        gain = Q + Q.T
        gain -= 2.0 * self.A
        if self.anchor is not None:
            R = self.anchor[:, lab] - self.anchor[self.idx, lab][:, None]
            gain += R + R.T
        if self.mu or cap is not None:
            delta = self.w[:, None] - self.w[None, :]  # w_e - w_f
            Wl = self.W[lab]
            if self.mu:
                t = Wl[None, :] - Wl[:, None]
                t += delta
                t *= delta
                t *= 2.0 * self.mu
                gain -= t
            if cap is not None:
                gain[(Wl[:, None] - delta > cap) | (Wl[None, :] + delta > cap)] = -np.inf
        gain[lab[:, None] == lab[None, :]] = -np.inf
        return gain

    def block_swap_candidates(self, m: int, cap: float | None, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Improving swaps among each group pair's ``m`` most promising members (a cheap pre-pass to :meth:`swap_gains`).

        For groups ``a < b``, expert e of a and f of b are ranked by the part of the swap gain
        that depends on one of them (``M[e, b] - M[e, a]`` plus the linear part of the balance
        term); the ``m x m`` block of exact gains between the best of each side is evaluated.
        O(K^2 m^2 + n K) instead of O(n^2); it can miss improving swaps, so the local search
        ends only after a full :meth:`swap_gains` pass finds none.

        Returns:
            ``(e, f, gain)``: int64, int64, float64 ``[c]``, every gain above ``tol``.
        """
        lab, w, W = self.labels, self.w, self.W
        U = self.M - self.M[self.idx, lab][:, None]  # [n, K] gain of e's attachment when moving to k
        if self.anchor is not None:
            U = U + self.anchor - self.anchor[self.idx, lab][:, None]
        order = np.argsort(lab, kind="stable")
        bounds = np.searchsorted(lab[order], np.arange(self.K + 1))
        members = [order[bounds[k]: bounds[k + 1]] for k in range(self.K)]
        es, fs, gs = [], [], []
        for a in range(self.K):
            ia = members[a]
            if ia.size == 0:
                continue
            for b in range(a + 1, self.K):
                ib = members[b]
                if ib.size == 0:
                    continue
                dW = W[b] - W[a]
                sa = U[ia, b] - 2.0 * self.mu * w[ia] * dW
                sb = U[ib, a] + 2.0 * self.mu * w[ib] * dW
                ta = ia if ia.size <= m else ia[np.argpartition(-sa, m - 1)[:m]]
                tb = ib if ib.size <= m else ib[np.argpartition(-sb, m - 1)[:m]]
                delta = w[ta][:, None] - w[tb][None, :]
                g = U[ta, b][:, None] + U[tb, a][None, :] - 2.0 * self.A[np.ix_(ta, tb)]
                if self.mu:
                    g -= 2.0 * self.mu * delta * (dW + delta)
                if cap is not None:
                    g[(W[a] - delta > cap) | (W[b] + delta > cap)] = -np.inf
                i, j = np.nonzero(g > tol)
                if i.size:
                    es.append(ta[i])
                    fs.append(tb[j])
                    gs.append(g[i, j])
        if not es:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0)
        return np.concatenate(es), np.concatenate(fs), np.concatenate(gs)

    def move_gain(self, e: int, b: int, lo: np.ndarray, hi: np.ndarray, cap: float | None) -> float:
        """Objective gain of moving expert e to group b now (-inf if not allowed)."""
        a = int(self.labels[e])
        we = float(self.w[e])
        if a == b or self.size[b] + 1 > hi[b] or self.size[a] - 1 < lo[a]:
            return -np.inf
        if cap is not None and (self.W[b] + we > cap or self.W[a] - we > cap):
            return -np.inf
        gain = self.M[e, b] - self.M[e, a]
        if self.anchor is not None:
            gain += self.anchor[e, b] - self.anchor[e, a]
        if self.mu:
            gain -= self.mu * 2.0 * we * (self.W[b] - self.W[a] + we)
        return float(gain)

    def swap_gain(self, e: int, f: int, cap: float | None) -> float:
        """Objective gain of exchanging experts e and f now (-inf if same group or over ``cap``)."""
        a, b = int(self.labels[e]), int(self.labels[f])
        if a == b:
            return -np.inf
        delta = float(self.w[e] - self.w[f])
        if cap is not None and (self.W[a] - delta > cap or self.W[b] + delta > cap):
            return -np.inf
        gain = self.M[e, b] - self.M[e, a] + self.M[f, a] - self.M[f, b] - 2.0 * self.A[e, f]
        if self.anchor is not None:
            gain += self.anchor[e, b] - self.anchor[e, a] + self.anchor[f, a] - self.anchor[f, b]
        if self.mu:
            gain -= self.mu * 2.0 * delta * (self.W[b] - self.W[a] + delta)
        return float(gain)

    # -------------------------------------------------------------- repair
    def repair(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Bring every group size into ``[lo, hi]`` (GRACE-MoE's repair pass)."""
        pool: list[int] = []
        for g in np.flatnonzero(self.size > hi):
            # oversized: repeatedly drop the member least attached to the rest of the group
            while self.size[g] > hi[g]:
                members = np.flatnonzero(self.labels == g)
                e = int(members[np.argmin(self.M[members, g])])
                self._detach(e)
                pool.append(e)
        if pool:
            # place the pool greedily: strongest-attached experts first, each where it gains most
            pool_arr = np.array(pool)
            for e in pool_arr[np.argsort(-self.A[pool_arr].sum(axis=1), kind="stable")]:
                gain = self._attach_gains(int(e))
                gain[self.size >= hi] = -np.inf
                self._attach(int(e), int(np.argmax(gain)))
        while (self.size < lo).any():
            # undersized: the member whose move costs least goes from a group that can spare one
            u = int(np.argmax(lo - self.size))
            donors = self.size[self.labels] > lo[self.labels]
            donors &= self.labels != u
            gain = self.move_gains()[:, u]
            gain[~donors] = -np.inf
            self.move(int(np.argmax(gain)), u)

    def _detach(self, e: int) -> None:
        a = int(self.labels[e])
        self.M[:, a] -= self.A[:, e]
        self.size[a] -= 1
        self.W[a] -= self.w[e]
        self.labels[e] = -1

    def _attach(self, e: int, b: int) -> None:
        self.M[:, b] += self.A[:, e]
        self.size[b] += 1
        self.W[b] += self.w[e]
        self.labels[e] = b

    def _attach_gains(self, e: int) -> np.ndarray:
        gain = self.M[e].copy()
        if self.anchor is not None:
            gain += self.anchor[e]
        if self.mu:
            gain -= self.mu * (2.0 * self.w[e] * self.W + self.w[e] ** 2)
        return gain

    # -------------------------------------------------------------- local search
    def improve(self, lo: np.ndarray, hi: np.ndarray, max_steps: int, load_slack: float | None = None) -> int:
        """Best-improvement moves, then swaps, until no step gains more than a tolerance.

        Args:
            load_slack: when given, no step may leave a group heavier than
                ``max(mean group load + load_slack, current heaviest group)``: the heaviest
                group never gets heavier, and groups within the slack are free.

        Returns:
            The number of steps taken.
        """
        steps = 0
        n = self.A.shape[0]
        tol = _TOL * max(float(np.abs(self.A).sum()), 1.0)
        base = float(self.W.sum()) / self.K
        use_blocks = n >= _BLOCK_SWAP_MIN_PER_GROUP * self.K
        while steps < max_steps:
            gain = self.move_gains()
            gain[:, self.size + 1 > hi] = -np.inf
            gain[self.size[self.labels] - 1 < lo[self.labels]] = -np.inf
            if load_slack is not None:
                cap = max(base + load_slack, float(self.W.max())) + 1e-12
                w = self.w[:, None]
                gain[(self.W[None, :] + w > cap) | (self.W[self.labels][:, None] - w > cap)] = -np.inf
            flat_gain = gain.ravel()
            cand = np.flatnonzero(flat_gain > tol)
            if cand.size:
                # a batch of improving moves from this one O(n K) evaluation, best first, each on a
                # fresh expert and re-checked against the current state (sizes, loads, gains)
                cand = cand[np.argsort(-flat_gain[cand], kind="stable")][: max(n // 4, 1)]
                moved = np.zeros(n, dtype=bool)
                for k, flat in enumerate(cand):
                    e, b = divmod(int(flat), self.K)
                    if moved[e]:
                        continue
                    if k:
                        cap = None if load_slack is None else max(base + load_slack, float(self.W.max())) + 1e-12
                        if self.move_gain(e, b, lo, hi, cap) <= tol:
                            break
                    self.move(e, b)
                    moved[e] = True
                    steps += 1
                    if steps >= max_steps:
                        break
                continue
            cap_now = cap if load_slack is not None else None
            e_c = f_c = None
            if use_blocks:
                e_c, f_c, g_c = self.block_swap_candidates(_BLOCK_SWAP_M, cap_now, tol)
                if e_c.size == 0:
                    e_c = None  # confirm with a full pass
            if e_c is None:
                flat_gain = self.swap_gains(cap_now).ravel()
                cand = np.flatnonzero(flat_gain > tol)
                cand = cand[cand // n < cand % n]  # the gain is symmetric: each pair once
                if cand.size == 0:
                    break
                if cand.size > n:
                    cand = cand[np.argpartition(-flat_gain[cand], n - 1)[:n]]
                e_c, f_c, g_c = cand // n, cand % n, flat_gain[cand]
            # apply a batch of improving swaps from this one evaluation: best first, on fresh
            # experts, each re-checked against the current state (earlier swaps change M and W);
            # a candidate that no longer improves is skipped, and the batch ends after
            # _SWAP_MISSES of those (the rest of the list is then mostly stale)
            rank = np.argsort(-g_c, kind="stable")
            e_c, f_c = e_c[rank], f_c[rank]
            moved = np.zeros(n, dtype=bool)
            applied = misses = 0
            for e, f in zip(e_c.tolist(), f_c.tolist()):
                if moved[e] or moved[f]:
                    continue
                if applied:
                    cap = None if load_slack is None else max(base + load_slack, float(self.W.max())) + 1e-12
                    if self.swap_gain(e, f, cap) <= tol:
                        misses += 1
                        if misses >= _SWAP_MISSES:
                            break
                        continue
                a, b = int(self.labels[e]), int(self.labels[f])
                self.move(e, b)
                self.move(f, a)
                moved[e] = moved[f] = True
                applied += 1
                steps += 1
                if steps >= max_steps:
                    break
        return steps

    def objective(self) -> float:
        """Current value of J (for tests and diagnostics)."""
        kept = 0.5 * float(self.M[self.idx, self.labels].sum())
        anch = 0.0 if self.anchor is None else float(self.anchor[self.idx, self.labels].sum())
        return kept + anch - self.mu * float(((self.W - 1.0) ** 2).sum())
