"""Plot helpers shared by the chapters: attention heatmaps (Chapter 1), quality against cost over
``top_p`` (Chapters 6 and 8), quality per corpus regime (Chapter 7). Explorers that work without a
kernel are :func:`nbsupport.book.widgets.static_explorer`."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = ["attention_heatmap", "head_heatmaps", "quality_vs_cost", "quality_per_regime"]


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
                    costs: dict | None = None, intervals: bool = True,
                    reference: dict | None = None, title: str = ""):
    """Quality against compute over the sparsity threshold (Dai et al. 2021, Fig. 4: accuracy against
    FLOPs over ``top_p``): Chapter 8's sweep of ``top_p`` x seeds and Chapter 6's ``top_p`` sweep of
    one trained MESM. One panel per cost column (``costs``: column -> axis label); every point (a row)
    coloured by ``by``, with its bootstrap interval when ``intervals`` (columns
    ``<metric>_low``/``_high``; none drawn where NaN); a grey line through the mean of each ``by``
    value in ``by`` order, and, where some value has several points (seeds), that mean as a diamond.
    ``reference``: label -> a value drawn as a dashed horizontal line on every panel (Chapter 6: FE2E's
    quality). ``title``: the figure's title. Returns the figure."""
    costs = costs or {"macs": "extractor MACs per test utterance", "seconds": "training seconds"}
    bounds = [f"{metric}_low", f"{metric}_high"] if intervals else []
    missing = [c for c in [by, metric, *bounds, *costs] if c not in points]
    if missing:
        raise ValueError(f"viz.quality_vs_cost: the sweep table lacks column(s) {missing}")
    sns.set_theme(style="whitegrid")
    values = sorted(points[by].unique())
    colours = dict(zip(values, sns.color_palette("viridis", len(values))))
    means = points.groupby(by)[[metric, *costs]].mean().reset_index()
    seeds = points.groupby(by).size().max() > 1
    fig, axes = plt.subplots(1, len(costs), figsize=(5.5 * len(costs), 4), sharey=True, squeeze=False)
    for ax, (x, label) in zip(axes.flat, costs.items()):
        for v, g in points.groupby(by):
            err = [g[metric] - g[bounds[0]], g[bounds[1]] - g[metric]] if intervals else None
            ax.errorbar(g[x], g[metric], yerr=err, fmt="o", ms=5, capsize=3, alpha=0.7,
                        color=colours[v], label=f"{by}={v}")
        ax.plot(means[x], means[metric], "-", color="grey", lw=1, zorder=0)
        if seeds:
            ax.scatter(means[x], means[metric], s=140, marker="D", c=[colours[v] for v in means[by]],
                       edgecolors="black", zorder=3, label="mean over seeds")
        for name, value in (reference or {}).items():
            ax.axhline(value, color="grey", ls="--", label=name)
        ylabel = f"test {metric} (95 % bootstrap interval)" if intervals else f"test {metric}"
        ax.set(xlabel=label, ylabel=ylabel, title="" if title else f"quality vs {x}")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def quality_per_regime(rows, *, metric: str = "wacc", cost: str = "macs",
                       cost_label: str = "MACs per utterance (log; baselines: model only, "
                                         "features not counted)"):
    """Two-phase pipelines against end-to-end models (Chapter 7; Dai et al. 2021, Table 2 and its
    compute column): left, each model's test ``metric`` in % as bars, one colour per corpus regime;
    right, ``metric`` against ``cost`` (log scale), one colour per model and one marker per regime.
    ``rows``: the chapter's result rows (``model``, ``regime``, ``metric``, ``cost``). Returns the figure."""
    table = pd.DataFrame(list(rows))
    missing = [c for c in ("model", "regime", metric, cost) if c not in table]
    if missing:
        raise ValueError(f"viz.quality_per_regime: the result rows lack column(s) {missing}")
    sns.set_theme(style="whitegrid")
    long = table.assign(value=100 * table[metric])
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    sns.barplot(data=long, x="model", y="value", hue="regime", ax=axes[0])
    axes[0].set(xlabel="", ylabel=f"test {metric} (%)",
                title="average over the emotions, per regime")
    sns.scatterplot(data=table, x=cost, y=metric, hue="model", style="regime", s=90, ax=axes[1])
    axes[1].set_xscale("log")
    axes[1].set(xlabel=cost_label, ylabel=f"test {metric}", title="quality vs compute")
    fig.tight_layout()
    return fig
