"""What every command shares: one-line errors, output formats, the console (options: cli/options.py)."""

from __future__ import annotations

import csv
import enum
import functools
import json
import os
import sys
import warnings
from typing import Any, Callable, Iterable, NoReturn, Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from neurostore.errors import MACHINE_ERRNOS, NeurostoreError, io_fault

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"
    csv = "csv"


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit non-zero: the user's mistake, not a traceback."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(func: Callable) -> Callable:
    """Turn :class:`NeurostoreError` (exit 2), :class:`~neurostore.errors.Fault` and I/O faults
    (exit 1) and warnings about incomplete stores into plain lines."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = func(*args, **kwargs)
            except NeurostoreError as err:
                _print_warnings(caught)
                fail(str(err), code=err.exit_code)
            except OSError as err:
                if err.errno not in MACHINE_ERRNOS:
                    raise
                _print_warnings(caught)
                fail(str(io_fault(err, "I/O fault", "fix it and run the command again")), code=1)
            except KeyboardInterrupt:
                fail("interrupted", code=130)
        _print_warnings(caught)
        return result

    return wrapper


def _print_warnings(caught: Iterable[warnings.WarningMessage]) -> None:
    seen = set()
    for w in caught:
        text = str(w.message)
        if text in seen or not issubclass(w.category, UserWarning):
            continue
        seen.add(text)
        err_console.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], header: bool = True) -> None:
    table = Table(title=title, title_justify="left", show_header=header)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    console.print(table)


def write_csv(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    writer = csv.writer(sys.stdout)
    writer.writerow(columns)
    writer.writerows(rows)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class RateColumn(ProgressColumn):
    """tokens/s and MB/s since the bar started (raw activation bytes handed to the writer)."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("-- tok/s  -- MB/s", style="progress.data.speed")
        tokens = task.fields.get("tokens", 0) / elapsed
        mb = task.fields.get("bytes", 0) / elapsed / 1e6
        return Text(f"{tokens:,.0f} tok/s  {mb:,.1f} MB/s", style="progress.data.speed")


def run_extract(
    paths: list[str],
    out: str,
    *,
    model: Optional[str],
    options: "Any",
    corpus_options: Optional[dict] = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    space_check: bool = True,
    dry_run: bool = False,
) -> Any:
    """Run an extraction under a progress bar (sentences, tokens/s, MB/s, ETA) and print the summary
    (extract and demo). Returns the library's result; a dry run's estimate is left to the caller."""
    from neurostore.extract import extract

    from .options import storage_options

    progress = Progress(
        TextColumn("[bold]extract"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("sentences"),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        disable=quiet,
        transient=False,
    )
    task = progress.add_task("extract", total=None, tokens=0, bytes=0)
    state = {"tokens": 0, "bytes": 0}

    def on_start(total_docs: int, total_tokens: int, done_docs: int, done_tokens: int) -> None:
        progress.start()
        progress.update(task, total=total_docs, completed=done_docs)
        if done_docs:
            err_console.print(f"resuming after {done_docs:,} committed sentences")

    def on_batch(docs: int, tokens: int, nbytes: int) -> None:
        state["tokens"] += tokens
        state["bytes"] += nbytes
        progress.update(task, advance=docs, tokens=state["tokens"], bytes=state["bytes"])

    def on_warning(line: str) -> None:
        err_console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False)

    try:
        result = extract(
            paths, out, model=model, options=options, corpus_options=corpus_options, resume=resume, overwrite=overwrite,
            on_start=on_start, on_batch=on_batch, on_warning=on_warning, space_check=space_check, dry_run=dry_run,
            kill_at=os.environ.get("NEUROSTORE_FAULT"),  # the resume tests' kill points in a child process
            storage_options=storage_options(),
        )
    except KeyboardInterrupt:
        progress.stop()
        fail(f"interrupted; continue with: neurostore extract ... --out {out} --resume", code=130)
    finally:
        progress.stop()
    if dry_run:
        return result
    if result.already_complete:
        console.print(f"{out}: already complete ({result.docs:,} sentences); nothing to do")
        return result
    meta = result.meta
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}")
    skipped = meta["corpus"].get("skipped", 0)
    from neurostore.audio import UNBOUNDED

    limit = meta["options"]["max_length"]
    cut = f"{result.truncated:,} truncated at {limit} tokens" if limit < UNBOUNDED else "no length limit: a speech encoder's frames"
    console.print(
        f"[green]done[/]: {result.docs:,} sentences, {result.tokens:,} tokens"
        f" ({cut}"
        + (f"; {skipped:,} unusable corpus rows skipped" if skipped else "")
        + f") -> {out} in {result.seconds:.1f}s; see: neurostore info {out}"
    )
    return result


def run_parts(paths: list[str], out: str, n: int, *, model: Optional[str], options: "Any", corpus_options: Optional[dict],
              resume: bool, overwrite: bool, quiet: bool, devices: Optional[list[str]], scheduler: Optional[str]) -> Any:
    """``extract --parts N``: every part under one progress bar, read from the parts' commits."""
    from neurostore.parts import extract_parts

    progress = Progress(
        TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), TextColumn("sentences ({task.fields[where]})"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console, disable=quiet, transient=False,
    )
    where = f"{n} parts" + (f" on {','.join(devices)}" if devices else f" on {scheduler}" if scheduler else ", one after another")
    task = progress.add_task("extract", total=None, where=where)

    def on_progress(docs: int, tokens: int, total: int) -> None:
        progress.update(task, completed=docs, total=total or None)

    progress.start()
    try:
        result = extract_parts(paths, out, n, model=model, options=options, corpus_options=corpus_options, resume=resume, overwrite=overwrite,
                               devices=devices, scheduler=scheduler, on_progress=on_progress)
    except KeyboardInterrupt:
        progress.stop()
        fail(f"interrupted; continue with: neurostore extract ... --out {out} --parts {n} --resume", code=130)
    finally:
        progress.stop()
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"[green]done[/]: {result.docs:,} sentences, {result.tokens:,} tokens in {n} parts -> {out} in {result.seconds:.1f}s; "
                  f"see: neurostore info {out}")
    return result
