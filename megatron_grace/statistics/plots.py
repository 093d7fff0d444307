"""PNG plots of routing statistics (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_grace._sampling import evenly_spaced
from megatron_grace._files import PathLike, atomic_path
from megatron_grace.statistics.expert_stats import ExpertStats


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def representative_layers(num_layers: int, count: int = 6) -> list[int]:
    """Up to ``count`` evenly spread layer indices, first and last included."""
    return evenly_spaced(num_layers, count).tolist()


def _save(fig, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    return path


def plot_stats(stats: ExpertStats, out_dir: PathLike, layers: list[int] | None = None, progress: bool = False) -> list[Path]:
    """Write load and co-activation plots of ``stats`` into ``out_dir``; return the paths.

    Files: ``load_heatmap.png`` (load / layer mean, all layers), ``load_bars.png`` (per-expert
    load of the chosen layers, busiest first), ``coactivation.png`` (lift heatmaps of the chosen
    layers, experts ordered busiest first; only when co-activation data exists). ``progress``
    shows a bar over the figures (after 1 s).
    """
    from megatron_grace._progress import progress as _progress

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = layers if layers is not None else representative_layers(stats.num_layers)
    figures = [("load_heatmap.png", _load_heatmap), ("load_bars.png", _load_bars)]
    if stats.coactivation is not None:
        figures.append(("coactivation.png", _coactivation))
    written: list[Path] = []
    for name, draw in _progress(figures, desc="plotting", total=len(figures), enabled=progress):
        plt = _pyplot()
        fig = draw(plt, stats, layers)
        written.append(_save(fig, out / name))
        plt.close(fig)
    return written


def _relative_load(stats: ExpertStats) -> np.ndarray:
    """float64 ``[L, E]``: load / layer mean (0 for an empty layer)."""
    mean = stats.load.mean(axis=1, keepdims=True)
    return np.divide(stats.load, mean, out=np.zeros_like(stats.load, dtype=np.float64), where=mean > 0)


def _grid(plt, count: int, width: float, height: float):
    cols = min(3, count)
    rows = int(np.ceil(count / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, axes


def _load_heatmap(plt, stats: ExpertStats, layers: list[int]):
    fig, ax = plt.subplots(figsize=(10, max(3, stats.num_layers * 0.12 + 1.5)))
    im = ax.imshow(_relative_load(stats), aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("expert id")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{stats.model}: expert load / layer mean")
    fig.colorbar(im, ax=ax, label="load / mean")
    return fig


def _load_bars(plt, stats: ExpertStats, layers: list[int]):
    rel = _relative_load(stats)
    fig, axes = _grid(plt, len(layers), 5, 3)
    for ax, layer in zip(axes.flat, layers):
        order = np.argsort(-stats.load[layer], kind="stable")
        ax.bar(np.arange(stats.num_experts), rel[layer, order], width=1.0, color="tab:blue")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title(f"layer {layer}: max/mean {rel[layer].max():.2f}")
        ax.set_xlabel("expert rank by load (0 = busiest)")
        ax.set_ylabel("load / mean")
    fig.tight_layout()
    return fig


def _coactivation(plt, stats: ExpertStats, layers: list[int]):
    lift = stats.lift()
    fig, axes = _grid(plt, len(layers), 4.6, 4)
    im = None
    for ax, layer in zip(axes.flat, layers):
        order = np.argsort(-stats.load[layer], kind="stable")
        sub = np.log2(np.nan_to_num(lift[layer][np.ix_(order, order)], nan=1.0).clip(min=1e-3))
        im = ax.imshow(sub, cmap="RdBu_r", vmin=-4, vmax=4, interpolation="nearest")
        ax.set_title(f"layer {layer}: log2 lift")
        ax.set_xlabel("expert rank by load (0 = busiest)")
    for row in axes:
        row[0].set_ylabel("expert rank by load (0 = busiest)")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    cax = fig.add_axes((0.92, 0.15, 0.015, 0.7))
    fig.colorbar(im, cax=cax, label="log2 P(i,j)/(P(i)P(j)); unmeasured = 0")
    return fig
