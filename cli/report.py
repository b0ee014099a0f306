"""``neurostore report``: the neuron browser, one self-contained HTML page for a neuron set.

Parses options and renders progress and a summary; the workflow is :func:`neurostore.report.report`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .common import OutputFormat, console, err_console, handle_errors, print_json
from .options import (
    BY, LABEL, LANG, NO_CACHE, POOL, QUANTITY, SKIP_SPECIAL, STORES, TOKEN_KIND, TOKENS, WHERE, WORKERS,
    filters, open_stores, rows_option, run_options,
)


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to the application."""
    app.command(
        "report",
        help=(
            "Write a neuron browser: one self-contained HTML file (no network resource) with the neuron set "
            "as a sortable, filterable table (score, mean z per label and per language, P(x>0)) and per "
            "neuron a language x label heatmap of mean z, its distribution per group (the store's quantile "
            "sketch) and its top-k example sentences with every token shaded by its value.\n\n"
            "Neurons come from any query JSON output or from --neurons 11:523,11:87 with --site, as in intervene."
        ),
    )(report_command)


@handle_errors
def report_command(
    stores: list[str] = STORES,
    neurons: str = typer.Option(..., "--neurons", help="A query JSON output (variance top, polyglot, lape, select) or layer:neuron pairs like 11:523,11:87 (with --site).", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="The HTML file to write (report.html).", show_default=False),
    site: Optional[str] = typer.Option(None, "--site", help="Site of a layer:neuron list: resid or mlp (a JSON file names its own).", show_default=False),
    group: Optional[str] = typer.Option(None, "--group", help="Which label/language entry of the JSON to use (LABEL/LANG for monolingual polyglot neurons).", show_default="union of all entries"),
    k: int = typer.Option(20, "--k", help="Example sentences per neuron (ranked by their highest token)."),
    by: str = BY,
    pool: Optional[str] = POOL,
    tokens: bool = TOKENS,
    lang: Optional[list[str]] = LANG,
    label: Optional[list[str]] = LABEL,
    where: Optional[list[str]] = WHERE,
    token_kind: Optional[list[str]] = TOKEN_KIND,
    skip_special: bool = SKIP_SPECIAL,
    quantity: str = QUANTITY,
    title: Optional[str] = typer.Option(None, "--title", help="The page's title.", show_default="N neurons of SITE"),
    workers: Optional[int] = WORKERS,
    no_cache: bool = NO_CACHE,
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", help="The summary: a line (table) or one JSON object with the provenance (json)."),
) -> None:
    """The neuron browser (statistics over --pool/--tokens rows; examples over token rows where stored)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from neurostore.report import report

    rows = rows_option(pool, tokens)
    sel = filters(lang, label, where, token_kind, skip_special)
    kinds = sel["where"].pop("token_kind", None)
    run = run_options(None, workers, no_cache)
    store = open_stores(stores)
    quiet = fmt is not OutputFormat.table
    progress = Progress(TextColumn("[bold]report[/] {task.fields[stage]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err_console, disable=quiet, transient=True)
    task = progress.add_task("report", total=None, stage="")

    def on_progress(stage: str, done: int, total: int) -> None:
        progress.update(task, stage=stage, completed=done, total=total)

    with progress:
        rep = report(store, neurons, out, site=site, group=group, k=k, rows=rows, by=by, lang=sel["lang"], label=sel["label"],
                     where=sel["where"], token_kind=kinds, quantity=quantity, title=title, workers=run["workers"],
                     cache=run["cache"], progress=on_progress)
    size = os.path.getsize(out)
    data = rep.data
    n_examples = sum(len(n["examples"]) for n in data["neurons"])
    if fmt is OutputFormat.json:
        print_json({"out": str(out), "bytes": size, "seconds": rep.seconds, "neurons": len(data["neurons"]),
                    "examples": n_examples, "notes": rep.notes, "provenance": data["provenance"]})
        return
    console.print(f"[green]done[/]: {len(data['neurons'])} neurons, {n_examples} examples -> {out} "
                  f"({size / 1e6:.2f} MB) in {rep.seconds:.1f}s; open it in a browser")
