"""``neurostore query``: out-of-core neuron statistics of one or several (part) stores.

A thin layer over :mod:`neurostore.query`: parse options, call the library, render tables / JSON /
CSV. No statistics are computed here.
"""

from __future__ import annotations

from typing import Any, Optional

import typer

from .common import OutputFormat, console, fail, handle_errors, print_json, print_table, write_csv
from .options import (
    ALL_LAYERS, BY, CORRELATION, FORMAT, LABEL, LANG, LAPE_FILTER_RATE, LAPE_LAYERS, LAPE_SITE, LAYER, NO_CACHE, PER, POOL, SCHEDULER,
    QUANTITY, SITE, SKIP_SPECIAL, STORES, THRESHOLD, TOKEN_KIND, TOKENS, TOP_RATE, WHERE, WITHIN, WORKERS, ZSCORE, filters, open_stores,
    parse_int_list, renamed, run_options, selection,
)

app = typer.Typer(
    help=(
        "Neuron statistics read out of core, in one pass, cached in the store: variance and ANOVA "
        "over labels, cross-lingual correlation, polyglot neurons, LAPE, selectors, top examples, "
        "raw group tables. Several STORE arguments (extract --part outputs) are read as one store."
    ),
    no_args_is_help=True,
)


def title(res: Any, what: str) -> str:
    """A table title: the rows behind the numbers (site, layer, pooling, filters, z-scoring), then what they are."""
    from neurostore.provenance import describe

    return f"{describe(res.provenance)}: {what}"


def _fmt(value: Any) -> Any:
    if value is None:
        return "nan"
    return value


@app.command("variance")
@handle_errors
def variance_command(
    stores: list[str] = STORES,
    site: str = SITE,
    layer: Optional[int] = LAYER,
    by: str = BY,
    per: Optional[str] = PER,
    within: Optional[str] = WITHIN,
    top: int = typer.Option(20, "--top", help="Rank the K neurons with the highest variance."),
    zscore: bool = ZSCORE,
    pool: Optional[str] = POOL,
    tokens: bool = TOKENS,
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    quantity: str = QUANTITY,
    fmt: OutputFormat = FORMAT,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    token_kind: Optional[list[str]] = TOKEN_KIND,
    skip_special: bool = SKIP_SPECIAL,
    no_cache: bool = NO_CACHE,
) -> None:
    """Per-neuron variance over label means of z, with the one-way ANOVA F; --within: per label."""
    from neurostore import query as q

    sel = selection(pool, tokens, lang, label, where, token_kind, skip_special, quantity)
    run = run_options(scheduler, workers, no_cache)
    store = open_stores(stores)
    res = q.variance(store, site, layer, by=within or by, per=per, within=within is not None, zscore=zscore, top=top, **sel, **run)
    if fmt == OutputFormat.json:
        print_json(res.to_json())
        return
    if res.groups is None:
        if fmt == OutputFormat.csv:
            write_csv(["neuron", "variance", "f"], [[d, res.variance[d], res.f[d]] for d in range(len(res.variance))])
            return
        print_table(
            title(res, f"top {len(res.top)} neurons by variance over {by} means, ANOVA F"),
            ["rank", "neuron", "variance", "F"], [[i + 1, n, v, float(res.f[n])] for i, (n, v) in enumerate(res.top)],
        )
        return
    if fmt == OutputFormat.csv:
        rows = []
        for g, name in enumerate(res.groups):
            for d in range(res.variance.shape[1]):
                rows.append([name, d, res.variance[g, d], None if res.f is None else res.f[g, d]])
        write_csv(["group", "neuron", "variance", "f"], rows)
        return
    what = f"variance within each {within}" if within else f"variance over {by} means per language, ANOVA F"
    rows = []
    for g, name in enumerate(res.groups):
        for i, (n, v) in enumerate(res.top[g]):
            rows.append([name, i + 1, n, v] + ([] if res.f is None else [float(res.f[g, n])]))
    print_table(title(res, f"top {top} neurons, {what}"), ["group", "rank", "neuron", "variance"] + ([] if res.f is None else ["F"]), rows)


@app.command("correlate")
@handle_errors
def correlate_command(
    stores: list[str] = STORES,
    site: str = SITE,
    layer: Optional[int] = LAYER,
    by: str = BY,
    across: str = typer.Option("lang", "--across", help="Compare M between the values of this column (lang)."),
    method: str = CORRELATION,
    zscore: bool = ZSCORE,
    pool: Optional[str] = POOL,
    tokens: bool = TOKENS,
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    quantity: str = QUANTITY,
    fmt: OutputFormat = FORMAT,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    token_kind: Optional[list[str]] = TOKEN_KIND,
    skip_special: bool = SKIP_SPECIAL,
    no_cache: bool = NO_CACHE,
) -> None:
    """Per label, the language x language correlation of the mean-z profiles over neurons."""
    from neurostore import query as q

    sel = selection(pool, tokens, lang, label, where, token_kind, skip_special, quantity)
    run = run_options(scheduler, workers, no_cache)
    store = open_stores(stores)
    res = q.correlate(store, site, layer, by=by, across=across, method=method, zscore=zscore, **sel, **run)
    if fmt == OutputFormat.json:
        print_json(res.to_json())
        return
    named = [(g, res.matrices[i]) for i, g in enumerate(res.groups)] + [("(mean)", res.mean)]
    if fmt == OutputFormat.csv:
        write_csv(["group", "a", "b", method], [[g, a, b, m[i, j]] for g, m in named for i, a in enumerate(res.across) for j, b in enumerate(res.across)])
        return
    for g, m in named:
        print_table(title(res, f"{method} across {across}, {by} {g}"), [across, *res.across],
                    [[a, *[float(v) for v in m[i]]] for i, a in enumerate(res.across)])


@app.command("polyglot")
@handle_errors
def polyglot_command(
    stores: list[str] = STORES,
    site: str = SITE,
    layer: Optional[int] = LAYER,
    by: str = BY,
    threshold: float = THRESHOLD,
    sensitive_top: int = typer.Option(100, "--sensitive-top", help="The K highest-variance neurons count as label-sensitive."),
    zscore: bool = ZSCORE,
    pool: Optional[str] = POOL,
    tokens: bool = TOKENS,
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    quantity: str = QUANTITY,
    fmt: OutputFormat = FORMAT,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    token_kind: Optional[list[str]] = TOKEN_KIND,
    skip_special: bool = SKIP_SPECIAL,
    no_cache: bool = NO_CACHE,
) -> None:
    """Polyglot neurons (above threshold in every language) and monolingual ones, per label."""
    from neurostore import query as q

    sel = selection(pool, tokens, lang, label, where, token_kind, skip_special, quantity)
    run = run_options(scheduler, workers, no_cache)
    store = open_stores(stores)
    res = q.polyglot(store, site, layer, threshold=threshold, by=by, sensitive_top=sensitive_top, zscore=zscore, **sel, **run)
    if fmt == OutputFormat.json:
        print_json(res.to_json())
        return
    if fmt == OutputFormat.csv:
        rows = [[g, "polyglot", "", n] for g in res.groups for n in res.polyglot[g]]
        rows += [[g, "monolingual", l, n] for g in res.groups for l in res.langs for n in res.monolingual[g].get(l, [])]
        write_csv([by, "kind", "lang", "neuron"], rows)
        return
    counts = res.counts()
    print_table(
        title(res, f"neurons with mean > {threshold} (counts); shares among the {sensitive_top} highest-variance neurons"),
        [by, "polyglot", *[f"only {l}" for l in res.langs], "sensitive: poly", "mono", "other"],
        [[g, counts[g]["polyglot"], *[counts[g].get(l, "-") for l in res.langs], res.shares[g]["polyglot"], res.shares[g]["monolingual"], res.shares[g]["other"]] for g in res.groups],
    )
    print_table("polyglot neurons", [by, "neurons"], [[g, " ".join(map(str, res.polyglot[g])) or "-"] for g in res.groups])


@app.command("lape")
@handle_errors
def lape_command(
    stores: list[str] = STORES,
    site: str = LAPE_SITE,
    layers: Optional[str] = LAPE_LAYERS,
    filter_rate: float = LAPE_FILTER_RATE,
    top_rate: float = TOP_RATE,
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    quantity: str = QUANTITY,
    fmt: OutputFormat = FORMAT,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    token_kind: Optional[list[str]] = TOKEN_KIND,
    skip_special: bool = SKIP_SPECIAL,
    no_cache: bool = NO_CACHE,
) -> None:
    """Language-specific neurons by activation-probability entropy (token rows, all layers)."""
    from neurostore import query as q

    sel = filters(lang, label, where, token_kind, skip_special, quantity)  # LAPE reads token rows
    run = run_options(scheduler, workers, no_cache)
    store = open_stores(stores)
    layer_list = parse_int_list(layers, "--layers") if layers else None
    res = q.lape(store, site, layer_list, filter_rate=filter_rate, top_rate=top_rate, **sel, **run)
    if fmt == OutputFormat.json:
        print_json(res.to_json())
        return
    if fmt == OutputFormat.csv:
        write_csv(["lang", "layer", "neuron"], [[l, a, b] for l, v in res.neurons.items() for a, b in v])
        return
    per_layer = res.per_layer()
    print_table(
        title(res, f"LAPE, t = {res.threshold:.4g} (filter rate {filter_rate}), top {top_rate:.2%} lowest entropy"),
        ["lang", "neurons", *[f"L{x}" for x in res.layers]], [[l, len(v), *per_layer[l]] for l, v in res.neurons.items()],
    )


@app.command("select")
@handle_errors
def select_command(
    stores: list[str] = STORES,
    site: str = SITE,
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers, like 11 or 0,5,11 or 3-7.", show_default=ALL_LAYERS),
    by: str = BY,
    method: str = typer.Option("frequency", "--method", help="frequency, entropy, magnitude, contrast or actprob90 (P(x > 0) above the group's 90th percentile)."),
    top: Optional[int] = typer.Option(None, "--top", help="Neurons per group (actprob90: at most this many).", show_default="20; actprob90: all above the percentile"),
    filter_rate: float = typer.Option(0.95, "--filter-rate", help="entropy: quantile of all probabilities a candidate must exceed."),
    zscore: bool = ZSCORE,
    pool: Optional[str] = POOL,
    tokens: bool = TOKENS,
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    quantity: str = QUANTITY,
    fmt: OutputFormat = FORMAT,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    token_kind: Optional[list[str]] = TOKEN_KIND,
    skip_special: bool = SKIP_SPECIAL,
    no_cache: bool = NO_CACHE,
    old_layer: Optional[str] = typer.Option(None, "--layer", hidden=True, help="Kept for old scripts: the old name of --layers."),
) -> None:
    """Label-sensitive neurons by a selector: triples (layer, neuron, score) per group."""
    from neurostore import query as q

    sel = selection(pool, tokens, lang, label, where, token_kind, skip_special, quantity)
    run = run_options(scheduler, workers, no_cache)
    store = open_stores(stores)
    layers, option = renamed(layers, old_layer, "--layers", "--layer")
    layer_list = parse_int_list(layers, option) if layers else None
    res = q.select(store, site, layer_list, by=by, method=method, top=top, zscore=zscore, filter_rate=filter_rate, **sel, **run)
    if fmt == OutputFormat.json:
        print_json(res.to_json())
        return
    rows = [[g, i + 1, a, b, c] for g, v in res.selected.items() for i, (a, b, c) in enumerate(v)]
    if fmt == OutputFormat.csv:
        write_csv(["group", "rank", "layer", "neuron", "score"], rows)
        return
    print_table(title(res, f"{method} selector, {'top ' + str(res.provenance['parameters']['top']) if res.provenance['parameters'].get('top') else 'all above the 90th percentile'} per {by}"), [by, "rank", "layer", "neuron", "score"], rows)


@app.command("top-examples")
@handle_errors
def top_examples_command(
    stores: list[str] = STORES,
    site: str = SITE,
    layer: Optional[int] = LAYER,
    neuron: int = typer.Option(..., "--neuron", help="Neuron index along the width axis (0-based).", show_default=False),
    k: int = typer.Option(20, "--k", help="How many rows to show."),
    pool: Optional[str] = POOL,
    tokens: bool = TOKENS,
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    quantity: str = QUANTITY,
    fmt: OutputFormat = FORMAT,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    token_kind: Optional[list[str]] = TOKEN_KIND,
    skip_special: bool = SKIP_SPECIAL,
) -> None:
    """The tokens (default when stored) or sentences (--pool) that activate one neuron most."""
    from neurostore import query as q

    sel = selection(pool, tokens, lang, label, where, token_kind, skip_special, quantity)
    run = run_options(scheduler, workers)  # no cache: the pass keeps only the top rows
    store = open_stores(stores)
    if sel["rows"] is None and store.meta["tokens"]:
        sel["rows"] = "tokens"
    res = q.top_examples_result(store, site, layer, neuron, k=k, **sel, **run)
    examples = res.examples
    cols = ["value", "lang", "label", "doc", "position", "token_id", "kind", "token", "left", "right", "text"]
    rows = [[e.value, e.lang, e.label, e.doc, e.position, e.token_id, e.kind, e.token, e.left, e.right, e.text] for e in examples]
    if fmt == OutputFormat.json:
        print_json(res.to_json())
    elif fmt == OutputFormat.csv:
        write_csv(cols, rows)
    elif sel["rows"] == "tokens":  # the token in its sentence: left [token] right (escaped: rich would read [word] as markup)
        from rich.markup import escape

        print_table(
            title(res, f"neuron {neuron}, top {len(rows)} tokens"),
            ["rank", "value", "lang", "label", "doc", "position", "kind", "token", "context"],
            [[i + 1, e.value, e.lang, e.label, e.doc, e.position, e.kind or "", escape(e.token) if e.token is not None else f"id {e.token_id}", escape(e.context())] for i, e in enumerate(examples)],
        )
    else:
        from rich.markup import escape

        print_table(title(res, f"neuron {neuron}, top {len(rows)} sentences"), ["rank", "value", "lang", "label", "doc", "text"],
                    [[i + 1, e.value, e.lang, e.label, e.doc, escape(e.text)] for i, e in enumerate(examples)])


@app.command("stats")
@handle_errors
def stats_command(
    stores: list[str] = STORES,
    site: str = SITE,
    layer: Optional[int] = LAYER,
    by: str = BY,
    neurons: Optional[str] = typer.Option(None, "--neurons", help="Only these neurons in the table/CSV, like 0,5 or 3-7.", show_default="all (the table: the first 8)"),
    quantiles: bool = typer.Option(True, "--quantiles/--no-quantiles", help="Approximate P10/P50/P90 (a histogram sketch in the same pass)."),
    pool: Optional[str] = POOL,
    tokens: bool = TOKENS,
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    quantity: str = QUANTITY,
    fmt: OutputFormat = FORMAT,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    token_kind: Optional[list[str]] = TOKEN_KIND,
    skip_special: bool = SKIP_SPECIAL,
    no_cache: bool = NO_CACHE,
) -> None:
    """The raw group table per (language, group) and neuron: count, mean, std, P(act>0), quantiles."""
    from neurostore import query as q

    sel = selection(pool, tokens, lang, label, where, token_kind, skip_special, quantity)
    run = run_options(scheduler, workers, no_cache)
    store = open_stores(stores)
    res = q.stats(store, site, layer, by=by, quantiles=quantiles, **sel, **run)
    picks = parse_int_list(neurons, "--neurons") if neurons else None
    width = res.mean.shape[-1]
    for d in picks or []:
        if not 0 <= d < width:
            fail(f"--neurons {d}: site {site!r} has neurons 0-{width - 1}")
    if fmt == OutputFormat.json:
        print_json(res.to_json())
        return
    if fmt == OutputFormat.csv:
        write_csv(res.COLUMNS, res.table(picks))
        return
    shown = picks if picks is not None else list(range(min(width, 8)))
    print_table(title(res, "group statistics of the raw activations"), res.COLUMNS, [[_fmt(v) for v in r] for r in res.table(shown)])
    if picks is None and width > len(shown):
        console.print(f"(neurons 0-{len(shown) - 1} of {width}; --neurons to choose, --format csv for all)")
