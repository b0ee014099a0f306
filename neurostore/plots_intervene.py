"""Figures of ``neurostore intervene`` results (the JSON it prints): drawing only, no statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_intervention(result: dict, path: str | Path) -> Path:
    """Per-label accuracy change (intervened - baseline): the selected set as bars, the controls
    as their mean with a ±1 std bar and one dot per control. The first group is overall accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
