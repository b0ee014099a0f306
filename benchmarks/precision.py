"""What the compute and store dtypes do to the results, not to the speed.

    python -m benchmarks.precision          # packaged MiniLM, the sample corpus, resid + mlp

Extracts the sample corpus with the packaged all-MiniLM-L6-v2 once per dtype setting and compares
each with float32 compute and float32 storage on what researchers read off a store: the LAPE
language-specific sets (mlp, token rows), the contrast selector's top 20 per label (mlp), and the
per-label variance of the last layer's residual stream (relative difference, top-20 overlap).
Compute dtypes run through autocast on the CPU; a GPU runs the same kernels' dtypes faster, with
the same rounding.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from benchmarks import common

SETTINGS = [  # (compute, store)
    ("float32", "float32"),
    ("bfloat16", "float32"),
    ("float16", "float32"),
    ("float32", "float16"),
    ("float32", "bfloat16"),
    ("float16", "float16"),
]


def measure(path: Path) -> dict:
    from neurostore import query

    s = common.open_store(path)
    lape = query.lape(s, "mlp", cache=False)
    contrast = query.select(s, "mlp", by="label", method="contrast", top=20, cache=False)
    last = s.sites["resid"]["layers"][-1]
    var = query.variance(s, "resid", last, by="label", top=20, cache=False)
    st = query.stats(s, "resid", last, by="label", quantiles=False, cache=False)
    scale = np.nanmax(np.abs(st.mean) + st.std, axis=(0, 1))  # per neuron: how large its values get
    return {
        "scale": scale,
        "lape": {lang: {tuple(x) for x in members} for lang, members in lape.neurons.items()},
        "contrast": {g: {(a, b) for a, b, _ in v} for g, v in contrast.selected.items()},
        "variance": np.asarray(var.variance, dtype=np.float64),
        "top_variance": set(np.argsort(-np.asarray(var.variance))[:20].tolist()),
        "nonfinite": s.meta.get("nonfinite", {}),
    }


def compare(ref: dict, got: dict) -> dict:
    # neurons whose values all sit below float16's smallest normal number, 6.1e-5 (MiniLM has a few at ~1e-32),
    # keep few or no significant bits in float16: their z-scored variance is not comparable, so they are counted
    tiny = ref["scale"] < float(np.finfo(np.float16).tiny)
    big = (ref["variance"] > 0.01 * ref["variance"].max()) & ~tiny
    rel = np.abs(got["variance"][big] - ref["variance"][big]) / ref["variance"][big]
    langs = sorted(ref["lape"])
    labels = sorted(ref["contrast"])
    return {
        "lape_jaccard": common.jaccard(set().union(*ref["lape"].values()), set().union(*got["lape"].values())),
        "lape_jaccard_per_lang": float(np.mean([common.jaccard(ref["lape"][k], got["lape"].get(k, set())) for k in langs])),
        "contrast_top20_jaccard": float(np.mean([common.jaccard(ref["contrast"][k], got["contrast"].get(k, set())) for k in labels])),
        "variance_max_rel_diff": float(rel.max()),
        "variance_median_rel_diff": float(np.median(rel)),
        "variance_top20_jaccard": common.jaccard(ref["top_variance"], got["top_variance"]),
        "nonfinite": sum(sum(v.values()) for v in got["nonfinite"].values()),
        "tiny_neurons": int(tiny.sum()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="Scratch folder (default: a temporary folder).")
    p.add_argument("--results", default=str(common.RESULTS), help="Folder for the results JSON.")
    a = p.parse_args(argv)
    import torch

    from neurostore import models
    from neurostore.extract import ExtractOptions, extract

    loaded = models.load(None, torch.device("cpu"))
    measured = {}
    with common.scratch(a.work, "ns-precision-") as work:
        for compute, store in SETTINGS:
            out = work / f"{compute}-{store}.zarr"
            shutil.rmtree(out, ignore_errors=True)
            extract([str(common.DATA)], str(out), model=loaded,
                    options=ExtractOptions(sites=["resid", "mlp"], dtype=compute, store_dtype=store, device="cpu"))
            measured[(compute, store)] = measure(out)
    ref = measured[SETTINGS[0]]
    rows = {f"{c}/{s}": compare(ref, measured[(c, s)]) for c, s in SETTINGS[1:]}
    lines = ["| compute / store | LAPE Jaccard (all / per language) | contrast top-20 Jaccard | variance max / median rel. diff | variance top-20 Jaccard | non-finite |",
             "|---|---:|---:|---:|---:|---:|"]
    tiny = rows[next(iter(rows))]["tiny_neurons"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['lape_jaccard']:.3f} / {r['lape_jaccard_per_lang']:.3f} | {r['contrast_top20_jaccard']:.3f} | "
                     f"{r['variance_max_rel_diff']:.2%} / {r['variance_median_rel_diff']:.2%} | {r['variance_top20_jaccard']:.2f} | {r['nonfinite']} |")
    table = "\n".join(lines)
    print("Against float32 compute and float32 storage (packaged MiniLM, sample corpus, resid + mlp); variance of the"
          f" last resid layer by label, z-scored within language, over neurons above 1% of the largest variance, less {tiny}"
          " neuron(s) whose values stay below float16's smallest normal number (6.1e-5):\n")
    print(table)
    path = common.save_results({"benchmark": "precision", "quick": False, "machine": common.machine(None, torch.get_num_threads()),
                                "rows": rows, "table_markdown": table}, "precision", Path(a.results))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
