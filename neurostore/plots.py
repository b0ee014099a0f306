"""Figures from query results (matplotlib, Agg backend). Plots draw; they compute no statistics.

Each function takes a result object of :mod:`neurostore.query` and returns a ``Figure`` with titles,
axis labels and legends, ready for a paper; :func:`save` writes PNG (300 dpi) or PDF.
:func:`plot_intervention` draws an ``intervene`` result (its JSON) straight to a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .errors import NeurostoreError  # noqa: E402
from .provenance import describe  # noqa: E402

FORMATS = (".png", ".pdf", ".svg")


def _title(fig: Any, what: str, res: Any) -> None:
    """The figure's title: what is drawn, and on a second line the rows behind it (site, layer,
    pooling, filters, z-scoring), as the query tables say it."""
    if getattr(res, "provenance", None):
        rows = describe(res.provenance)
    else:  # a result built by hand: at least the site and layer(s)
        rows = f"{res.site}, layer {res.layer}" if hasattr(res, "layer") else f"{res.site}, layers {res.layers}"
    fig.suptitle(f"{what}\n{rows}", fontsize=11)


def _rows_cols(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return (n + cols - 1) // cols, cols


# Where a point's label may go, in points from the point: above, beside, then further up.
_SPOTS = [(0, 4), (6, 1), (-6, 1), (0, 12), (9, 9), (-9, 9), (0, 20), (13, 16), (-13, 16), (0, 28), (17, 24), (-17, 24)]


def _label_points(ax: Any, points: list[tuple[float, float, str]], color: str) -> int:
    """Write ``text`` next to each ``(x, y)`` without overlapping another label, a marked point,
    the legend or the axes' edge: each label takes the first free spot of ``_SPOTS`` (measured in
    display space, so call this once the layout is final); one that finds none is left out.
    Returns how many were written."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = []
    legend = ax.get_legend()
    if legend is not None:
        taken.append(legend.get_window_extent(renderer))
    for x, y, _ in points:  # the markers themselves (a few pixels around each)
        px, py = ax.transData.transform((x, y))
        r = 3 * ax.figure.dpi / 72
        taken.append(matplotlib.transforms.Bbox([[px - r, py - r], [px + r, py + r]]))
    written = 0
    for x, y, text in points:
        for dx, dy in _SPOTS:
            ha = "center" if dx == 0 else "left" if dx > 0 else "right"
            moved = (dx, dy) != _SPOTS[0]  # a label moved off its point gets a thin line to it
            t = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va="bottom",
                            fontsize=7, color=color, annotation_clip=False,
                            bbox=dict(boxstyle="square,pad=0.05", fc="white", ec="none", alpha=0.75),
                            arrowprops=dict(arrowstyle="-", lw=0.4, color=color, shrinkA=0, shrinkB=3) if moved else None)
            t.update_positions(renderer)
            box = matplotlib.text.Text.get_window_extent(t, renderer).padded(1)  # the text, not its line
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in taken):
                taken.append(box)
                written += 1
                break
            t.remove()
    return written


def _mark(ax: Any, top: list, color: str = "tab:red") -> None:
    if not top:
        return
    xs = [n for n, _ in top]
    ys = [v for _, v in top]
    ax.scatter(xs, ys, color=color, s=18, zorder=3, label=f"top {len(top)} (neuron ids)")


def variance_figure(res: Any) -> Any:
    """Per-neuron variance along the layer: one panel (variance over group means, the default of
    ``query variance``), or one per language (``--per``) or group (``--within``); the top neurons
    marked and labelled with their ids where the labels do not overlap."""
    space = "z" if res.zscore else "activation"
    if res.groups is None:
        panels = [(None, res.variance, res.top)]
    else:
        panels = [(g, res.variance[i], res.top[i]) for i, g in enumerate(res.groups)]
    ylabel = f"variance of {space}" if res.mode == "within" else f"variance of {res.by} means\nof {space}"
    rows, cols = _rows_cols(len(panels), 2)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 2.9 * rows + 0.6), squeeze=False, sharex=True)
    width = len(panels[0][1])
    for ax, (name, values, top) in zip(axes.ravel(), panels):
        ax.plot(np.arange(width), values, lw=0.8, color="tab:blue")
        _mark(ax, top)
        if name is not None:
            ax.set_title(f"{res.by} {name}" if res.mode == "within" else f"language {name}", fontsize=10)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.margins(y=0.18)
        ax.grid(alpha=0.3)
    for i, ax in enumerate(axes.ravel()):
        if i >= len(panels):
            ax.set_visible(False)
        if i >= len(panels) - cols and i < len(panels):  # the lowest panel of its column
            ax.tick_params(labelbottom=True)
            ax.set_xlabel("neuron")
    axes.ravel()[0].legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, borderaxespad=0.1)
    kind = {"within": f"within each {res.by}", "per": f"over {res.by} means, per language", "by": f"over {res.by} means"}[res.mode]
    _title(fig, f"Per-neuron variance {kind}", res)
    fig.tight_layout()
    for ax, (_, _, top) in zip(axes.ravel(), panels):
        _label_points(ax, [(n, v, str(n)) for n, v in top], "tab:red")
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
    space = "z" if res.provenance.get("parameters", {}).get("zscore", True) else "activation"
    _title(fig, f"Cross-lingual {label} of the per-neuron mean {space} of each group", res)
    return fig


def means_figure(gm: Any, label: str, highlights: dict[str, list[int]]) -> Any:
    """Average z-activation per language for one group, each language's top neurons highlighted."""
    if label not in gm.groups:
        raise NeurostoreError(f"--label {label}: the store has {', '.join(gm.groups)}")
    e = gm.groups.index(label)
    langs = [l for i, l in enumerate(gm.langs) if gm.count[i, e] > 0]
    fig, axes = plt.subplots(len(langs), 1, figsize=(8, 1.7 * len(langs) + 1.2), squeeze=False, sharex=True, sharey=True)
    width = gm.M.shape[-1]
    space = "z-activation" if gm.zscore else "activation"
    for ax, lang in zip(axes[:, 0], langs):
        i = gm.langs.index(lang)
        values = gm.M[i, e]
        ax.bar(np.arange(width), values, width=1.0, color="0.6")
        top = highlights.get(lang, [])
        ax.bar(top, values[top], width=1.0, color="tab:red", label="the language's top neurons (ids)")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel(f"{lang} (n={int(gm.count[i, e])})", fontsize=8)
        ax.margins(y=0.2)
        ax.grid(alpha=0.3, axis="y")
    axes[-1, 0].set_xlabel("neuron")
    axes[0, 0].legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, borderaxespad=0.1)
    fig.supylabel(f"mean {space} of {gm.by} {label}, per language", fontsize=9)
    _title(fig, f"Average {space} for {gm.by} {label} per language", gm)
    fig.tight_layout()
    for ax, lang in zip(axes[:, 0], langs):
        values = gm.M[gm.langs.index(lang), e]
        top = highlights.get(lang, [])
        _label_points(ax, [(n, values[n], str(n)) for n in top], "tab:red")
    return fig


def polyglot_figure(res: Any) -> Any:
    """Polyglot and monolingual neuron counts per group and language (grouped bars)."""
    counts = res.counts()
    kinds = ["polyglot", *res.langs]
    x = np.arange(len(res.groups))
    w = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(res.groups) + 2), 3.8))
    colors = plt.get_cmap("tab10")
    for k, kind in enumerate(kinds):
        have = [g for g in res.groups if kind in counts[g]]  # a language without rows of a group has no bar
        xs = [x[res.groups.index(g)] + (k - (len(kinds) - 1) / 2) * w for g in have]
        bars = ax.bar(xs, [counts[g][kind] for g in have], w, label="polyglot (all languages)" if kind == "polyglot" else f"only {kind}",
                      color="black" if kind == "polyglot" else colors(k - 1))
        ax.bar_label(bars, fontsize=6)
    by = res.provenance.get("selection", {}).get("by") or "label"
    space = "z" if res.provenance.get("parameters", {}).get("zscore", True) else "activation"
    ax.set_xticks(x, res.groups)
    ax.set_ylabel("neurons")
    ax.set_xlabel(by)
    ax.margins(y=0.12)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _title(fig, f"Polyglot and monolingual neurons (mean {space} > {res.threshold})", res)
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
    ax.legend(fontsize=7, title="language (total)", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _title(fig, f"LAPE language-specific neurons per layer (filter rate {res.filter_rate}, top rate {res.top_rate})", res)
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


# ----------------------------------------------------------------------------------------------
# interventions


def plot_intervention(result: dict, path: str | Path) -> Path:
    """An ``intervene`` result (its JSON) drawn to ``path``: per-label accuracy change (intervened -
    baseline), the selected set as bars, the controls as their mean with a ±1 std bar and one dot
    per control. The first group is overall accuracy."""
    base, after = result["baseline"], result["intervened"]
    names = ["overall"] + list(base["per_label"])

    def changes(run: dict) -> np.ndarray:
        values = [run["accuracy"] - base["accuracy"]]
        values += [run["per_label"][n] - base["per_label"][n] for n in base["per_label"]]
        return np.asarray(values, dtype=float)

    selected = changes(after)
    controls = np.array([changes(c) for c in result.get("controls") or []])
    x = np.arange(len(names))
    width = 0.38 if len(controls) else 0.6
    fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * len(names) + 2), 3.6))
    ax.axhline(0, color="0.3", linewidth=0.8)
    offset = width / 2 if len(controls) else 0.0
    colors = ["#c0392b" if n == result.get("target") else "#2c7fb8" for n in names]
    ax.bar(x - offset, selected, width, color=colors, label="selected")
    if len(controls):
        mean = controls.mean(axis=0)
        std = controls.std(axis=0, ddof=1) if len(controls) > 1 else np.zeros_like(mean)
        ax.bar(x + offset, mean, width, color="0.75", yerr=std, capsize=3, label=f"controls (n={len(controls)})")
        jitter = np.linspace(-width / 4, width / 4, len(controls)) if len(controls) > 1 else np.zeros(1)
        for i, row in enumerate(controls):
            ax.scatter(x + offset + jitter[i], row, s=9, color="0.25", zorder=3)
    ax.margins(y=0.12)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("accuracy change")
    neurons = result["neurons"]
    how = {"ablate": "ablate", "gain": f"gain x{result.get('alpha')}", "set": f"set to {result.get('stat')} of {result.get('of')}"}
    title = f"{how.get(result['mode'], result['mode'])}: {neurons['n']} {neurons['site']} neurons"
    if neurons.get("group"):
        title += f" of {neurons['group']}"
    if result.get("target") in names:
        title += f" (target {result['target']} in red)"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
