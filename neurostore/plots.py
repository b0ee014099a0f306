"""Figures from query results (matplotlib, Agg backend). Plots draw; they compute no statistics.

Each function takes a result object of :mod:`neurostore.query` and returns a ``Figure`` with titles,
axis labels and legends, ready for a paper; :func:`save` writes PNG (300 dpi) or PDF.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .errors import NeurostoreError  # noqa: E402

FORMATS = (".png", ".pdf", ".svg")


def _rows_cols(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return (n + cols - 1) // cols, cols


def _mark(ax: Any, top: list, color: str = "tab:red", annotate: int = 5) -> None:
    if not top:
        return
    xs = [n for n, _ in top]
    ys = [v for _, v in top]
    ax.scatter(xs, ys, color=color, s=18, zorder=3, label=f"top {len(top)}")
    for n, v in top[:annotate]:
        ax.annotate(str(n), (n, v), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7, color=color)


def variance_figure(res: Any) -> Any:
    """Per-neuron variance along the layer: one panel per group (``--within``/``--per``) or one
    panel (variance over group means), top neurons marked and numbered."""
    space = "z" if res.zscore else "activation"
    if res.groups is None:
        panels = [("all rows", res.variance, res.top)]
        ylabel = f"variance of {res.by} means of {space}"
    else:
        panels = [(g, res.variance[i], res.top[i]) for i, g in enumerate(res.groups)]
        ylabel = f"variance of {space}" if res.mode == "within" else f"variance of {res.by} means of {space}"
    rows, cols = _rows_cols(len(panels), 2)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 2.8 * rows), squeeze=False, sharex=True)
    width = len(panels[0][1])
    for ax, (name, values, top) in zip(axes.ravel(), panels):
        ax.plot(np.arange(width), values, lw=0.8, color="tab:blue")
        _mark(ax, top)
        ax.set_title(f"{res.by} = {name}" if res.groups is not None and res.mode == "within" else name, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("neuron")
    axes.ravel()[0].legend(fontsize=7, loc="upper right")
    kind = {"within": f"within each {res.by}", "per": "per language", "by": f"over {res.by} means"}[res.mode]
    fig.suptitle(f"Per-neuron variance {kind}: {res.site}, layer {res.layer}")
    fig.tight_layout()
    return fig


def correlation_figure(res: Any) -> Any:
    """Cross-lingual correlation heatmaps, one per group and one for the mean over groups."""
    named = [(g, res.matrices[i]) for i, g in enumerate(res.groups)] + [("mean over groups", res.mean)]
    rows, cols = _rows_cols(len(named), 4)
    L = len(res.across)
    size = max(2.6, 0.45 * L + 1.2)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 1, size * rows), squeeze=False)
    lo = -1.0
    image = None
    for ax, (name, m) in zip(axes.ravel(), named):
        image = ax.imshow(np.ma.masked_invalid(m), vmin=lo, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(L), res.across, rotation=90 if L > 6 else 0, fontsize=7)
        ax.set_yticks(range(L), res.across, fontsize=7)
        ax.set_title(name, fontsize=10)
        if L <= 10:
            for i in range(L):
                for j in range(L):
                    v = m[i, j]
                    ax.text(j, i, "–" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if np.isfinite(v) and abs(v) > 0.6 else "black")
    for ax in axes.ravel()[len(named):]:
        ax.set_visible(False)
    label = "Spearman's ρ" if res.method == "spearman" else "cosine similarity"
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=label)
    fig.suptitle(f"Cross-lingual {label} of mean z per neuron: {res.site}, layer {res.layer}")
    return fig


def means_figure(gm: Any, label: str, highlights: dict[str, list[int]]) -> Any:
    """Average z-activation per language for one group, each language's top neurons highlighted."""
    if label not in gm.groups:
        raise NeurostoreError(f"--label {label}: the store has {', '.join(gm.groups)}")
    e = gm.groups.index(label)
    langs = [l for i, l in enumerate(gm.langs) if gm.count[i, e] > 0]
    fig, axes = plt.subplots(len(langs), 1, figsize=(8, 1.6 * len(langs) + 0.8), squeeze=False, sharex=True, sharey=True)
    width = gm.M.shape[-1]
    for ax, lang in zip(axes[:, 0], langs):
        i = gm.langs.index(lang)
        values = gm.M[i, e]
        ax.bar(np.arange(width), values, width=1.0, color="0.6")
        top = highlights.get(lang, [])
        ax.bar(top, values[top], width=1.0, color="tab:red", label="top neurons")
        for n in top[:5]:
            ax.annotate(str(n), (n, values[n]), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7, color="tab:red")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel(f"{lang}\n(n={int(gm.count[i, e])})", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[-1, 0].set_xlabel("neuron")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    space = "z-activation" if gm.zscore else "activation"
    fig.suptitle(f"Average {space} for {gm.by} = {label} per language: {gm.site}, layer {gm.layer}")
    fig.tight_layout()
    return fig


def polyglot_figure(res: Any) -> Any:
    """Polyglot and monolingual neuron counts per group and language (grouped bars)."""
    counts = res.counts()
    kinds = ["polyglot", *res.langs]
    x = np.arange(len(res.groups))
    w = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(res.groups) + 2), 3.6))
    colors = plt.get_cmap("tab10")
    for k, kind in enumerate(kinds):
        values = [counts[g][kind] for g in res.groups]
        bars = ax.bar(x + (k - (len(kinds) - 1) / 2) * w, values, w, label="polyglot (all languages)" if kind == "polyglot" else f"only {kind}",
                      color="black" if kind == "polyglot" else colors(k - 1))
        ax.bar_label(bars, fontsize=6)
    ax.set_xticks(x, res.groups)
    ax.set_ylabel("neurons")
    ax.set_xlabel("label")
    ax.legend(fontsize=7, ncol=min(len(kinds), 4))
    ax.set_title(f"Polyglot and monolingual neurons (mean z > {res.threshold}): {res.site}, layer {res.layer}")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def lape_figure(res: Any) -> Any:
    """LAPE language-specific neurons per layer and language (grouped bars)."""
    per_layer = res.per_layer()
    x = np.arange(len(res.layers))
    langs = list(per_layer)
    w = 0.8 / max(len(langs), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(res.layers) * max(1, len(langs) / 3) + 2), 3.6))
    for k, lang in enumerate(langs):
        ax.bar(x + (k - (len(langs) - 1) / 2) * w, per_layer[lang], w, label=f"{lang} ({len(res.neurons[lang])})")
    ax.set_xticks(x, [str(layer) for layer in res.layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("language-specific neurons")
    ax.legend(fontsize=7, ncol=min(len(langs), 6), title="language (total)", title_fontsize=7)
    ax.set_title(f"LAPE neurons per layer ({res.site}; filter rate {res.filter_rate}, top rate {res.top_rate})")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def save(fig: Any, path: str | Path) -> Path:
    """Write the figure (format from the suffix: .png at 300 dpi, .pdf, .svg) and close it."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise NeurostoreError(f"--out {path}: use a .png, .pdf or .svg file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=300 if path.suffix.lower() == ".png" else None, bbox_inches="tight")
    plt.close(fig)
    return path
