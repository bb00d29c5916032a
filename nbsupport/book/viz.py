"""Plot helpers shared by the chapters: attention heatmaps (Chapter 1), quality against cost over a
sweep (Chapter 8). Explorers that work without a
kernel are :func:`nbsupport.book.widgets.static_explorer`."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

__all__ = ["attention_heatmap", "head_heatmaps", "quality_vs_cost"]


def attention_heatmap(weights, x_labels: Sequence[str] | None = None, y_labels: Sequence[str] | None = None,
                      ax=None, title: str = "", xlabel: str = "key", ylabel: str = "query", annot: bool = False):
    """Draw attention weights (queries x keys) as a heatmap: row q shows where query q looks (Chapter 1)."""
    weights = np.asarray(getattr(weights, "detach", lambda: weights)().cpu() if hasattr(weights, "cpu") else weights)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * weights.shape[1] + 2, 0.4 * weights.shape[0] + 1.5))
    sns.heatmap(weights, ax=ax, vmin=0, vmax=max(float(weights.max()), 1e-9), cmap="viridis", square=False,
                xticklabels=list(x_labels) if x_labels is not None else "auto",
                yticklabels=list(y_labels) if y_labels is not None else "auto",
                annot=annot, fmt=".2f", cbar_kws={"label": "attention weight"})
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


def head_heatmaps(weights, tokens: Sequence[str], title: str = "", max_cols: int = 4):
    """One heatmap per attention head; ``weights`` (heads, T, T) over a sentence's ``tokens`` (Chapter 1)."""
    weights = np.asarray(weights)
    heads = weights.shape[0]
    cols = min(heads, max_cols)
    rows = int(np.ceil(heads / cols))
    size = 0.32 * len(tokens) + 1.5
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        sns.heatmap(weights[h], ax=ax, vmin=0, vmax=1, cmap="viridis", cbar=False,
                    xticklabels=tokens, yticklabels=tokens if h % cols == 0 else False, square=True)
        ax.set_title(f"head {h}")
        ax.set_xlabel("key token")
        if h % cols == 0:
            ax.set_ylabel("query token")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def quality_vs_cost(points, *, by: str = "top_p", metric: str = "wacc",
                    costs: dict | None = None):
    """Quality against compute over a sweep (Chapter 8; Dai et al. 2021, Fig. 4: accuracy against
    FLOPs over the sparsity threshold): one panel per cost column, every point (one seed) with its
    bootstrap interval (``<metric>_low``/``_high``; none drawn where NaN), coloured by ``by``, and the
    mean over seeds of each ``by`` value as a diamond on a grey line. Returns the figure."""
    costs = costs or {"macs": "extractor MACs per test utterance", "seconds": "training seconds"}
    missing = [c for c in [by, metric, f"{metric}_low", f"{metric}_high", *costs] if c not in points]
    if missing:
        raise ValueError(f"viz.quality_vs_cost: the sweep table lacks column(s) {missing}")
    sns.set_theme(style="whitegrid")
    values = sorted(points[by].unique())
    colours = dict(zip(values, sns.color_palette("viridis", len(values))))
    means = points.groupby(by)[[metric, *costs]].mean().reset_index()
    fig, axes = plt.subplots(1, len(costs), figsize=(5.5 * len(costs), 4), sharey=True, squeeze=False)
    for ax, (x, label) in zip(axes.flat, costs.items()):
        for v, g in points.groupby(by):
            err = [g[metric] - g[f"{metric}_low"], g[f"{metric}_high"] - g[metric]]
            ax.errorbar(g[x], g[metric], yerr=err, fmt="o", ms=5, capsize=3, alpha=0.7,
                        color=colours[v], label=f"{by}={v}")
        ax.plot(means[x], means[metric], "-", color="grey", lw=1, zorder=0)
        ax.scatter(means[x], means[metric], s=140, marker="D", c=[colours[v] for v in means[by]],
                   edgecolors="black", zorder=3, label="mean over seeds")
        ax.set(xlabel=label, ylabel=f"test {metric} (95 % bootstrap interval)", title=f"quality vs {x}")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
