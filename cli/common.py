"""What every command shares: one-line errors, output formats, the console."""

from __future__ import annotations

import csv
import enum
import errno
import functools
import json
import sys
import warnings
from typing import Any, Callable, Iterable, Sequence

import typer
from rich.console import Console
from rich.table import Table

from neurostore.errors import NeurostoreError

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"
    csv = "csv"


FORMAT_OPTION = typer.Option(
    OutputFormat.table, "--format", help="How to print results: rich tables, one JSON object, or CSV."
)


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
                fail(describe_os_error(err), code=1)
            except KeyboardInterrupt:
                fail("interrupted", code=130)
        _print_warnings(caught)
        return result

    return wrapper


# Faults of the machine rather than bugs: one line, exit 1, wherever they surface.
MACHINE_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS}


def describe_os_error(err: OSError) -> str:
    """One line for an I/O fault: what failed, the path, and for a full disk the free space."""
    import os
    import shutil

    path = err.filename or ""
    text = f"{os.strerror(err.errno)}" + (f": {path}" if path else "")
    if err.errno in (errno.ENOSPC, errno.EDQUOT) and path:
        probe = os.path.dirname(os.path.abspath(path))
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe)
        try:
            text += f" ({shutil.disk_usage(probe).free / 2**20:,.1f} MiB free there)"
        except OSError:
            pass
    return text + "; free space or fix the device, then run again (extract: --resume continues)"


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


def parse_int_list(value: str, option: str) -> list[int]:
    """``"0,5,11"`` or ``"3-7"`` or mixtures; a clear error naming the option otherwise."""
    out: list[int] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            fail(f"{option} {value!r}: expected integers like 0,5,11 or 3-7")
    return out
