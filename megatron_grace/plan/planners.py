"""Expert placement planners behind one interface, selectable by name.

    from megatron_grace.plan.planners import plan_placement, PLANNERS
    plan = plan_placement(stats, topology, "grace", replicas="auto", interlayer_weight=0.5)

Every planner is a pure function of the statistics (numpy arrays) and the topology; its knobs
are a frozen options dataclass whose fields all have documented defaults. The planners:

``vanilla``
    Megatron-Core / DeepSpeed default: GPU g hosts a contiguous block of expert ids (sizes
    differ by at most one when the experts do not divide evenly), no replicas.
``eplb``
    DeepSeek EPLB's hierarchical load-balancing policy (:mod:`megatron_grace.plan.eplb`) with
    the same slot budget (every slot of every GPU used), fixed so that two copies of one
    expert never share a GPU. Load only. By default one contiguous expert group per GPU
    (finer than one per node, so the node packing can balance); ``policy="global"`` is what
    vLLM/SGLang run for models without expert groups.
``affinity``
    Co-activation grouping only, equal group sizes, no replicas (Occult / ExFlow style):
    spectral clustering into one group per node, then one per GPU, with local improvement.
``grace``
    GRACE-MoE, per layer:

    1. *Grouping* (:mod:`megatron_grace.plan.grouping`): one group per node sized freely
       within the bounds, then one group per GPU of size ``[Ē - d, Ē + d]``: spectral
       clustering, GRACE-MoE's repair pass, then moves/swaps that raise kept affinity minus a
       load-imbalance penalty, never making the heaviest group heavier beyond a slack.
       Load-aware, so balance is not left to the replicas: the grouping balances the loads
       expected *after* replication (hot experts weigh ``load / planned copies``), and groups
       by co-activation in excess of independence (raw counts would pull hot experts together).
    2. *Replication for the serving router* (:func:`~megatron_grace.plan.replication.add_demand_replicas`)
       into the free slots (``capacity - hosted`` per GPU). The router the layer serves with
       (``grace``: own GPU, else own node, else anywhere) keeps a node's demand on that node's
       copies, so copies go where the demand is (tokens start on GPU ``t mod G``: every node
       sends ``1 / N`` of each expert's pairs) and a node's copies of an expert are sized to
       that node's demand: split experts whose copies are predicted heavier than a mean GPU,
       then add node copies that keep the most pairs off the inter-node links without
       overloading a node, then fill every remaining slot by splitting the heaviest copy.
    3. *Repack*: each node's experts and copies are rearranged among its GPUs for balance (each
       copy weighing its predicted load under the router) and GPU-level affinity (node
       membership, hence cross-node traffic, unchanged).
    4. *Monotone in slots* (``monotone=True``): a layer whose serving prediction is worse
       than with one slot fewer per GPU keeps that smaller plan, extended or not.

    Beyond the paper: the memory budget (``Topology.capacity``) bounds every GPU, an optional
    between-layer affinity term (``interlayer_weight``), and ``replicas="auto"`` which stops
    copying once a layer is predicted balanced. See :class:`PlannerOptions`.

Capacity: a topology without a budget (``capacity() is None``) is planned with
``ceil(E / G) + UNBOUNDED_EXTRA_SLOTS`` slots per GPU; the plan's metadata says so.

Statistics without co-activation (load-only sources such as switch-base-128): ``affinity``
and ``grace`` fall back to load-only grouping (balanced packing plus local improvement of the
balance) and emit a :class:`UserWarning` that is also recorded in ``metadata["warnings"]``;
``on_missing_coactivation="error"`` raises :class:`GraceInputError` instead.

Every plan's ``metadata`` records the planner, its options, the capacity used, and the
predicted per-GPU load, max/mean GPU and node load, extra copies and kept affinity per layer
(see :func:`evaluate_plan`; equal share of an expert's load per copy); ``predicted["serving"]``
is the per-GPU load under the serving router (:func:`serving_prediction`: the routing policy
itself run on the statistics' demand, or replaying the planning trace when a trace is
planned), with ``summary["serving_max_over_mean"]``; ``empty_slots`` counts unused slots per
layer and says why; ``grace`` adds its group-size bounds and the per-GPU group sizes of every
layer before replication.

Planning runs with single-threaded BLAS (:mod:`megatron_grace.plan._blas`): the matrices are
small and BLAS threads only contend for the cores.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatron_grace._progress import progress as _progress
from megatron_grace._sampling import evenly_spaced
from megatron_grace.errors import GraceInputError
from megatron_grace.plan._blas import blas_threads, torch_threads
from megatron_grace.plan.eplb import eplb_layer, replicate_by_load
from megatron_grace.plan.grouping import equal_sizes, partition, refine, size_bounds
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.plan.replication import add_demand_replicas, add_planned_replicas, add_replicas, spread_node_copies
from megatron_grace.plan.token_grouping import refine_messages
from megatron_grace.plan.topology import ModelShape, Topology
from megatron_grace.statistics.expert_stats import ExpertStats
from megatron_grace.trace.routing_trace import RoutingTrace

UNBOUNDED_EXTRA_SLOTS = 1
"""Extra slots per GPU assumed when the topology has no budget (``capacity() is None``)."""


# ============================================================================ options
def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise GraceInputError(f"option {name}={value!r}: expected one of {', '.join(allowed)}")


def _nonneg(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise GraceInputError(f"option {name}={value!r}: expected a finite number >= 0")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise GraceInputError(f"option {name}={value!r}: expected true or false")


def _integer(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (minimum is not None and value < minimum):
        raise GraceInputError(f"option {name}={value!r}: expected an integer" + ("" if minimum is None else f" >= {minimum}"))


@dataclass(frozen=True)
class VanillaOptions:
    """Knobs of the ``vanilla`` planner.

    Attributes:
        progress: show a progress bar over layers (default False).
    """

    progress: bool = False

    def __post_init__(self) -> None:
        _boolean("progress", self.progress)


@dataclass(frozen=True)
class EplbOptions:
    """Knobs of the ``eplb`` planner.

    Attributes:
        policy: ``"hierarchical"`` (default: groups to nodes, replicas and packing inside each
            node) or ``"global"`` (the whole cluster as one node, as vLLM/SGLang run EPLB for
            models without expert groups).
        num_groups: contiguous expert groups of the hierarchical policy; must divide the expert
            count and be a multiple of the node count. Default None: one group per GPU when the
            GPU count divides the experts (finer groups balance the nodes better), else one
            per node, else the global policy. The hierarchical policy gives each node only its
            ``E / N`` experts, at most one copy per GPU, so with fewer experts per node than
            slots per GPU (8 experts on 4 nodes with 3 slots per GPU) slots stay empty;
            ``metadata["empty_slots"]`` says so, and ``policy="global"`` fills them.
        allow_colocated_copies: allow two copies of one expert on one GPU as DeepSeek's code
            does (default False, our fix). A plan cannot hold such copies, so they are merged
            and the wasted slots reported in ``metadata["colocated_copies_merged"]``.
        progress: progress bar over layers (default False).
    """

    policy: str = "hierarchical"
    num_groups: int | None = None
    allow_colocated_copies: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        _choice("policy", self.policy, ("hierarchical", "global"))
        if self.num_groups is not None:
            _integer("num_groups", self.num_groups, 1)
        _boolean("allow_colocated_copies", self.allow_colocated_copies)
        _boolean("progress", self.progress)


@dataclass(frozen=True)
class AffinityOptions:
    """Knobs of the ``affinity`` planner (co-activation grouping, equal sizes, no replicas).

    Attributes:
        init: initial grouping, ``"spectral"`` (default: spectral clustering) or ``"greedy"``.
        local_search: improve the grouping with moves/swaps after the repair (default True).
        on_missing_coactivation: ``"fallback"`` (default: warn and group by load only) or
            ``"error"`` (raise GraceInputError) for statistics without co-activation.
        seed: seed of the k-means++ initialization (default 0; layer l uses ``seed + l``).
        progress: progress bar over layers (default False).
    """

    init: str = "spectral"
    local_search: bool = True
    on_missing_coactivation: str = "fallback"
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        _choice("init", self.init, ("spectral", "greedy"))
        _boolean("local_search", self.local_search)
        _choice("on_missing_coactivation", self.on_missing_coactivation, ("fallback", "error"))
        _integer("seed", self.seed, 0)
        _boolean("progress", self.progress)


@dataclass(frozen=True)
class PlannerOptions:
    """Knobs of the ``grace`` planner.

    Grouping (per layer: one group per node, then one group per GPU inside each node):

    Attributes:
        ratio: r of GRACE-MoE's GPU group-size bounds ``[Ē - d, Ē + d]``, ``Ē`` = experts per
            GPU, ``d = max(1, round(Ē r))`` (default 0.15, the paper's value); the upper bound
            is also capped by the GPU's slots and the lower bound by 0. A node's bounds are the
            sums over its GPUs, so nodes are sized freely by affinity inside them.
        balance_weight: weight of the load-imbalance penalty of the grouping objective: kept
            affinity (a fraction of the layer's pair mass) minus ``balance_weight`` times the
            mean squared deviation of group load from the mean, in units of the mean (default
            3.0; 0 groups by affinity alone, which concentrates hot experts).
        node_balance_weight: the same at node level (default None: ``balance_weight``).
        load_slack: hard balance rule of the local improvement (default 0.05): no move or swap
            leaves a group heavier than ``max(mean + load_slack, current heaviest)`` in units
            of the mean group load, so the heaviest group never gets heavier. None disables it.
        affinity_baseline: ``"independence"`` (default): group by co-activation in excess of
            the independence estimate ``tokens * P(i) * P(j)``. Raw counts are dominated by
            popularity (two hot experts co-occur often just because both are hot), so grouping
            by them packs hot experts together; once group loads are balanced the independence
            part of the kept raw count is nearly fixed, so the excess is what grouping can win.
            ``"none"``: raw counts (the paper). The kept-affinity metrics always count raw
            co-activation.
        anticipate: balance the grouping for the loads expected after replication (default
            True): the copies that the budget allows are planned by load (EPLB's rule), each
            expert weighs ``load / planned copies`` and every free slot is expected to receive
            an average copy; so hot experts can stay with their partners and the copies spread
            their load. False balances the raw expert loads.
        init: initial grouping, ``"spectral"`` (default: spectral clustering of the affinity,
            seeded k-means++) or ``"greedy"`` (heaviest first to the lightest group); the
            greedy start is used anyway when there is no affinity or under 4 experts per group.
        local_search: run the move/swap improvement pass after the repair (default True).
        interlayer_weight: weight of between-layer affinity (default 0, the paper's objective).
            Layers are planned in order; when ``stats.transitions`` is present, expert j of
            layer l gains ``interlayer_weight * sum_i T[l-1][i, j] * share(i, g)`` for GPU g
            (summed over a node's GPUs at node level), where ``share(i, g)`` is the fraction of
            layer-(l-1) expert i's tokens that its copy on g serves: tokens whose consecutive
            experts sit on one GPU (ExFlow's inter-layer affinity), in the same token units as
            the co-activation counts (divided by the layer's pair mass like them).

    Replication (per layer, into the free slots ``capacity - experts hosted`` of every GPU):

    Attributes:
        replicas: ``"fill"`` (default: use every free slot where a copy helps, the budget of
            ``eplb``), ``"auto"`` (copy only while the layer's predicted max/mean GPU load is
            above ``balance_target``; balanced layers keep slots empty, which saves memory where
            the runtime allocates expert slots per layer, e.g. with a memory budget), ``"none"``
            or an integer cap of copies per layer.
        balance_target: the max/mean stopping point of ``replicas="auto"`` (default 1.05).
        replica_strategy: ``"demand"`` (default for ``fill`` and integer caps: copies placed
            and sized for the serving router, which keeps a node's demand on the node's copies:
            :func:`~megatron_grace.plan.replication.add_demand_replicas`), ``"planned"`` (the
            previous default: copy counts by EPLB's load-per-copy rule, copies packed largest
            first onto the GPU with the lowest predicted load under the equal-share model, with
            a locality preference) or ``"greedy"`` (one copy at a time, each lowering the
            heaviest GPU; always used by ``"auto"``); see :mod:`megatron_grace.plan.replication`.
        replica_locality_weight: weight of co-activation locality (share of the expert's
            co-activation mass the copy serves on its node) against predicted load, in units of
            the mean GPU load, when choosing the GPU of a copy (default 1.0; 0 = load only); for
            ``demand``, the weight of that share on the pairs a new node copy keeps local.
        spread_copies: with more than one node, give an expert at most one copy per node
            (``planned`` strategy; default True): a second copy on a node adds no cross-node
            locality (unless the expert alone outweighs a mean GPU load), so its slot goes to the next hottest expert (measured on Qwen3-30B-A3B,
            a100-2x4 +2 slots: fewer cross-node messages and better balance). False: EPLB's
            rule, at most one copy per GPU.
        repack: after replication, rearrange each node's experts and copies among its GPUs
            (moves/swaps with the grouping objective and ``load_slack``; never two copies of
            an expert on one GPU, at most ``capacity`` and at least ``Ē - d`` experts per GPU).
            Node membership, hence cross-node traffic, is unchanged (default True).
        monotone: with ``replicas="fill"``, plan every slot count from an even split up to the
            capacity and never let a layer's serving prediction (max/mean GPU load or cross-node
            traffic, on the planning trace when planning from one) get worse than with one slot
            fewer: such a layer keeps the smaller plan and fills the new slots by demand-aware
            copies, or leaves them empty when that is predicted worse too (default True; costs
            one plan per extra slot).

    Planning from a per-token trace (``plan_placement(trace, ...)`` or ``trace=``; ``grace plan --trace``):

    Attributes:
        token_objective: after the pairwise grouping of each level, swap experts between nodes
            (then between the GPUs of each node) while the exact number of distinct remote
            nodes (GPUs) per planning token goes down (:func:`~megatron_grace.plan.token_grouping.refine_messages`;
            tokens start on GPU ``t mod G``), never making a group heavier than the balance
            rule of the grouping allows (default True; no effect on statistics-only input).
        token_sample: at most this many planning tokens per layer enter that search, evenly
            spaced (default 8192; the search costs ``O(tokens k^2)`` per pass).
        load_shrinkage: the per-expert load the grouping balances and the copies are sized by
            is pulled toward the layer's mean, ``(1 - s) * load + s * mean(load)``: the loads of a
            few hundred tokens, or of other prompts, differ from the served ones, and copies sized
            to them overfit (measured on the Mixtral-8x7B trace, h200-4x8 +1 slot: max/mean on
            held-out requests under least-loaded routing 1.32 with ``s = 0``, 1.22 with 0.5; those
            are the placement benchmark's own held-out requests, in view when the grid and the
            rule below were chosen).
            None (default): chosen from :data:`SHRINKAGE_GRID` by validation on a small planning
            trace (:func:`_validated_shrinkage`: plan on half of the planning requests, measure on
            the other half, both ways), 0 for larger traces and statistics.

    Other:

    Attributes:
        on_missing_coactivation: ``"fallback"`` (default: warn, group by load only) or
            ``"error"`` (GraceInputError) for statistics without co-activation.
        seed: seed of the k-means++ initialization (default 0; layer l uses ``seed + l``).
        progress: progress bar over layers (default False).
    """

    ratio: float = 0.15
    balance_weight: float = 3.0
    node_balance_weight: float | None = None
    load_slack: float | None = 0.05
    affinity_baseline: str = "independence"
    anticipate: bool = True
    init: str = "spectral"
    local_search: bool = True
    interlayer_weight: float = 0.0
    replicas: str | int = "fill"
    balance_target: float = 1.05
    replica_strategy: str = "demand"
    replica_locality_weight: float = 1.0
    spread_copies: bool = True
    repack: bool = True
    monotone: bool = True
    token_objective: bool = True
    token_sample: int = 8192
    load_shrinkage: float | None = None
    on_missing_coactivation: str = "fallback"
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        _nonneg("ratio", self.ratio)
        _nonneg("balance_weight", self.balance_weight)
        if self.node_balance_weight is not None:
            _nonneg("node_balance_weight", self.node_balance_weight)
        if self.load_slack is not None:
            _nonneg("load_slack", self.load_slack)
        _choice("affinity_baseline", self.affinity_baseline, ("independence", "none"))
        _boolean("anticipate", self.anticipate)
        _choice("init", self.init, ("spectral", "greedy"))
        _boolean("local_search", self.local_search)
        _nonneg("interlayer_weight", self.interlayer_weight)
        if isinstance(self.replicas, str) and self.replicas.isdigit():
            object.__setattr__(self, "replicas", int(self.replicas))
        if isinstance(self.replicas, str):
            _choice("replicas", self.replicas, ("fill", "auto", "none"))
        else:
            _integer("replicas", self.replicas, 0)
        _nonneg("balance_target", self.balance_target)
        if self.balance_target < 1:
            raise GraceInputError(f"option balance_target={self.balance_target!r}: max/mean is never below 1; expected >= 1")
        _choice("replica_strategy", self.replica_strategy, ("demand", "planned", "greedy"))
        _nonneg("replica_locality_weight", self.replica_locality_weight)
        _boolean("spread_copies", self.spread_copies)
        _boolean("repack", self.repack)
        _boolean("monotone", self.monotone)
        _boolean("token_objective", self.token_objective)
        _integer("token_sample", self.token_sample, 1)
        if isinstance(self.load_shrinkage, str):
            try:
                object.__setattr__(self, "load_shrinkage", None if self.load_shrinkage.strip().lower() in ("none", "")
                                   else float(self.load_shrinkage))
            except ValueError:
                raise GraceInputError(f"option load_shrinkage={self.load_shrinkage!r}: expected a fraction in [0, 1] "
                                      "(or none: validated)") from None
        if self.load_shrinkage is not None:
            _nonneg("load_shrinkage", self.load_shrinkage)
            if self.load_shrinkage > 1:
                raise GraceInputError(f"option load_shrinkage={self.load_shrinkage!r}: expected a fraction in [0, 1] (or none: validated)")
        _choice("on_missing_coactivation", self.on_missing_coactivation, ("fallback", "error"))
        _integer("seed", self.seed, 0)
        _boolean("progress", self.progress)


# ============================================================================ context and metrics
@dataclass
class _Context:
    """What a planner function gets: the statistics as arrays and the cluster.

    Attributes:
        load: float64 ``[L, E]``; affinity: float64 ``[L, E, E]`` (zero diagonal) or None;
        num_nodes, gpus_per_node, capacity (effective slots per GPU); notes: planner-specific
        metadata to record; warnings: messages also issued as ``UserWarning``; serving: layer ->
        ``(gpu_load [G], cross-node share)`` under the serving router on the statistics' demand,
        for the layers whose planner already evaluated it (:func:`serving_prediction` reuses them);
        trace: the planning trace when planning from one (else None).
    """

    stats: ExpertStats
    topology: Topology
    capacity: int
    load: np.ndarray
    affinity: np.ndarray | None
    notes: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    serving: dict[int, tuple[np.ndarray, float]] = field(default_factory=dict)
    trace: RoutingTrace | None = None

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[1])

    @property
    def num_nodes(self) -> int:
        return self.topology.num_nodes

    @property
    def gpus_per_node(self) -> int:
        return self.topology.gpus_per_node

    @property
    def num_gpus(self) -> int:
        return self.topology.num_gpus

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(message, UserWarning, stacklevel=4)

    def layers(self, desc: str, enabled: bool):
        return _progress(range(self.num_layers), desc=desc, total=self.num_layers, enabled=enabled)


@dataclass(frozen=True)
class PlanMetrics:
    """Static predictions for a plan on some statistics (equal split of load over copies).

    Attributes:
        gpu_load: float64 ``[L, G]`` predicted tokens per GPU.
        max_over_mean: float64 ``[L]`` max / mean GPU load (1 = perfect balance).
        node_max_over_mean: float64 ``[L]`` the same over nodes.
        extra_copies: int64 ``[L]`` copies beyond one per expert.
        slots_used: int64 ``[L]`` occupied slots over all GPUs.
        kept_affinity_gpu: float64 ``[L]`` or None: share of co-activation mass (pairs i != j)
            whose two experts share at least one GPU (raw counts from ``stats.affinity()``:
            with thresholded sources, unobserved pairs count at their independence estimate).
        kept_affinity_node: float64 ``[L]`` or None: the same for nodes.
        kept_interlayer_gpu: float64 ``[L-1]`` or None: share of between-layer transitions
            (i at l, j at l+1) that stay on one GPU when i's tokens split equally over its
            copies (needs ``stats.transitions``).
    """

    gpu_load: np.ndarray
    max_over_mean: np.ndarray
    node_max_over_mean: np.ndarray
    extra_copies: np.ndarray
    slots_used: np.ndarray
    kept_affinity_gpu: np.ndarray | None
    kept_affinity_node: np.ndarray | None
    kept_interlayer_gpu: np.ndarray | None

    def summary(self) -> dict[str, float | None]:
        """Means over layers (and the worst layer's max/mean)."""
        def mean(x: np.ndarray | None) -> float | None:
            return None if x is None or x.size == 0 else float(np.mean(x))

        return {
            "max_over_mean": mean(self.max_over_mean),
            "worst_max_over_mean": float(np.max(self.max_over_mean)),
            "node_max_over_mean": mean(self.node_max_over_mean),
            "extra_copies": mean(self.extra_copies.astype(np.float64)),
            "kept_affinity_gpu": mean(self.kept_affinity_gpu),
            "kept_affinity_node": mean(self.kept_affinity_node),
            "kept_interlayer_gpu": mean(self.kept_interlayer_gpu),
        }


def _hosts(plan_layer: tuple[tuple[int, ...], ...] | list[list[int]], num_experts: int) -> np.ndarray:
    """bool ``[G, E]`` hosting matrix of one layer's GPU lists."""
    H = np.zeros((len(plan_layer), num_experts), dtype=bool)
    for g, experts in enumerate(plan_layer):
        H[g, list(experts)] = True
    return H


def evaluate_plan(plan: PlacementPlan, stats: ExpertStats, affinity: np.ndarray | None = None) -> PlanMetrics:
    """Predicted balance and kept affinity of ``plan`` on ``stats`` (see :class:`PlanMetrics`).

    Args:
        affinity: optional precomputed ``stats.affinity()`` (``[L, E, E]``), to avoid recomputing it.
    """
    if plan.num_experts != stats.num_experts or plan.num_layers != stats.num_layers:
        raise GraceInputError(
            f"plan is for {plan.num_layers} layers x {plan.num_experts} experts, statistics have "
            f"{stats.num_layers} x {stats.num_experts}"
        )
    return _evaluate(plan.gpu_experts, plan.topology, stats, affinity)


def _evaluate(gpu_experts: Any, topology: Topology, stats: ExpertStats, affinity: np.ndarray | None) -> PlanMetrics:
    """:func:`evaluate_plan` on ``[layer][gpu] -> expert ids`` lists."""
    L, E, G = len(gpu_experts), stats.num_experts, topology.num_gpus
    gpn, N = topology.gpus_per_node, topology.num_nodes
    if affinity is None and stats.coactivation is not None:
        affinity = stats.affinity()
    gpu_load = np.zeros((L, G))
    mom = np.zeros(L)
    node_mom = np.zeros(L)
    kept_gpu = np.zeros(L) if affinity is not None else None
    kept_node = np.zeros(L) if affinity is not None else None
    kept_inter = np.zeros(max(L - 1, 0)) if stats.transitions is not None else None
    hosts_all = [_hosts(layer, E) for layer in gpu_experts]
    for l, H in enumerate(hosts_all):
        w = stats.load[l]
        copies = H.sum(axis=0)
        share = H / copies[None, :]  # [G, E] fraction of expert e's tokens served by GPU g
        gl = share @ w
        gpu_load[l] = gl
        mean = gl.mean()
        mom[l] = gl.max() / mean if mean > 0 else 1.0
        nl = gl.reshape(N, gpn).sum(axis=1)
        node_mom[l] = nl.max() / nl.mean() if mean > 0 else 1.0
        if affinity is not None:
            A = affinity[l]
            total = A.sum()
            Hf = H.astype(np.float64)
            co_gpu = (Hf.T @ Hf) > 0
            Hn = Hf.reshape(N, gpn, E).sum(axis=1)
            co_node = (Hn.T @ Hn) > 0
            kept_gpu[l] = (A * co_gpu).sum() / total if total > 0 else 0.0
            kept_node[l] = (A * co_node).sum() / total if total > 0 else 0.0
        if kept_inter is not None and l > 0:
            T = stats.transitions[l - 1]
            prev = hosts_all[l - 1]
            prev_share = prev / prev.sum(axis=0)[None, :]
            total = T.sum()
            kept_inter[l - 1] = float((prev_share.T @ H.astype(np.float64) * T).sum() / total) if total > 0 else 0.0
    return PlanMetrics(
        gpu_load=gpu_load, max_over_mean=mom, node_max_over_mean=node_mom,
        extra_copies=np.array([int(H.sum()) - E for H in hosts_all], dtype=np.int64),
        slots_used=np.array([int(H.sum()) for H in hosts_all], dtype=np.int64),
        kept_affinity_gpu=kept_gpu, kept_affinity_node=kept_node, kept_interlayer_gpu=kept_inter,
    )


# ============================================================================ planners
def _plan_vanilla(ctx: _Context, opts: VanillaOptions) -> list[list[list[int]]]:
    """Contiguous blocks of expert ids per GPU, the same for every layer."""
    sizes = equal_sizes(ctx.num_experts, ctx.num_gpus)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    layer = [list(range(int(bounds[g]), int(bounds[g + 1]))) for g in range(ctx.num_gpus)]
    return [[list(g) for g in layer] for _ in ctx.layers("plan vanilla", opts.progress)]


def _plan_eplb(ctx: _Context, opts: EplbOptions) -> list[list[list[int]]]:
    """DeepSeek EPLB (see :mod:`megatron_grace.plan.eplb`) with no colocated copies by default."""
    E, N, G = ctx.num_experts, ctx.num_nodes, ctx.num_gpus
    num_groups: int | None
    if opts.policy == "global":
        num_groups = None
    elif opts.num_groups is not None:
        num_groups = opts.num_groups
        if E % num_groups:
            raise GraceInputError(f"eplb: num_groups={num_groups} does not divide the {E} experts")
        if num_groups % N:
            raise GraceInputError(f"eplb: num_groups={num_groups} is not a multiple of the {N} nodes (use policy='global')")
    elif E % G == 0:
        num_groups = G
    elif E % N == 0:
        num_groups = N
    else:
        num_groups = None
        ctx.notes["eplb_fallback"] = f"{E} experts do not split over {N} nodes: global policy"
    ctx.notes["eplb_policy"] = "global" if num_groups is None else "hierarchical"
    ctx.notes["eplb_num_groups"] = num_groups
    out, merged = [], 0
    for l in ctx.layers("plan eplb", opts.progress):
        layer = eplb_layer(ctx.load[l], N, ctx.gpus_per_node, ctx.capacity, num_groups, opts.allow_colocated_copies)
        deduped = [sorted(set(g)) for g in layer]
        merged += sum(len(a) - len(b) for a, b in zip(layer, deduped))
        out.append(deduped)
    if opts.allow_colocated_copies:
        ctx.notes["colocated_copies_merged"] = merged
    return out


def _affinity_or_fallback(ctx: _Context, planner: str, mode: str) -> np.ndarray | None:
    """The layer affinities, or None after a warning (``fallback``) / GraceInputError (``error``)."""
    if ctx.affinity is not None:
        return ctx.affinity
    message = (f"{planner}: the statistics ({ctx.stats.source or ctx.stats.model}) have no co-activation data; "
               "grouping by load only (no affinity kept)")
    if mode == "error":
        raise GraceInputError(f"{planner}: the statistics have no co-activation data (on_missing_coactivation='error')",
                              ctx.stats.source or None)
    ctx.warn(message)
    ctx.notes["fallback"] = "load-only grouping (no co-activation data)"
    return None


def _normalized(A: np.ndarray | None, E: int) -> tuple[np.ndarray, float]:
    """Affinity divided by its total pair mass (so kept affinity is a fraction); and that mass."""
    if A is None:
        return np.zeros((E, E)), 0.0
    mass = float(A.sum()) / 2.0
    return (A / mass if mass > 0 else np.zeros_like(A)), mass


def _hierarchical_groups(a: np.ndarray, w: np.ndarray, ctx: _Context, gpu_lo: np.ndarray, gpu_hi: np.ndarray,
                         balance_weight: float, node_balance_weight: float, anchor: np.ndarray | None, init: str,
                         local_search: bool, rng: np.random.Generator, total: float | None = None,
                         load_slack: float | None = None, tokens: np.ndarray | None = None,
                         token_gpu: np.ndarray | None = None) -> np.ndarray:
    """Group experts into nodes, then each node's experts into its GPUs.

    Args:
        a: float64 ``[E, E]`` normalized affinity; w: float64 ``[E]`` load.
        gpu_lo, gpu_hi: int64 ``[G]`` size bounds per GPU (a node's bounds are the sums).
        anchor: float64 ``[E, G]`` per-GPU attraction or None.
        tokens, token_gpu: optional planning tokens, int ``[T, k]`` expert ids (-1: none), and
            int ``[T]`` their start GPUs: each level's grouping is then refined for fewer
            distinct remote nodes / GPUs per token (:func:`~megatron_grace.plan.token_grouping.refine_messages`).

    Returns:
        int64 ``[E]``: GPU of each expert.
    """
    E, N, gpn, G = a.shape[0], ctx.num_nodes, ctx.gpus_per_node, ctx.num_gpus
    total = float(w.sum()) if total is None else total
    w_node = w / (total / N) if total > 0 else np.zeros(E)
    w_gpu = w / (total / G) if total > 0 else np.zeros(E)
    node_lo = gpu_lo.reshape(N, gpn).sum(axis=1)
    node_hi = gpu_hi.reshape(N, gpn).sum(axis=1)
    anchor_node = None if anchor is None else anchor.reshape(E, N, gpn).sum(axis=2)
    node_of = partition(a, w_node, node_lo, node_hi, balance_weight=node_balance_weight, anchor=anchor_node,
                        init=init, local_search=local_search, load_slack=load_slack, rng=rng)
    if tokens is not None and token_gpu is not None and N > 1:
        node_of = refine_messages(tokens, token_gpu // gpn, node_of, N, w_node)
    gpu_of = np.empty(E, dtype=np.int64)
    for n in range(N):
        members = np.flatnonzero(node_of == n)
        gpus = np.arange(n * gpn, (n + 1) * gpn)
        sub = partition(a[np.ix_(members, members)], w_gpu[members], gpu_lo[gpus], gpu_hi[gpus],
                        balance_weight=balance_weight, anchor=None if anchor is None else anchor[np.ix_(members, gpus)],
                        init=init, local_search=local_search, load_slack=load_slack, rng=rng)
        if tokens is not None and token_gpu is not None and gpn > 1:
            local = np.full(E + 1, -1, dtype=np.int64)  # index E: the -1 padding
            local[members] = np.arange(members.size)
            ids = local[np.where(tokens >= 0, tokens, E)]
            here = (ids >= 0).any(axis=1)
            home = np.where(token_gpu // gpn == n, token_gpu % gpn, -1)
            sub = refine_messages(ids[here], home[here], sub, gpn, w_gpu[members])
        gpu_of[members] = gpus[sub]
    return gpu_of


_APART = -1e6
"""Affinity that keeps two copies of one expert off one GPU during the repack."""


def _repack_nodes(hosts: np.ndarray, w: np.ndarray, a: np.ndarray, ctx: _Context, lo: int,
                  balance_weight: float, anchor: np.ndarray | None = None,
                  load_slack: float | None = None, copy_load: np.ndarray | None = None) -> np.ndarray:
    """Rebalance the physical experts (primaries and copies) among the GPUs of each node.

    Moves and swaps inside a node (:func:`~megatron_grace.plan.grouping.refine`) never change
    which node serves which expert, so the cross-node traffic the grouping and replication
    planned is untouched; they trade GPU-level affinity ``a`` (``[E, E]``, normalized) against
    the predicted GPU balance (each copy weighs ``w / copies``), keep at most ``capacity`` and at
    least ``lo`` experts per GPU, and never put two copies of one expert on one GPU. ``anchor``
    (``[E, G]``, optional) is the between-layer attraction of the grouping. ``copy_load``
    (``[N, E]``, optional) is the predicted load of one copy of each expert on each node
    (:func:`~megatron_grace.plan.replication.node_copy_load`); without it each copy weighs
    ``w / copies``.

    Returns:
        bool ``[G, E]`` new placement with the same copies per node.
    """
    G, E = hosts.shape
    gpn = ctx.gpus_per_node
    total = float(w.sum())
    if total <= 0:
        return hosts
    equal = w / np.maximum(hosts.sum(axis=0), 1) / (total / G)
    out = np.zeros_like(hosts)
    for n in range(ctx.num_nodes):
        share = equal if copy_load is None else copy_load[n] / (total / G)
        gpus = np.arange(n * gpn, (n + 1) * gpn)
        local_gpu, expert = np.nonzero(hosts[gpus])
        if expert.size == 0:
            continue
        aff = a[np.ix_(expert, expert)]
        aff = np.where(expert[:, None] == expert[None, :], _APART, aff)
        counts = np.bincount(local_gpu, minlength=gpn)
        lo_n = np.minimum(np.full(gpn, lo), counts)
        labels = refine(aff, share[expert], local_gpu, lo_n, np.full(gpn, ctx.capacity), balance_weight=balance_weight,
                        anchor=None if anchor is None else anchor[np.ix_(expert, gpus)], load_slack=load_slack)
        out[gpus[labels], expert] = True
    return out


def _lists(hosts: np.ndarray) -> list[list[int]]:
    """GPU lists (ascending expert ids) of a bool ``[G, E]`` hosting matrix."""
    return [np.flatnonzero(row).tolist() for row in hosts]


def _plan_affinity(ctx: _Context, opts: AffinityOptions) -> list[list[list[int]]]:
    """Equal-size affinity grouping, hierarchical (nodes, then GPUs), no replicas."""
    E, G = ctx.num_experts, ctx.num_gpus
    affinity = _affinity_or_fallback(ctx, "affinity", opts.on_missing_coactivation)
    sizes = equal_sizes(E, G)
    ctx.notes["equal_group_sizes"] = sorted({int(s) for s in sizes})
    out = []
    for l in ctx.layers("plan affinity", opts.progress):
        a, _ = _normalized(None if affinity is None else affinity[l], E)
        rng = np.random.default_rng(opts.seed + l)
        # with no affinity the only objective left is balance (load-only fallback)
        bw = 1.0 if affinity is None else 0.0
        gpu_of = _hierarchical_groups(a, ctx.load[l], ctx, sizes, sizes, bw, bw, None, opts.init, opts.local_search, rng)
        hosts = np.zeros((G, E), dtype=bool)
        hosts[gpu_of, np.arange(E)] = True
        out.append(_lists(hosts))
    return out


def _grace_affinity(ctx: _Context, opts: PlannerOptions, l: int) -> tuple[np.ndarray | None, np.ndarray, float]:
    """Layer ``l``'s raw affinity ``A`` (``[E, E]`` or None), the grouping's normalized affinity ``a``
    (in excess of independence with ``affinity_baseline="independence"``) and the pair mass."""
    A = None if ctx.affinity is None else ctx.affinity[l]
    a, mass = _normalized(A, ctx.num_experts)
    if A is not None and opts.affinity_baseline == "independence" and mass > 0:
        w = ctx.load[l]
        p = w / max(float(ctx.stats.tokens[l]), 1.0)
        indep = np.outer(p, p) * float(ctx.stats.tokens[l])
        np.fill_diagonal(indep, 0.0)
        a = (A - indep) / mass
    return A, a, mass


def _plan_grace(ctx: _Context, opts: PlannerOptions) -> list[list[list[int]]]:
    """GRACE-MoE: load-aware hierarchical affinity grouping, then replication into free slots."""
    E, G, L = ctx.num_experts, ctx.num_gpus, ctx.num_layers
    _affinity_or_fallback(ctx, "grace", opts.on_missing_coactivation)  # warns (or raises) without co-activation data
    lo, hi, d = size_bounds(E, G, ctx.capacity, opts.ratio)
    ctx.notes["group_size_bounds"] = [lo, hi]
    ctx.notes["group_size_d"] = d
    ctx.notes["replica_strategy"] = "greedy" if opts.replicas == "auto" else opts.replica_strategy
    gpu_lo, gpu_hi = np.full(G, lo, dtype=np.int64), np.full(G, hi, dtype=np.int64)
    transitions = ctx.stats.transitions
    use_inter = opts.interlayer_weight > 0 and transitions is not None and L > 1
    if opts.interlayer_weight > 0 and not use_inter:
        ctx.warn("grace: interlayer_weight > 0 ignored: the statistics have no between-layer transitions")
    max_new: int | None
    target: float | None = None
    if opts.replicas == "fill":
        max_new = None
    elif opts.replicas == "auto":
        max_new, target = None, opts.balance_target
    elif opts.replicas == "none":
        max_new = 0
    else:
        max_new = int(opts.replicas)
    free_slots = G * ctx.capacity - E
    planned = free_slots if max_new is None else min(max_new, free_slots)
    out: list[list[list[int]]] = []
    group_sizes: list[np.ndarray] = []
    prev_hosts: np.ndarray | None = None
    sample = token_gpu = None
    if ctx.trace is not None and opts.token_objective:
        T = ctx.trace.num_tokens
        sample = evenly_spaced(T, opts.token_sample)
        token_gpu = sample % G  # tokens start on GPU t mod G (the serving prediction's placement)
        ctx.notes["token_objective"] = {"tokens": int(sample.size), "of": T}
    for l in ctx.layers("plan grace", opts.progress):
        A, a, mass = _grace_affinity(ctx, opts, l)
        w = ctx.load[l]
        anchor = None
        if use_inter and l > 0 and prev_hosts is not None:
            T = transitions[l - 1]  # [E, E]: i at l-1 -> j at l
            share = prev_hosts / prev_hosts.sum(axis=0)[None, :]  # [G, E_prev]
            unit = mass if mass > 0 else max(float(T.sum()), 1.0)
            anchor = opts.interlayer_weight * (share @ T).T / unit  # [E, G]
        rng = np.random.default_rng(opts.seed + l)
        w = _planning_load(w, opts)
        w_bal = w
        copy_cap: Any = G
        if opts.spread_copies and ctx.num_nodes > 1 and w.sum() > 0:
            # one copy per node, more only where an expert alone outweighs a mean GPU load
            copy_cap = np.minimum(G, np.maximum(ctx.num_nodes, np.ceil(w * G / float(w.sum()) - 1e-9))).astype(np.int64)
        if opts.anticipate and planned > 0 and w.sum() > 0:
            c = replicate_by_load(w, E + planned, copy_cap)
            psi = float(((c - 1) * w / c).sum()) / max(int((c - 1).sum()), 1)
            w_bal = w / c - psi
        nbw = opts.balance_weight if opts.node_balance_weight is None else opts.node_balance_weight
        gpu_of = _hierarchical_groups(a, w_bal, ctx, gpu_lo, gpu_hi, opts.balance_weight, nbw, anchor, opts.init,
                                      opts.local_search, rng, total=float(w.sum()), load_slack=opts.load_slack,
                                      tokens=None if sample is None else ctx.trace.expert_ids[sample, l], token_gpu=token_gpu)
        hosts = np.zeros((G, E), dtype=bool)
        hosts[gpu_of, np.arange(E)] = True
        group_sizes.append(np.bincount(gpu_of, minlength=G))
        if max_new != 0:
            if opts.replica_strategy == "demand" and target is None:
                hosts, ctx.serving[l] = _demand_replicas(hosts, w, a, A, ctx, lo, opts, anchor, max_new, l)
                added = 0  # repacked inside
            elif opts.replica_strategy == "planned" and target is None:
                hosts, added = add_planned_replicas(hosts, w, ctx.capacity, ctx.gpus_per_node, affinity=A, max_new=max_new,
                                                    locality_weight=opts.replica_locality_weight,
                                                    max_copies=copy_cap)
            else:
                hosts, added = add_replicas(hosts, w, ctx.capacity, ctx.gpus_per_node, affinity=A, max_new=max_new,
                                            balance_target=target, locality_weight=opts.replica_locality_weight)
            if added and opts.repack:
                hosts = _repack_nodes(hosts, w, a, ctx, lo, opts.balance_weight, anchor, opts.load_slack)
        prev_hosts = hosts
        out.append(_lists(hosts))
    ctx.notes["group_sizes"] = np.array(group_sizes)  # [L, G] experts per GPU after grouping, before copies
    return out


def _demand_replicas(hosts: np.ndarray, w: np.ndarray, a: np.ndarray, A: np.ndarray | None, ctx: _Context, lo: int,
                     opts: PlannerOptions, anchor: np.ndarray | None, max_new: int | None,
                     layer: int) -> tuple[np.ndarray, tuple[np.ndarray, float]]:
    """One layer's demand-aware copies (:func:`~megatron_grace.plan.replication.add_demand_replicas`), repacked.

    Two split thresholds are tried: a copy may carry up to one mean GPU load (more slots left
    for node copies, i.e. locality), or up to one mean *slot* load (EPLB-like balance first:
    better with many nodes, where a node copy saves only ``1 / N`` of an expert's pairs). The
    serving router (:func:`megatron_grace.simulation.policies.serving_gpu_load`) decides: the
    lower max/mean wins, and within 0.01 the lower cross-node share.

    Returns:
        ``(hosts, (gpu_load, cross))``: bool ``[G, E]`` placement and the winner's serving
        prediction (float64 ``[G]`` load, cross-node share of the demand).
    """
    from megatron_grace.simulation.policies import serving_gpu_load

    thresholds = [1.0] + ([1.0 / ctx.capacity] if ctx.capacity > 1 else [])
    best: tuple[tuple[float, float], np.ndarray, tuple[np.ndarray, float]] | None = None
    for threshold in thresholds:
        out, added, copy_load = add_demand_replicas(hosts, w, ctx.capacity, ctx.gpus_per_node, affinity=A, max_new=max_new,
                                                    locality_weight=opts.replica_locality_weight, split_threshold=threshold)
        if added and opts.repack:
            out = _repack_nodes(out, w, a, ctx, lo, opts.balance_weight, anchor, opts.load_slack, copy_load)
        if added:  # the copies of each node in one component: least-loaded routing can move load between all its GPUs
            out = spread_node_copies(out, copy_load, ctx.gpus_per_node)
        with torch_threads(1):
            load, cross = serving_gpu_load(_host_array(out), ctx.topology, ctx.load[layer], layer=layer)  # the data's load, not the shrunk one
        mom = float(load.max() / load.mean()) if load.mean() > 0 else 1.0
        key = (mom, cross)
        if best is None or key[0] < best[0][0] - 0.01 or (abs(key[0] - best[0][0]) <= 0.01 and key[1] < best[0][1]):
            best = (key, out, (load, cross))
        if not added:  # no free slot: every threshold gives this placement
            break
    assert best is not None
    return best[1], best[2]


def _planning_load(w: np.ndarray, opts: PlannerOptions) -> np.ndarray:
    """float64 ``[E]``: a layer's load ``w`` pulled toward its mean by ``opts.load_shrinkage`` (see :class:`PlannerOptions`)."""
    s = opts.load_shrinkage or 0.0
    return w if s == 0 else (1.0 - s) * w + s * float(w.mean())


SHRINKAGE_GRID = (0.0, 0.25, 0.5, 0.75)
"""``load_shrinkage`` values :func:`_validated_shrinkage` chooses from."""
VALIDATION_LAYERS = 8
"""At most this many layers (evenly spaced) enter the shrinkage validation (it plans 8 half-trace plans)."""


def _validation_folds(trace: RoutingTrace) -> tuple[np.ndarray, str]:
    """bool ``[T]``: the first of two halves of a planning trace, and how it was split.

    By request when the trace has at least two (alternate requests in order of first
    appearance: the halves hold different prompts, as the served traffic will), else the first
    and second half of the tokens.
    """
    T = trace.num_tokens
    req = trace.request_ids
    if req is not None:
        order = np.unique(req, return_index=True)
        if order[0].size >= 2:
            ranked = order[0][np.argsort(order[1])]
            first = np.isin(req, ranked[0::2])
            return first, f"by request ({order[0].size} requests, alternating)"
    first = np.arange(T) < T // 2
    return first, "first and second half of the tokens"


def _validated_shrinkage(topology: Topology, opts: PlannerOptions, trace: RoutingTrace | None) -> tuple[float, dict[str, Any]]:
    """``load_shrinkage`` for ``load_shrinkage=None`` and a record of how it was chosen.

    A planning trace with fewer than :data:`BOOTSTRAP_BELOW_PAIRS_PER_GPU` token-expert pairs per
    GPU and layer (and at least one token per GPU in each half) is split in two
    (:func:`_validation_folds`); for each value of :data:`SHRINKAGE_GRID`, a ``grace`` plan of one
    half (without the monotone guard and the per-token search, for speed; at most
    :data:`VALIDATION_LAYERS` evenly spaced layers) is replayed on the other half through the
    serving router, which predicts loads from the fitted half (as it serves with the planning
    statistics), both ways. The smallest value whose mean max/mean is within
    :data:`MONOTONE_TOLERANCE` of the lowest wins (no shrinkage unless it helps); the
    cross-node messages of each value are recorded. Otherwise 0 (also with ``replicas="none"``).
    The plans are validated with one slot per GPU above an even split, whatever ``topology``'s
    budget, so every slot budget of one cluster gets the same value and the monotone guard's
    promise holds between budgets too (more slots never hurt).
    """
    G = topology.num_gpus
    if opts.replicas == "none":
        return 0.0, {"value": 0.0, "chosen_by": "default (replicas='none': no copies to size)"}
    if trace is None or trace.num_tokens * trace.top_k >= BOOTSTRAP_BELOW_PAIRS_PER_GPU * G:
        return 0.0, {"value": 0.0, "chosen_by": "default (no small planning trace to validate on)"}
    first, how = _validation_folds(trace)
    kept = evenly_spaced(trace.num_layers, VALIDATION_LAYERS)
    trace = trace.select_layers(kept)
    halves = [trace.select_tokens(first), trace.select_tokens(~first)]
    if min(h.num_tokens for h in halves) < G:
        return 0.0, {"value": 0.0, "chosen_by": f"default (the planning trace is too small to validate on: each half needs "
                                                f"at least one token per GPU, {G}; it has {[h.num_tokens for h in halves]})"}
    fold_opts = dataclasses.replace(opts, monotone=False, token_objective=False, progress=False)
    capacity = math.ceil(trace.num_experts / G) + 1
    folds = []  # the planner's context of each half (its statistics and affinity, counted once)
    for h in halves:
        st = ExpertStats.from_trace(h)
        folds.append(_Context(stats=st, topology=topology.with_slots(capacity), capacity=capacity, load=st.load,
                              affinity=st.affinity() if st.coactivation is not None else None))
    scores: dict[float, tuple[float, int]] = {}
    for s in SHRINKAGE_GRID:
        moms, msgs = [], 0
        for fit, held in ((0, 1), (1, 0)):
            ctx = dataclasses.replace(folds[fit], notes={}, serving={})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the full plan warns once, not every fold
                layers = _plan_grace(ctx, dataclasses.replace(fold_opts, load_shrinkage=s))
            # the router predicts from the fitted half's load, as it would serve with the planning statistics
            _, result = _replay(_draft(ctx, layers), halves[held], ctx.load)
            moms.append(float(result.load_imbalance.mean()))
            msgs += int(result.msgs_node.sum())
        scores[s] = (float(np.mean(moms)), msgs)
    best = min(m for m, _ in scores.values())
    value = min(s for s in SHRINKAGE_GRID if scores[s][0] <= best * (1 + MONOTONE_TOLERANCE))
    return value, {"value": value, "chosen_by": f"validation on the planning trace, split {how}, layers {kept.tolist()}",
                   "held_out_max_over_mean": {str(s): scores[s][0] for s in SHRINKAGE_GRID},
                   "held_out_msgs_node": {str(s): scores[s][1] for s in SHRINKAGE_GRID}}


def _host_array(hosts: np.ndarray) -> np.ndarray:
    """int64 ``[E, R]`` hosting GPUs of a bool ``[G, E]`` placement (ascending, -1 padded; ``plan.expert_gpus[l]``)."""
    G = hosts.shape[0]
    rows = np.sort(np.where(hosts.T, np.arange(G)[None, :], G), axis=1)[:, : max(int(hosts.sum(axis=0).max()), 1)]
    return np.where(rows == G, -1, rows)


# ============================================================================ registry
@dataclass(frozen=True)
class Planner:
    """A named planner: its options dataclass and the function that plans every layer.

    Attributes:
        name: registry name.
        options_type: frozen dataclass of the knobs (every field has a default).
        run: ``(context, options) -> [layer][gpu] -> expert ids``.
        summary: one line for help texts.
    """

    name: str
    options_type: type
    run: Callable[[_Context, Any], list[list[list[int]]]]
    summary: str

    def knobs(self) -> dict[str, Any]:
        """Option name -> default value."""
        return {f.name: f.default for f in dataclasses.fields(self.options_type)}

    def make_options(self, options: Any = None, **overrides: Any) -> Any:
        """Options instance from an instance/mapping plus keyword overrides; unknown knobs raise GraceInputError."""
        if isinstance(options, self.options_type):
            base = dataclasses.asdict(options)
        elif options is None:
            base = {}
        elif isinstance(options, Mapping):
            base = dict(options)
        else:
            raise GraceInputError(f"planner {self.name!r}: options must be a {self.options_type.__name__} or a mapping")
        base.update(overrides)
        unknown = sorted(set(base) - set(self.knobs()))
        if unknown:
            raise GraceInputError(
                f"planner {self.name!r} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(self.knobs())}"
            )
        return self.options_type(**base)

    def parse_option(self, name: str, text: str) -> Any:
        """Convert a command-line string to the type of knob ``name`` (for ``--set name=value``)."""
        fields = {f.name: f for f in dataclasses.fields(self.options_type)}
        if name not in fields:
            raise GraceInputError(f"planner {self.name!r} has no option {name!r}; its options: {', '.join(fields)}")
        kind = str(fields[name].type)
        t = text.strip()
        if kind.endswith(" | None"):
            if t.lower() in ("none", ""):
                return None
            kind = kind[: -len(" | None")]
        if kind == "bool":
            if t.lower() in ("1", "true", "yes", "on"):
                return True
            if t.lower() in ("0", "false", "no", "off"):
                return False
            raise GraceInputError(f"option {name}={text!r}: expected true or false")
        try:
            if kind == "int":
                return int(t)
            if kind == "float":
                return float(t)
            if kind == "str | int":
                return int(t) if t.lstrip("-").isdigit() else t
        except ValueError:
            raise GraceInputError(f"option {name}={text!r}: expected {kind}") from None
        return t

    def __call__(self, stats: ExpertStats, topology: Topology, options: Any = None, **overrides: Any) -> PlacementPlan:
        return plan_placement(stats, topology, self.name, options, **overrides)


PLANNERS: dict[str, Planner] = {
    "vanilla": Planner("vanilla", VanillaOptions, _plan_vanilla,
                       "contiguous experts per GPU, no replicas (Megatron-Core / DeepSpeed default)"),
    "eplb": Planner("eplb", EplbOptions, _plan_eplb,
                    "DeepSeek EPLB: load-only hierarchical replication and packing, no colocated copies (slots a node cannot fill stay empty, the plan says why)"),
    "affinity": Planner("affinity", AffinityOptions, _plan_affinity,
                        "co-activation grouping, equal group sizes, no replicas (Occult / ExFlow style)"),
    "grace": Planner("grace", PlannerOptions, _plan_grace,
                     "GRACE-MoE: load-aware hierarchical affinity grouping + copies placed and sized for the locality-first router (every slot used unless more copies are predicted to hurt; the plan says why)"),
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def serving_prediction(plan: PlacementPlan, expert_load: np.ndarray, policy: str = "grace",
                       trace: RoutingTrace | None = None,
                       known: Mapping[int, tuple[np.ndarray, float]] | None = None) -> dict[str, Any]:
    """Per-GPU load of every layer of ``plan`` under the serving router.

    Without a trace: :func:`megatron_grace.simulation.policies.serving_gpu_load` (the routing
    module's policy, as the layer and the simulator run it) on the demand of ``expert_load``
    ``[L, E]``, tokens starting on GPU ``t mod G``. With the planning trace: the simulator
    replays its tokens (``t mod G``) through the plan with the same policy, so the prediction
    includes the imbalance of batches of that size. A planning trace with few tokens
    (under :data:`BOOTSTRAP_BELOW_PAIRS_PER_GPU` pairs per GPU and layer) is also replayed in
    :data:`BOOTSTRAP_RESAMPLES` resamples drawn with replacement: the plan was chosen on these
    tokens, so their own replay flatters it, while a resample behaves like a fresh batch of that
    size; ``max_over_mean`` is then the resamples' mean (``max_over_mean_in_sample`` the replay)
    and ``sampling_error`` the standard deviation of the layer-mean max/mean over the resamples. ``known`` (layer -> ``(gpu_load [G], cross)``,
    policy ``grace``, no trace) holds layers already evaluated that way, by the planner on the
    same placement; they are not routed again.

    Returns:
        ``{"policy", "token_placement", "source", "gpu_load": float64 [L, G], "max_over_mean":
        float64 [L], "cross_node_pair_share": float64 [L]}`` (plus ``"msgs_node"``, int ``[L]``
        deduplicated token-to-node messages, from a trace; and ``"max_over_mean_in_sample"``
        float64 ``[L]``, ``"sampling_error"`` float and ``"resample_max_over_mean"`` float64 ``[B, L]`` from a
        resampled small trace).
    """
    from megatron_grace.simulation.policies import serving_gpu_load

    L, G = plan.num_layers, plan.num_gpus
    out: dict[str, Any] = {"policy": policy, "token_placement": "round-robin"}
    with torch_threads(1):
        if trace is not None:
            gpu_load, r = _replay(plan, trace, expert_load, policy)
            cross = np.divide(r.pairs_inter_node, r.pairs_total, out=np.zeros(L), where=r.pairs_total > 0)
            out.update(source=f"planning trace ({trace.num_tokens} tokens)", msgs_node=r.msgs_node)
            T = trace.num_tokens
            if 0 < T * trace.top_k < BOOTSTRAP_BELOW_PAIRS_PER_GPU * G:
                # few tokens: the plan was chosen on them, so their replay is optimistic; a fresh batch of the same size
                # is modelled by resampling them (fixed seed: every plan sees the same resamples)
                rng = np.random.default_rng(0)
                moms = np.empty((BOOTSTRAP_RESAMPLES, L))
                for b in range(BOOTSTRAP_RESAMPLES):
                    moms[b] = _replay(plan, trace.select_tokens(np.sort(rng.integers(T, size=T))), expert_load, policy)[1].load_imbalance
                out.update(source=f"planning trace ({T} tokens), mean of {BOOTSTRAP_RESAMPLES} resamples",
                           max_over_mean_in_sample=r.load_imbalance,
                           bootstrap_max_over_mean=moms.mean(axis=0), sampling_error=float(moms.mean(axis=1).std()),
                           resample_max_over_mean=moms)
        else:
            gpu_load, cross = np.zeros((L, G)), np.zeros(L)
            known = known if policy == "grace" and known is not None else {}
            for l in range(L):
                if l in known:
                    gpu_load[l], cross[l] = known[l]
                else:
                    gpu_load[l], cross[l] = serving_gpu_load(plan.expert_gpus[l], plan.topology, expert_load[l], policy=policy, layer=l)
            out["source"] = "statistics (demand batch)"
    mean = gpu_load.mean(axis=1)
    mom = np.divide(gpu_load.max(axis=1), mean, out=np.ones(L), where=mean > 0)
    out.update(gpu_load=gpu_load, max_over_mean=out.pop("bootstrap_max_over_mean", mom), cross_node_pair_share=cross)
    return out


def _replay(plan: PlacementPlan, trace: RoutingTrace, expert_load: np.ndarray, policy: str = "grace") -> tuple[np.ndarray, Any]:
    """The simulator's replay of ``trace`` (tokens on GPU ``t mod G``) through ``plan``: float64 ``[L, G]`` GPU loads and
    the :class:`~megatron_grace.simulation.simulator.SimResult`."""
    from megatron_grace.simulation.simulator import simulate

    shape = ModelShape(name="plan", num_layers=plan.num_layers, num_experts=plan.num_experts, top_k=max(int(trace.top_k), 1),
                       hidden_size=1, expert_ffn_size=1)  # sizes only scale bytes and times, unused here
    with torch_threads(1):
        r = simulate(plan, trace, shape, policy=policy, dispatch="hierarchical", expert_load=expert_load)
    return r.gpu_load.astype(np.float64), r


BOOTSTRAP_BELOW_PAIRS_PER_GPU = 1000
"""A planning trace with fewer token-expert pairs per GPU and layer than this is predicted by resampling."""
BOOTSTRAP_RESAMPLES = 16
"""Resamples of such a trace (each a batch of its size, drawn with replacement)."""


MONOTONE_TOLERANCE = 0.005
"""Relative worsening of a layer's predicted max/mean or cross-node traffic that ``monotone`` tolerates."""


def _serving_worse(a: dict[str, Any], b: dict[str, Any], tol: float = MONOTONE_TOLERANCE) -> np.ndarray:
    """bool ``[L]``: layers where serving prediction ``a`` has a higher max/mean or more cross-node traffic than ``b``
    (deduplicated messages from a trace, else the cross-node pair share)."""
    key = "msgs_node" if "msgs_node" in a and "msgs_node" in b else "cross_node_pair_share"
    worse = np.asarray(a["max_over_mean"]) > np.asarray(b["max_over_mean"]) * (1 + tol) + 1e-12
    return worse | (np.asarray(a[key], dtype=np.float64) > np.asarray(b[key], dtype=np.float64) * (1 + tol) + 1e-12)


def _compose(choice: np.ndarray, options: list[tuple[list, dict[str, Any]]]) -> tuple[list, dict[str, Any]]:
    """Per layer ``l``, layer and serving prediction of ``options[choice[l]]``.

    Predictions are per layer: the simulator routes each layer on its own and every plan sees the
    same resamples, so a composed plan's resampled max/mean are its layers' and its sampling error
    follows from them (no new replay).
    """
    layers = [options[int(c)][0][l] for l, c in enumerate(choice)]
    serving = dict(options[0][1])
    for key in ("gpu_load", "max_over_mean", "cross_node_pair_share", "msgs_node", "max_over_mean_in_sample"):
        if key in serving:
            serving[key] = np.stack([np.asarray(options[int(c)][1][key])[l] for l, c in enumerate(choice)])
    if "resample_max_over_mean" in serving:  # [B, L]
        moms = np.stack([options[int(c)][1]["resample_max_over_mean"][:, l] for l, c in enumerate(choice)], axis=1)
        serving.update(resample_max_over_mean=moms, sampling_error=float(moms.mean(axis=1).std()))
    return layers, serving


def _plan_grace_monotone(ctx: _Context, opts: PlannerOptions) -> tuple[list, dict[str, Any]]:
    """The ``grace`` plan, never worse than the plan for one slot fewer per GPU (``monotone=True``).

    Plans with every slot count from ``ceil(E / G)`` up to the capacity; at each step a layer keeps
    its fresh plan unless the serving prediction (:func:`serving_prediction`, on the planning
    trace when there is one) says it has a higher max/mean or more cross-node traffic than the
    layer chosen for one slot fewer (by more than :data:`MONOTONE_TOLERANCE`, relative). Then that layer is extended instead (its copies kept, the
    new slots filled by :func:`~megatron_grace.plan.replication.add_demand_replicas`), or, if
    the extension is predicted worse too, kept as it was (the new slots stay empty, and
    ``metadata["empty_slots"]`` says why).
    """
    E, G = ctx.num_experts, ctx.num_gpus
    trace = ctx.trace
    base = min(ctx.capacity, max(1, math.ceil(E / G)))
    prev: tuple[list, dict[str, Any]] | None = None
    kept: set[int] = set()
    extended: set[int] = set()
    for c in range(base, ctx.capacity + 1):
        sub = dataclasses.replace(ctx, capacity=c, topology=ctx.topology.with_slots(c), notes={}, warnings=ctx.warnings,
                                  serving={})
        layers = _plan_grace(sub, opts)
        serving = serving_prediction(_draft(sub, layers), ctx.load, trace=trace, known=sub.serving)
        if trace is not None and opts.token_objective:
            layers, serving = _keep_pairwise_where_better(sub, opts, layers, serving)
        if prev is not None:
            worse = _serving_worse(serving, prev[1])
            if worse.any():
                grown = [_extend_layer(prev[0][l], l, sub, opts) if worse[l] else layers[l] for l in range(ctx.num_layers)]
                grown_serving = serving_prediction(_draft(sub, grown), ctx.load, trace=trace, known=sub.serving)
                still = worse & _serving_worse(grown_serving, prev[1])
                choice = np.where(still, 2, np.where(worse, 1, 0))
                layers, serving = _compose(choice, [(layers, serving), (grown, grown_serving), prev])
                kept_now = set(np.flatnonzero(still).tolist())
                extended |= set(np.flatnonzero(worse & ~still).tolist())
                kept = {l for l in kept if choice[l] == 2} | kept_now  # a kept layer carries its empty slots upwards
                extended = {l for l in extended if choice[l] != 0}
            else:
                kept, extended = set(), set()
        prev = (layers, serving)
        ctx.notes.update(sub.notes)
    ctx.notes["monotone"] = {"layers_extended_from_fewer_slots": sorted(extended), "layers_kept_from_fewer_slots": sorted(kept)}
    assert prev is not None
    return prev


def _keep_pairwise_where_better(ctx: _Context, opts: PlannerOptions, layers: list,
                                serving: dict[str, Any]) -> tuple[list, dict[str, Any]]:
    """Per layer, the plan grouped without the per-token search where that one is predicted better on the planning
    trace (fewer messages or a lower max/mean by :data:`MONOTONE_TOLERANCE`; the search only sees the primaries,
    the copies added after it can undo its gain). Records the layers (at this slot count) in
    ``ctx.notes["token_objective"]["layers_planned_pairwise"]``."""
    sub = dataclasses.replace(ctx, notes={}, serving={})
    pairwise = _plan_grace(sub, dataclasses.replace(opts, token_objective=False))
    pairwise_serving = serving_prediction(_draft(sub, pairwise), ctx.load, trace=ctx.trace, known=sub.serving)
    worse = _serving_worse(serving, pairwise_serving)
    ctx.notes.setdefault("token_objective", {})["layers_planned_pairwise"] = np.flatnonzero(worse).tolist()
    if not worse.any():
        return layers, serving
    ctx.notes["group_sizes"][worse] = sub.notes["group_sizes"][worse]
    return _compose(worse.astype(np.int64), [(layers, serving), (pairwise, pairwise_serving)])


def _draft(ctx: _Context, layers: list) -> PlacementPlan:
    return PlacementPlan(topology=ctx.topology, num_experts=ctx.num_experts, gpu_experts=layers, planner="grace")


def _extend_layer(layer: Any, l: int, ctx: _Context, opts: PlannerOptions) -> list[list[int]]:
    """Layer ``l``'s GPU lists with the free slots of ``ctx.capacity`` filled by :func:`_demand_replicas`
    (repacked without the between-layer term); its serving prediction goes to ``ctx.serving[l]``."""
    lo = size_bounds(ctx.num_experts, ctx.num_gpus, ctx.capacity, opts.ratio)[0]
    A, a, _ = _grace_affinity(ctx, opts, l)
    hosts, ctx.serving[l] = _demand_replicas(_hosts(layer, ctx.num_experts), _planning_load(ctx.load[l], opts), a, A, ctx, lo,
                                             opts, None, None, l)
    return _lists(hosts)


def _note_empty_slots(ctx: _Context, plan: PlacementPlan, planner: str, opts: Any) -> None:
    """Record in ``ctx.notes["empty_slots"]`` how many slots stay empty per layer and why."""
    empty = plan.topology.num_gpus * ctx.capacity - np.asarray(plan.slots_used).reshape(plan.num_layers, -1).sum(axis=1)
    if not empty.any():
        ctx.notes["empty_slots"] = {"count": 0, "reason": "every slot is used"}
        return
    live = (ctx.load > 0).sum(axis=1)
    if planner in ("vanilla", "affinity"):
        reason = f"the {planner} planner places no copies"
    elif planner == "eplb" and ctx.notes.get("eplb_policy") == "hierarchical":
        per_node = ctx.num_experts // ctx.num_nodes
        reason = (f"hierarchical EPLB gives each node its {per_node} experts, at most one copy per GPU, so a GPU holds at most "
                  f"{per_node} of its {ctx.capacity} slots (policy='global' fills every slot)")
    elif planner == "grace" and opts.replicas != "fill":
        reason = f"replicas={opts.replicas!r} limits the copies"
    elif planner == "grace" and ctx.notes.get("monotone", {}).get("layers_kept_from_fewer_slots"):
        reason = ("in some layers any plan using the extra slots was predicted worse (max/mean or cross-node traffic) than "
                  "the plan for one slot fewer, which is kept (monotone=True)")
    else:
        reason = (f"no admissible copy left: every GPU with a free slot already hosts every expert with load "
                  f"(experts with load per layer: {int(live.min())}-{int(live.max())})")
    ctx.notes["empty_slots"] = {"count": empty.astype(int).tolist(), "reason": reason}


PLANNING_TRACE_TOKENS = 65_536
"""At most this many tokens of a planning trace (evenly spaced) are replayed and searched; statistics use all."""


def effective_capacity(topology: Topology, num_experts: int) -> int:
    """Slots per GPU a planner uses: the topology's budget, or ``ceil(E/G) + UNBOUNDED_EXTRA_SLOTS``."""
    cap = topology.capacity()
    return cap if cap is not None else math.ceil(num_experts / topology.num_gpus) + UNBOUNDED_EXTRA_SLOTS


def plan_placement(stats: ExpertStats | RoutingTrace, topology: Topology, planner: str = "grace", options: Any = None,
                   *, trace: RoutingTrace | None = None, **overrides: Any) -> PlacementPlan:
    """Plan the expert placement of every layer with the named planner.

    Args:
        stats: routing statistics (load ``[L, E]``; co-activation ``[L, E, E]`` for the affinity
            planners; transitions ``[L-1, E, E]`` for ``interlayer_weight``), or a per-token
            trace: it is counted into statistics, the serving prediction replays its tokens and
            ``grace`` refines its grouping on them (``token_objective``).
        topology: the cluster and its per-GPU budget.
        planner: a name in :data:`PLANNERS` (``vanilla``, ``eplb``, ``affinity``, ``grace``).
        options: an options instance of that planner or a mapping of knobs (optional).
        trace: the per-token trace ``stats`` were counted from, when planning statistics read
            from one (same layers and experts); used as a trace given as ``stats`` is. A trace of
            more than :data:`PLANNING_TRACE_TOKENS` tokens is replayed and searched on an evenly
            spaced sample of that many (``metadata["planning_trace_sample"]``).
        **overrides: knobs by name (e.g. ``replicas="auto"``); unknown names raise.

    Returns:
        A validated :class:`PlacementPlan`; ``metadata`` holds the options, capacity,
        predicted loads and kept affinity (see :class:`PlanMetrics`).

    Raises:
        GraceInputError: unknown planner or knob, bad knob value, statistics that are not an
            :class:`ExpertStats` or fail validation, a budget that cannot hold every expert.
    """
    if planner not in PLANNERS:
        raise GraceInputError(f"unknown planner {planner!r}; known: {', '.join(PLANNERS)}")
    spec = PLANNERS[planner]
    opts = spec.make_options(options, **overrides)
    if isinstance(stats, RoutingTrace):
        trace = stats
        stats = ExpertStats.from_trace(trace)
    trace_note = None
    if isinstance(trace, RoutingTrace) and trace.num_tokens > PLANNING_TRACE_TOKENS:
        # the statistics count every token; the replays and the per-token search use an evenly spaced sample
        keep = evenly_spaced(trace.num_tokens, PLANNING_TRACE_TOKENS)
        trace_note = {"tokens_replayed": int(keep.size), "of": trace.num_tokens}
        trace = trace.select_tokens(keep)
    elif trace is not None and not isinstance(trace, RoutingTrace):
        raise GraceInputError(f"trace= needs a RoutingTrace, got {type(trace).__name__}")
    if not isinstance(stats, ExpertStats):
        raise GraceInputError(f"planner {planner!r} needs ExpertStats, got {type(stats).__name__}")
    if not isinstance(topology, Topology):
        raise GraceInputError(f"planner {planner!r} needs a Topology, got {type(topology).__name__}")
    stats.validate()
    E = stats.num_experts
    if trace is not None and (trace.num_layers, trace.num_experts) != (stats.num_layers, E):
        raise GraceInputError(f"the trace has {trace.num_layers} layers x {trace.num_experts} experts, the statistics "
                              f"{stats.num_layers} x {E}: plan a trace with the statistics counted from it")
    topology.check_fits(E)
    cap = effective_capacity(topology, E)
    shrinkage_note = None
    requested = opts  # the metadata records the options as given; a validated value goes to metadata["load_shrinkage"]
    if planner == "grace" and opts.load_shrinkage is None:
        value, shrinkage_note = _validated_shrinkage(topology, opts, trace)
        opts = dataclasses.replace(opts, load_shrinkage=value)
    with blas_threads(1):
        affinity = stats.affinity() if stats.coactivation is not None else None
        ctx = _Context(stats=stats, topology=topology, capacity=cap, load=stats.load, affinity=affinity, trace=trace)
        if shrinkage_note is not None:
            ctx.notes["load_shrinkage"] = shrinkage_note
        if planner == "grace" and opts.replicas == "fill" and opts.monotone:
            layers, serving = _plan_grace_monotone(ctx, opts)
        else:
            layers = spec.run(ctx, opts)
            serving = None
        metrics = _evaluate(layers, topology, stats, affinity)
    draft = PlacementPlan(topology=topology, num_experts=E, gpu_experts=layers, planner=planner)
    _note_empty_slots(ctx, draft, planner, opts)
    if serving is None:
        serving = serving_prediction(draft, stats.load, trace=trace, known=ctx.serving)
    serving.pop("resample_max_over_mean", None)  # [B, L]: what the composition needed, not kept in the plan
    predicted: dict[str, Any] = {
        "gpu_load": metrics.gpu_load,
        "max_over_mean": metrics.max_over_mean,
        "node_max_over_mean": metrics.node_max_over_mean,
        "extra_copies": metrics.extra_copies,
        "kept_affinity_gpu": metrics.kept_affinity_gpu,
        "kept_affinity_node": metrics.kept_affinity_node,
    }
    if metrics.kept_interlayer_gpu is not None:
        predicted["kept_interlayer_gpu"] = metrics.kept_interlayer_gpu
    predicted["serving"] = serving
    summary = metrics.summary()
    summary["serving_max_over_mean"] = float(np.mean(serving["max_over_mean"]))
    summary["serving_worst_max_over_mean"] = float(np.max(serving["max_over_mean"]))
    summary["serving_cross_node_pair_share"] = float(np.mean(serving["cross_node_pair_share"]))
    if "sampling_error" in serving:
        summary["serving_max_over_mean_sampling_error"] = float(serving["sampling_error"])
        summary["serving_max_over_mean_in_sample"] = float(np.mean(serving["max_over_mean_in_sample"]))
    metadata = {
        "planner": planner,
        "options": dataclasses.asdict(requested),
        "capacity": cap,
        "capacity_assumed": topology.capacity() is None,
        "stats": {"model": stats.model, "source": stats.source, "missing": stats.missing,
                  "layers": stats.num_layers, "experts": E, "top_k": int(stats.top_k)},
        "load_model": ("predicted.gpu_load / max_over_mean: static, each copy takes an equal share of its expert's load; "
                       "predicted.serving: the serving router (policy grace) run on the statistics' demand, tokens "
                       "starting on GPU t mod G"),
        "summary": summary,
        "predicted": predicted,
        **ctx.notes,
        "warnings": ctx.warnings,
    }
    if trace_note is not None:
        metadata["planning_trace_sample"] = trace_note
    return PlacementPlan(topology=topology, num_experts=E, gpu_experts=draft.gpu_experts, planner=planner,
                         metadata=_jsonable(metadata))


__all__ = [
    "PLANNERS", "Planner", "PlanMetrics", "VanillaOptions", "EplbOptions", "AffinityOptions", "PlannerOptions",
    "UNBOUNDED_EXTRA_SLOTS", "effective_capacity", "evaluate_plan", "plan_placement",
]
