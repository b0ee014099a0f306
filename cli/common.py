"""What every command shares: one-line errors, output formats, the console (options: cli/options.py)."""

from __future__ import annotations

import csv
import enum
import functools
import json
import sys
import warnings
from typing import Any, Callable, Iterable, Sequence

import typer
from rich.console import Console
from rich.table import Table

from neurostore.errors import MACHINE_ERRNOS, NeurostoreError, io_fault

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"
    csv = "csv"


def fail(message: str, code: int = 2) -> None:
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
