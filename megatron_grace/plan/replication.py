"""Replication of hot experts into free slots, balance first and locality second.

Load prediction is static, as in GRACE-MoE and DeepSeek EPLB: an expert with ``c`` copies is
predicted to send ``load / c`` tokens to each copy, and a GPU's predicted load is the sum of
the shares of the experts it hosts. A copy always goes to a GPU with a free slot and no copy
of that expert yet. Both strategies below score GPUs partly by **locality**: the share of the
expert's co-activation mass that the new copy serves locally, i.e. its partners hosted on the
GPU's node (counted only when that node has no copy of the expert yet, and only for partners
that share no node with it yet), plus ``gpu_share`` times its partners on the GPU itself that
share no GPU with it yet. A copy placed where the expert's co-activated partners live lets
tokens that need both stay on that node (locality-aware routing then picks it).

:func:`add_planned_replicas` (the ``grace`` planner's default): copy counts by DeepSeek EPLB's
rule (one copy at a time to the expert with the highest load per copy), then the copies are
packed largest share first, each onto the GPU with the lowest
``load_after / mean - locality_weight * locality``. A longest-processing-time packing: the
big pieces go first, so the small ones can even out what is left.

:func:`add_replicas` (incremental; used for ``replicas="auto"``) adds one copy at a time,
scoring every candidate (expert e, GPU g) by

    cost(e, g) = balance(e, g) / mean + fill_weight * load_after(e, g) / mean
                 - locality_weight * locality(e, g)

where ``load_after`` is g's own new load (among equals, the lighter GPU) and ``balance``:

1. **Reduce the maximum.** The candidates are the experts on the heaviest GPU h (only their
   copies can lower the maximum), ``balance`` is the larger of h's and g's new loads, and only
   targets that stay below h's current load qualify, so h gets lighter and no GPU reaches its
   old load (the sorted load vector improves even when another GPU ties for the maximum).
2. **Fill** (when no copy lowers the maximum any more, and no ``balance_target`` is set):
   ``balance`` is the predicted maximum GPU load after the copy; the expert with the highest
   load per copy (EPLB's rule: it spreads the hottest experts, the most exposed to load drift)
   goes to its best GPU among those where the copy does not raise the predicted maximum; when
   no expert has such a GPU, the remaining slots stay empty (a copy there could only hurt).
3. **Stop** when no slot can take a useful copy, after ``max_new`` copies, or, with
   ``balance_target``, as soon as the predicted max/mean GPU load is at or below it.

Experts with zero load are never copied.

:func:`add_demand_replicas` (the ``grace`` planner's default since issue 12) plans for the
router the layer serves with instead: under locality-first routing a node's demand for an
expert stays on that node's copies, so the equal-share model above is wrong for copies spread
unevenly over nodes (a node with one copy of a hot expert overflows while another node's three
copies idle). Its model (:func:`node_copy_load`): the copies on node ``n`` share that node's
demand ``load * node_share[n]``, and the demand of nodes without a copy is split over all
copies. The serving prediction recorded in a plan runs the router itself
(:func:`megatron_grace.simulation.policies.serving_gpu_load`).
"""

from __future__ import annotations

import numpy as np

from megatron_grace.errors import GraceInputError

_FILL_CHUNK = 16


def predicted_gpu_load(layer_hosts: np.ndarray, num_gpus: int, expert_load: np.ndarray | None = None) -> np.ndarray:
    """float64 ``[G]``: one layer's static predicted GPU load (GRACE-MoE, DeepSeek EPLB).

    Every copy of expert ``e`` takes an equal share ``expert_load[e] / copies[e]``; a GPU's
    predicted load is the sum of the shares of the copies it hosts. The one implementation:
    the planners, the simulator and the routing layer's load predictor all use it.

    Args:
        layer_hosts: int ``[E, R]`` hosting GPU of each copy, -1 where there is none
            (``PlacementPlan.expert_gpus[layer]``; any -1 positions).
        num_gpus: G.
        expert_load: float ``[E]`` expert load, or None for 1 per expert.

    Raises:
        GraceInputError: ``expert_load`` does not have one entry per expert.
    """
    hosts = np.asarray(layer_hosts)
    E = hosts.shape[0]
    load = np.ones(E) if expert_load is None else np.asarray(expert_load, dtype=np.float64).reshape(-1)
    if load.shape != (E,):
        raise GraceInputError(f"expert_load has {load.shape[0]} entries, the plan has {E} experts")
    present = hosts >= 0
    copies = np.maximum(present.sum(axis=1), 1)
    share = np.broadcast_to((load / copies)[:, None], hosts.shape)
    return np.bincount(hosts[present], weights=share[present], minlength=num_gpus).astype(np.float64)


def add_replicas(
    hosts: np.ndarray,
    load: np.ndarray,
    capacity: int,
    gpus_per_node: int,
    *,
    affinity: np.ndarray | None = None,
    max_new: int | None = None,
    balance_target: float | None = None,
    locality_weight: float = 0.1,
    fill_weight: float = 0.1,
    gpu_share: float = 0.25,
) -> tuple[np.ndarray, int]:
    """Add replicas of hot experts into the free slots (see the module doc for the rules).

    Args:
        hosts: bool ``[G, E]``; current placement (every expert on at least one GPU).
        load: float64 ``[E]``; expert load of the layer.
        capacity: slots per GPU.
        gpus_per_node: GPUs per node (GPUs are node-major).
        affinity: float64 ``[E, E]`` co-activation (zero diagonal) or None (balance only).
        max_new: at most this many copies (None: as many as are useful).
        balance_target: stop once predicted max/mean GPU load <= this, and never add copies
            that do not lower the maximum (None: reduce the maximum, then fill).
        locality_weight: weight of the locality term in the cost.
        fill_weight: weight of the target GPU's own new load in the cost.
        gpu_share: weight of same-GPU partners relative to same-node partners in ``locality``.

    Returns:
        ``(hosts, added)``: the new bool ``[G, E]`` placement and the number of copies added.
    """
    hosts = hosts.copy()
    G, E = hosts.shape
    w = np.asarray(load, dtype=np.float64)
    total = float(w.sum())
    if total <= 0:
        return hosts, 0
    mean = total / G
    copies = hosts.sum(axis=0).astype(np.int64)
    free = capacity - hosts.sum(axis=1)
    gpu_load = predicted_gpu_load(np.where(hosts.T, np.arange(G), -1), G, w)
    node = np.arange(G) // gpus_per_node
    # incremental tables for the locality term: node hosting and each GPU's expert ids
    on_node = (hosts.reshape(-1, gpus_per_node, E).any(axis=1)).astype(np.float64)  # [N, E]
    slots = np.full((G, max(capacity, 1)), E, dtype=np.int64)  # [G, capacity], padded with E
    count = hosts.sum(axis=1)
    for g in range(G):
        slots[g, : count[g]] = np.flatnonzero(hosts[g])
    use_locality = affinity is not None and locality_weight > 0
    added = 0
    filling = False
    tol = 1e-9 * mean
    while (free > 0).any() and (max_new is None or added < max_new):
        peak = float(gpu_load.max())
        if balance_target is not None and peak <= balance_target * mean * (1 + 1e-12):
            break
        copyable = (w > 0) & (copies < G)
        choice = None
        if not filling:
            h = int(np.argmax(gpu_load))
            cand = np.flatnonzero(hosts[h] & copyable)
            if cand.size:
                _, after, new_h = _outcomes(cand, hosts, gpu_load, w, copies, h)
                # lower the heaviest GPU h as far as possible while its partner stays lighter:
                # the larger of the two new loads is the balance cost
                cost = np.maximum(new_h[:, None], after) / mean + fill_weight * after / mean
                cost[(after >= peak - tol) | (free[None, :] <= 0) | hosts[:, cand].T] = np.inf
                if use_locality:
                    cost -= locality_weight * _locality(cand, hosts, slots, on_node, node, affinity, gpu_share)
                if np.isfinite(cost).any():
                    i, g = divmod(int(np.argmin(cost)), G)
                    choice = (int(cand[i]), g)
            if choice is None:
                if balance_target is not None:
                    break
                filling = True
        if choice is None:
            order = np.flatnonzero(copyable)
            order = order[np.lexsort((order, -(w[order] / copies[order])))]
            for lo in range(0, order.size, _FILL_CHUNK):  # hottest per copy first, in vectorized chunks
                chunk = order[lo: lo + _FILL_CHUNK]
                max_after, after, _ = _outcomes(chunk, hosts, gpu_load, w, copies, None)
                cost = max_after / mean + fill_weight * after / mean
                # a fill copy must not raise the predicted maximum
                cost[(max_after > peak + tol) | (free[None, :] <= 0) | hosts[:, chunk].T] = np.inf
                ok = np.flatnonzero(np.isfinite(cost).any(axis=1))
                if ok.size:
                    i = int(ok[0])
                    row = cost[i]
                    if use_locality:
                        row = row - locality_weight * _locality(chunk[i:i + 1], hosts, slots, on_node, node, affinity, gpu_share)[0]
                    choice = (int(chunk[i]), int(np.argmin(row)))
                    break
            if choice is None:
                break
        e, g = choice
        drop = w[e] / copies[e] - w[e] / (copies[e] + 1)
        gpu_load = gpu_load - hosts[:, e] * drop
        hosts[g, e] = True
        slots[g, count[g]] = e
        count[g] += 1
        on_node[node[g], e] = 1.0
        copies[e] += 1
        gpu_load[g] += w[e] / copies[e]
        free[g] -= 1
        added += 1
    return hosts, added


def add_planned_replicas(
    hosts: np.ndarray,
    load: np.ndarray,
    capacity: int,
    gpus_per_node: int,
    *,
    affinity: np.ndarray | None = None,
    max_new: int | None = None,
    locality_weight: float = 0.1,
    gpu_share: float = 0.0,
    max_copies: int | np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Replicate by planned copy counts, then pack the copies largest first (EPLB-like, locality-aware).

    The copy counts come from DeepSeek EPLB's rule (one copy at a time to the expert with the
    highest load per copy, at most one copy per GPU) for ``min(max_new, free slots)`` copies;
    every GPU's load is then predicted with those final shares, and the copies are placed
    largest share first, each on the GPU (free slot, no copy of it yet) with the lowest

        load_after(g) / mean - locality_weight * locality(e, g)

    (longest-processing-time packing with a locality preference; the locality of an expert is
    computed once for all its copies, which are placed one after another). A copy with no
    admissible GPU is dropped. ``gpu_share`` defaults to 0 here: the grace planner rearranges
    each node's experts among its GPUs afterwards, so only the node of a copy matters for
    locality. ``max_copies`` (an int or int ``[E]``) caps the copies of each expert (None: one per GPU at most); the
    ``grace`` planner caps them at the node count, since a copy beyond one per node adds no
    locality and its slot is better spent on another expert; slots the cap would leave empty
    are filled after the capped copies, by load per copy. Other arguments and the return
    value as :func:`add_replicas`.
    """
    from megatron_grace.plan.eplb import replicate_by_load

    hosts = hosts.copy()
    G, E = hosts.shape
    w = np.asarray(load, dtype=np.float64)
    total = float(w.sum())
    free = capacity - hosts.sum(axis=1)
    budget = int(free.sum()) if max_new is None else min(int(max_new), int(free.sum()))
    if total <= 0 or budget <= 0:
        return hosts, 0
    mean = total / G
    have = hosts.sum(axis=0)
    live = np.where(have > 0, w, 0.0)
    target = replicate_by_load(live, E + budget, G if max_copies is None else np.clip(max_copies, 1, G))
    if max_copies is not None:
        # The cap orders the copies (one per node first); slots it would leave empty are still
        # filled, each by the expert with the highest load per copy (at most one copy per GPU).
        spare = E + budget - int(target.sum())
        while spare > 0:
            per_copy = np.where((target < G) & (live > 0), live / np.maximum(target, 1), -1.0)
            e = int(np.argmax(per_copy))
            if per_copy[e] <= 0:
                break
            target[e] += 1
            spare -= 1
    target = np.where(w > 0, np.maximum(target, have), have)
    share = w / target
    gpu_load = hosts.astype(np.float64) @ share
    node = np.arange(G) // gpus_per_node
    on_node = hosts.reshape(-1, gpus_per_node, E).any(axis=1).astype(np.float64)
    slots = np.full((G, max(capacity, 1)), E, dtype=np.int64)
    count = hosts.sum(axis=1)
    for g in range(G):
        slots[g, : count[g]] = np.flatnonzero(hosts[g])
    use_locality = affinity is not None and locality_weight > 0
    items = np.repeat(np.arange(E), np.maximum(target - have, 0))
    items = items[np.lexsort((items, -share[items]))]
    added = 0
    loc_expert, loc_row = -1, np.zeros(G)
    for e in items:
        cost = (gpu_load + share[e]) / mean
        cost[(free <= 0) | hosts[:, e]] = np.inf
        if not np.isfinite(cost).any():
            continue
        if use_locality:
            if e != loc_expert:  # the copies of one expert are consecutive: one locality row for all
                loc_expert = int(e)
                loc_row = locality_weight * _locality(np.array([e]), hosts, slots, on_node, node, affinity, gpu_share)[0]
            cost = cost - loc_row
        g = int(np.argmin(cost))
        hosts[g, e] = True
        slots[g, count[g]] = e
        count[g] += 1
        on_node[node[g], e] = 1.0
        gpu_load[g] += share[e]
        free[g] -= 1
        added += 1
        if use_locality:
            loc_row[node == node[g]] = 0.0  # e now has a copy on that node
    return hosts, added


def _outcomes(cand: np.ndarray, hosts: np.ndarray, gpu_load: np.ndarray, w: np.ndarray, copies: np.ndarray,
              h: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Predicted loads after copying each candidate expert to each GPU.

    Args:
        cand: int ``[C]`` candidate experts; h: a GPU whose new load to report, or None.

    Returns:
        ``(max_after, after, new_h)``: float64 ``[C, G]`` maximum GPU load and target GPU load
        after the copy, and float64 ``[C]`` GPU h's new load (None without h).
    """
    G = hosts.shape[0]
    c = copies[cand]
    new_share = w[cand] / (c + 1)
    drop = w[cand] / c - new_share
    reduced = gpu_load[None, :] - hosts[:, cand].T * drop[:, None]  # [C, G]
    rows = np.arange(cand.size)
    top = np.argmax(reduced, axis=1)
    first = reduced[rows, top]
    masked = reduced.copy()
    masked[rows, top] = -np.inf
    second = masked.max(axis=1) if G > 1 else np.full(cand.size, -np.inf)
    rest_max = np.where(np.arange(G)[None, :] == top[:, None], second[:, None], first[:, None])
    after = reduced + new_share[:, None]
    return np.maximum(rest_max, after), after, (None if h is None else reduced[:, h])


def _locality(cand: np.ndarray, hosts: np.ndarray, slots: np.ndarray, on_node: np.ndarray, node: np.ndarray,
              affinity: np.ndarray, gpu_share: float) -> np.ndarray:
    """float64 ``[C, G]``: share of each candidate's co-activation mass a new copy on each GPU serves locally.

    Args:
        cand: int ``[C]`` candidate experts; hosts: bool ``[G, E]``; slots: int ``[G, S]`` expert
        ids per GPU padded with E; on_node: float 0/1 ``[N, E]`` node hosting; node: int ``[G]``
        node of each GPU; affinity: ``[E, E]``.
    """
    E = hosts.shape[1]
    a = np.zeros((cand.size, E + 1))
    a[:, :E] = affinity[cand]
    total = a.sum(axis=1)
    cand_node = on_node[:, cand].T > 0  # [C, N]
    node_open = a[:, :E].copy()  # partners that share no node with the candidate yet
    for i in range(cand.size):
        node_open[i][on_node[cand_node[i]].any(axis=0)] = 0.0
    node_gain = node_open @ on_node.T  # [C, N]
    node_gain[cand_node] = 0.0
    out = node_gain[:, node]
    if gpu_share:
        gpu_open = a.copy()  # partners that share no GPU with the candidate yet
        for i, e in enumerate(cand):
            gpu_open[i, slots[hosts[:, e]].ravel()] = 0.0
        out = out + gpu_share * gpu_open[:, slots].sum(axis=2)  # [C, G]
    return np.divide(out, total[:, None], out=np.zeros_like(out), where=total[:, None] > 0)


# ------------------------------------------------------------------------------ demand-aware copies
def node_copy_load(copies_on_node: np.ndarray, load: np.ndarray, node_share: np.ndarray) -> np.ndarray:
    """float64 ``[N, E]``: per-copy load of every expert on every node under locality-first routing.

    The planning model of the serving router (``grace`` policy: own GPU, else own node, else
    anywhere): the demand for expert ``e`` arising on node ``n`` is ``load[e] * node_share[n]``
    (tokens start on GPU ``t mod G``, so ``node_share`` is ``1 / N`` for round-robin placement).
    A node with copies of ``e`` keeps its own demand and splits it over its copies; the demand
    of nodes without a copy goes to the copies anywhere, split evenly over all of them. So a
    copy of ``e`` on node ``n`` is predicted to serve
    ``load[e] * node_share[n] / c[n, e] + remote[e] / sum_n c[n, e]``.

    Args:
        copies_on_node: int ``[N, E]`` copies of each expert per node (every expert >= 1 in total).
        load: float ``[E]`` expert load.
        node_share: float ``[N]`` share of the tokens that start on each node (sums to 1).

    Returns:
        float64 ``[N, E]``; 0 where a node has no copy.
    """
    c = np.asarray(copies_on_node, dtype=np.float64)
    w = np.asarray(load, dtype=np.float64)
    s = np.asarray(node_share, dtype=np.float64)[:, None]
    absent = c <= 0
    remote = w * (s * absent).sum(axis=0)  # [E]
    total = np.maximum(c.sum(axis=0), 1.0)
    per = w[None, :] * s / np.maximum(c, 1.0) + (remote / total)[None, :]
    return np.where(absent, 0.0, per)


def demand_gpu_load(hosts: np.ndarray, load: np.ndarray, gpus_per_node: int, node_share: np.ndarray | None = None) -> np.ndarray:
    """float64 ``[G]``: GPU loads of a bool ``[G, E]`` placement under :func:`node_copy_load`'s model."""
    G, E = hosts.shape
    N = G // gpus_per_node
    share = np.full(N, 1.0 / N) if node_share is None else np.asarray(node_share, dtype=np.float64)
    c = hosts.reshape(N, gpus_per_node, E).sum(axis=1)
    per = node_copy_load(c, load, share)
    return (hosts * np.repeat(per, gpus_per_node, axis=0)).sum(axis=1)


def add_demand_replicas(
    hosts: np.ndarray,
    load: np.ndarray,
    capacity: int,
    gpus_per_node: int,
    *,
    node_share: np.ndarray | None = None,
    affinity: np.ndarray | None = None,
    max_new: int | None = None,
    locality_weight: float = 1.0,
    split_threshold: float = 1.0,
    node_slack: float | None = None,
    node_weight: float = 3.0,
) -> tuple[np.ndarray, int, np.ndarray]:
    """Copies placed and sized for the locality-first router (the ``grace`` planner's default).

    Under the serving router a node's demand for an expert stays on that node when the node has
    a copy, so copies go where the demand is and a node's copies of an expert are sized to that
    node's demand (model: :func:`node_copy_load`). Copies are added one at a time, each by the
    first rule that applies:

    1. **Split** (balance): while some expert's heaviest copy is predicted above
       ``split_threshold`` times the mean GPU load, that expert (the heaviest first) gets a copy
       on a node without one (which takes that node's demand off every copy) or on its heaviest
       node, whichever leaves its heaviest copy lighter (ties: the new node, for locality).
    2. **Locality**: a copy of expert ``e`` on a node ``n`` without one removes
       ``load[e] * node_share[n]`` token-expert pairs from the inter-node links (plus, weighted
       by ``locality_weight``, the share of ``e``'s co-activation with partners on ``n``); the
       largest gain is taken among copies that keep the new copy under the split threshold and
       the node's predicted load under ``max(heaviest node, (1 + node_slack) * mean node)``.
    3. **Fill**: every remaining slot splits the heaviest copy on its node (no copy is
       predicted heavier after this), so every slot is used while any expert with load can
       take one (at most one copy of an expert per GPU).

    The copies of each node are then packed onto its GPUs heaviest first, each to the GPU with
    the lowest predicted load that has a free slot and no copy of that expert (an expert of a
    full GPU moves over in the rare dead end). Node membership of the primaries is kept.

    Args:
        hosts: bool ``[G, E]`` placement (every expert on at least one GPU).
        load: float64 ``[E]`` expert load.
        capacity: slots per GPU; gpus_per_node: GPUs per node (node-major numbering).
        node_share: float ``[N]`` share of tokens starting on each node (default ``1 / N``).
        affinity: float ``[E, E]`` co-activation (zero diagonal) or None.
        max_new: at most this many copies (None: every free slot).
        locality_weight: weight of the co-activation term of rule 2, in units of the
            expert's own demand on the node.
        split_threshold: rule 1's bound on a copy's predicted load, in mean GPU loads.
        node_slack: rule 2's allowance over the mean node load.

    Returns:
        ``(hosts, added, copy_load)``: the new bool ``[G, E]`` placement, the copies added and the
        predicted per-copy load float64 ``[N, E]`` (:func:`node_copy_load`).
    """
    from megatron_grace.plan.eplb import _make_room

    hosts = hosts.copy()
    G, E = hosts.shape
    gpn = gpus_per_node
    N = G // gpn
    w = np.asarray(load, dtype=np.float64)
    s = np.full(N, 1.0 / N) if node_share is None else np.asarray(node_share, dtype=np.float64)
    free = capacity - hosts.sum(axis=1)
    budget = int(free.sum()) if max_new is None else min(int(max_new), int(free.sum()))
    c0 = hosts.reshape(N, gpn, E).sum(axis=1).astype(np.int64)
    total = float(w.sum())
    if total <= 0 or budget <= 0:
        return hosts, 0, node_copy_load(c0, w, s)
    c = c0.copy()
    F = free.reshape(N, gpn).sum(axis=1)
    mean_gpu = total / G
    live = w > 0
    demand = w[None, :] * s[:, None]  # [N, E] pairs arising on each node
    if affinity is not None and locality_weight > 0:
        A = np.asarray(affinity, dtype=np.float64)
        mass = A.sum(axis=1)
    added = 0
    while added < budget:
        ell = node_copy_load(c, w, s)
        room = (F > 0)[:, None]
        can_split = (c > 0) & (c < gpn) & room & live[None, :]
        can_open = (c == 0) & room & live[None, :]
        if not (can_split.any() or can_open.any()):
            break
        choice: tuple[int, int] | None = None
        pressure = ell.max(axis=0)
        movable = (can_split | can_open).any(axis=0)
        heavy = np.flatnonzero(movable & (pressure > split_threshold * mean_gpu * (1 + 1e-12)))
        if heavy.size:  # rule 1: split the expert with the heaviest copy
            e = int(heavy[np.argmax(pressure[heavy])])
            best = None
            for n in np.flatnonzero(can_split[:, e] | can_open[:, e]):
                col = c[:, e].copy()
                col[n] += 1
                after = float(node_copy_load(col[:, None], w[e:e + 1], s).max())
                node_load = float((c[n] * ell[n]).sum())
                key = (after, 0 if c[n, e] == 0 else 1, -float(ell[n, e]), node_load)
                if best is None or key < best[0]:
                    best = (key, int(n))
            assert best is not None
            choice = (best[1], e)
        elif can_open.any():  # rule 2: locality under the balance limits
            ce = c.sum(axis=0)
            remote = (demand * (c == 0)).sum(axis=0)  # [E]
            new_copy = demand + (remote[None, :] - demand) / (ce[None, :] + 1)  # [N, E] load of the new copy
            node_load = (c * ell).sum(axis=1)
            ok = can_open & (new_copy <= split_threshold * mean_gpu * (1 + 1e-12))
            if node_slack is not None:
                limit = max(float(node_load.max()), (1 + node_slack) * total * float(s.mean()))
                ok &= node_load[:, None] + new_copy <= limit * (1 + 1e-12)
            if ok.any():
                gain = demand.copy()
                if affinity is not None and locality_weight > 0:
                    on_node = c > 0  # [N, E]
                    share = np.divide(on_node.astype(np.float64) @ A, mass[None, :], out=np.zeros((N, E)), where=mass[None, :] > 0)
                    gain = gain * (1 + locality_weight * share)
                # node balance: pairs the node would carry above the mean node load count against the pairs saved;
                # among equal gains the lighter node wins
                after = node_load[:, None] + new_copy
                mean_node = total * s[:, None]
                gain = gain - node_weight * np.maximum(after - mean_node, 0.0) - 1e-9 * after
                gain = np.where(ok, gain, -np.inf)
                n, e = divmod(int(np.argmax(gain)), E)
                choice = (n, e)
        if choice is None:  # rule 3: fill by splitting the heaviest copy on a node with room
            if can_split.any():
                n, e = divmod(int(np.argmax(np.where(can_split, ell, -np.inf))), E)
            else:  # only nodes without any splittable expert have room: the lightest new copy
                ce = c.sum(axis=0)
                remote = (demand * (c == 0)).sum(axis=0)
                new_copy = demand + (remote[None, :] - demand) / (ce[None, :] + 1)
                n, e = divmod(int(np.argmin(np.where(can_open, new_copy, np.inf))), E)
            choice = (n, e)
        n, e = choice
        c[n, e] += 1
        F[n] -= 1
        added += 1
    ell = node_copy_load(c, w, s)
    # pack every node's new copies onto its GPUs, heaviest first, to the lightest admissible GPU
    for n in range(N):
        new = c[n] - c0[n]
        if not new.any():
            continue
        gpus = np.arange(n * gpn, (n + 1) * gpn)
        has = hosts[gpus].copy()  # [gpn, E]
        lists = [list(np.flatnonzero(row)) for row in has]
        count = has.sum(axis=1)
        gl = has @ ell[n]
        items = np.repeat(np.arange(E), new)
        items = items[np.lexsort((items, -ell[n, items]))]
        for e in items:
            ok = (count < capacity) & ~has[:, e]
            g = int(np.argmin(np.where(ok, gl, np.inf))) if ok.any() else _make_room(int(e), lists, has, gl, count, capacity, ell[n])
            lists[g].append(int(e))
            has[g, e] = True
            gl[g] += ell[n, e]
            count[g] += 1
        hosts[gpus] = has
    return hosts, added, ell


# ------------------------------------------------------------------------------ connected copies
def copy_components(node_hosts: np.ndarray) -> int:
    """Connected components of one node's GPUs, two GPUs linked when they hold a copy of the same expert.

    Under least-loaded routing inside a node, load moves between GPUs only along these links: a
    set of GPUs that shares no expert with the rest (say two GPUs both holding experts ``a`` and
    ``b``, and no other copy of either) must absorb every pair of its experts alone, however hot
    they run in a batch.

    Args:
        node_hosts: bool ``[gpus_per_node, E]``.

    Returns:
        The number of components (GPUs holding nothing count as their own component).
    """
    return len(set(_component_labels(node_hosts)))


def _component_labels(node_hosts: np.ndarray) -> list[int]:
    """Component label (a root GPU) of every GPU of a node, see :func:`copy_components`."""
    n = node_hosts.shape[0]
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for e in np.flatnonzero(node_hosts.sum(axis=0) >= 2):
        gpus = np.flatnonzero(node_hosts[:, e])
        first = root(int(gpus[0]))
        for g in gpus[1:]:
            parent[root(int(g))] = first
    return [root(i) for i in range(n)]


def spread_node_copies(hosts: np.ndarray, copy_load: np.ndarray, gpus_per_node: int, *, slack: float = 0.1) -> np.ndarray:
    """Rearrange each node's experts among its GPUs so that the GPUs sharing copies form one component.

    The repack groups co-activated experts on one GPU; with copies that can close the node into
    small islands (GPUs 0 and 3 both holding experts 1 and 2, GPUs 1 and 4 both holding 5 and 7,
    ...) between which the router's least-loaded choice cannot move any load (measured on the
    Mixtral-8x7B trace, h200-4x8 +1 slot: such plans reach max/mean 1.41 under least-loaded
    routing on the placement benchmark's held-out requests, the same copies in one component 1.31). Swaps of two experts
    between GPUs of a node, each joining components (:func:`copy_components`), are applied
    while one exists that keeps every GPU's predicted load (``copy_load``) at or below
    ``max(its node's heaviest GPU, (1 + slack) * its node's mean GPU)`` (the one leaving the
    lighter pair of GPUs first); a swap never puts two copies of an expert on one GPU. Which
    node holds which copies, and so the cross-node traffic, is unchanged; nodes whose GPUs
    already form one component are left as they are.

    Args:
        hosts: bool ``[G, E]`` placement (node-major GPU numbering).
        copy_load: float ``[N, E]`` predicted load of one copy of each expert on each node
            (:func:`node_copy_load`).
        gpus_per_node: GPUs per node.
        slack: allowance over the node's mean GPU load for the swapped GPUs.

    Returns:
        bool ``[G, E]`` with the same experts per node and the same count per GPU.
    """
    out = hosts.copy()
    G, E = out.shape
    gpn = gpus_per_node
    for n in range(G // gpn):
        node = out[n * gpn:(n + 1) * gpn]  # a view: swaps write through
        comps = copy_components(node)
        if comps == 1:
            continue
        w = np.asarray(copy_load[n], dtype=np.float64)
        gl = node @ w
        limit = max(float(gl.max()), (1 + slack) * float(gl.mean())) * (1 + 1e-9)
        while comps > 1:
            swap = _joining_swap(node, gl, w, limit, comps)
            if swap is None:
                break
            i, x, j, y = swap
            node[i, x], node[i, y], node[j, y], node[j, x] = False, True, False, True
            gl[i] += w[y] - w[x]
            gl[j] += w[x] - w[y]
            comps = copy_components(node)
    return out


def _joining_swap(node: np.ndarray, gl: np.ndarray, w: np.ndarray, limit: float, comps: int
                  ) -> tuple[int, int, int, int] | None:
    """Among the swaps (expert ``x`` on GPU ``i`` <-> ``y`` on GPU ``j``, ``i`` and ``j`` in different components, ``x``
    with copies on other GPUs) that keep both GPUs within ``limit``, the first in order of the heavier GPU's load
    after the swap that lowers the component count; None if there is none."""
    multi = node.sum(axis=0) >= 2
    label = np.asarray(_component_labels(node))
    g, e = np.nonzero(node)  # the node's copies, [n]
    i, j = np.meshgrid(np.arange(g.size), np.arange(g.size), indexing="ij")
    i, j = i.ravel(), j.ravel()  # candidate pairs of copies: (g[i], e[i]) <-> (g[j], e[j])
    gi, xi, gj, yj = g[i], e[i], g[j], e[j]
    ok = multi[xi] & (label[gi] != label[gj]) & ~node[gj, xi] & ~node[gi, yj]
    peak = np.maximum(gl[gi] + w[yj] - w[xi], gl[gj] + w[xi] - w[yj])
    ok &= peak <= limit
    for k in np.flatnonzero(ok)[np.argsort(peak[ok], kind="stable")]:
        a, x, b, y = int(gi[k]), int(xi[k]), int(gj[k]), int(yj[k])
        node[a, x], node[a, y], node[b, y], node[b, x] = False, True, False, True
        joined = copy_components(node) < comps
        node[a, x], node[a, y], node[b, y], node[b, x] = True, False, True, False
        if joined:
            return a, x, b, y
    return None
