"""DeepSeek EPLB's load-balancing policy, re-derived from its description (our own code).

Per layer, from the expert loads alone (no affinity, no locality):

* **Hierarchical policy** (``num_groups`` a multiple of the node count): split the experts into
  ``num_groups`` groups of contiguous ids; pack the groups onto nodes by load with the same
  number of groups per node (heaviest group first, to the lightest node that still has room);
  inside each node, add replicas one at a time to the expert with the highest load per copy
  until the node's physical slots (``gpus_per_node * slots_per_gpu``) are used; then pack the
  node's physical experts onto its GPUs by load (heaviest first, to the lightest GPU that still
  has a free slot), which gives every GPU the same number of slots.
* **Global policy**: the same with the whole cluster as one node (what vLLM and SGLang run for
  models without expert groups).

**Deviation from DeepSeek's code:** by default two copies of one expert never share a GPU
(EPLB can put them together, which wastes a slot and predicts a balance that routing cannot
deliver). An expert therefore gets at most one copy per GPU of its node; the packing skips
GPUs that already host the expert, and in the rare dead end (every GPU with a free slot already
has it) an expert of another GPU moves over to make room. ``allow_colocated_copies=True``
restores EPLB's packing; since a :class:`PlacementPlan` cannot hold two copies of an expert on
one GPU, such copies are then merged into one (their slot is wasted, as it is in EPLB) and the
planner reports how many. When the cap of one copy per GPU leaves slots that no expert may
take, they stay empty.
"""

from __future__ import annotations

import numpy as np


def balanced_packing(weight: np.ndarray, num_packs: int, per_pack: int) -> np.ndarray:
    """Assign items to packs, heaviest first, each to the lightest pack holding < ``per_pack`` items.

    Args:
        weight: float64 ``[n]`` item weights, ``n <= num_packs * per_pack``.

    Returns:
        int64 ``[n]``: pack of each item.
    """
    n = weight.shape[0]
    order = np.lexsort((np.arange(n), -weight))
    pack = np.empty(n, dtype=np.int64)
    load = np.zeros(num_packs)
    count = np.zeros(num_packs, dtype=np.int64)
    for i in order:
        p = int(np.argmin(np.where(count < per_pack, load, np.inf)))
        pack[i] = p
        load[p] += weight[i]
        count[p] += 1
    return pack


def replicate_by_load(weight: np.ndarray, num_slots: int, max_copies: int | None) -> np.ndarray:
    """Copies per expert: start at 1, add one at a time to the highest load per copy.

    Args:
        weight: float64 ``[n]`` expert loads (``n <= num_slots``).
        num_slots: physical slots to fill.
        max_copies: cap on an expert's copies (None: no cap).

    Returns:
        int64 ``[n]`` copy counts summing to at most ``num_slots``.
    """
    copies = np.ones(weight.shape[0], dtype=np.int64)
    for _ in range(num_slots - weight.shape[0]):
        per_copy = weight / copies
        if max_copies is not None:
            per_copy = np.where(copies < max_copies, per_copy, -np.inf)
        e = int(np.argmax(per_copy))
        if not np.isfinite(per_copy[e]):
            break
        copies[e] += 1
    return copies


def pack_copies(weight: np.ndarray, copies: np.ndarray, num_gpus: int, slots_per_gpu: int, allow_colocated: bool) -> list[list[int]]:
    """Pack the physical copies of ``n`` experts onto GPUs by load, equal slot counts.

    Args:
        weight: float64 ``[n]`` expert loads; each copy weighs ``weight / copies``.
        copies: int64 ``[n]`` copies per expert (``<= num_gpus`` unless ``allow_colocated``).
        num_gpus, slots_per_gpu: the packs and their size.
        allow_colocated: let two copies of one expert share a GPU (DeepSeek EPLB's behaviour).

    Returns:
        ``[num_gpus]`` lists of local expert indices (``0..n-1``).
    """
    n = weight.shape[0]
    item_expert = np.repeat(np.arange(n), copies)
    item_weight = (weight / copies)[item_expert]
    order = np.lexsort((item_expert, -item_weight))
    gpus: list[list[int]] = [[] for _ in range(num_gpus)]
    load = np.zeros(num_gpus)
    count = np.zeros(num_gpus, dtype=np.int64)
    has = np.zeros((num_gpus, n), dtype=bool)
    for i in order:
        e, wi = int(item_expert[i]), float(item_weight[i])
        ok = count < slots_per_gpu
        if not allow_colocated:
            ok &= ~has[:, e]
        if ok.any():
            g = int(np.argmin(np.where(ok, load, np.inf)))
        else:  # dead end: every GPU with room already has e; move another expert over to make room
            g = _make_room(e, gpus, has, load, count, slots_per_gpu, weight / copies)
        gpus[g].append(e)
        has[g, e] = True
        load[g] += wi
        count[g] += 1
    return gpus


def _make_room(e: int, gpus: list[list[int]], has: np.ndarray, load: np.ndarray, count: np.ndarray,
               slots_per_gpu: int, share: np.ndarray) -> int:
    """Free a slot on a GPU without ``e``: move some x from it to a GPU with room that lacks x.

    A GPU ``p`` with room exists (it holds ``e``) and any full GPU ``q`` without ``e`` holds an
    expert that ``p`` lacks (``q`` has more experts than ``p``), so the move always exists. Among
    the options the one whose moved share is closest to ``e``'s share is taken.
    """
    best: tuple[float, int, int, int] | None = None
    rooms = np.flatnonzero(count < slots_per_gpu)
    for q in np.flatnonzero(~has[:, e]):
        for x in gpus[q]:
            for p in rooms:
                if not has[p, x]:
                    score = abs(float(share[x]) - float(share[e]))
                    if best is None or score < best[0]:
                        best = (score, int(q), int(x), int(p))
    assert best is not None, "no room can be made (impossible when copies <= GPUs)"
    _, q, x, p = best
    gpus[q].remove(x)
    gpus[p].append(x)
    has[q, x], has[p, x] = False, True
    load[q] -= share[x]
    load[p] += share[x]
    count[q] -= 1
    count[p] += 1
    return q


def eplb_layer(weight: np.ndarray, num_nodes: int, gpus_per_node: int, slots_per_gpu: int,
               num_groups: int | None, allow_colocated: bool = False) -> list[list[int]]:
    """One layer of the EPLB policy.

    Args:
        weight: float64 ``[E]`` expert loads.
        num_nodes, gpus_per_node: the cluster (GPUs node-major).
        slots_per_gpu: physical expert slots per GPU (``>= ceil(E / G)``).
        num_groups: expert groups for the hierarchical policy (must divide E and be a multiple
            of ``num_nodes``); None runs the global policy.
        allow_colocated: DeepSeek EPLB's behaviour of allowing two copies on one GPU.

    Returns:
        ``[G]`` lists of expert ids hosted by each GPU.
    """
    E = weight.shape[0]
    if num_groups is None:
        num_nodes, gpus_per_node, num_groups = 1, num_nodes * gpus_per_node, 1
    group_size = E // num_groups
    group_load = weight.reshape(num_groups, group_size).sum(axis=1)
    group_node = balanced_packing(group_load, num_nodes, num_groups // num_nodes)
    out: list[list[int]] = []
    for n in range(num_nodes):
        groups = np.flatnonzero(group_node == n)
        experts = (groups[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)
        w = weight[experts]
        copies = replicate_by_load(w, gpus_per_node * slots_per_gpu, None if allow_colocated else gpus_per_node)
        for local in pack_copies(w, copies, gpus_per_node, slots_per_gpu, allow_colocated):
            out.append(sorted(int(experts[i]) for i in local))  # duplicates only with allow_colocated
    return out
