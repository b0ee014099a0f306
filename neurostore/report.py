"""The neuron browser: one self-contained HTML page per neuron set (``neurostore report``).

Why this shape: researchers would rather look than read ``[layer, neuron, score]`` lists. The page
is built from what the store already answers cheaply:

- the grouped statistics of the selection (:func:`neurostore.moments.group_moments`, cached in the
  store; for a stats-only store they are its data): mean z per language x label (z within language,
  :func:`neurostore.analysis.zscore_moments`), P(x > 0), and the quantile sketch for the
  distributions;
- one bounded read per needed layer for the examples: every chunk of a layer is read once and the
  top-k sentences of *all* requested neurons of that layer are kept (a sentence ranks by its highest
  token); then the token rows of the example sentences are read (only the chunks holding them) to
  shade every token by its value on the neuron. A stats-only store keeps each neuron's top rows but
  no activations: its examples show the maximal token marked, without shading, and the page says so.

The page draws its figures itself from compact inline data (a matplotlib SVG per neuron is ~113 KB,
so 100 neurons would pass 10 MB) and shows corpus text as text. It loads nothing from the network.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import analysis as an
from . import chunks as ch
from . import moments as mo
from . import sketch as sk
from . import statsonly
from . import store as st
from .errors import NeurostoreError
from .neurons import NeuronSet, check_neuron_set, load_neuron_set
from .plan import MISSING, RunOptions, default_rows, resolve
from .provenance import provenance, rows_words
from .results import check_count

# Token rows merged into one read of a token table when the gap between two example sentences is
# smaller than this (a table chunk is read once, not once per sentence).
TABLE_GAP = 1 << 16
# Significant digits of the values written into the page (shading needs no more).
DIGITS = 4

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class Report:
    """What the page shows (``data`` is the page's inline JSON) and how long it took."""

    data: dict
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# the workflow


def report(
    store: st.Store, neurons: str | NeuronSet, out: str | os.PathLike, *, site: str | None = None, group: str | None = None,
    k: int = 20, rows: str | None = None, by: str = "label", lang: Sequence[str] | None = None,
    label: Sequence[str] | None = None, where: dict[str, Sequence[str]] | None = None,
    token_kind: Sequence[str] | None = None, quantity: str = "activation", title: str | None = None,
    workers: int | None = None, cache: bool = True, progress: Progress | None = None,
) -> Report:
    """Build the report of ``neurons`` (a ``--neurons`` spec as ``intervene`` takes it, or a set)
    and write it to ``out``; returns the report (its data and the time taken)."""
    t0 = time.perf_counter()
    check_out(out)
    scores: dict[tuple[int, int], float] = {}
    score_name = "score"
    if isinstance(neurons, str):
        spec = neurons
        neurons = load_neuron_set(spec, site=site, group=group)
        scores, score_name = set_scores(spec, group)
    rep = build(store, neurons, scores=scores, score_name=score_name, k=k, rows=rows, by=by, lang=lang, label=label,
                where=where, token_kind=token_kind, quantity=quantity, title=title, workers=workers, cache=cache,
                progress=progress)
    write(rep, out)
    rep.seconds = time.perf_counter() - t0
    return rep


def set_scores(spec: str, group: str | None = None) -> tuple[dict[tuple[int, int], float], str]:
    """The scores a query JSON gives its neurons (select: ``[layer, neuron, score]``; variance:
    ``[neuron, value]``), keyed by (layer, neuron), and the score's name; empty for lists and sets
    without scores (LAPE, polyglot)."""
    path = Path(spec)
    try:
        if not path.is_file():
            return {}, "score"
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, "score"  # load_neuron_set has already said what is wrong with it
    out: dict[tuple[int, int], float] = {}
    name = str((obj.get("provenance") or {}).get("analysis") or "score")
    if isinstance(obj.get("selected"), dict):
        name = f"{obj.get('method', 'select')} score"
        entries = obj["selected"].items() if group is None else [(group, obj["selected"].get(group) or [])]
        for _, rows_ in entries:
            for row in rows_:
                if isinstance(row, list) and len(row) == 3:
                    key = (int(row[0]), int(row[1]))
                    out[key] = max(out.get(key, -math.inf), float(row[2]))
    elif "top" in obj and isinstance(obj.get("layer"), int):
        top = obj["top"]
        if isinstance(top, dict):
            top = top.get(group, []) if group is not None else [r for v in top.values() for r in v]
        for row in top:
            if isinstance(row, list) and len(row) == 2 and row[1] is not None:
                key = (obj["layer"], int(row[0]))
                out[key] = max(out.get(key, -math.inf), float(row[1]))
    return out, name


def build(
    store: st.Store, neurons: NeuronSet, *, scores: dict[tuple[int, int], float] | None = None, score_name: str = "score",
    k: int = 20, rows: str | None = None, by: str = "label", lang=None, label=None, where=None, token_kind=None,
    quantity: str = "activation", title: str | None = None, workers: int | None = None, cache: bool = True,
    progress: Progress | None = None,
) -> Report:
    """The page's data: statistics of every neuron of the set, and its top-k example sentences.

    ``rows``: the rows of the statistics (default: the library's, mean-pooled sentences when
    stored); examples are token rows where the store has them (sentences otherwise).
    ``token_kind``: the token rows kept for the examples (and for the statistics when they are
    token rows)."""
    check_count(k, "--k")
    if by == "lang":
        raise NeurostoreError("--by lang: the report shows languages already (the heatmap's rows, the per-language columns); "
                              "group by another column (--by label, or a stored categorical such as pred)")
    if not neurons.n:
        raise NeurostoreError(f"--neurons: the set from {neurons.source or 'the list'} is empty; nothing to report")
    site = neurons.site
    if site not in store.sites:
        raise NeurostoreError(f"--neurons: site {site!r} is not in the store (stored: {', '.join(store.sites)})")
    spec = store.site(site)
    check_neuron_set(neurons, spec["layers"], int(spec["width"]))
    layers = sorted(neurons.layers)
    stats_only = statsonly.is_stats_only(store)
    rows = rows or default_rows(store)
    where = dict(where or {})
    stat_kinds = token_kind if rows == "tokens" else None
    plan = resolve(store, site, layers, rows=rows, by=by, lang=lang, label=label, where=where, token_kind=stat_kinds, quantity=quantity)
    notes: list[str] = []
    if token_kind and rows != "tokens":
        notes.append(f"--token-kind {','.join(token_kind)} filters the examples (token rows); the statistics are {rows_words(rows)}")
    sketch = not (stats_only and not statsonly.settings(store)["sketch"])
    if not sketch:
        notes.append("no distributions: this stats-only store was extracted without the quantile sketch (--no-sketch)")
    mom = _statistics(store, plan, neurons, sketch, RunOptions(None, workers, cache), progress)
    if not (mom.count > 0).any():
        raise NeurostoreError("report: no rows selected (widen --lang/--label/--where, or check --by)")

    ex_rows = "tokens" if store.meta["tokens"] else rows
    ex_plan = resolve(store, site, layers, rows=ex_rows, by=None, lang=lang, label=label, where=where,
                      token_kind=token_kind if ex_rows == "tokens" else None, quantity=quantity)
    shaded = not stats_only and ex_rows == "tokens"
    if stats_only:
        notes.append("stats-only store: no activations are stored, so each example shows its maximal token marked, without per-token shading")
        kept_k = statsonly.check_k(store, k)
        starts = store.doc_column("token_start").astype(np.int64) if ex_rows == "tokens" else None
        found = {(layer, n): _stats_only_top(store, ex_plan.with_layers([layer]), n, k, kept_k, starts)
                 for layer in layers for n in neurons.layers[layer]}
        short = sum(len(hits) < min(k, store.n_docs) for hits in found.values())
        if short:
            notes.append(f"stats-only store: {short} neuron(s) show fewer than {k} sentences, because the top "
                         f"{kept_k} rows it kept per neuron fall in fewer sentences (extract with a larger --k)")
    elif ex_rows != "tokens":
        notes.append(f"the store has no token rows (--no-tokens): examples are {rows_words(ex_rows)}, without per-token shading")
        found = _top_docs(store, ex_plan, neurons, k, workers, progress)
    else:
        found = _top_docs(store, ex_plan, neurons, k, workers, progress)

    docs = sorted({d for hits in found.values() for d, _, _ in hits})
    doc_info = _doc_tables(store, docs, ex_rows == "tokens")
    shading: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    if shaded:
        shading = _token_values(store, ex_plan, neurons, found, workers, progress)
    data = _page_data(store, neurons, mom, plan, found, doc_info, shading, scores or {}, score_name, k, title, notes,
                      quantity=quantity, ex_rows=ex_rows, ex_plan=ex_plan)
    return Report(data, notes=notes)


def _statistics(store: st.Store, plan: Any, neurons: NeuronSet, sketch: bool, run: RunOptions, progress: Progress | None) -> mo.GroupMoments:
    """The grouped statistics of the set's neurons, one layer at a time (cached per layer in the
    store), kept for those neurons only: one layer axis, the set's neurons in layer order as the
    width (memory: one layer's sketch, whatever the number of layers)."""
    parts = []
    layers = sorted(neurons.layers)
    for i, layer in enumerate(layers):
        m = mo.group_moments(store, plan.with_layers([layer]), quantiles=sketch, run=run)
        take = np.asarray(neurons.layers[layer], np.int64)
        parts.append(m)
        for key in ("mean", "m2", "pos", "vmin", "vmax", "hist"):
            if getattr(m, key) is not None:
                setattr(m, key, getattr(m, key)[:, :, :, take])
        if progress:
            progress("statistics", i + 1, len(layers))
    cat = {key: np.concatenate([getattr(m, key) for m in parts], axis=3) for key in ("mean", "m2", "pos", "vmin", "vmax")}
    hist = np.concatenate([m.hist for m in parts], axis=3) if sketch else None
    return mo.GroupMoments(plan.selection, parts[0].langs, parts[0].groups, [0], parts[0].count, hist=hist, **cat)


# ----------------------------------------------------------------------------------------------
# examples: the top-k sentences of every neuron of a layer in one read of the layer


def _part_rows(store: st.Store, tokens: bool) -> list[tuple[int, int, int, np.ndarray]]:
    """Per part: (row shift, doc shift, committed rows, each local sentence's first local row)."""
    out, row_shift, doc_shift = [], 0, 0
    for group, meta in zip(store.groups, store.metas):
        n_docs = meta["committed_docs"]
        n_rows = meta["committed_tokens" if tokens else "committed_docs"]
        starts = np.asarray(ch.read_zarr(group["docs/token_start"], slice(0, n_docs), 0, n_docs), np.int64) if tokens else np.arange(n_docs, dtype=np.int64)
        out.append((row_shift, doc_shift, n_rows, starts))
        row_shift += n_rows
        doc_shift += n_docs
    return out


def _chunk_best(values: np.ndarray, docs: np.ndarray, keep: np.ndarray, k: int, row0: int) -> list[tuple]:
    """Per column of ``values [rows, m]``: the ``k`` sentences with the highest row (``docs`` the
    sentence of each row, contiguous runs), as (max values, docs, row of the max) arrays, highest
    first, ties by lowest sentence. Rows not ``keep`` never count."""
    if not keep.any():
        return [(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))] * values.shape[1]
    v = np.where(keep[:, None], values, -np.inf)
    run = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
    run_max = np.maximum.reduceat(v, run, axis=0)  # [runs, m]
    run_doc = docs[run]
    bounds = np.r_[run, len(docs)]
    out = []
    for j in range(v.shape[1]):
        col = run_max[:, j]
        ok = np.isfinite(col)
        idx = np.flatnonzero(ok)
        order = idx[np.lexsort((run_doc[idx], -col[idx]))[:k]]
        arg = np.array([bounds[r] + int(np.argmax(v[bounds[r]:bounds[r + 1], j])) for r in order], np.int64)
        out.append((col[order], run_doc[order], arg + row0))
    return out


def _merge_best(parts: Sequence[tuple], k: int) -> tuple:
    """Merge per-sentence maxima (a sentence may appear in several chunks: keep its highest, ties
    by lowest row), then the top ``k``, highest first, ties by lowest sentence."""
    vals = np.concatenate([p[0] for p in parts])
    docs = np.concatenate([p[1] for p in parts]).astype(np.int64)
    rows = np.concatenate([p[2] for p in parts]).astype(np.int64)
    if not len(vals):
        return vals, docs, rows
    order = np.lexsort((rows, -vals, docs))  # per sentence: its highest value first
    first = np.r_[True, docs[order][1:] != docs[order][:-1]]
    pick = order[first]
    best = pick[np.lexsort((docs[pick], -vals[pick]))[:k]]
    return vals[best], docs[best], rows[best]


def _layer_tasks(store: st.Store, plan: Any, layer: int, columns: list[int], k: int) -> list[Callable[[], list[tuple]]]:
    """One task per block of rows (within a shard) of every part: read the layer's chunks there
    once and keep the top sentences of each requested neuron (``columns``)."""
    sel = plan.selection
    tokens = sel.rows == "tokens"
    li = store.layer_index(sel.site, layer)
    keep_docs = plan.codes >= 0
    tasks = []
    for p, ((row_shift, doc_shift, n_rows, starts), group) in enumerate(zip(_part_rows(store, tokens), store.groups)):
        src = ch.source(group[st.array_path(sel.site, sel.rows, sel.quantity)])
        kind_arr = group["tokens/kind"] if tokens and sel.token_kind is not None else None
        codes = mo.kind_codes(group, sel.token_kind) if kind_arr is not None else None
        for lo, hi in mo._task_rows(n_rows, *ch.step(src)):
            def task(src=src, lo=lo, hi=hi, starts=starts, doc_shift=doc_shift, row_shift=row_shift, kind_arr=kind_arr, codes=codes):
                parts = [[] for _ in columns]
                for a, b, _, values in ch.blocks(src, lo, hi, [li]):
                    x = st.decode(values[:, columns], store.store_dtype).astype(np.float64)
                    docs = (np.searchsorted(starts, np.arange(a, b), side="right") - 1) + doc_shift
                    keep = keep_docs[docs]
                    if kind_arr is not None:
                        keep = keep & np.isin(ch.read_zarr(kind_arr, slice(a, b), a, b), codes)
                    for j, best in enumerate(_chunk_best(x, docs, keep, k, a + row_shift)):
                        parts[j].append(best)
                return [_merge_best(p, k) for p in parts]
            tasks.append(task)
    return tasks


def _run(tasks: list[Callable], workers: int | None, progress: Progress | None, stage: str) -> list:
    done, out = 0, []
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = [pool.submit(t) for t in tasks]
        for f in futures:
            out.append(f.result())
            done += 1
            if progress:
                progress(stage, done, len(tasks))
    return out


def _top_docs(store: st.Store, plan: Any, neurons: NeuronSet, k: int, workers: int | None, progress: Progress | None) -> dict:
    """``{(layer, neuron): [(doc, value, row of the max)]}``: each layer read once for all its neurons."""
    tasks, owners = [], []
    for layer in sorted(neurons.layers):
        cols = list(neurons.layers[layer])
        for t in _layer_tasks(store, plan, layer, cols, k):
            tasks.append(t)
            owners.append((layer, cols))
    results = _run(tasks, workers, progress, "examples")
    merged: dict[tuple[int, int], list] = {}
    for (layer, cols), res in zip(owners, results):
        for n, best in zip(cols, res):
            merged.setdefault((layer, n), []).append(best)
    out = {}
    for key, parts in merged.items():
        v, d, r = _merge_best(parts, k)
        out[key] = [(int(a), float(b), int(c)) for a, b, c in zip(d, v, r)]
    return out


def _stats_only_top(store: st.Store, plan: Any, neuron: int, k: int, kept_k: int,
                    starts: np.ndarray | None) -> list[tuple[int, float, int]]:
    """The kept top rows of a stats-only store as sentences (a sentence once, at its highest row).

    All the kept rows are read, not k: a sentence may hold several of the top rows. The top k
    sentences among them are exact when they number k or more (a sentence with no kept row has its
    best row below every kept one); fewer, and the page says so. ``starts``: each sentence's first
    token row (token rows), read once for all neurons."""
    found = statsonly.top_rows(store, plan, neuron, kept_k)
    if not found:
        return []
    rows = np.array([r for r, _ in found], np.int64)
    vals = np.array([v for _, v in found])
    if plan.rows == "tokens":
        docs = np.searchsorted(starts, rows, side="right") - 1
    else:
        docs = rows
    v, d, r = _merge_best([(vals, docs, rows)], k)
    return [(int(a), float(b), int(c)) for a, b, c in zip(d, v, r)]


def _token_values(store: st.Store, plan: Any, neurons: NeuronSet, found: dict, workers: int | None,
                  progress: Progress | None) -> dict[tuple[int, int], dict[int, np.ndarray]]:
    """Every token's value on the neuron, for the example sentences of each neuron: per layer, the
    chunks holding those sentences are read once for all the layer's neurons."""
    sel = plan.selection
    starts_all = store.doc_column("token_start").astype(np.int64)
    n_tok = store.doc_column("n_tokens").astype(np.int64)
    parts = _part_rows(store, True)
    tasks, owners = [], []
    for layer in sorted(neurons.layers):
        cols = list(neurons.layers[layer])
        li = store.layer_index(sel.site, layer)
        docs = sorted({d for n in cols for d, _, _ in found.get((layer, n), [])})
        for p, ((row_shift, doc_shift, n_rows, _), group) in enumerate(zip(parts, store.groups)):
            mine = [d for d in docs if doc_shift <= d < doc_shift + store.metas[p]["committed_docs"]]
            if not mine:
                continue
            src = ch.source(group[st.array_path(sel.site, "tokens", sel.quantity)])
            chunk, shard = ch.step(src)
            spans = {}  # chunk start -> sentences touching it
            for d in mine:
                a, b = starts_all[d] - row_shift, starts_all[d] - row_shift + n_tok[d]
                for c in range((a // chunk) * chunk, b, chunk):
                    spans.setdefault(c, []).append(d)
            for c, ds in sorted(spans.items()):
                def task(src=src, c=c, ds=ds, row_shift=row_shift, li=li, cols=cols, n_rows=n_rows, chunk=chunk):
                    out = {}
                    lo, hi = c, min(n_rows, c + chunk)
                    for a, b, _, values in ch.blocks(src, lo, hi, [li]):
                        x = st.decode(values[:, cols], store.store_dtype).astype(np.float64)
                        for d in ds:
                            s = starts_all[d] - row_shift
                            e = s + n_tok[d]
                            lo_, hi_ = max(s, a), min(e, b)
                            if lo_ < hi_:
                                out[(d, lo_ - s)] = x[lo_ - a:hi_ - a]
                    return out
                tasks.append(task)
                owners.append((layer, cols))
    results = _run(tasks, workers, progress, "token values")
    per_doc: dict[int, dict[int, dict]] = {}
    for (layer, cols), res in zip(owners, results):
        for (d, off), x in res.items():
            per_doc.setdefault(layer, {}).setdefault(d, {})[off] = x
    out: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    for layer, by_doc in per_doc.items():
        cols = list(neurons.layers[layer])
        for d, pieces in by_doc.items():
            full = np.concatenate([pieces[o] for o in sorted(pieces)], axis=0)  # [n_tok, len(cols)]
            for j, n in enumerate(cols):
                if any(dd == d for dd, _, _ in found.get((layer, n), [])):
                    out.setdefault((layer, n), {})[d] = full[:, j]
    return out


def _read_spans(arr: Any, spans: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """``arr[a:b]`` for each span, reading spans closer than ``TABLE_GAP`` rows together."""
    out = {}
    spans = sorted(set(spans))
    i = 0
    while i < len(spans):
        lo, hi = spans[i]
        j = i + 1
        while j < len(spans) and spans[j][0] - hi < TABLE_GAP:
            hi = max(hi, spans[j][1])
            j += 1
        block = ch.read_zarr(arr, slice(lo, hi), lo, hi) if hi > lo else None
        for a, b in spans[i:j]:
            out[(a, b)] = block[a - lo:b - lo] if block is not None else np.zeros(0)
        i = j
    return out


def _doc_tables(store: st.Store, docs: list[int], tokens: bool) -> dict[int, dict]:
    """Text, language, label and tokens (spans, kinds, names) of the example sentences only."""
    info: dict[int, dict] = {}
    if not docs:
        return info
    lang_codes, label_codes = store.doc_column("lang"), store.doc_column("label")
    langs, labels = store.categories("lang"), store.categories("label")
    doc_shift = 0
    parts = _part_rows(store, True) if tokens else None
    for p, (group, meta) in enumerate(zip(store.groups, store.metas)):
        n_docs = meta["committed_docs"]
        mine = [d for d in docs if doc_shift <= d < doc_shift + n_docs]
        if mine:
            texts = _read_spans(group["docs/text"], [(d - doc_shift, d - doc_shift + 1) for d in mine])
            for d in mine:
                info[d] = {
                    "text": str(texts[(d - doc_shift, d - doc_shift + 1)][0]),
                    "lang": langs[lang_codes[d]] if lang_codes[d] >= 0 else MISSING,
                    "label": labels[label_codes[d]] if label_codes[d] >= 0 else MISSING,
                    "toks": None,
                }
            if tokens:
                _token_tables(group, meta, parts[p][3], [d - doc_shift for d in mine], doc_shift, info)
        doc_shift += n_docs
    return info


def _token_tables(group: Any, meta: dict, starts: np.ndarray, local: list[int], doc_shift: int, info: dict) -> None:
    """Each example sentence's tokens as ``[start, end, kind, name]``: the character span in its text
    (-1 where unknown), the kind (text, special, audio) and, where the span is empty or unknown, a
    name to show instead (the special token's string, "audio frame i", or the token id)."""
    features = set(meta.get("features") or [])
    n_rows = meta["committed_tokens"]
    spans = [(int(starts[d]), int(starts[d + 1]) if d + 1 < len(starts) else n_rows) for d in local]
    ids = _read_spans(group["tokens/token_id"], spans)
    kinds = _read_spans(group["tokens/kind"], spans) if "token_kind" in features else None
    offs = _read_spans(group["tokens/offsets"], spans) if "token_offsets" in features else None
    names, special = list(st.TOKEN_KINDS), {}
    if kinds is not None:
        attrs = group["tokens/kind"].attrs
        names, special = list(attrs.get("categories", st.TOKEN_KINDS)), dict(attrs.get("special_tokens") or {})
    for d, span in zip(local, spans):
        text = info[d + doc_shift]["text"]
        toks, frame = [], 0
        for i in range(span[1] - span[0]):
            tid = int(ids[span][i])
            kind = names[int(kinds[span][i])] if kinds is not None else "text"
            a, b = (int(x) for x in offs[span][i]) if offs is not None else (-1, -1)
            ok = 0 <= a <= b <= len(text)
            name = None
            if kind == "audio":
                name, a, b = f"audio frame {frame}", -1, -1
                frame += 1
            elif kind == "special" and (not ok or a == b):
                name, a, b = special.get(str(tid), f"<special {tid}>"), -1, -1
            elif not ok or a == b:
                name, a, b = f"token {tid}", -1, -1
            toks.append([a, b, kind, name])
        info[d + doc_shift]["toks"] = toks


# ----------------------------------------------------------------------------------------------
# the page's data


def _round(x: Any) -> Any:
    """Floats with ``DIGITS`` significant digits; NaN and inf become None (strict JSON)."""
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    if isinstance(x, np.ndarray):
        return _round(x.tolist())
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{DIGITS}g}")


def _page_data(store: st.Store, neurons: NeuronSet, mom: mo.GroupMoments, plan: Any, found: dict, doc_info: dict,
               shading: dict, scores: dict, score_name: str, k: int, title: str | None, notes: list[str], *,
               quantity: str, ex_rows: str, ex_plan: Any) -> dict:
    langs, groups = list(mom.langs), list(mom.groups)
    n = mom.count  # [L, G]
    zmean, _ = an.zscore_moments(n, mom.mean, mom.m2)  # [L, G, layers, D], z within language
    with np.errstate(invalid="ignore", divide="ignore"):
        # per label, pooled over languages: the count-weighted mean of z within language
        w = n[:, :, None, None].astype(np.float64)
        n_g = n.sum(axis=0)
        z_label = (w * zmean).sum(axis=0) / np.where(n_g > 0, n_g, 1)[:, None, None]
        z_label = np.where((n_g > 0)[:, None, None], z_label, np.nan)
        # per language: z against all selected rows (within-language z would be 0 by construction)
        n_l, mu_l, m2_l = an.combine(n, mom.mean, mom.m2, axis=1)  # [L], [L, layers, D]
        n_all, mu_all, m2_all = an.combine(n_l, mu_l, m2_l, axis=0)
        sd_all = np.sqrt(m2_all / max(int(n_all), 1))
        z_lang = np.where(sd_all > 0, (mu_l - mu_all) / np.where(sd_all > 0, sd_all, 1), 0.0)
        z_lang = np.where((n_l > 0)[:, None, None], z_lang, np.nan)
        p_act = mom.pos.sum(axis=(0, 1)) / max(int(n.sum()), 1)  # [layers, D]
        heat = np.where((n > 0)[:, :, None, None], zmean, np.nan)
    hist = None if mom.hist is None else mom.hist.sum(axis=0)  # [G, layers, D, bins] pooled over languages
    vmin = mom.vmin.min(axis=0)
    vmax = mom.vmax.max(axis=0)
    qs = None
    if hist is not None:
        qs = sk.quantiles(hist, vmin, vmax, (0.1, 0.5, 0.9))  # [3, G, layers, D]
    starts = store.doc_column("token_start").astype(np.int64) if ex_rows == "tokens" else None
    entries = []
    column = 0  # the statistics hold the set's neurons in layer order (_statistics)
    for layer in sorted(neurons.layers):
        for d in neurons.layers[layer]:
            li, c = 0, column
            column += 1
            e: dict[str, Any] = {
                "layer": layer, "neuron": d, "score": _round(scores.get((layer, d))),
                "z_label": _round(z_label[:, li, c]), "z_lang": _round(z_lang[:, li, c]), "p_active": _round(p_act[li, c]),
                "heat": _round(heat[:, :, li, c]),
            }
            if hist is not None:
                h = hist[:, li, c]  # [G, bins]
                nz = np.flatnonzero(h.sum(axis=0))
                lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
                e["dist"] = {"lo": lo, "counts": h[:, lo:hi].astype(int).tolist(), "q": _round(qs[:, :, li, c].T)}
            ex = []
            for doc, value, row in found.get((layer, d), []):
                item: dict[str, Any] = {"doc": doc, "value": _round(value)}
                info = doc_info.get(doc) or {}
                if ex_rows == "tokens":
                    item["max"] = row - int(starts[doc])
                    vals = shading.get((layer, d), {}).get(doc)
                    if vals is not None:
                        item["values"] = _round(vals)
                        item["kept"] = _kept_positions(info, ex_plan)
                ex.append(item)
            e["examples"] = ex
            entries.append(e)
    used = {x["doc"] for e in entries for x in e["examples"]}
    docs = {str(d): doc_info[d] for d in sorted(used) if d in doc_info}
    prov = provenance(store, plan.selection, "report", notes, neurons=neurons.describe(), k=k,
                      examples={"rows": ex_rows, "token_kind": list(ex_plan.selection.token_kind or []) or None})
    return {
        "title": title or f"{neurons.n} neurons of {neurons.site}" + (f" ({neurons.group})" if neurons.group else ""),
        "site": neurons.site, "quantity": quantity, "by": plan.by, "langs": langs, "groups": groups,
        "rows": rows_words(plan.rows), "examples_rows": rows_words(ex_rows), "score_name": score_name, "k": k,
        "shaded": bool(shading), "notes": notes, "hist": {"bins": sk.HIST_BINS, "range": sk.HIST_RANGE, "width": sk.HIST_WIDTH},
        "neurons": entries, "docs": docs, "provenance": prov,
    }


def _kept_positions(info: dict, plan: Any) -> list[int] | None:
    """Positions of the sentence's tokens the token-kind filter leaves out (None: none left out)."""
    kinds = plan.selection.token_kind
    if kinds is None or not info.get("toks"):
        return None
    out = [i for i, t in enumerate(info["toks"]) if t[2] not in kinds]
    return out or None


# ----------------------------------------------------------------------------------------------
# the page


def check_out(out: str | os.PathLike) -> Path:
    """Refuse an output the page cannot go to before any work is done."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise NeurostoreError(f"--out {out}: the report is one HTML file; name it like report.html")
    if not out.parent.is_dir():
        raise NeurostoreError(f"--out {out}: folder {out.parent} does not exist; create it or write elsewhere")
    return out


def write(rep: Report, out: str | os.PathLike) -> None:
    """Write the page (to a temporary name, then renamed: a reader never sees half a page)."""
    out = check_out(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(rep.data), encoding="utf-8")
    os.replace(tmp, out)


def render(data: dict) -> str:
    """The self-contained page: CSS, the data as inline JSON, the script that draws it."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    return (_PAGE.replace("__TITLE__", html.escape(data["title"]))
            .replace("__CSS__", _CSS).replace("__JS__", _JS).replace("__DATA__", payload))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>__TITLE__</title><style>__CSS__</style></head>
<body><header id="top"><h1>__TITLE__</h1><div id="meta"></div></header>
<main><section id="index"><h2>Neurons</h2>
<p><input id="filter" type="search" placeholder="filter: layer, neuron, or e.g. L6 ..."> <span id="shown"></span></p>
<table id="table"><thead></thead><tbody></tbody></table></section>
<div id="neurons"></div></main>
<script type="application/json" id="data">__DATA__</script>
<script>__JS__</script></body></html>
"""

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px;color:#222}
h1{font-size:22px;margin:16px 0 4px}h2{font-size:18px;margin:20px 0 6px}h3{font-size:16px;margin:0 0 6px}
#meta{color:#555;font-size:13px}#meta p{margin:2px 0}.note{color:#8a4b00}
table{border-collapse:collapse}#table th,#table td{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
#table th{cursor:pointer;background:#f3f3f3;position:sticky;top:0;user-select:none}#table th.on{background:#dde8f6}
#table td:first-child,#table th:first-child{text-align:left}#table tr:hover td{background:#f7f7fb}
.neuron{border-top:2px solid #ccc;margin-top:18px;padding-top:8px}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.heat td,.heat th{padding:3px 6px;font-size:12px;text-align:center;border:1px solid #fff}.heat th{font-weight:600;background:#f3f3f3}
.nums{font-size:13px}.nums td{padding:1px 8px 1px 0}
.ex{margin:3px 0;padding:3px 6px;background:#fafafa;border-left:3px solid #ddd;font-size:13px}
.ex .v{display:inline-block;min-width:64px;color:#555;font-variant-numeric:tabular-nums}.ex .g{color:#777;font-size:12px;margin-right:6px}
.tok{border-radius:2px}.chip{font-size:11px;padding:0 3px;margin:0 1px;border:1px solid #ccc;border-radius:3px;color:#444}
.max{outline:2px solid #000;outline-offset:0}.off{color:#aaa}
svg text{font:11px system-ui,sans-serif}
"""

_JS = r"""
const D=JSON.parse(document.getElementById('data').textContent);
const E=(t,a={},...c)=>{const e=document.createElement(t);for(const[k,v]of Object.entries(a))e.setAttribute(k,v);for(const x of c)e.append(x);return e};
const fmt=v=>v==null?'–':(Math.abs(v)>=1e4||(Math.abs(v)<1e-3&&v!=0))?v.toExponential(2):(+v).toFixed(3);
const id=n=>`n-${n.layer}-${n.neuron}`;
function color(v,m){if(v==null||!m)return'';const a=Math.min(1,Math.abs(v)/m);return v>=0?`rgba(220,40,30,${(a*0.85).toFixed(3)})`:`rgba(30,90,220,${(a*0.85).toFixed(3)})`}
// header
(function(){const m=document.getElementById('meta'),p=D.provenance,s=p.store;
 m.append(E('p',{},`store ${s.paths.join(', ')} · model ${s.model||'?'} · site ${D.site} · ${D.quantity} · statistics over ${D.rows}, grouped by ${D.by} · examples: top ${D.k} sentences by their highest ${D.examples_rows==='token rows'?'token':'row'} · neurostore ${p.neurostore_version}`));
 m.append(E('p',{},'mean z: per label, z within each language (as the paper) pooled over languages; per language, z against all selected rows (within-language z is 0 by construction). P(x>0) over all selected rows.'));
 for(const n of D.notes)m.append(E('p',{class:'note'},n));})();
// index
const cols=[['neuron','neuron',n=>`L${n.layer}:${n.neuron}`,n=>n.layer*1e6+n.neuron],['score',D.score_name,n=>fmt(n.score),n=>n.score]];
D.groups.forEach((g,i)=>cols.push([`z_${g}`,`z ${g}`,n=>fmt(n.z_label[i]),n=>n.z_label[i]]));
D.langs.forEach((l,i)=>cols.push([`zlang_${l}`,`z ${l}`,n=>fmt(n.z_lang[i]),n=>n.z_lang[i]]));
cols.push(['p_active','P(x>0)',n=>fmt(n.p_active),n=>n.p_active]);
const thead=document.querySelector('#table thead'),tbody=document.querySelector('#table tbody');
const hr=E('tr');cols.forEach(([key,name])=>{const th=E('th',{'data-key':key,title:'sort by '+name},name);th.onclick=()=>{const s=state();location.hash=`sort=${key}&dir=${s.sort===key&&s.dir==='desc'?'asc':'desc'}`+(s.filter?`&filter=${encodeURIComponent(s.filter)}`:'')};hr.append(th)});thead.append(hr);
const rows=D.neurons.map(n=>{const tr=E('tr',{class:'nrow','data-id':id(n)});cols.forEach(([k,,f],i)=>{const td=E('td');if(i==0)td.append(E('a',{href:'#'+id(n)},f(n)));else td.append(f(n));tr.append(td)});return[n,tr]});
function state(){const h=new URLSearchParams(location.hash.slice(1));return{sort:h.get('sort'),dir:h.get('dir')||'desc',filter:h.get('filter')||document.getElementById('filter').value}}
function draw(){const s=state();let list=rows.slice();const c=cols.find(c=>c[0]===s.sort);
 if(c){const sg=s.dir==='asc'?1:-1;list.sort((a,b)=>{const x=c[3](a[0]),y=c[3](b[0]);if(x==null&&y==null)return 0;if(x==null)return 1;if(y==null)return-1;return sg*(x-y)})}
 const f=s.filter.trim().toLowerCase();tbody.replaceChildren();let shown=0;
 for(const[n,tr]of list){const txt=`l${n.layer}:${n.neuron} ${n.layer}:${n.neuron} layer ${n.layer} neuron ${n.neuron}`;if(!f||f.split(/\s+/).every(w=>txt.includes(w))){tbody.append(tr);shown++}}
 document.querySelectorAll('#table th').forEach(th=>th.className=th.dataset.key===s.sort?'on':'');
 document.getElementById('shown').textContent=`${shown} of ${rows.length} neurons`;}
document.getElementById('filter').oninput=e=>{const s=state();location.hash=(s.sort?`sort=${s.sort}&dir=${s.dir}&`:'')+`filter=${encodeURIComponent(e.target.value)}`};
window.addEventListener('hashchange',()=>{if(!location.hash.startsWith('#n-'))draw()});
{const s=new URLSearchParams(location.hash.slice(1));if(s.get('filter'))document.getElementById('filter').value=s.get('filter')}
draw();
// per neuron
function heat(n){const t=E('table',{class:'heat'}),h=E('tr',{},E('th',{},'lang \\ '+D.by));D.groups.forEach(g=>h.append(E('th',{},g)));t.append(h);
 const m=Math.max(1e-9,...n.heat.flat().filter(v=>v!=null).map(Math.abs));
 D.langs.forEach((l,i)=>{const r=E('tr',{},E('th',{},l));D.groups.forEach((g,j)=>{const v=n.heat[i][j];r.append(E('td',{style:`background:${color(v,m)}`,title:`${l} × ${g}: mean z ${fmt(v)}`},v==null?'–':v.toFixed(2))) });t.append(r)});
 return E('div',{},E('h4',{},'mean z (within language), language × '+D.by),t)}
const PAL=['#d62728','#1f77b4','#2ca02c','#ff7f0e','#9467bd','#8c564b','#e377c2','#7f7f7f','#bcbd22','#17becf'];
function dist(n){if(!n.dist)return E('div');const W=420,H=150,P=28,ns='http://www.w3.org/2000/svg',d=n.dist,nb=d.counts[0]?d.counts[0].length:0;
 const svg=document.createElementNS(ns,'svg');svg.setAttribute('width',W);svg.setAttribute('height',H+34);if(!nb)return E('div');
 const dens=d.counts.map(c=>{const s=c.reduce((a,b)=>a+b,0)||1;return c.map(x=>x/s)});const top=Math.max(1e-9,...dens.flat());
 const X=i=>P+(W-P-8)*(i/(nb)),Y=v=>H-(H-10)*v/top;
 const add=(t,a,txt)=>{const e=document.createElementNS(ns,t);for(const[k,v]of Object.entries(a))e.setAttribute(k,v);if(txt!=null)e.textContent=txt;svg.append(e);return e};
 add('line',{x1:P,y1:H,x2:W-8,y2:H,stroke:'#999'});
 const val=b=>Math.sinh(-D.hist.range+(d.lo+b)*D.hist.width);
 for(const b of [0,Math.floor(nb/2),nb]){add('text',{x:X(b),y:H+13,'text-anchor':'middle',fill:'#555'},fmt(val(b)))}
 dens.forEach((c,g)=>{let p='';c.forEach((v,i)=>{p+=`${i?'L':'M'}${X(i).toFixed(1)},${Y(v).toFixed(1)}L${X(i+1).toFixed(1)},${Y(v).toFixed(1)}`});add('path',{d:p,fill:'none',stroke:PAL[g%PAL.length],'stroke-width':1.5})});
 let x=P;D.groups.forEach((g,i)=>{const q=d.q[i];add('rect',{x,y:H+20,width:9,height:9,fill:PAL[i%PAL.length]});const t=add('text',{x:x+12,y:H+28},g);t.append(document.createElementNS(ns,'title'));t.lastChild.textContent=`${g}: P10 ${fmt(q[0])}, P50 ${fmt(q[1])}, P90 ${fmt(q[2])}`;x+=14+7*g.length+10});
 return E('div',{},E('h4',{},`distribution per ${D.by} (quantile sketch, asinh axis)`),svg,
   E('table',{class:'nums'},E('tr',{},E('td',{},''),E('td',{},'P10'),E('td',{},'P50'),E('td',{},'P90')),...D.groups.map((g,i)=>E('tr',{},E('td',{},g),...d.q[i].map(v=>E('td',{},fmt(v)))))))}
function sentence(x,m){const doc=D.docs[x.doc],out=E('span'),toks=doc.toks;
 if(!toks){out.append(E('span',{class:'tok max',style:`background:${color(x.value,m)}`},doc.text));return out}
 const off=new Set(x.kept||[]);let pos=0;const plain=[];
 toks.forEach((t,i)=>{const v=x.values?x.values[i]:(i===x.max?x.value:null);const cls='tok'+(i===x.max?' max':'')+(off.has(i)?' off':'');
  const style=off.has(i)?'':`background:${color(v,m)}`;const title=v==null?'':`${fmt(v)}`;
  if(t[0]<0){out.append(E('span',{class:cls+' chip',style,title},t[3]));return}
  if(t[0]>pos)out.append(doc.text.slice(pos,t[0]));if(t[0]<pos)return;
  out.append(E('span',{class:cls,style,title},doc.text.slice(t[0],t[1])));pos=t[1]});
 if(pos<doc.text.length&&toks.some(t=>t[0]>=0))out.append(doc.text.slice(pos));
 if(!toks.some(t=>t[0]>=0))out.prepend(E('div',{class:'g'},doc.text));
 return out}
function examples(n){const m=Math.max(1e-9,...n.examples.flatMap(x=>x.values?x.values.filter(v=>v!=null).map(Math.abs):[Math.abs(x.value)]));
 const box=E('div',{},E('h4',{},`top ${n.examples.length} examples`+(D.shaded?' (every token shaded by its value on this neuron; the highest token outlined)':' (the highest row outlined)')));
 n.examples.forEach(x=>{const doc=D.docs[x.doc];box.append(E('div',{class:'ex'},E('span',{class:'v'},fmt(x.value)),E('span',{class:'g'},`${doc.lang} · ${doc.label} · #${x.doc}`),sentence(x,m)))});
 if(!n.examples.length)box.append(E('p',{},'no rows selected'));return box}
const host=document.getElementById('neurons');
for(const n of D.neurons){const s=E('section',{class:'neuron',id:id(n)});
 s.append(E('h3',{},`layer ${n.layer}, neuron ${n.neuron} `,E('a',{href:'#top'},'↑ index')));
 const nums=E('table',{class:'nums'},E('tr',{},E('td',{},D.score_name),E('td',{},fmt(n.score))),E('tr',{},E('td',{},'P(x>0)'),E('td',{},fmt(n.p_active))),
   ...D.groups.map((g,i)=>E('tr',{},E('td',{},`mean z ${g}`),E('td',{},fmt(n.z_label[i])))),...D.langs.map((l,i)=>E('tr',{},E('td',{},`z ${l} (vs all)`),E('td',{},fmt(n.z_lang[i])))));
 s.append(E('div',{class:'row'},E('div',{},E('h4',{},'the numbers'),nums),heat(n),dist(n)),examples(n));host.append(s)}
// #show=L:N (or several, comma-separated): that neuron's section only (for a link, a print or a screenshot)
function show(){const w=new URLSearchParams(location.hash.slice(1)).get('show');const keep=w?new Set(w.split(',').map(x=>'n-'+x.replace(':','-'))):null;
 document.getElementById('index').hidden=!!keep;document.querySelectorAll('section.neuron').forEach(s=>s.hidden=!!keep&&!keep.has(s.id))}
show();window.addEventListener('hashchange',show);
if(location.hash.startsWith('#n-')){const t=document.getElementById(location.hash.slice(1));if(t)t.scrollIntoView()}
document.body.dataset.ready='1';
"""
