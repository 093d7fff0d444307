"""Summaries of routing statistics: skew, dead experts, co-activation strength, inter-layer MI.

All functions are pure and vectorized over layers and experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_grace.statistics.expert_stats import ExpertStats
from megatron_grace.trace.routing_trace import RoutingTrace

#: Pairs with fewer co-activations than this are ignored when summarizing lift (too noisy).
MIN_PAIR_COUNT = 5


@dataclass(frozen=True)
class LayerSummary:
    """Per-layer summary arrays (all of length L; NaN where the source lacks the data).

    Attributes:
        skew: max / mean expert load.
        zero_load: experts never chosen.
        top_share: share of the layer's choices taken by the busiest 10% of experts.
        max_lift: strongest pair lift P(i,j) / (P(i) P(j)) among pairs with >= MIN_PAIR_COUNT.
        median_lift: median lift of those pairs.
        mutual_info_bits: mutual information between the expert choice at layer l and at
            layer l+1 (the last layer has NaN); see :func:`interlayer_mutual_information`.
    """

    skew: np.ndarray
    zero_load: np.ndarray
    top_share: np.ndarray
    max_lift: np.ndarray
    median_lift: np.ndarray
    mutual_info_bits: np.ndarray

    METRICS = ("skew", "zero_load", "top_share", "max_lift", "median_lift", "mutual_info_bits")

    def overall(self) -> dict[str, dict[str, float | None]]:
        """min / median / max of each per-layer metric over the layers that have it (None where none has:
        strict JSON)."""
        out: dict[str, dict[str, float | None]] = {}
        for name in self.METRICS:
            values = np.asarray(getattr(self, name), dtype=np.float64)
            finite = values[np.isfinite(values)]
            out[name] = (
                {"min": float(finite.min()), "median": float(np.median(finite)), "max": float(finite.max())}
                if finite.size else {"min": None, "median": None, "max": None}
            )
        return out

    def per_layer(self) -> dict[str, list[float | None]]:
        """Each metric per layer as a list, None where the source lacks the data (strict JSON)."""
        return {name: [float(v) if np.isfinite(v) else None for v in np.asarray(getattr(self, name), dtype=np.float64)]
                for name in self.METRICS}


def load_skew(load: np.ndarray) -> np.ndarray:
    """max / mean load per layer; ``load`` is ``[L, E]`` -> ``[L]`` (NaN for an empty layer)."""
    mean = load.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, load.max(axis=1) / mean, np.nan)


def top_share(load: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Share of each layer's load on its busiest ``fraction`` of experts; ``[L, E] -> [L]``."""
    n = max(1, int(round(load.shape[1] * fraction)))
    top = -np.sort(-load, axis=1)[:, :n].sum(axis=1)
    total = load.sum(axis=1)
    return np.divide(top, total, out=np.full_like(top, np.nan), where=total > 0)


def lift_summary(stats: ExpertStats) -> tuple[np.ndarray, np.ndarray]:
    """(max lift, median lift) per layer over measured pairs with >= MIN_PAIR_COUNT tokens.

    Returns two float64 ``[L]`` arrays, NaN when the stats have no co-activation data.
    """
    L = stats.num_layers
    if stats.coactivation is None:
        return np.full(L, np.nan), np.full(L, np.nan)
    lift = stats.lift()
    iu = np.triu_indices(stats.num_experts, 1)
    pair_lift = lift[:, iu[0], iu[1]]  # [L, P]
    counts = stats.coactivation[:, iu[0], iu[1]]
    usable = np.isfinite(pair_lift) & (counts >= MIN_PAIR_COUNT)
    masked = np.where(usable, pair_lift, np.nan)
    has = usable.any(axis=1)
    max_lift = np.full(L, np.nan)
    med_lift = np.full(L, np.nan)
    if has.any():
        max_lift[has] = np.nanmax(masked[has], axis=1)
        med_lift[has] = np.nanmedian(masked[has], axis=1)
    return max_lift, med_lift


def mutual_information_bits(joint: np.ndarray) -> np.ndarray:
    """Mutual information (bits) of joint count tables ``[..., E, E]`` -> ``[...]``."""
    total = joint.sum(axis=(-2, -1), keepdims=True)
    p = np.divide(joint, total, out=np.zeros_like(joint, dtype=np.float64), where=total > 0)
    pi = p.sum(axis=-1, keepdims=True)
    pj = p.sum(axis=-2, keepdims=True)
    denom = pi * pj
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / denom), 0.0)
    mi = terms.sum(axis=(-2, -1))
    return np.where(total[..., 0, 0] > 0, mi, np.nan)


def interlayer_mutual_information(source: RoutingTrace | ExpertStats) -> np.ndarray:
    """Mutual information between consecutive layers' expert choices, float64 ``[L]`` (last is NaN).

    From a trace: between the top-1 expert (highest gate weight, else the first listed) at
    layer l and at layer l+1, over tokens present at both. From statistics: between the
    expert choices at l and l+1 as given by the ``transitions`` table (all k x k pairs of a
    token, which dilutes the signal for k > 1). NaN when the data is missing.
    """
    if isinstance(source, RoutingTrace):
        trace = source
        L, E = trace.num_layers, trace.num_experts
        if trace.gate_weights is not None:
            first = np.argmax(trace.gate_weights, axis=2)[..., None]
            top1 = np.take_along_axis(trace.expert_ids, first, axis=2)[..., 0]
        else:
            top1 = trace.expert_ids[:, :, 0]
        out = np.full(L, np.nan)
        for layer in range(L - 1):
            a, b = top1[:, layer], top1[:, layer + 1]
            ok = (a >= 0) & (b >= 0)
            if ok.any():
                joint = np.bincount(a[ok] * E + b[ok], minlength=E * E).reshape(E, E).astype(np.float64)
                out[layer] = mutual_information_bits(joint)
        return out
    stats = source
    out = np.full(stats.num_layers, np.nan)
    if stats.transitions is not None and stats.num_layers > 1:
        out[:-1] = mutual_information_bits(stats.transitions)
    return out


def summarize(stats: ExpertStats, trace: RoutingTrace | None = None) -> LayerSummary:
    """Per-layer summary of ``stats`` (MI from ``trace`` when given, else from stats)."""
    max_lift, med_lift = lift_summary(stats)
    return LayerSummary(
        skew=load_skew(stats.load),
        zero_load=(stats.load == 0).sum(axis=1).astype(np.float64),
        top_share=top_share(stats.load),
        max_lift=max_lift,
        median_lift=med_lift,
        mutual_info_bits=interlayer_mutual_information(trace if trace is not None else stats),
    )


def format_table(stats: ExpertStats, summary: LayerSummary) -> str:
    """A fixed-width text table: one row per layer, then min/median/max over layers."""
    head = f"{'layer':>6} {'tokens':>8} {'max/mean':>8} {'zero':>5} {'top10%':>7} {'maxlift':>8} {'medlift':>8} {'MI(l,l+1)':>9}"
    rows = [head, "-" * len(head)]

    def fmt(x: float | None, spec: str) -> str:
        return format(x, spec) if x is not None and np.isfinite(x) else "-".rjust(len(format(0.0, spec)))

    for l in range(stats.num_layers):
        rows.append(
            f"{l:>6} {stats.tokens[l]:>8.0f} {fmt(summary.skew[l], '8.2f')} {summary.zero_load[l]:>5.0f} "
            f"{fmt(summary.top_share[l], '7.3f')} {fmt(summary.max_lift[l], '8.1f')} {fmt(summary.median_lift[l], '8.2f')} "
            f"{fmt(summary.mutual_info_bits[l], '9.3f')}"
        )
    rows.append("-" * len(head))
    overall = summary.overall()
    for stat in ("min", "median", "max"):
        o = {k: v[stat] for k, v in overall.items()}
        rows.append(
            f"{stat:>6} {'':>8} {fmt(o['skew'], '8.2f')} {fmt(o['zero_load'], '5.0f')} {fmt(o['top_share'], '7.3f')} "
            f"{fmt(o['max_lift'], '8.1f')} {fmt(o['median_lift'], '8.2f')} {fmt(o['mutual_info_bits'], '9.3f')}"
        )
    rows.append("- = not in this source: " + "; ".join(missing_reasons(summary))
                if missing_reasons(summary) else "MI(l,l+1) of the last layer is -: it has no next layer")
    return "\n".join(rows)


def missing_reasons(summary: LayerSummary) -> list[str]:
    """Why whole columns of the summary are empty (one phrase per empty column)."""
    reasons = []
    if not np.isfinite(summary.max_lift).any():
        reasons.append("lift needs co-activation counts (per-token ids or pair lists)")
    if not np.isfinite(summary.mutual_info_bits).any():
        reasons.append("MI(l,l+1) needs per-token ids or layer-to-layer transition counts")
    return reasons
