"""``neurostore query``: out-of-core neuron statistics of one or several (part) stores.

A thin layer over :mod:`neurostore.query`: parse options, call the library, render tables / JSON /
CSV. No statistics are computed here.
"""

from __future__ import annotations

from typing import Any, Optional

import typer

from cli.common import FORMAT_OPTION, OutputFormat, console, fail, handle_errors, parse_int_list, print_json, print_table, write_csv

app = typer.Typer(
    help=(
        "Neuron statistics read out of core, in one pass, cached in the store: variance and ANOVA "
        "over labels, cross-lingual correlation, polyglot neurons, LAPE, selectors, top examples, "
        "raw group tables. Several STORE arguments (extract --part outputs) are read as one store."
    ),
    no_args_is_help=True,
)

STORES = typer.Argument(..., help="The store, or several --part stores of one extraction read as one.", show_default=False)
SITE = typer.Option("resid", "--site", help="Activation site: resid or mlp (whatever the store holds).")
# Every option shows its default in --help; a computed one says how it is computed (show_default as
# text: a "[default: ...]" inside the help string would be eaten as rich markup).
LAYER = typer.Option(None, "--layer", help="Model layer number; negative counts back from the last.", show_default="last stored layer")
POOL = typer.Option(None, "--pool", help="Sentence rows from this pooling: first, mean or last.", show_default="mean when stored")
TOKENS = typer.Option(False, "--tokens", help="Token rows instead of sentences (each token takes its sentence's label and language).", show_default="off: sentence rows")
LANG = typer.Option(None, "--lang", help="Keep these languages only (comma-separated or repeated).", show_default="all")
LABEL = typer.Option(None, "--label", help="Keep these labels only (comma-separated or repeated).", show_default="all")
WHERE = typer.Option(None, "--where", help="Keep rows where a stored categorical has these values: COLUMN=V1,V2 (repeatable).", show_default="no filter")
BY = typer.Option("label", "--by", help="Grouping column: label, or any stored categorical (pred ...).")
ZSCORE = typer.Option(True, "--zscore/--no-zscore", help="Standardise each neuron within each language first.")
SCHEDULER = typer.Option(None, "--scheduler", help="Run the pass on this Dask distributed scheduler (tcp://host:8786).", show_default="local threads")
WORKERS = typer.Option(None, "--workers", help="Local threads for the pass.", show_default="CPU count")
NO_CACHE = typer.Option(False, "--no-cache", help="Neither read nor write the statistics cache in the store.", show_default="off: cache used")
PER = typer.Option(None, "--per", help="Give the variance per language (--per lang).", show_default="pooled over languages")
WITHIN = typer.Option(None, "--within", help="Per group of this column, the variance of z over the group's rows (--within label).", show_default="off: variance over group means")
ALL_LAYERS = "all stored"
TOKEN_KIND = typer.Option(None, "--token-kind", help="Keep token rows of these kinds only: text, special, audio (comma-separated or repeated; token rows only).", show_default="all kinds")
SKIP_SPECIAL = typer.Option(False, "--skip-special", help="Leave out the tokenizer's special tokens ([CLS], [SEP], <s> ...): --token-kind with every kind but special.", show_default="off: special tokens counted")


def split_names(values: Optional[list[str]]) -> Optional[list[str]]:
    if not values:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def parse_where(values: Optional[list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for value in values or []:
        column, sep, names = value.partition("=")
        if not sep or not column.strip() or not names.strip():
            fail(f"--where {value!r}: expected COLUMN=VALUE[,VALUE...], e.g. --where pred=joy")
        out.setdefault(column.strip(), []).extend(split_names([names]) or [])
    return out


def rows_option(pool: Optional[str], tokens: bool) -> Optional[str]:
    if tokens and pool:
        fail("--tokens and --pool exclude each other: rows are either tokens or pooled sentences")
    return "tokens" if tokens else pool


def open_stores(stores: list[str]) -> Any:
    import neurostore

    return neurostore.open(stores)


def token_kind_option(token_kind: Optional[list[str]], skip_special: bool) -> Optional[list[str]]:
    """The token kinds asked for (None: all rows); the library checks them against rows and store."""
    from neurostore.store import TOKEN_KINDS

    kinds = split_names(token_kind)
    if kinds and skip_special:
        fail("--token-kind and --skip-special exclude each other: --skip-special is --token-kind " + ",".join(k for k in TOKEN_KINDS if k != "special"))
    return [k for k in TOKEN_KINDS if k != "special"] if skip_special else kinds


def common(stores, pool, tokens, lang, label, where, scheduler, workers, no_cache, token_kind=None, skip_special=False) -> tuple[Any, dict, dict]:
    """(store, selection keywords, run keywords). Token kinds travel as ``where["token_kind"]``,
    which every query function passes on to its selection."""
    rows = rows_option(pool, tokens)
    if workers is not None and workers < 1:
        fail(f"--workers {workers}: expected at least 1")
    kinds = token_kind_option(token_kind, skip_special)
    store = open_stores(stores)
    sel = {"rows": rows, "lang": split_names(lang), "label": split_names(label), "where": parse_where(where)}
    if kinds:
        sel["where"].setdefault("token_kind", []).extend(kinds)
    run = {"scheduler": scheduler, "workers": workers, "cache": not no_cache}
    return store, sel, run


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
    fmt: OutputFormat = FORMAT_OPTION,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    token_kind: Optional[list[str]] = TOKEN_KIND,
    skip_special: bool = SKIP_SPECIAL,
    no_cache: bool = NO_CACHE,
) -> None:
    """Per-neuron variance over label means of z, with the one-way ANOVA F; --within: per label."""
    from neurostore import query as q

    store, sel, run = common(stores, pool, tokens, lang, label, where, scheduler, workers, no_cache, token_kind, skip_special)
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
    method: str = typer.Option("spearman", "--method", help="spearman (rank correlation) or cosine."),
    zscore: bool = ZSCORE,
    pool: Optional[str] = POOL,
    tokens: bool = TOKENS,
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    fmt: OutputFormat = FORMAT_OPTION,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    token_kind: Optional[list[str]] = TOKEN_KIND,
    skip_special: bool = SKIP_SPECIAL,
    no_cache: bool = NO_CACHE,
) -> None:
    """Per label, the language x language correlation of the mean-z profiles over neurons."""
    from neurostore import query as q

    store, sel, run = common(stores, pool, tokens, lang, label, where, scheduler, workers, no_cache, token_kind, skip_special)
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
    threshold: float = typer.Option(0.5, "--threshold", help="A neuron is above for (lang, label) when M > threshold."),
    sensitive_top: int = typer.Option(100, "--sensitive-top", help="The K highest-variance neurons count as label-sensitive."),
    zscore: bool = ZSCORE,
    pool: Optional[str] = POOL,
    tokens: bool = TOKENS,
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    fmt: OutputFormat = FORMAT_OPTION,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    token_kind: Optional[list[str]] = TOKEN_KIND,
    skip_special: bool = SKIP_SPECIAL,
    no_cache: bool = NO_CACHE,
) -> None:
    """Polyglot neurons (above threshold in every language) and monolingual ones, per label."""
    from neurostore import query as q

    store, sel, run = common(stores, pool, tokens, lang, label, where, scheduler, workers, no_cache, token_kind, skip_special)
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
    site: str = typer.Option("mlp", "--site", help="Activation site (LAPE is defined on MLP neurons)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers, like 0,5,11 or 3-7.", show_default=ALL_LAYERS),
    filter_rate: float = typer.Option(0.95, "--filter-rate", help="Quantile of all activation probabilities used as threshold t."),
    top_rate: float = typer.Option(0.01, "--top-rate", help="Share of all neurons kept (lowest entropy)."),
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    fmt: OutputFormat = FORMAT_OPTION,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    token_kind: Optional[list[str]] = TOKEN_KIND,
    skip_special: bool = SKIP_SPECIAL,
    no_cache: bool = NO_CACHE,
) -> None:
    """Language-specific neurons by activation-probability entropy (token rows, all layers)."""
    from neurostore import query as q

    store, sel, run = common(stores, None, True, lang, label, where, scheduler, workers, no_cache, token_kind, skip_special)
    sel.pop("rows")
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
    layer: Optional[str] = typer.Option(None, "--layer", help="Layers, like 11 or 0,5,11 or 3-7.", show_default=ALL_LAYERS),
    by: str = BY,
    method: str = typer.Option("frequency", "--method", help="frequency, entropy, magnitude or contrast."),
    top: int = typer.Option(20, "--top", help="Neurons per group."),
    filter_rate: float = typer.Option(0.95, "--filter-rate", help="entropy: quantile of all probabilities a candidate must exceed."),
    zscore: bool = ZSCORE,
    pool: Optional[str] = POOL,
    tokens: bool = TOKENS,
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    fmt: OutputFormat = FORMAT_OPTION,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    token_kind: Optional[list[str]] = TOKEN_KIND,
    skip_special: bool = SKIP_SPECIAL,
    no_cache: bool = NO_CACHE,
) -> None:
    """Label-sensitive neurons by a selector: triples (layer, neuron, score) per group."""
    from neurostore import query as q

    store, sel, run = common(stores, pool, tokens, lang, label, where, scheduler, workers, no_cache, token_kind, skip_special)
    layer_list = parse_int_list(layer, "--layer") if layer else None
    res = q.select(store, site, layer_list, by=by, method=method, top=top, zscore=zscore, filter_rate=filter_rate, **sel, **run)
    if fmt == OutputFormat.json:
        print_json(res.to_json())
        return
    rows = [[g, i + 1, a, b, c] for g, v in res.selected.items() for i, (a, b, c) in enumerate(v)]
    if fmt == OutputFormat.csv:
        write_csv(["group", "rank", "layer", "neuron", "score"], rows)
        return
    print_table(title(res, f"{method} selector, top {top} per {by}"), [by, "rank", "layer", "neuron", "score"], rows)


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
    fmt: OutputFormat = FORMAT_OPTION,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    token_kind: Optional[list[str]] = TOKEN_KIND,
    skip_special: bool = SKIP_SPECIAL,
) -> None:
    """The tokens (default when stored) or sentences (--pool) that activate one neuron most."""
    from neurostore import query as q

    store, sel, run = common(stores, pool, tokens, lang, label, where, scheduler, workers, False, token_kind, skip_special)
    run.pop("cache")
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
    fmt: OutputFormat = FORMAT_OPTION,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    token_kind: Optional[list[str]] = TOKEN_KIND,
    skip_special: bool = SKIP_SPECIAL,
    no_cache: bool = NO_CACHE,
) -> None:
    """The raw group table per (language, group) and neuron: count, mean, std, P(act>0), quantiles."""
    from neurostore import query as q

    store, sel, run = common(stores, pool, tokens, lang, label, where, scheduler, workers, no_cache, token_kind, skip_special)
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
