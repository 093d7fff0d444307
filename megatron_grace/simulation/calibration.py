"""Calibrate the simulator's cost model to a measured cluster and compare its predictions with measurements.

The simulator (:mod:`megatron_grace.simulation.simulator`) turns counted bytes and expert loads
into a layer time with a per-link model ``time = latency + bytes / bandwidth`` (per GPU and
phase) and a compute model ``max GPU load x FLOPs per pair / gpu_flops``. Here those parameters
are fitted to a micro-benchmark run on the cluster itself (``scripts/cluster_workload.py``):

- **links**: all-to-alls where every GPU moves ``b`` bytes over one link type (intra-node: to
  the other GPUs of its node; inter-node: to its peer on the other node, all GPUs at once), timed
  for several ``b``: a least-squares line ``seconds = latency + b / bandwidth`` (latency >= 0);
- **compute**: every GPU runs its expert slots on ``n`` rows at once: ``seconds = fixed + n x
  flops_per_pair / gpu_flops``.

Predictions then come from the simulator's own code: :func:`predict_layer_s` replays the same
batches the workload served through :func:`~megatron_grace.simulation.simulator.simulate` on the
plan with the calibrated topology (one implementation of the cost model), and
:func:`compare_ranking` says how close and how well ordered the predictions are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_grace.errors import GraceInputError
from megatron_grace.plan.placement import PlacementPlan
from megatron_grace.plan.topology import LinkModel, ModelShape, Topology


@dataclass(frozen=True)
class LineFit:
    """``seconds = intercept + slope x size``, least squares with ``intercept >= 0``.

    Attributes:
        intercept: seconds at size 0 (>= 0).
        slope: seconds per unit of size (> 0).
        points: samples fitted.
        max_rel_error: max over samples of |fit / measured - 1|.
    """

    intercept: float
    slope: float
    points: int
    max_rel_error: float

    def __call__(self, size: np.ndarray | float) -> np.ndarray | float:
        return self.intercept + self.slope * np.asarray(size, dtype=np.float64)


def fit_line(size: Sequence[float] | np.ndarray, seconds: Sequence[float] | np.ndarray, relative: bool = False) -> LineFit:
    """Least-squares ``seconds = a + b size`` with ``a >= 0``, ``b > 0``.

    Args:
        size: ``[n]`` sizes (bytes or rows), at least two distinct values.
        seconds: ``[n]`` measured times (> 0).
        relative: minimise relative residuals (every sample weighted by ``1 / seconds``, so small
            messages count as much as large ones) instead of absolute seconds (the default,
            which follows the large transfers that dominate a layer's time).

    Raises:
        GraceInputError: fewer than two distinct sizes, a non-positive time, or a fit whose slope
            is not positive (times that do not grow with size).
    """
    x = np.asarray(size, dtype=np.float64).reshape(-1)
    y = np.asarray(seconds, dtype=np.float64).reshape(-1)
    if x.shape != y.shape or np.unique(x).size < 2:
        raise GraceInputError(f"a line fit needs at least two distinct sizes with one time each, got {x.size} sizes and {y.size} times")
    if not (np.all(np.isfinite(y)) and np.all(y > 0) and np.all(np.isfinite(x)) and np.all(x >= 0)):
        raise GraceInputError("a line fit needs finite sizes >= 0 and times > 0")
    w = 1.0 / y if relative else np.ones_like(y)
    A = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    (a, b), *_ = np.linalg.lstsq(A, y * w, rcond=None)
    if a < 0:  # no negative latency: refit through the origin
        a, b = 0.0, float(np.sum(x * y * w * w) / np.sum(x * x * w * w))
    if not b > 0:
        raise GraceInputError(f"times do not grow with size (slope {b:.3g}); the measurement is too noisy to fit")
    fit = a + b * x
    return LineFit(intercept=float(a), slope=float(b), points=int(x.size), max_rel_error=float(np.max(np.abs(fit / y - 1.0))))


@dataclass(frozen=True)
class ClusterFit:
    """The fitted cost model of one cluster.

    Attributes:
        intra_node: link model between GPUs of one node (per GPU and direction); None when the
            nodes have one GPU each (nothing to measure; :meth:`topology` keeps the base's).
        inter_node: link model between nodes (per GPU and direction; a node link shared by its
            GPUs shows up as its bandwidth divided by the GPUs sending at once).
        gpu_flops: expert FLOP/s of one GPU with all GPUs busy.
        compute_fixed_s: fixed cost of one expert call (all slots), seconds.
        fits: the line fits behind them (``intra_node``, ``inter_node``, ``compute``).
    """

    intra_node: LinkModel | None
    inter_node: LinkModel
    gpu_flops: float
    compute_fixed_s: float
    fits: dict[str, LineFit]

    def topology(self, base: Topology) -> Topology:
        """``base`` with the fitted links and FLOP rate (nodes, GPUs and slots unchanged)."""
        return dataclasses.replace(base, intra_node=self.intra_node or base.intra_node, inter_node=self.inter_node,
                                   gpu_flops=self.gpu_flops)

    def links_spec(self) -> str:
        """The fit as ``--links`` text for the ``grace`` command (``KEY=VALUE,...``; see
        :func:`megatron_grace.plan.topology.parse_links`), e.g. ``inter=24.5MB/s,inter-latency=3.08ms,...``."""
        items = []
        for key, link in (("intra", self.intra_node), ("inter", self.inter_node)):
            if link is not None:
                items += [f"{key}={link.bandwidth_bytes_per_s / 1e6:.6g}MB/s", f"{key}-latency={link.latency_s * 1e6:.6g}us"]
        return ",".join(items + [f"flops={self.gpu_flops / 1e9:.6g}G"])

    def to_dict(self) -> dict[str, Any]:
        def link(m: LinkModel | None) -> dict[str, float] | None:
            return None if m is None else {"bandwidth_bytes_per_s": m.bandwidth_bytes_per_s, "latency_s": m.latency_s}

        return {
            "intra_node": link(self.intra_node), "inter_node": link(self.inter_node),
            "gpu_flops": self.gpu_flops, "compute_fixed_s": self.compute_fixed_s, "links": self.links_spec(),
            "fit_max_rel_error": {name: f.max_rel_error for name, f in self.fits.items()},
        }


def fit_cluster(micro: dict[str, Sequence[Sequence[float]]], shape: ModelShape) -> ClusterFit:
    """Fit links and compute from a micro-benchmark.

    Args:
        micro: ``{"intra": [[bytes_per_gpu, seconds], ...], "inter": [...], "compute": [[rows, seconds], ...]}``
                    (``scripts/cluster_workload.py``'s ``microbench``); fitted in absolute seconds.
            An empty ``intra`` list means one GPU per node (no intra-node link).
        shape: the model shape whose ``expert_flops_per_token`` turns rows into FLOPs.
    """
    fits = {}
    for key, name in (("intra", "intra_node"), ("inter", "inter_node"), ("compute", "compute")):
        samples = np.asarray(micro.get(key, []), dtype=np.float64).reshape(-1, 2)
        if key == "intra" and samples.shape[0] == 0:
            continue
        if samples.shape[0] < 2:
            raise GraceInputError(f"micro-benchmark has {samples.shape[0]} '{key}' samples; the fit needs at least 2")
        fits[name] = fit_line(samples[:, 0], samples[:, 1])
    links = {name: LinkModel(bandwidth_bytes_per_s=1.0 / fits[name].slope, latency_s=fits[name].intercept)
             for name in ("intra_node", "inter_node") if name in fits}
    return ClusterFit(intra_node=links.get("intra_node"), inter_node=links["inter_node"],
                      gpu_flops=float(shape.expert_flops_per_token) / fits["compute"].slope,
                      compute_fixed_s=fits["compute"].intercept, fits=fits)


def predict_layer_s(plan: PlacementPlan, ids: np.ndarray, shape: ModelShape, *, mode: str, policy: str = "grace",
                    compute_fixed_s: float = 0.0, seed: int = 0, shared_nic: bool = True) -> dict[str, float]:
    """The simulator's mean layer time over the batches a workload served.

    Args:
        plan: the plan, its topology holding the (calibrated) link and compute model.
        ids: int ``[steps, T, L, k]``: step ``s`` served tokens ``ids[s]``, token ``i`` on GPU
            ``i mod G`` (the simulator's round-robin placement).
        shape: sizes for bytes and FLOPs.
        mode: ``flat`` or ``hierarchical``.
        policy: replica-choice policy.
        compute_fixed_s: fixed cost per expert call added to the simulator's compute time.
        seed: seed of randomized policies.
        shared_nic: the nodes' GPUs share one inter-node link (the emulated cluster's veth; see
            :func:`~megatron_grace.simulation.simulator.simulate`).

    Returns:
        seconds per layer, averaged over steps and layers: ``dispatch_s``, ``combine_s``,
        ``compute_s`` (simulator compute + ``compute_fixed_s``) and ``layer_s`` (their sum).
    """
    from megatron_grace.simulation.simulator import simulate
    from megatron_grace.trace.routing_trace import RoutingTrace

    ids = np.asarray(ids)
    if ids.ndim != 4:
        raise GraceInputError(f"ids must be [steps, tokens, layers, k], got shape {ids.shape}")
    parts = {"dispatch_s": [], "combine_s": [], "compute_s": []}
    for batch in ids:
        trace = RoutingTrace(expert_ids=batch.astype(np.int32), num_experts=plan.num_experts, model=shape.name)
        res = simulate(plan, trace, shape, policy=policy, dispatch=mode, seed=seed, shared_nic=shared_nic)
        cost = res.modes[mode]
        parts["dispatch_s"].append(float(cost.dispatch_s.mean()))
        parts["combine_s"].append(float(cost.combine_s.mean()))
        parts["compute_s"].append(float(res.compute_s.mean()) + compute_fixed_s)
    out = {name: float(np.mean(v)) for name, v in parts.items()}
    out["layer_s"] = out["dispatch_s"] + out["combine_s"] + out["compute_s"]
    return out


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall rank correlation (tau-a) of two equally long sequences (1 = same order)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise GraceInputError("kendall_tau needs two 1-d sequences of one length")
    n = x.size
    if n < 2:
        return 1.0
    i, j = np.triu_indices(n, 1)
    return float(np.sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])) / (n * (n - 1) / 2))


def compare_ranking(rows: Sequence[dict[str, Any]], tolerance: float = 0.25) -> dict[str, dict[str, Any]]:
    """Per phase: how many predictions are within ``tolerance`` and whether the order matches.

    Args:
        rows: dicts with ``phase``, ``layer_ms_median`` (measured) and ``predicted_layer_ms``.
        tolerance: allowed relative error.

    Returns:
        phase -> ``{configs, within_25pct, max_abs_error, kendall_tau, same_order,
        measured_order, predicted_order}`` (orders list ``plan/mode`` fastest first).
    """
    out = {}
    for phase in dict.fromkeys(r["phase"] for r in rows):
        ph = [r for r in rows if r["phase"] == phase and r.get("predicted_layer_ms") is not None]
        meas = np.array([r["layer_ms_median"] for r in ph])
        pred = np.array([r["predicted_layer_ms"] for r in ph])
        err = pred / meas - 1.0
        labels = [f"{r['plan']}/{r['mode']}" for r in ph]
        tau = kendall_tau(meas, pred)
        out[phase] = {
            "configs": len(ph), "within_25pct": int(np.sum(np.abs(err) <= tolerance)),
            "max_abs_error": float(np.max(np.abs(err))) if err.size else 0.0, "kendall_tau": tau,
            "same_order": bool([labels[i] for i in np.argsort(meas, kind="stable")] == [labels[i] for i in np.argsort(pred, kind="stable")]),
            "measured_order": [labels[i] for i in np.argsort(meas, kind="stable")],
            "predicted_order": [labels[i] for i in np.argsort(pred, kind="stable")],
        }
    return out


def plot_results(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Two panels: tokens/s per configuration (median, min-max bars) and predicted vs measured layer time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_grace._files import atomic_path

    phases = list(dict.fromkeys(r["phase"] for r in rows))
    fig, axes = plt.subplots(1, len(phases) + 1, figsize=(5.5 * (len(phases) + 1), 4.8))
    for ax, phase in zip(axes, phases):
        ph = [r for r in rows if r["phase"] == phase]
        med = np.array([r["tokens_per_s_median"] for r in ph])
        err = np.array([[m - r["tokens_per_s_min"] for m, r in zip(med, ph)], [r["tokens_per_s_max"] - m for m, r in zip(med, ph)]])
        colors = ["tab:gray" if r["planner"] == "vanilla" else "tab:blue" if r["planner"] == "eplb" else "tab:green" for r in ph]
        hatch = ["" if r["mode"] == "flat" else "//" for r in ph]
        bars = ax.bar(range(len(ph)), med, yerr=err, color=colors, capsize=2)
        for b, h in zip(bars, hatch):
            b.set_hatch(h)
        ax.set_xticks(range(len(ph)), [f"{r['plan']}\n{r['mode'][:4]}" for r in ph], fontsize=7, rotation=90)
        ax.set_ylabel("tokens/s (median, min-max over repeats)")
        ax.set_title(f"{phase}: measured tokens/s (hatched = hierarchical)")
    ax = axes[-1]
    for phase, marker in zip(phases, "os^"):
        ph = [r for r in rows if r["phase"] == phase and r.get("predicted_layer_ms") is not None]
        ax.scatter([r["layer_ms_median"] for r in ph], [r["predicted_layer_ms"] for r in ph], marker=marker, label=phase)
    vals = [v for r in rows for v in (r["layer_ms_median"], r.get("predicted_layer_ms") or r["layer_ms_median"])]
    lo, hi = min(vals) * 0.7, max(vals) * 1.4
    line = np.geomspace(lo, hi, 50)
    ax.plot(line, line, "k-", lw=0.8, label="predicted = measured")
    ax.fill_between(line, 0.75 * line, 1.25 * line, color="k", alpha=0.08, label="within 25%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured layer time (ms, median)")
    ax.set_ylabel("simulator, calibrated (ms)")
    ax.set_title("calibrated simulator vs measurement")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
