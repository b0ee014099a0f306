"""`neurostore compare`: overlap (Jaccard) of neuron sets from query outputs, and their layers.

The library (``neurostore.compare``) reads and compares; this module parses options and renders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .common import OutputFormat, console, handle_errors, print_json, print_table, write_csv
from .options import FORMAT


def register(app: typer.Typer) -> None:
    """Add the ``compare`` command to the application."""
    app.command(
        "compare",
        help=(
            "Overlap of neuron sets from query outputs (lape, select, polyglot, variance; --format json): "
            "Jaccard |A ∩ B| / |A ∪ B| of the (layer, neuron) pairs per group both files hold and overall "
            "(the union of a file's groups), for every pair of files, and each set's count per layer."
        ),
    )(compare_command)


@handle_errors
def compare_command(
    files: list[Path] = typer.Argument(..., help="Two or more query JSON outputs of one site (written with --format json)."),
    fmt: OutputFormat = FORMAT,
) -> None:
    from neurostore import compare as cmp

    result = cmp.run(files)
    if fmt is OutputFormat.json:
        print_json(result)
        return
    columns, rows = _overlap_rows(result)
    if fmt is OutputFormat.csv:
        write_csv(columns, rows)
        return
    _render(result, rows)


def _overlap_rows(result: dict) -> tuple[list[str], list[list[Any]]]:
    columns = ["a", "b", "group", "n_a", "n_b", "intersection", "union", "jaccard"]
    rows = []
    for pair in result["pairs"]:
        for group, j in [("overall", pair["overall"]), *pair["groups"].items()]:
            rows.append([pair["a"], pair["b"], group, j["a"], j["b"], j["intersection"], j["union"], j["jaccard"]])
    return columns, rows


def _render(result: dict, rows: list[list[Any]]) -> None:
    layers = sorted({int(layer) for s in result["sets"] for layer in s["layers"]})
    print_table(
        f"Neuron sets ({result['site']}): neurons per layer (overall = union of the file's groups)",
        ["set", "analysis", "groups", "neurons", *[f"L{layer}" for layer in layers]],
        [[s["name"], s["analysis"], ", ".join(f"{g} {n}" for g, n in s["groups"].items()), s["n"],
          *[s["layers"].get(str(layer), 0) for layer in layers]] for s in result["sets"]],
    )
    print_table(
        "Overlap: Jaccard = |A ∩ B| / |A ∪ B|",
        ["A", "B", "group", "|A|", "|B|", "|A ∩ B|", "Jaccard"],
        [[a, b, g, na, nb, inter, "-" if j is None else f"{j:.3f}"] for a, b, g, na, nb, inter, _union, j in rows],
    )
    for pair in result["pairs"]:
        if not pair["groups"]:
            console.print(f"[dim]{pair['a']} and {pair['b']} share no group name: only the overall overlap is shown.[/]")
