"""PNG plots of routing statistics (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_grace._files import PathLike, atomic_path
from megatron_grace.statistics.expert_stats import ExpertStats


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def representative_layers(num_layers: int, count: int = 6) -> list[int]:
    """Up to ``count`` evenly spread layer indices, first and last included."""
    return sorted({int(round(x)) for x in np.linspace(0, num_layers - 1, min(count, num_layers))})


def _save(fig, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    return path


def plot_stats(stats: ExpertStats, out_dir: PathLike, layers: list[int] | None = None) -> list[Path]:
    """Write load and co-activation plots of ``stats`` into ``out_dir``; return the paths.

    Files: ``load_heatmap.png`` (load / layer mean, all layers), ``load_bars.png`` (sorted
    per-expert load of the chosen layers), ``coactivation.png`` (lift heatmaps of the chosen
    layers, experts ordered by load; only when co-activation data exists).
    """
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = layers if layers is not None else representative_layers(stats.num_layers)
    written: list[Path] = []
    mean = stats.load.mean(axis=1, keepdims=True)
    rel = np.divide(stats.load, mean, out=np.zeros_like(stats.load), where=mean > 0)

    fig, ax = plt.subplots(figsize=(10, max(3, stats.num_layers * 0.12 + 1.5)))
    im = ax.imshow(rel, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("expert id")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{stats.model}: expert load / layer mean")
    fig.colorbar(im, ax=ax, label="load / mean")
    written.append(_save(fig, out / "load_heatmap.png"))
    plt.close(fig)

    cols = min(3, len(layers))
    rows = int(np.ceil(len(layers) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        order = np.argsort(-stats.load[layer])
        ax.bar(np.arange(stats.num_experts), rel[layer, order], width=1.0, color="tab:blue")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title(f"layer {layer}: max/mean {rel[layer].max():.2f}")
        ax.set_xlabel("experts (sorted by load)")
        ax.set_ylabel("load / mean")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.tight_layout()
    written.append(_save(fig, out / "load_bars.png"))
    plt.close(fig)

    if stats.coactivation is not None:
        lift = stats.lift()
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4 * rows), squeeze=False)
        for ax, layer in zip(axes.flat, layers):
            order = np.argsort(-stats.load[layer])
            sub = np.log2(np.nan_to_num(lift[layer][np.ix_(order, order)], nan=1.0).clip(min=1e-3))
            im = ax.imshow(sub, cmap="RdBu_r", vmin=-4, vmax=4, interpolation="nearest")
            ax.set_title(f"layer {layer}: log2 lift")
            ax.set_xlabel("expert (by load)")
            ax.set_ylabel("expert (by load)")
        for ax in list(axes.flat)[len(layers):]:
            ax.axis("off")
        fig.colorbar(im, ax=list(axes.flat), label="log2 P(i,j)/(P(i)P(j)); unmeasured = 0", shrink=0.8)
        written.append(_save(fig, out / "coactivation.png"))
        plt.close(fig)
    return written
