"""``neurostore info``: what a store holds, and (--verify) whether every committed row reads back."""

from __future__ import annotations

import typer

from .common import OutputFormat, console, err_console, handle_errors, print_json, print_table
from .options import FORMAT, storage_options
from neurostore import store as st
from neurostore.space import format_bytes


@handle_errors
def info_command(
    stores: list[str] = typer.Argument(..., help="A store, or several --part stores read as one."),
    verify: bool = typer.Option(False, "--verify", help="Read every committed row and check that the tables agree."),
    output: OutputFormat = FORMAT,
) -> None:
    """What a store holds: model, sites, layers, widths, counts per label and language, size on disk."""
    store = st.open(stores, storage_options=storage_options())
    info = st.summary(store)
    problems = st.verify(store) if verify else None
    if output == OutputFormat.json:
        if problems is not None:
            info["verify"] = {"ok": not problems, "problems": problems}
        print_json(info)
    else:
        state = "[green]complete[/]" if info["complete"] else f"[yellow]incomplete[/] ({info['docs']:,} of {info['docs_total']:,} sentences committed)"
        rows = [
            ("store", ", ".join(info["paths"])),
            ("model", f"{info['model']} ({info['model_type']}{', classifier' if info['classifier'] else ''})"),
            ("state", state),
            ("sentences", f"{info['docs']:,}"),
            ("token rows", f"{info['token_rows']:,}" + ("" if info["tokens"] else " (not stored: --no-tokens)")),
            ("truncated", f"{info['truncated']:,}"),
            ("dtype", f"compute {info['compute_dtype']}, stored {info['store_dtype']}"),
            ("non-finite", "none" if not info["nonfinite"] else "; ".join(
                f"{name} {sum(v.values()):,} (layers {','.join(v)})" for name, v in info["nonfinite"].items())),
            ("batches", "?" if info["real_token_share"] is None else f"{info['real_token_share']:.0%} of computed tokens real (plan v{info['plan']})"),
            *(_mode_rows(info) if info.get("mode") == "stats-only" else
              [("compression", f"{info['compression']}, " + (f"{info['compression_ratio']:.2f}x" if info["compression_ratio"] else "?"))]),
            ("pooled", ", ".join(info["pool"]) or "none"),
            ("quantities", ", ".join(info["quantities"]) + (f" (relevance by {info['relevance']['rule']}, target {info['relevance']['target']})"
                                                            if info.get("relevance") else "")),
            *_corpus_rows(info),
            ("features", (", ".join(info["features"]) or "none") + (f" (lacks {', '.join(info['lacks'])}: written by an older neurostore)" if info["lacks"] else "")),
            *([] if info.get("mode") == "stats-only" else [("activations", format_bytes(info["activation_bytes"]))]),
            ("on disk", format_bytes(info["disk_bytes"])),
        ]
        print_table("store", ["", ""], rows, header=False)
        print_table("sites", ["site", "layers", "n_layers", "width", "token rows"],
                    [(s, v["layers"], v["n_layers"], v["width"], v["rows"]) for s, v in info["sites"].items()])
        for column, counts in info["counts"].items():
            if counts:
                print_table(f"sentences per {column}", [column, "sentences"], sorted(counts.items()))
        if problems is not None:
            if problems:
                for p in problems:
                    err_console.print(f"[red]problem:[/] {p}")
            else:
                console.print("[green]verify: every committed row is readable and consistent[/]")
    if problems:
        raise typer.Exit(1)


def _mode_rows(info: dict) -> list[tuple[str, str]]:
    """What a stats-only store keeps in place of activations."""
    stats = info["stats"]
    kept = f"statistics per {', '.join(stats['groups'])} and token kind; top {stats['k']} rows per neuron; " + (
        "quantile sketch" if stats["sketch"] else "no quantile sketch (--no-sketch)")
    return [("mode", f"[cyan]stats-only[/] (no activations): {kept}")]


def _corpus_rows(info: dict) -> list[tuple[str, str]]:
    """Where labels and languages came from, and the rows --skip-bad left out (newer stores)."""
    rows = []
    options = {"label": "--label-col", "lang": "--lang-col"}
    for key, source in (info.get("sources") or {}).items():
        rows.append((f"{ {'label': 'labels', 'lang': 'languages'}[key]} from", source or f"[yellow]none[/] (not in the corpus; name the column with {options[key]})"))
    if info.get("skipped") is not None:
        rows.append(("skipped rows", f"{info['skipped']:,}" + (" (--skip-bad: empty or missing texts)" if info["skipped"] else "")))
    return rows


def register(app: typer.Typer) -> None:
    app.command("info")(info_command)
