"""``neurostore plot``: paper figures from query results (same store and selection options).

Each command runs the matching query (cached statistics are reused) and draws it with
:mod:`neurostore.plots`. ``--out FILE`` (.png / .pdf / .svg) or ``--out-dir DIR`` (a name is made
from the command, site and layer; ``--pdf`` for PDF).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .common import console, fail, handle_errors
from .options import (
    BY, CORRELATION, LABEL, LANG, LAPE_FILTER_RATE, LAPE_LAYERS, LAPE_SITE, LAYER, NO_CACHE, PER, POOL, QUANTITY, SCHEDULER, SITE, STORES,
    THRESHOLD, TOKENS, TOP_RATE, WHERE, WITHIN, WORKERS, ZSCORE, filters, open_stores, parse_int_list, renamed, run_options, selection,
)

app = typer.Typer(
    help="Figures for papers: per-neuron variance, correlation heatmaps, mean z per language, polyglot counts, LAPE per layer.",
    no_args_is_help=True,
)

OUT = typer.Option(None, "--out", help="Figure file: .png (300 dpi), .pdf or .svg.", show_default="none: give --out or --out-dir")
OUT_DIR = typer.Option(None, "--out-dir", help="Folder for the figure; the name is made from command, site and layer.", show_default="none: give --out or --out-dir")
PDF = typer.Option(False, "--pdf", help="With --out-dir: write PDF instead of PNG.", show_default="off: PNG")


def _target(out: Optional[Path], out_dir: Optional[Path], pdf: bool, name: str) -> Path:
    if out is not None and out_dir is not None:
        fail("--out and --out-dir exclude each other")
    if out is not None:
        return out
    if out_dir is None:
        fail("give --out FILE or --out-dir DIR for the figure")
    return out_dir / f"{name}.{'pdf' if pdf else 'png'}"


def _save(fig: Any, path: Path) -> None:
    from neurostore import plots

    written = plots.save(fig, path)
    console.print(f"wrote {written}")


@app.command("variance")
@handle_errors
def variance_plot(
    stores: list[str] = STORES,
    site: str = SITE,
    layer: Optional[int] = LAYER,
    by: str = BY,
    per: Optional[str] = PER,
    within: Optional[str] = WITHIN,
    top: int = typer.Option(10, "--top", help="Neurons to mark per panel."),
    zscore: bool = ZSCORE,
    pool: Optional[str] = POOL,
    tokens: bool = TOKENS,
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    quantity: str = QUANTITY,
    out: Optional[Path] = OUT,
    out_dir: Optional[Path] = OUT_DIR,
    pdf: bool = PDF,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    no_cache: bool = NO_CACHE,
    over_means: bool = typer.Option(False, "--over-means", hidden=True, help="Kept for old scripts: the variance over label means is the default."),
    per_lang: bool = typer.Option(False, "--per-lang", hidden=True, help="Kept for old scripts: the same as --per lang."),
) -> None:
    """Per-neuron variance over label means along the layer (the statistic of `query variance`, the
    same options and defaults), top neurons marked; --per lang: a panel per language; --within
    label: a panel per label."""
    from neurostore import plots
    from neurostore import query as q

    sel = selection(pool, tokens, lang, label, where, quantity=quantity)
    run = run_options(scheduler, workers, no_cache)
    store = open_stores(stores)
    per = "lang" if per_lang else per
    res = q.variance(store, site, layer, by=within or by, per=per, within=within is not None, zscore=zscore, top=top, **sel, **run)
    _save(plots.variance_figure(res), _target(out, out_dir, pdf, f"variance-{site}-L{res.layer}"))


@app.command("correlate")
@handle_errors
def correlate_plot(
    stores: list[str] = STORES,
    site: str = SITE,
    layer: Optional[int] = LAYER,
    by: str = BY,
    method: str = CORRELATION,
    zscore: bool = ZSCORE,
    pool: Optional[str] = POOL,
    tokens: bool = TOKENS,
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    quantity: str = QUANTITY,
    out: Optional[Path] = OUT,
    out_dir: Optional[Path] = OUT_DIR,
    pdf: bool = PDF,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    no_cache: bool = NO_CACHE,
) -> None:
    """Cross-lingual correlation heatmaps, one per label, plus their mean."""
    from neurostore import plots
    from neurostore import query as q

    sel = selection(pool, tokens, lang, label, where, quantity=quantity)
    run = run_options(scheduler, workers, no_cache)
    store = open_stores(stores)
    res = q.correlate(store, site, layer, by=by, method=method, zscore=zscore, **sel, **run)
    _save(plots.correlation_figure(res), _target(out, out_dir, pdf, f"correlate-{site}-L{res.layer}"))


@app.command("means")
@handle_errors
def means_plot(
    stores: list[str] = STORES,
    group: Optional[str] = typer.Option(None, "--group", help="The group to draw: a value of --by (a label; a language with --by lang). \\[required]", show_default=False),
    site: str = SITE,
    layer: Optional[int] = LAYER,
    by: str = BY,
    top: int = typer.Option(10, "--top", help="Highlight each language's K highest neurons."),
    zscore: bool = ZSCORE,
    pool: Optional[str] = POOL,
    tokens: bool = TOKENS,
    lang: Optional[list[str]] = LANG,
    where: Optional[list[str]] = WHERE,
    quantity: str = QUANTITY,
    out: Optional[Path] = OUT,
    out_dir: Optional[Path] = OUT_DIR,
    pdf: bool = PDF,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    no_cache: bool = NO_CACHE,
    old_label: Optional[str] = typer.Option(None, "--label", hidden=True, help="Kept for old scripts: the old name of --group (--label filters rows elsewhere)."),
) -> None:
    """Average z-activation per language for one group (a label), each language's top neurons highlighted."""
    from neurostore import plots
    from neurostore import query as q

    group, option = renamed(group, old_label, "--group", "--label")
    if group is None:
        fail("give --group GROUP: the value of --by to draw, e.g. --group joy")
    sel = selection(pool, tokens, lang, None, where, quantity=quantity)
    run = run_options(scheduler, workers, no_cache)
    store = open_stores(stores)
    gm = q.group_means(store, site, layer, by=by, zscore=zscore, **sel, **run)
    if group not in gm.groups:
        fail(f"{option} {group}: the store has {', '.join(gm.groups)}")
    fig = plots.means_figure(gm, group, gm.top_neurons(group, top))
    _save(fig, _target(out, out_dir, pdf, f"means-{group}-{site}-L{gm.layer}"))


@app.command("polyglot")
@handle_errors
def polyglot_plot(
    stores: list[str] = STORES,
    site: str = SITE,
    layer: Optional[int] = LAYER,
    by: str = BY,
    threshold: float = THRESHOLD,
    zscore: bool = ZSCORE,
    pool: Optional[str] = POOL,
    tokens: bool = TOKENS,
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    quantity: str = QUANTITY,
    out: Optional[Path] = OUT,
    out_dir: Optional[Path] = OUT_DIR,
    pdf: bool = PDF,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    no_cache: bool = NO_CACHE,
) -> None:
    """Polyglot / monolingual neuron counts per label and language."""
    from neurostore import plots
    from neurostore import query as q

    sel = selection(pool, tokens, lang, label, where, quantity=quantity)
    run = run_options(scheduler, workers, no_cache)
    store = open_stores(stores)
    res = q.polyglot(store, site, layer, threshold=threshold, by=by, zscore=zscore, **sel, **run)
    _save(plots.polyglot_figure(res), _target(out, out_dir, pdf, f"polyglot-{site}-L{res.layer}"))


@app.command("lape")
@handle_errors
def lape_plot(
    stores: list[str] = STORES,
    site: str = LAPE_SITE,
    layers: Optional[str] = LAPE_LAYERS,
    filter_rate: float = LAPE_FILTER_RATE,
    top_rate: float = TOP_RATE,
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    quantity: str = QUANTITY,
    out: Optional[Path] = OUT,
    out_dir: Optional[Path] = OUT_DIR,
    pdf: bool = PDF,
    scheduler: Optional[str] = SCHEDULER,
    workers: Optional[int] = WORKERS,
    no_cache: bool = NO_CACHE,
) -> None:
    """LAPE language-specific neurons per layer and language."""
    from neurostore import plots
    from neurostore import query as q

    sel = filters(lang, label, where, quantity=quantity)  # LAPE reads token rows
    run = run_options(scheduler, workers, no_cache)
    store = open_stores(stores)
    layer_list = parse_int_list(layers, "--layers") if layers else None
    res = q.lape(store, site, layer_list, filter_rate=filter_rate, top_rate=top_rate, **sel, **run)
    _save(plots.lape_figure(res), _target(out, out_dir, pdf, f"lape-{site}"))
