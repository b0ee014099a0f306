"""What leaving out special tokens (`--skip-special`) does to token-level results.

    python -m benchmarks.token_kinds        # packaged MiniLM, the sample corpus, resid + mlp (~1 min)

Extracts the sample corpus as ``neurostore demo`` does (packaged all-MiniLM-L6-v2, resid + mlp,
every token) and compares each token-level result with and without the special tokens ([CLS],
[SEP]): their share of the token rows per language, the LAPE language-specific sets (mlp), the
contrast selector's top 20 per label (mlp, token rows), the top 20 neurons by variance over label
means (token rows, first and last layer of each site), and how often [CLS]/[SEP] are among a
neuron's 20 top examples.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from benchmarks import common

SKIP = {"token_kind": ["text", "audio"]}  # what --skip-special sends to every query


def measure(path: Path) -> dict:
    from neurostore import query

    s = common.open_store(path)
    kind, doc = s.token_column("kind"), s.token_column("doc")
    lang, langs = s.doc_column("lang"), s.categories("lang")
    special = kind == 1
    out: dict = {"rows": int(len(kind)), "special_share": float(special.mean()),
                 "special_share_per_lang": {l: float(special[lang[doc] == i].mean()) for i, l in enumerate(langs)}}
    lape = [query.lape(s, "mlp", cache=False, where=w) for w in (None, SKIP)]
    sets = [{l: {tuple(x) for x in v} for l, v in r.neurons.items()} for r in lape]
    out["lape_sizes"] = [sum(map(len, x.values())) for x in sets]
    out["lape_jaccard"] = common.jaccard({(l, *x) for l, v in sets[0].items() for x in v}, {(l, *x) for l, v in sets[1].items() for x in v})
    out["lape_jaccard_per_lang"] = {l: common.jaccard(sets[0][l], sets[1].get(l, set())) for l in sets[0]}
    sel = [query.select(s, "mlp", by="label", method="contrast", top=20, rows="tokens", cache=False, where=w) for w in (None, SKIP)]
    out["contrast_top20_jaccard"] = float(np.mean([common.jaccard({(a, b) for a, b, _ in sel[0].selected[g]}, {(a, b) for a, b, _ in sel[1].selected[g]})
                                                   for g in sel[0].selected]))
    out["variance_top20_jaccard"] = {}
    for site in ("resid", "mlp"):
        layers = s.sites[site]["layers"]
        for layer in (layers[0], layers[-1]):
            top = [{n for n, _ in query.variance(s, site, layer, by="label", top=20, rows="tokens", cache=False, where=w).top} for w in (None, SKIP)]
            out["variance_top20_jaccard"][f"{site} L{layer}"] = common.jaccard(*top)
    last = s.sites["resid"]["layers"][-1]
    x = np.asarray(s.acts("resid")[:, s.layer_index("resid", last)].compute(), dtype=np.float64)
    top_rows = np.argsort(-x, axis=0, kind="stable")[:20]  # [20, width]: each neuron's 20 top examples
    out["top20_examples_special_share"] = float(special[top_rows].mean())
    out["neurons_topped_by_special"] = float(special[top_rows[0]].mean())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.token_kinds", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="Scratch folder (default: a temporary folder).")
    p.add_argument("--results", default=str(common.RESULTS), help="Folder for the results JSON.")
    a = p.parse_args(argv)
    import torch

    from neurostore.extract import ExtractOptions, extract

    with common.scratch(a.work, "ns-kinds-") as work:
        out = work / "emotions.zarr"
        shutil.rmtree(out, ignore_errors=True)
        extract([str(common.DATA)], str(out), options=ExtractOptions(sites=["resid", "mlp"], pool=["first", "mean"], device="cpu"))
        r = measure(out)
    per_lang = ", ".join(f"{l} {v:.1%}" for l, v in r["special_share_per_lang"].items())
    lines = [
        "| with vs without --skip-special | value |", "|---|---:|",
        f"| special-token rows | {r['special_share']:.1%} of {r['rows']:,} ({per_lang}) |",
        f"| LAPE sets (mlp): Jaccard all / per language | {r['lape_jaccard']:.3f} / "
        + " ".join(f"{l} {v:.2f}" for l, v in r["lape_jaccard_per_lang"].items()) + f" ({r['lape_sizes'][0]} -> {r['lape_sizes'][1]} neurons) |",
        f"| contrast selector (mlp, token rows): top-20 Jaccard, mean over labels | {r['contrast_top20_jaccard']:.3f} |",
        *[f"| variance over label means (token rows, {k}): top-20 Jaccard | {v:.2f} |" for k, v in r["variance_top20_jaccard"].items()],
        f"| [CLS]/[SEP] among a neuron's top-20 examples (resid, last layer) | {r['top20_examples_special_share']:.1%}; "
        f"the top example of {r['neurons_topped_by_special']:.0%} of neurons |",
    ]
    table = "\n".join(lines)
    print("Token-level results with all token rows (the default) against --skip-special (packaged MiniLM, sample corpus):\n")
    print(table)
    path = common.save_results({"benchmark": "token_kinds", "quick": False, "machine": common.machine(None, torch.get_num_threads()),
                                "rows": r, "table_markdown": table}, "token_kinds", Path(a.results))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
