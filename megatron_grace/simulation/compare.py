"""Compare planners on one trace: plan each on the first part, simulate each on the rest.

    from megatron_grace.simulation.compare import compare_planners, split_source
    plan_stats, measure = split_source(trace_or_stats, num_tokens=100_000, seed=0)
    cmp = compare_planners(plan_stats, measure, Topology.preset("a100-2x4"), extra_slots=1)
    print(cmp.format_table())

Planning uses ``megatron_grace.plan.planners.plan_placement(stats, topology, planner)``
(or any ``planner_fn`` with that signature); statistics-only inputs are turned into a trace with
``megatron_grace.trace.synthesis.synthesize_trace(stats, num_tokens, seed)``. The planning
statistics' expert load is also the replica-choice policy's load prediction.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_grace._files import PathLike, atomic_path, save_json_atomic
from megatron_grace._progress import progress as _progress
from megatron_grace.errors import GraceInputError
from megatron_grace.names import DEFAULT_PLANNERS
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.plan.topology import ModelShape, Topology
from megatron_grace.simulation.policies import DEFAULT_POLICY
from megatron_grace.simulation.simulator import SimulationResult, resolve_model_shape, simulate
from megatron_grace.statistics.expert_stats import ExpertStats
from megatron_grace.trace.routing_trace import RoutingTrace

PlannerFn = Callable[..., PlacementPlan]

#: What the columns of :meth:`Comparison.format_table` mean.
TABLE_NOTES = (
    "messages: deduplicated, summed over layers, decided by the replica policy alone, so the same under both dispatch "
    "modes; MB: bytes per direction of the dispatch summed over layers (the combine moves the same); busiest inter MB: "
    "the inter-node bytes of the busiest GPU, summed over layers (the modelled time follows it, not the total); "
    "ms/layer: modelled time of one MoE layer (dispatch + expert compute on the busiest GPU + combine) with all "
    "measured tokens in one batch, mean over layers"
)


def default_planner_fn() -> PlannerFn:
    """``megatron_grace.plan.planners.plan_placement``, or a clear error when it is not in this build."""
    try:
        module = importlib.import_module("megatron_grace.plan.planners")
    except ModuleNotFoundError as exc:
        if exc.name == "megatron_grace.plan.planners":
            raise GraceInputError("the planners (megatron_grace.plan.planners) are not available in this build") from None
        raise
    return module.plan_placement


def known_planners() -> list[str]:
    """Names in ``megatron_grace.plan.planners.PLANNERS`` (empty if the module is absent)."""
    try:
        return list(importlib.import_module("megatron_grace.plan.planners").PLANNERS)
    except ModuleNotFoundError:
        return []


def split_source(source: RoutingTrace | ExpertStats, num_tokens: int | None = None, seed: int = 0,
                 fraction: float = 0.5) -> tuple[ExpertStats, RoutingTrace]:
    """Planning statistics and the measurement trace from a trace or from statistics.

    A trace is split in token order: the first ``fraction`` of its tokens give the planning
    statistics, the rest is measured (``num_tokens`` > 0 keeps only its first ``num_tokens``
    tokens first). Statistics are first synthesized into a ``num_tokens``-token trace
    (``synthesize_trace(stats, num_tokens, seed)``), then split the same way.
    """
    if not 0 < fraction < 1:
        raise GraceInputError(f"the planning fraction must be in (0, 1), got {fraction}")
    if isinstance(source, ExpertStats):
        if not num_tokens or num_tokens < 2:
            raise GraceInputError("statistics input needs --tokens >= 2 to synthesize a trace")
        try:
            synthesis = importlib.import_module("megatron_grace.trace.synthesis")
        except ModuleNotFoundError as exc:
            if exc.name == "megatron_grace.trace.synthesis":
                raise GraceInputError("trace synthesis (megatron_grace.trace.synthesis) is not available in this build") from None
            raise
        trace = synthesis.synthesize_trace(source, num_tokens, seed=seed)
    elif isinstance(source, RoutingTrace):
        trace = source if not num_tokens else source.select_tokens(slice(0, num_tokens))
    else:
        raise GraceInputError(f"expected a routing trace or statistics, got {type(source).__name__}")
    first, rest = trace.split(fraction)
    if first.num_tokens == 0 or rest.num_tokens == 0:
        raise GraceInputError(f"a trace of {trace.num_tokens} tokens is too short to plan on one part and measure on the other")
    return ExpertStats.from_trace(first), rest


@dataclass(eq=False)
class Comparison:
    """Plans and simulations of several planners on one trace.

    Attributes:
        topology: the cluster with the slot budget the plans were made for.
        extra_slots: extra slots per GPU above an even split.
        model_shape: sizes for bytes and FLOPs.
        planners: planner names, in order.
        plans: planner -> plan.
        results: planner -> simulation (every dispatch mode).
        plan_seconds: planner -> wall time of planning.
        policy: replica-choice policy used.
    """

    topology: Topology
    extra_slots: int
    model_shape: ModelShape
    planners: list[str]
    plans: dict[str, PlacementPlan]
    results: dict[str, SimulationResult]
    plan_seconds: dict[str, float] = field(default_factory=dict)
    policy: str = DEFAULT_POLICY

    @property
    def baseline(self) -> tuple[str, str]:
        """``(planner, mode)`` the speedups are relative to: vanilla flat, else the first planner flat."""
        planner = "vanilla" if "vanilla" in self.results else self.planners[0]
        modes = self.results[planner].modes
        return planner, ("flat" if "flat" in modes else next(iter(modes)))

    def rows(self) -> list[dict[str, Any]]:
        """One dict per planner x dispatch mode: messages, bytes, load, modelled time, speedup."""
        base_planner, base_mode = self.baseline
        base = self.results[base_planner].modes[base_mode].layer_s.sum()
        out = []
        for planner in self.planners:
            r = self.results[planner]
            for mode, cost in r.modes.items():
                t = float(cost.layer_s.sum())
                out.append({
                    "planner": planner,
                    "dispatch": mode,
                    "msgs_node": int(r.msgs_node.sum()),
                    "msgs_gpu": int(r.msgs_gpu.sum()),
                    "pairs_inter_node": int(r.pairs_inter_node.sum()),
                    "pairs_remote": int(r.pairs_intra_node.sum() + r.pairs_inter_node.sum()),
                    "intra_bytes": int(cost.intra_bytes.sum()),
                    "inter_bytes": int(cost.inter_bytes.sum()),
                    "max_gpu_intra_bytes": int(cost.max_gpu_intra_bytes.sum()),
                    "max_gpu_inter_bytes": int(cost.max_gpu_inter_bytes.sum()),
                    "load_max_over_mean": float(r.load_imbalance.mean()),
                    "dispatch_s": float(cost.dispatch_s.sum()),
                    "combine_s": float(cost.combine_s.sum()),
                    "compute_s": float(r.compute_s.sum()),
                    "layer_s": t,
                    "mean_layer_s": t / max(r.num_layers, 1),
                    "speedup": float(base / t) if t > 0 else None,
                    "copies": int(self.plans[planner].copy_count.sum() - self.plans[planner].num_experts * self.plans[planner].num_layers),
                })
        return out

    def row(self, planner: str, mode: str) -> dict[str, Any]:
        """The row of ``planner`` with dispatch ``mode``."""
        for r in self.rows():
            if r["planner"] == planner and r["dispatch"] == mode:
                return r
        raise KeyError((planner, mode))

    def format_table(self) -> str:
        """One row per planner x dispatch mode."""
        r0 = next(iter(self.results.values()))
        base_planner, base_mode = self.baseline
        head = (f"{self.topology.name} ({self.topology.num_nodes}x{self.topology.gpus_per_node} GPUs, "
                f"{self.topology.capacity()} slots/GPU = even split + {self.extra_slots}), {self.model_shape.name}, "
                f"{r0.num_tokens} measured tokens x {r0.num_layers} layers, policy {self.policy}")
        cols = (f"{'planner':<10}{'dispatch':<13}{'copies':>7}{'x-node msgs':>13}{'x-GPU msgs':>13}{'NVLink MB':>11}"
                f"{'inter MB':>10}{'busiest inter MB':>17}{'max/mean':>9}{'ms/layer':>10}{'speedup':>9}")
        lines = [head, cols, "-" * len(cols)]
        for r in self.rows():
            speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            lines.append(f"{r['planner']:<10}{r['dispatch']:<13}{r['copies']:>7}{r['msgs_node']:>13}{r['msgs_gpu']:>13}"
                         f"{r['intra_bytes'] / 1e6:>11.1f}{r['inter_bytes'] / 1e6:>10.1f}{r['max_gpu_inter_bytes'] / 1e6:>17.1f}"
                         f"{r['load_max_over_mean']:>9.3f}{r['mean_layer_s'] * 1e3:>10.3f}{speedup:>9}")
        lines.append(f"({TABLE_NOTES}; speedup vs {base_planner} {base_mode})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Rows, per-planner simulation summaries and plan metadata as JSON types."""
        base_planner, base_mode = self.baseline
        return {
            "format": "grace-compare/1",
            "topology": self.topology.to_dict(),
            "extra_slots": self.extra_slots,
            "model_shape": self.model_shape.name,
            "policy": self.policy,
            "baseline": {"planner": base_planner, "dispatch": base_mode},
            "rows": self.rows(),
            "plan_seconds": self.plan_seconds,
            "simulations": {p: self.results[p].summary() for p in self.planners},
            "per_layer_load_max_over_mean": {p: self.results[p].load_imbalance.tolist() for p in self.planners},
        }

    def save_json(self, path: PathLike) -> None:
        save_json_atomic(path, self.to_dict())

    def plot(self, directory: PathLike) -> list[Path]:
        """Write ``load.png`` (per-GPU load and per-layer max/mean per planner) and ``traffic.png``
        (messages per planner; bytes per link, busiest GPU's inter-node bytes and the modelled
        time split into dispatch, compute and combine per planner and dispatch mode); returns the paths."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = Path(directory)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / "load.png", out_dir / "traffic.png"]
        for path, draw in zip(paths, (self._plot_load, self._plot_traffic)):
            fig = draw(plt)
            with atomic_path(path, suffix=".png") as tmp:
                fig.savefig(tmp, dpi=100, format="png")
            plt.close(fig)
        return paths

    def _plot_load(self, plt):
        G, n = self.topology.num_gpus, len(self.planners)
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, G * 0.35), 8))
        width = 0.8 / n
        top = 1.0
        for i, planner in enumerate(self.planners):
            r = self.results[planner]
            load = r.gpu_load.sum(axis=0).astype(float)
            rel = load / max(load.mean(), 1e-12)
            top = max(top, float(rel.max()))
            ax1.bar(np.arange(G) + (i - (n - 1) / 2) * width, rel, width, label=planner)
            ax2.plot(np.arange(r.num_layers), r.load_imbalance, marker=".", label=planner)
        for node in range(1, self.topology.num_nodes):
            ax1.axvline(node * self.topology.gpus_per_node - 0.5, color="grey", lw=0.8, ls="--")
        ax1.set_xticks(np.arange(G))
        ax1.set_xlim(-0.6, G - 0.4)
        ax1.set_ylim(0, top * 1.25)  # room for the legend above the bars
        ax1.axhline(1.0, color="k", lw=0.6, ls=":")
        ax1.set_xlabel("GPU (dashed lines: node boundaries)")
        ax1.set_ylabel("pairs processed / mean (all layers)")
        ax1.set_title(f"Expert load per GPU, {self.topology.name}, +{self.extra_slots} slots, policy {self.policy}")
        ax1.legend(ncol=n, loc="upper center", fontsize=8)
        ax2.set_xlabel("MoE layer")
        ax2.set_ylabel("max / mean GPU load")
        ax2.set_title("Load imbalance per layer")
        ax2.legend(ncol=n, fontsize=8)
        fig.tight_layout()
        return fig

    def _plot_traffic(self, plt):
        rows = self.rows()
        modes = list(dict.fromkeys(r["dispatch"] for r in rows))
        fig, axes = plt.subplots(1, 3, figsize=(max(13, len(rows) * 1.6), 5))
        # messages: decided by the policy, the same for every dispatch mode -> one group per planner
        x = np.arange(len(self.planners))
        first = {r["planner"]: r for r in rows if r["dispatch"] == modes[0]}
        axes[0].bar(x - 0.2, [first[p]["msgs_node"] / 1e6 for p in self.planners], 0.4, label="token -> remote node")
        axes[0].bar(x + 0.2, [first[p]["msgs_gpu"] / 1e6 for p in self.planners], 0.4, label="token -> other GPU")
        axes[0].set_xticks(x)
        axes[0].set_xticklabels(self.planners, fontsize=8)
        axes[0].set_ylabel("messages, millions (all layers)")
        axes[0].set_title("Deduplicated messages\n(same for every dispatch mode)", fontsize=10)
        labels = [f"{r['planner']}\n{r['dispatch']}" for r in rows]
        xr = np.arange(len(rows))
        axes[1].bar(xr - 0.27, [r["inter_bytes"] / 1e9 for r in rows], 0.27, label="inter-node, all GPUs")
        axes[1].bar(xr, [r["max_gpu_inter_bytes"] / 1e9 for r in rows], 0.27, label="inter-node, busiest GPU")
        axes[1].bar(xr + 0.27, [r["intra_bytes"] / 1e9 for r in rows], 0.27, label="NVLink, all GPUs")
        axes[1].set_ylabel("GB per direction (all layers)")
        axes[1].set_title("Dispatch traffic per link", fontsize=10)
        bottom = np.zeros(len(rows))
        for key, label, color in (("dispatch_s", "dispatch", "tab:blue"), ("compute_s", "expert compute", "tab:green"),
                                  ("combine_s", "combine", "tab:orange")):
            values = np.array([r[key] * 1e3 / max(self.results[r["planner"]].num_layers, 1) for r in rows])
            axes[2].bar(xr, values, 0.6, bottom=bottom, label=label, color=color)
            bottom += values
        axes[2].set_ylabel("modelled ms per MoE layer")
        axes[2].set_title("Modelled MoE-layer time", fontsize=10)
        for ax in axes[1:]:
            ax.set_xticks(xr)
            ax.set_xticklabels(labels, fontsize=7)
        for ax in axes:
            ymax = ax.get_ylim()[1]
            ax.set_ylim(0, ymax * 1.3)  # room for the legend above the bars
            ax.legend(fontsize=7, loc="upper center", ncol=1)
        fig.suptitle(f"{self.topology.name}, +{self.extra_slots} slots/GPU, {self.model_shape.name}, policy {self.policy}",
                     fontsize=10)
        fig.tight_layout()
        return fig


def compare_planners(
    plan_stats: ExpertStats,
    trace: RoutingTrace,
    topology: Topology,
    *,
    extra_slots: int = 0,
    planners: Sequence[str] = DEFAULT_PLANNERS,
    model_shape: ModelShape | str | None = None,
    policy: str = DEFAULT_POLICY,
    token_placement: str = "round-robin",
    dispatch: str | Sequence[str] = "both",
    planner_fn: PlannerFn | None = None,
    planner_options: dict[str, dict[str, Any]] | None = None,
    progress: bool = False,
    plans: dict[str, PlacementPlan] | None = None,
) -> Comparison:
    """Plan with every planner on ``plan_stats`` and simulate each plan on ``trace``.

    Args:
        plan_stats: planning statistics (load ``[L, E]``, co-activation ...).
        trace: measurement trace ``[T, L, k]`` with the same layers and experts.
        topology: the cluster; its budget is replaced by ``ceil(E / G) + extra_slots`` slots.
        extra_slots: slots per GPU above an even split (the replication budget).
        planners: planner names.
        model_shape: sizes (default: from the trace's model name).
        policy, token_placement, dispatch: as in :func:`~megatron_grace.simulation.simulate`.
        planner_fn: ``(stats, topology, planner, **options) -> PlacementPlan``; default
            ``megatron_grace.plan.planners.plan_placement``.
        planner_options: planner -> knobs passed to ``planner_fn``.
        progress: progress bar over planners.
        plans: plans made earlier (planner -> plan, e.g. ``Comparison.plans`` of another policy's
            run); planners found here are not planned again.
    """
    if not planners:
        raise GraceInputError("no planners to compare")
    if plan_stats.num_experts != trace.num_experts or plan_stats.num_layers != trace.num_layers:
        raise GraceInputError(
            f"planning statistics ({plan_stats.num_layers} layers x {plan_stats.num_experts} experts) do not match the trace "
            f"({trace.num_layers} x {trace.num_experts})"
        )
    fn = planner_fn or default_planner_fn()
    shape = resolve_model_shape(model_shape, trace.model or plan_stats.model, trace)
    budget = topology.with_extra_slots(trace.num_experts, extra_slots)
    earlier = dict(plans or {})
    plans = {}
    results: dict[str, SimulationResult] = {}
    seconds: dict[str, float] = {}
    for planner in _progress(list(planners), desc="plan + simulate", total=len(planners), enabled=progress):
        t0 = time.perf_counter()
        plan = earlier[planner] if planner in earlier else fn(plan_stats, budget, planner, **(planner_options or {}).get(planner, {}))
        seconds[planner] = time.perf_counter() - t0
        if not plan.planner:
            plan = PlacementPlan(plan.topology, plan.num_experts, plan.gpu_experts, planner=planner, metadata=plan.metadata)
        plans[planner] = plan
        results[planner] = simulate(plan, trace, shape, policy=policy, dispatch=dispatch, token_placement=token_placement,
                                    expert_load=plan_stats.load)
    return Comparison(topology=budget, extra_slots=extra_slots, model_shape=shape, planners=list(planners), plans=plans,
                      results=results, plan_seconds=seconds, policy=policy if isinstance(policy, str) else "custom")


__all__ = ["DEFAULT_PLANNERS", "Comparison", "compare_planners", "default_planner_fn", "known_planners",
           "split_source"]
