"""Replica-choice policies: which copy of each chosen expert a token is sent to.

A policy is a vectorized function::

    policy(topk_ids, src_gpu, layer_hosts, topology, context) -> gpu

with ``topk_ids`` int ``[T, k]`` (expert ids, -1 = missing record), ``src_gpu`` int ``[T]``
(the GPU each token starts on), ``layer_hosts`` int ``[E, R]`` (GPUs hosting each expert at
this layer, ascending, padded with -1; ``PlacementPlan.expert_gpus[layer]``), the
:class:`~megatron_grace.plan.topology.Topology` and a :class:`PolicyContext`. It returns int
``[T, k]``: the GPU that processes each (token, expert) pair, -1 exactly where ``topk_ids`` is
-1, and always a GPU that hosts that expert. Policies only choose among copies; the set of
experts a token reaches never changes.

Policies are registered by name in :data:`POLICIES` (``register_policy``); the simulator looks
them up there. The routing module's policies (``primary``, ``random``, ``position``,
``static-local``, ``grace`` in :mod:`megatron_grace.routing.policies`) are wrapped and
registered on first lookup of a name not found here (:func:`load_routing_policies`).

The one policy defined here, ``local-first``, is documented on :func:`local_first`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from megatron_grace.errors import GraceInputError
from megatron_grace.plan.topology import Topology
from megatron_grace.routing.load_predictor import predicted_gpu_load

if TYPE_CHECKING:
    from megatron_grace.plan.placement import PlacementPlan

#: ``(sqrt(5) - 1) / 2``: step of the Weyl sequence that interleaves quota-weighted choices.
GOLDEN = (5**0.5 - 1) / 2


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may know besides the token's experts and start GPU.

    Attributes:
        layer: MoE layer index.
        expert_load: float ``[E]`` predicted load of each expert at this layer (e.g. the
            planning statistics' token counts), or None for "every expert equally loaded".
        token_index: int64 ``[T]`` position of each token in the trace (for position-based
            policies).
        seed: seed for randomized policies (derive a per-layer generator from ``seed`` and
            ``layer`` so results do not depend on call order).
        plan: the whole placement plan, or None.
    """

    layer: int
    expert_load: np.ndarray | None
    token_index: np.ndarray
    seed: int = 0
    plan: PlacementPlan | None = None

    def predicted_gpu_load(self, layer_hosts: np.ndarray, num_gpus: int) -> np.ndarray:
        """float64 ``[G]``: static predicted load of each GPU at this layer.

        As in GRACE-MoE, each copy of expert ``e`` is predicted to take an equal share
        ``load[e] / copies[e]`` of the expert's load (``load`` = :attr:`expert_load`, or 1 per
        expert when unknown); a GPU's predicted load is the sum over the copies it hosts.
        """
        return predicted_gpu_load(layer_hosts, num_gpus, self.expert_load)


class Policy(Protocol):
    """Signature of a replica-choice policy (see the module docstring)."""

    def __call__(self, topk_ids: np.ndarray, src_gpu: np.ndarray, layer_hosts: np.ndarray, topology: Topology,
                 context: PolicyContext) -> np.ndarray: ...


PolicyFn = Callable[[np.ndarray, np.ndarray, np.ndarray, Topology, PolicyContext], np.ndarray]

#: Registered replica-choice policies by name.
POLICIES: dict[str, PolicyFn] = {}


def register_policy(name: str) -> Callable[[PolicyFn], PolicyFn]:
    """Decorator: register ``fn`` as policy ``name`` (replacing any earlier one of that name)."""

    def deco(fn: PolicyFn) -> PolicyFn:
        POLICIES[name] = fn
        return fn

    return deco


def get_policy(policy: str | PolicyFn) -> tuple[str, PolicyFn]:
    """``(name, function)`` of a registered policy name or a policy function.

    Names not registered here are looked up among the routing module's policies
    (:func:`load_routing_policies`).
    """
    if callable(policy):
        return getattr(policy, "__name__", "custom"), policy
    if policy not in POLICIES:
        load_routing_policies()
    if policy not in POLICIES:
        raise GraceInputError(f"unknown replica-choice policy {policy!r}; known: {', '.join(sorted(POLICIES))}")
    return policy, POLICIES[policy]


def policy_names() -> list[str]:
    """Every available policy name (this module's and the routing module's)."""
    load_routing_policies()
    return sorted(POLICIES)


def load_routing_policies() -> list[str]:
    """Register the policies of :mod:`megatron_grace.routing.policies` (if present) under their names.

    Each is wrapped as a simulator policy: the layer's hosts become a ``ReplicaTable``; the
    ``grace`` policy gets :func:`predicted_gpu_load` as its load prediction, ``position`` the
    token indices, ``random`` the context seed; ``step`` is the layer index. Names already
    registered are kept. Returns the names added.
    """
    try:
        routing = importlib.import_module("megatron_grace.routing.policies")
        choose_copies, copy_destinations = routing.choose_copies, routing.copy_destinations
        ReplicaTable = importlib.import_module("megatron_grace.routing.replica_table").ReplicaTable
        names = tuple(routing.POLICY_NAMES)
    except (ImportError, AttributeError):
        return []
    added = []
    for name in names:
        if name in POLICIES:
            continue

        def adapter(topk_ids: np.ndarray, src_gpu: np.ndarray, layer_hosts: np.ndarray, topology: Topology,
                    context: PolicyContext, _name: str = name) -> np.ndarray:
            import torch

            G = topology.num_gpus
            table = ReplicaTable.from_hosts(torch.as_tensor(np.asarray(layer_hosts, dtype=np.int64)), topology.gpus_per_node, G)
            ids = torch.as_tensor(np.asarray(topk_ids, dtype=np.int64))
            pred = torch.as_tensor(predicted_gpu_load(layer_hosts, G, context.expert_load)) if _name == "grace" else None
            copy = choose_copies(_name, ids, torch.as_tensor(np.asarray(src_gpu, dtype=np.int64)), table, predicted_load=pred,
                                 step=context.layer, seed=context.seed, positions=torch.as_tensor(context.token_index))
            gpu, _ = copy_destinations(ids, copy, table)
            return gpu.numpy().astype(np.int32)

        adapter.__name__ = f"routing_{name.replace('-', '_')}"
        adapter.__doc__ = f"The routing module's {name!r} policy (megatron_grace.routing.policies.choose_copies)."
        POLICIES[name] = adapter
        added.append(name)
    return added


def group_rank(keys: np.ndarray) -> np.ndarray:
    """int64 ``[n]``: rank of each entry among the entries with the same key, in array order.

    ``group_rank([3, 1, 3, 3, 1]) == [0, 0, 1, 2, 1]``. Vectorized (one stable sort).
    """
    keys = np.asarray(keys)
    n = keys.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    lengths = np.diff(np.r_[starts, n])
    pos = np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = pos
    return rank


@register_policy("local-first")
def local_first(topk_ids: np.ndarray, src_gpu: np.ndarray, layer_hosts: np.ndarray, topology: Topology,
                context: PolicyContext) -> np.ndarray:
    """Locality-first, quota-weighted, deterministic replica choice.

    For a token on GPU ``s`` (node ``n``) that chose expert ``e``:

    1. if ``s`` hosts a copy of ``e``, that copy;
    2. else, if node ``n`` hosts copies of ``e``, one of them;
    3. else one of all copies of ``e`` (all remote).

    In tiers 2 and 3 the candidates get quotas proportional to ``1 / predicted load`` of their
    GPU (:func:`predicted_gpu_load`: equal shares of the expert load per copy, from
    ``context.expert_load`` or 1 per expert). The pairs of one group, key ``(e, n)``, are
    ranked ``r = 0, 1, ...`` in token order, and pair ``r`` goes to the candidate whose
    interval of the cumulative normalized quotas contains ``u_r = frac((r + 1/2) * g)``,
    ``g = (sqrt(5) - 1) / 2`` (a Weyl sequence): each copy gets its quota share of the group
    up to O(log(group size)) pairs, interleaved in token order, with no randomness and no
    sequential running count. Missing records (-1) stay -1.

    Shapes: ``topk_ids`` int ``[T, k]``, ``src_gpu`` int ``[T]``, ``layer_hosts`` int
    ``[E, R]`` -> int32 ``[T, k]``.
    """
    ids = np.asarray(topk_ids)
    src = np.asarray(src_gpu).astype(np.int32, copy=False)
    hosts = np.asarray(layer_hosts).astype(np.int32, copy=False)
    T, k = ids.shape
    E, R = hosts.shape
    G, N, gpn = topology.num_gpus, topology.num_nodes, topology.gpus_per_node
    valid = ids >= 0
    safe = np.where(valid, ids, 0).astype(np.int32, copy=False)
    if R == 1:  # one copy per expert: nothing to choose
        return np.where(valid, hosts[safe, 0], -1).astype(np.int32)
    cum, cand = _quota_tables(hosts, topology, context.expert_load)  # [E*N, R] each
    hosted = np.zeros(E * G, dtype=bool)
    e_idx, r_idx = np.nonzero(hosts >= 0)
    hosted[e_idx * G + hosts[e_idx, r_idx]] = True
    on_gpu = hosted[safe * G + src[:, None]] & valid
    need = valid & ~on_gpu
    if not need.any():
        return np.where(on_gpu, src[:, None], np.int32(-1)).astype(np.int32, copy=False)
    # group (expert, node) of each pair that needs a choice; everything else in group E*N (a dummy row)
    K = E * N
    key_dtype = np.int16 if K < np.iinfo(np.int16).max else np.int32
    key = np.where(need, safe * N + (src // gpn)[:, None], K).astype(key_dtype).reshape(-1)
    rank = group_rank(key)  # token-major order within each group
    x = (rank + 0.5) * GOLDEN
    u = x - np.floor(x)
    pick = _quota_pick(np.vstack([cum, np.ones((1, R))]), key.astype(np.int64), u)
    choice = np.vstack([cand, np.zeros((1, R), dtype=cand.dtype)]).reshape(-1)[key.astype(np.int64) * R + pick].reshape(T, k)
    return np.where(on_gpu, src[:, None], np.where(valid, choice, -1)).astype(np.int32, copy=False)


def _quota_pick(cum: np.ndarray, row: np.ndarray, u: np.ndarray, bins: int = 256) -> np.ndarray:
    """int64 ``[n]``: ``(cum[row[i]] <= u[i]).sum()`` for every i, in two gathers whatever R is.

    ``cum`` float ``[K, R]`` rows non-decreasing and ending at 1; ``u`` in ``[0, 1)``. A table
    of the answer at each of ``bins`` grid points ``q / bins`` gives a lower bound; the few
    entries whose grid cell contains a quota boundary are then stepped forward.
    """
    K, R = cum.shape
    grid = np.arange(bins) / bins
    table = np.zeros((K, bins), dtype=np.int64)
    for r in range(R - 1):  # the last column is 1 > any u
        table += cum[:, r, None] <= grid[None, :]
    pick = table.reshape(-1)[row * bins + np.minimum((u * bins).astype(np.int64), bins - 1)]
    flat = cum.reshape(-1)
    todo = np.flatnonzero(flat[row * R + pick] <= u)
    while todo.size:
        pick[todo] += 1
        todo = todo[flat[row[todo] * R + pick[todo]] <= u[todo]]
    return pick


def _quota_tables(hosts: np.ndarray, topology: Topology, expert_load: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Candidate copies and cumulative quotas for tiers 2 and 3 of :func:`local_first`.

    Returns:
        ``cum`` float64 ``[E * N, R]`` and ``cand`` int32 ``[E * N, R]``, row ``e * N + n``:
        the candidates for a token of node ``n`` needing expert ``e`` (copies on node ``n`` if
        any, else all copies) in ``cand``, and the running sum of their normalized quotas
        (``1 / predicted GPU load``) in ``cum``; non-candidates get weight 0 and the row ends at
        exactly 1, so the copy for ``u`` in ``[0, 1)`` is ``cand[row, (cum[row] <= u).sum()]``.
    """
    E, R = hosts.shape
    N, gpn = topology.num_nodes, topology.gpus_per_node
    pred = predicted_gpu_load(hosts, topology.num_gpus, expert_load)
    eps = 1e-6 * max(float(pred.mean()), 1e-12)
    weight = 1.0 / (pred + eps)  # [G]
    present = hosts >= 0  # [E, R]
    on_node = present[:, None, :] & (hosts[:, None, :] // gpn == np.arange(N)[None, :, None])  # [E, N, R]
    mask = np.where(on_node.any(axis=2, keepdims=True), on_node, present[:, None, :])
    w = np.where(mask, weight[np.where(present, hosts, 0)][:, None, :], 0.0)
    cum = np.cumsum(w, axis=2)
    cum /= cum[:, :, -1:]
    last = R - 1 - np.argmax(mask[:, :, ::-1], axis=2)  # last candidate of each row
    cum[np.arange(R)[None, None, :] >= last[:, :, None]] = 1.0
    cand = np.broadcast_to(hosts[:, None, :], (E, N, R))
    return cum.reshape(E * N, R), np.ascontiguousarray(cand).reshape(E * N, R)
