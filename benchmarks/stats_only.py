"""Stats-only extraction (``extract --stats-only``) against the bare forward pass and a full store.

    python -m benchmarks.stats_only            # packaged MiniLM, 300 mixed-length documents, 2 repeats (~4-7 min on 2 shared CPU cores)
    python -m benchmarks.stats_only --quick    # CI-sized: 48 documents, one repeat, no extraction warm-up

One loaded model (loading is never timed: ``extract()`` gets the LoadedModel), sites resid + mlp,
every token and the pooled first and mean vectors, float16 store dtype. Rows, side by side in one
run, interleaved over repeats (best of each row kept: the machine is shared):

- bare: the forward pass alone (``output_hidden_states=True``) over exactly the batches the
  extraction runs (the same windows and batch plan, as ``benchmarks/gpu.py`` does), tokenised
  before the clock;
- stats: ``extract --stats-only`` with the quantile sketch (the default);
- stats_nosketch: ``extract --stats-only --no-sketch``;
- full: a full extraction, lz4 (the default codec), for reference.

The extraction rows are timed on ``stages["loop"]`` (first forward to the last commit: tokenising
and creating the store are left out, as for the bare row); ``x bare`` is bare seconds / row
seconds, and ``forward share`` the row's own forward seconds / its loop seconds (the same ratio
measured inside one row, which a busy moment of a shared machine between rows cannot skew). ``commit_seconds`` is set far beyond the run, so only the final commit happens: its cost
(writing the statistics whole) is fixed per store, not per token, and is reported apart.

Sizes on disk per million tokens: a stats-only store's statistics (``stats/``) depend on the
cells (token kinds x languages x labels), not on the corpus size, and are reported apart from its
per-sentence and per-token tables (``docs/`` + ``tokens/``), which grow with it; the full store's
activations are ``acts/`` + ``pooled/``. The 7B extrapolation uses ``neurostore.live.stats_bytes``.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks import common
from benchmarks import extract as extract_bench
from benchmarks.extract import texts_of

ROWS = ("bare", "stats", "stats_nosketch", "full")
LABELS = {
    "bare": "bare forward (ceiling)",
    "stats": "extract --stats-only (sketch)",
    "stats_nosketch": "extract --stats-only --no-sketch",
    "full": "full extraction (lz4)",
}
SITES = ["resid", "mlp"]
POOL = ["first", "mean"]
NEVER = 1e9  # commit_seconds: only the final commit happens
# LLaMA-2-7B: resid is the 33 hidden states (embeddings + 32 layers) x 4096, mlp 32 layers x 11008
LLAMA_7B = {"resid": (33, 4096), "mlp": (32, 11008)}
FULL_MB_PER_TOKEN_7B = {"mlp": 32 * 11008 * 2 / 1e6, "resid": 33 * 4096 * 2 / 1e6}  # float16: 0.70 + 0.27 MB


def plan(loaded, corpus: Path, batch_tokens: int):
    """The token ids and the batches a full or stats-only extraction of resid + mlp runs on this
    corpus (both modes plan the same windows): the bare row runs exactly this list."""
    from neurostore import batching, models
    from neurostore import extract as ex

    ids, _ = batching.tokenize(loaded.tokenizer, texts_of(corpus), loaded.max_length())
    n_tokens = np.array([len(x) for x in ids], dtype=np.int64)
    sites = models.resolve_sites(loaded, SITES, None, None)
    per_row = sum(len(s.layers) * s.width * 2 for s in sites.values())  # float16
    opts = ex.ExtractOptions(sites=SITES, pool=POOL, tokens=True, max_batch_tokens=batch_tokens)
    opts.buffer_mb = batching.default_buffer_mb(loaded.device, batch_tokens, per_row)
    windows = ex.plan_windows(n_tokens, per_row, opts)
    return ids, n_tokens, [b for p in ex.plan_batches(n_tokens, windows, opts, batching.PLAN_VERSION) for b in p]


def _sync(loaded) -> None:
    if loaded.device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def row_bare(loaded, ids, batches) -> dict:
    import torch

    from neurostore import batching, models

    compute = models.resolve_dtype(None, loaded.device, loaded.config)
    _sync(loaded)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for docs in batches:
            x, mask = batching.pad([ids[i] for i in docs], loaded.pad_id, loaded.device)
            with models.autocast(loaded.device, compute):
                loaded.model(input_ids=x, attention_mask=mask, output_hidden_states=True)
    _sync(loaded)
    return {"seconds": time.perf_counter() - t0}


def row_extract(loaded, corpus: Path, out: Path, batch_tokens: int, **mode) -> dict:
    from neurostore import extract as ex

    shutil.rmtree(out, ignore_errors=True)
    opts = ex.ExtractOptions(sites=SITES, pool=POOL, tokens=True, max_batch_tokens=batch_tokens, compression="lz4",
                             commit_seconds=NEVER, **mode)
    _sync(loaded)
    res = ex.extract([str(corpus)], str(out), model=loaded, options=opts)
    _sync(loaded)
    st = res.stages
    folders = {name: common.dir_bytes(out / name) if (out / name).exists() else 0 for name in ("stats", "docs", "tokens", "acts", "pooled")}
    return {
        "seconds": st["loop"], "total_seconds": res.seconds, "tokens": int(res.tokens),
        "stages": {k: v for k, v in st.items() if isinstance(v, float)},
        "commit_seconds": st.get("commit", 0.0),
        "disk_bytes": common.dir_bytes(out), "folders": folders,
        "cells": _cells(out) if mode.get("stats_only") else None,
    }


def _cells(store: Path) -> dict:
    """Cells per stream of a stats-only store (rows of each ``stats/<entry>/<site>/<rows>/cells``)."""
    import json

    out = {}
    for path in sorted(store.glob("stats/*/*/*/cells/zarr.json")):
        site, rows = path.parent.parent.parent.name, path.parent.parent.name
        out[f"{site}/{rows}"] = int(json.loads(path.read_text())["shape"][0])
    return out


def stats_bytes_for(sites: dict[str, tuple[int, int]], token_cells: int, doc_cells: int, *, sketch: bool, k: int) -> int:
    """Raw bytes of a stats-only store's statistics (``neurostore.live.stats_bytes``): cells x
    neurons x bytes per neuron-cell, summed over the token stream and each pooling."""
    from neurostore import live

    meta = {"stats": {"sketch": sketch, "k": k}, "tokens": True, "pool": POOL,
            "sites": {name: {"layers": list(range(n)), "width": w} for name, (n, w) in sites.items()}}
    cells = {"tokens": SimpleNamespace(table=np.zeros((token_cells, 3)), rows=np.zeros(token_cells, np.int64)),
             "docs": SimpleNamespace(table=np.zeros((doc_cells, 3)), rows=np.zeros(doc_cells, np.int64))}
    return sum(raw for _, raw, _ in live.stats_bytes(meta, cells).values())


def per_neuron_cell(sketch: bool, k: int) -> int:
    """Bytes of one neuron in one cell (one stream of one 1-neuron layer, one cell)."""
    return stats_bytes_for({"x": (1, 1)}, 1, 0, sketch=sketch, k=k)


def run(loaded, corpus: Path, work: Path, repeats: int, batch_tokens: int, rows: list[str], k: int,
        warm_up: bool = True) -> tuple[list[dict], int]:
    """Every row ``repeats`` times, interleaved (A B C ... A B C ...), after one bare pass and (with
    ``warm_up``) one small extraction per row; returns the rows and the number of batches."""
    ids, n_tokens, batches = plan(loaded, corpus, batch_tokens)
    modes = {"stats": {"stats_only": True, "sketch": True, "k": k}, "stats_nosketch": {"stats_only": True, "sketch": False, "k": k}, "full": {}}
    # warm-up: first-call costs (kernels, thread pools, zarr, imports) stay out of every row
    row_bare(loaded, ids, batches)
    if warm_up:
        warm = work / "warmup.jsonl"
        warm.write_text("".join(corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:16]), encoding="utf-8")
        for row in rows:
            if row != "bare":
                row_extract(loaded, warm, work / "warmup.zarr", batch_tokens, **modes[row])
        shutil.rmtree(work / "warmup.zarr", ignore_errors=True)
    results = []
    for rep in range(repeats):
        for row in rows:
            gc.collect()
            if row == "bare":
                r = {**row_bare(loaded, ids, batches), "tokens": int(n_tokens.sum()), "batches": len(batches)}
            else:
                r = row_extract(loaded, corpus, work / f"{row}.zarr", batch_tokens, **modes[row])
                shutil.rmtree(work / f"{row}.zarr", ignore_errors=True)
            r.update(row=row, repeat=rep, tokens_per_s=r["tokens"] / r["seconds"])
            results.append(r)
            print(f"  [rep {rep + 1}/{repeats}] {row:15s} {r['seconds']:7.2f} s  {r['tokens_per_s']:,.0f} tok/s", flush=True)
    return results, len(batches)


def summarise(results: list[dict]) -> dict:
    """Best (fastest) repeat of each row; x bare against the best bare."""
    out = {}
    for row in dict.fromkeys(r["row"] for r in results):
        mine = [r for r in results if r["row"] == row]
        best = min(mine, key=lambda r: r["seconds"])
        out[row] = {**best, "seconds_all": [r["seconds"] for r in mine]}
    bare = out.get("bare")
    for row, s in out.items():
        s["x_bare"] = bare["seconds"] / s["seconds"] if bare else None
        commit = s.get("commit_seconds") or 0.0
        # the final commit writes the statistics whole: a cost per store, not per token
        # the row's own forward time over its loop: x bare measured inside one run of the row, so a
        # slow moment of the shared machine between rows does not move it
        s["forward_share"] = s["stages"]["forward"] / s["seconds"] if "forward" in s.get("stages", {}) else None
        s["x_bare_without_commit"] = bare["seconds"] / (s["seconds"] - commit) if bare and commit and s["seconds"] > commit else s["x_bare"]
    return out


def sizes(summary: dict) -> dict:
    """Bytes on disk per million tokens: full store and stats-only store, activations or
    statistics apart from the tables."""
    out = {}
    for row in ("stats", "stats_nosketch", "full"):
        s = summary.get(row)
        if not s:
            continue
        f, per_m = s["folders"], 1e6 / s["tokens"]
        tables = f["docs"] + f["tokens"]
        out[row] = {
            "tokens": s["tokens"],
            "disk_bytes": s["disk_bytes"],
            "tables_bytes": tables,
            "tables_mb_per_mtok": tables * per_m / 1e6,
            "stats_bytes": f["stats"],  # ~constant in corpus size: grows with the cells
            "activation_bytes": f["acts"] + f["pooled"],
            "activation_mb_per_mtok": (f["acts"] + f["pooled"]) * per_m / 1e6,
            "mb_per_mtok": s["disk_bytes"] * per_m / 1e6 if row == "full" else None,
            "cells": s.get("cells"),
        }
    full, stats = out.get("full"), out.get("stats")
    if full and stats and full["activation_bytes"]:
        # corpus size (tokens) above which the full store is the larger one
        out["break_even_tokens"] = stats["stats_bytes"] / (full["activation_bytes"] / full["tokens"])
    return out


def seven_b(summary: dict, langs: int, k: int) -> dict:
    """LLaMA-2-7B on paper: raw statistics bytes (cells x neurons x bytes per neuron-cell) for a
    corpus of ``langs`` languages without labels, against a full store's 0.70 + 0.27 MB a token."""
    neurons = sum(n * w for n, w in LLAMA_7B.values())
    token_cells, doc_cells = 2 * langs, langs  # token kinds (text, special) x languages; pooled: languages
    out = {"neurons": neurons, "token_cells": token_cells, "doc_cells_per_pooling": doc_cells, "poolings": len(POOL), "k": k,
           "full_mb_per_token": sum(FULL_MB_PER_TOKEN_7B.values()), "full_mb_per_token_parts": FULL_MB_PER_TOKEN_7B}
    for sketch in (True, False):
        key = "sketch" if sketch else "no_sketch"
        raw = stats_bytes_for(LLAMA_7B, token_cells, doc_cells, sketch=sketch, k=k)
        out[key] = {"bytes_per_neuron_cell": per_neuron_cell(sketch, k), "raw_bytes": raw,
                    "break_even_tokens": raw / (out["full_mb_per_token"] * 1e6)}
        measured = summary.get("stats" if sketch else "stats_nosketch")
        if measured and measured.get("cells"):  # the measured store's statistics on disk against their raw bytes
            out[key]["measured_disk_over_raw"] = measured["folders"]["stats"] / _raw_measured(measured, sketch, k)
    out["formula"] = ("stats bytes = sum over streams (token rows, each pooling) of cells x neurons x bytes per neuron-cell; "
                      "bytes per neuron-cell = 6 x 8 (moments) + 128 x 4 (sketch, if kept) + 16 x k (top-k value and row)")
    return out


def _raw_measured(measured: dict, sketch: bool, k: int) -> int:
    widths = measured["site_shapes"]
    cells = measured["cells"]
    total = 0
    for stream, c in cells.items():
        site = stream.split("/")[0]
        n, w = widths[site]
        total += c * n * w * per_neuron_cell(sketch, k)
    return total


def render(summary: dict, size: dict, big: dict, corpus: dict, a) -> str:
    lines = [f"{corpus['model']}, resid + mlp, every token + pooled first,mean, float16; {corpus['docs']} documents, "
             f"{corpus['tokens']:,} tokens, {corpus['batches']} batches of <= {a.batch_tokens} padded tokens; best of {corpus['repeats']} repeat(s), "
             f"{corpus['threads']} torch threads on {corpus['device']}; only the final commit (commit_seconds={NEVER:g})", "",
             "| row | seconds (best) | tokens/s | x bare | x bare without the final commit | forward share | forward | gather | reduce | commit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row, s in summary.items():
        st = s.get("stages", {})
        cell = lambda key: f"{st[key]:.2f}" if key in st else "-"  # noqa: E731
        lines.append(f"| {LABELS[row]} | {s['seconds']:.2f} | {s['tokens_per_s']:,.0f} | {common.fmt(s['x_bare'], 2)} | "
                     f"{common.fmt(s['x_bare_without_commit'], 2) if s.get('commit_seconds') else '-'} | {common.fmt(s.get('forward_share'), 2)} | "
                     f"{cell('forward')} | {cell('gather')} | "
                     f"{cell('reduce')} | {cell('commit')} |")
    lines += ["", "| store | on disk | statistics (constant in corpus size) | tables (docs/ + tokens/) per M tokens | activations per M tokens | cells (token / pooled) |",
              "|---|---:|---:|---:|---:|---|"]
    for row in ("stats", "stats_nosketch", "full"):
        z = size.get(row)
        if not z:
            continue
        c = z["cells"] or {}
        cells = f"{c.get('resid/tokens', '-')} / {c.get('resid/first', '-')}" if c else "-"
        stats = f"{z['stats_bytes'] / 1e6:,.1f} MB" if z["stats_bytes"] else "-"
        acts = f"{z['activation_mb_per_mtok'] / 1e3:,.1f} GB" if z["activation_bytes"] else "-"
        lines.append(f"| {LABELS[row]} | {z['disk_bytes'] / 1e6:,.1f} MB | {stats} | {z['tables_mb_per_mtok']:,.0f} MB | {acts} | {cells} |")
    if "break_even_tokens" in size:
        lines.append(f"\nA full store of this model outgrows the stats-only statistics above {size['break_even_tokens']:,.0f} tokens.")
    if big:
        s, n = big["sketch"], big["no_sketch"]
        est = lambda d: (f" (this run's statistics took {d['measured_disk_over_raw']:.2f} of their raw bytes on disk; a large corpus fills "  # noqa: E731
                         "more sketch bins and top-k rows, so raw is the bound to plan with)") if "measured_disk_over_raw" in d else ""
        lines += ["", f"LLaMA-2-7B on paper ({big['neurons']:,} neurons: 32 x 11008 mlp + 33 x 4096 resid; {a.langs_7b} languages, no labels: "
                  f"{big['token_cells']} token cells, {big['doc_cells_per_pooling']} per pooling x {big['poolings']}; k = {big['k']}): "
                  f"{big['formula']}.",
                  f"- with the sketch: {s['bytes_per_neuron_cell']} bytes per neuron-cell -> {s['raw_bytes'] / 1e9:,.1f} GB raw{est(s)}; "
                  f"a full store ({big['full_mb_per_token']:.2f} MB a token) is larger above {s['break_even_tokens']:,.0f} tokens",
                  f"- without the sketch: {n['bytes_per_neuron_cell']} bytes per neuron-cell -> {n['raw_bytes'] / 1e9:,.1f} GB raw{est(n)}; "
                  f"break-even {n['break_even_tokens']:,.0f} tokens",
                  f"- 100M tokens per language, {a.langs_7b} languages: a full store holds {big['full_mb_per_token'] * 1e8 * a.langs_7b / 1e6:,.0f} TB"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stats_only", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized: 48 documents, one repeat, no extraction warm-up.")
    p.add_argument("--docs", type=int, default=None, help="Documents in the mixed-length corpus (default 300; quick 48).")
    p.add_argument("--repeats", type=int, default=None, help="Interleaved repeats; the best of each row is kept (default 2; quick 1).")
    p.add_argument("--rows", default=",".join(ROWS), help="Rows to run, comma-separated.")
    p.add_argument("--model", default=None, help="Model folder (default: the packaged all-MiniLM-L6-v2).")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA the reductions run on the device).")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores).")
    p.add_argument("--batch-tokens", type=int, default=512, help="Padded tokens per batch (neurostore's CPU default).")
    p.add_argument("--k", type=int, default=None, help="Top rows kept per neuron in the stats-only rows (default: neurostore's, 20).")
    p.add_argument("--langs-7b", type=int, default=7, help="Languages of the LLaMA-2-7B extrapolation (LAPE's study: 7).")
    p.add_argument("--work", default=None, help="Scratch folder (kept; default: a temporary folder, removed).")
    p.add_argument("--results", default=str(common.RESULTS), help="Folder for the results JSON.")
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from neurostore import models, statsonly

    a.threads = a.threads or os.cpu_count() or 1
    torch.set_num_threads(a.threads)
    docs = a.docs or (48 if a.quick else 300)
    repeats = a.repeats or (1 if a.quick else 2)
    rows = [r for r in a.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {', '.join(unknown)} (use {', '.join(ROWS)})")
    k = statsonly.DEFAULT_K if a.k is None else a.k
    started = time.perf_counter()
    loaded = models.load(a.model, torch.device(a.device))  # before any clock
    with common.scratch(a.work, "ns-statsonly-") as work:
        corpus = extract_bench.make_corpus(work / f"corpus-{docs}.jsonl", docs)
        results, n_batches = run(loaded, corpus, work, repeats, a.batch_tokens, rows, k, warm_up=not a.quick)
        machine = common.machine(work if a.work else None, torch.get_num_threads())
    summary = summarise(results)
    shapes = {name: (len(s.layers), s.width) for name, s in models.resolve_sites(loaded, SITES, None, None).items()}
    for s in summary.values():
        s["site_shapes"] = shapes
    size = sizes(summary)
    big = seven_b(summary, a.langs_7b, k)
    any_row = next(iter(summary.values()))
    corpus_info = {"model": Path(loaded.path).name if a.model else "packaged all-MiniLM-L6-v2", "docs": docs, "tokens": any_row["tokens"],
                   "batches": n_batches,
                   "repeats": repeats, "threads": torch.get_num_threads(), "device": a.device}
    table = render(summary, size, big, corpus_info, a)
    print("\n" + table)
    payload = {
        "benchmark": "stats_only",
        "quick": a.quick,
        "command": "python -m benchmarks.stats_only " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "settings": {"sites": SITES, "pool": POOL, "tokens": True, "store_dtype": "float16", "compression": "lz4", "k": k,
                     "batch_tokens": a.batch_tokens, "commit_seconds": NEVER, "device": a.device, "threads": a.threads,
                     "timing": "extraction rows: stages['loop'] (first forward to the last commit); bare: the same batches, "
                               "tokenised before the clock; model loaded once, before any clock; best of the repeats"},
        "corpus": corpus_info,
        "summary": summary,
        "sizes": size,
        "llama_2_7b": big,
        "rows": results,
        "table_markdown": table,
        "wall_seconds": time.perf_counter() - started,
    }
    path = common.save_results(payload, "stats_only-quick" if a.quick else "stats_only", Path(a.results))
    print(f"\nresults: {path}  ({payload['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
