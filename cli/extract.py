"""``neurostore extract`` and ``neurostore info``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
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
from rich.markup import escape
from rich.text import Text

from cli.common import OutputFormat, console, err_console, fail, handle_errors, print_json, print_table
from cli.options import FORMAT, parse_int_list
from neurostore import store as st
from neurostore.space import format_bytes

SAMPLE_CORPUS = Path(__file__).resolve().parent.parent / "data" / "emotions.jsonl"


class RateColumn(ProgressColumn):
    """tokens/s and MB/s since the bar started (raw activation bytes handed to the writer)."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("-- tok/s  -- MB/s", style="progress.data.speed")
        tokens = task.fields.get("tokens", 0) / elapsed
        mb = task.fields.get("bytes", 0) / elapsed / 1e6
        return Text(f"{tokens:,.0f} tok/s  {mb:,.1f} MB/s", style="progress.data.speed")


def _split(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@handle_errors
def extract_command(
    corpus: list[Path] = typer.Argument(
        None,
        help="Corpus files (JSONL, CSV, TSV or plain text, one sentence a line). Default: the sample corpus data/emotions.jsonl.",
        show_default=False,
    ),
    out: str = typer.Option("neurostore.zarr", "--out", "-o", help="Store to write: a local folder or any fsspec URL."),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="Hugging Face model: a local folder or a hub name (the packaged model's name, sentence-transformers/all-MiniLM-L6-v2, loads it offline). \\[default: the packaged all-MiniLM-L6-v2, no network needed]",
        show_default=False,
    ),
    sites: Optional[str] = typer.Option(None, "--sites", help="Sites to store, comma-separated: resid (hidden_states\\[i]) and/or mlp (MLP neurons). \\[default: resid]", show_default=False),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers to store: all, or numbers like 0,5,11 or 3-7. \\[default: all layers]", show_default=False),
    pool: Optional[str] = typer.Option(None, "--pool", help="Pooled sentence vectors to store: first, mean, last (comma-separated), or none. \\[default: first,mean]", show_default=False),
    no_tokens: bool = typer.Option(False, "--no-tokens", help="Store pooled vectors only, not every token."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: float16, bfloat16 or float32. \\[default: float32 on CPU; on CUDA the checkpoint's own half dtype, else float16]", show_default=False),
    store_dtype: Optional[str] = typer.Option(None, "--store-dtype", help="Stored dtype: float16, bfloat16 (kept losslessly as uint16 bits) or float32. Values float16 cannot hold are counted and reported. \\[default: float16]", show_default=False),
    compression: Optional[str] = typer.Option(None, "--compression", help="Chunk compression: none, lz4 (bit-shuffled) or zstd[:LEVEL]. \\[default: lz4]", show_default=False),
    writers: int = typer.Option(0, "--writers", help="Threads that compress and write shards (0: one per core, 2 to 8). Does not change the stored bytes."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Truncate sentences to this many tokens; truncations are counted. \\[default: the model's limit]", show_default=False),
    max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", help="Token budget per batch, padding included; batches are length-sorted and at least 80% real tokens. \\[default: auto from the device: 512 on CPU; 32768 on CUDA, less where a batch's activations pass 1 GiB]", show_default=False),
    buffer_mb: Optional[int] = typer.Option(None, "--buffer-mb", help="One window of activations, written and committed together (two are held). \\[default: auto from the device: 256 on CPU; on CUDA four batches' worth]", show_default=False),
    module_pattern: Optional[str] = typer.Option(None, "--module-pattern", help="Glob naming the modules whose outputs are the mlp site, for architectures not known, e.g. 'encoder.layer.*.intermediate'. \\[default: the known module of the model's family]", show_default=False),
    part: Optional[str] = typer.Option(None, "--part", help="Extract the i-th of N equal slices of the corpus (0-based, e.g. 0/4) into its own store; query the parts together. \\[default: the whole corpus]", show_default=False),
    input_format: Optional[str] = typer.Option(None, "--input-format", help="Corpus format: jsonl, csv, tsv or text. \\[default: from the extension]", show_default=False),
    fmt: Optional[str] = typer.Option(None, "--format", help="How --dry-run prints its estimate: table or json (jsonl, csv, tsv, text: the corpus format, as --input-format). \\[default: table]", show_default=False),
    text_col: str = typer.Option("text", "--text-col", help="Column holding the sentence."),
    label_col: str = typer.Option("label", "--label-col", help="Column holding the label (optional in the data)."),
    lang_col: str = typer.Option("lang", "--lang-col", help="Column holding the language (optional in the data)."),
    lang: Optional[str] = typer.Option(None, "--lang", help="Language of whole files: one code for all files, or one per file (comma-separated). \\[default: the --lang-col column]", show_default=False),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip and count corpus rows whose text is empty or missing, instead of stopping at the first."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the store's estimated size (rows, tokens, arrays, bytes raw and on disk) against the free space, and exit without writing."),
    no_space_check: bool = typer.Option(False, "--no-space-check", help="Start even where the estimate says the target has too little free space."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted extraction from its last commit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Stream activations of every layer and token into a chunked, compressed Zarr store.

    Sentences are batched by length under a token budget, run through the model (mixed precision
    on CUDA) and written in corpus order, padding stripped, with their labels and languages. Safe
    to kill: --resume continues where it stopped, without losing or repeating a sentence.
    """
    from neurostore.corpus import FORMATS
    from neurostore.errors import NeurostoreError
    from neurostore.extract import ExtractOptions, parse_part

    paths = [str(p) for p in corpus] if corpus else [str(SAMPLE_CORPUS)]
    pool_list = _split(pool)
    if pool is not None and pool.strip().lower() == "none":
        pool_list = []
    options = ExtractOptions(
        sites=_split(sites),
        layers=None if layers in (None, "all") else parse_int_list(layers, "--layers"),
        pool=pool_list,
        tokens=False if no_tokens else None,
        dtype=dtype,
        store_dtype=store_dtype,
        max_length=max_length,
        max_batch_tokens=max_batch_tokens,
        buffer_mb=buffer_mb,
        module_pattern=module_pattern,
        part=parse_part(part),
        compression=compression,
        device=device,
        writers=writers,
    )
    output = OutputFormat.table
    if fmt is not None and fmt in (OutputFormat.table.value, OutputFormat.json.value):
        output = OutputFormat(fmt)
    elif fmt is not None and fmt in FORMATS:  # the corpus format, as before --input-format
        input_format = input_format or fmt
    elif fmt is not None:
        raise NeurostoreError(f"--format {fmt!r}: use table or json (how --dry-run prints); the corpus format is --input-format")
    corpus_options = dict(fmt=input_format, text_col=text_col, label_col=label_col, lang_col=lang_col, lang=lang, skip_bad=skip_bad)
    run_extract(
        paths, out, model=model, options=options, corpus_options=corpus_options, resume=resume, overwrite=overwrite, quiet=quiet,
        space_check=not no_space_check, dry_run=dry_run, output=output,
    )


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
    output: OutputFormat = OutputFormat.table,
) -> None:
    """Run an extraction under a progress bar (sentences, tokens/s, MB/s, ETA) and print the summary."""
    from neurostore.extract import extract

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
        )
    except KeyboardInterrupt:
        progress.stop()
        fail(f"interrupted; continue with: neurostore extract ... --out {out} --resume", code=130)
    finally:
        progress.stop()
    if dry_run:
        _print_estimate(result, output)
        return
    if result.already_complete:
        console.print(f"{out}: already complete ({result.docs:,} sentences); nothing to do")
        return
    meta = result.meta
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}")
    skipped = meta["corpus"].get("skipped", 0)
    console.print(
        f"[green]done[/]: {result.docs:,} sentences, {result.tokens:,} tokens"
        f" ({result.truncated:,} truncated at {meta['options']['max_length']} tokens"
        + (f"; {skipped:,} unusable corpus rows skipped" if skipped else "")
        + f") -> {out} in {result.seconds:.1f}s; see: neurostore info {out}"
    )


def _print_estimate(result: "Any", output: OutputFormat) -> None:
    """The --dry-run estimate: what would be written, and whether it fits."""
    est = result.estimate
    if output == OutputFormat.json:
        print_json({"out": result.path, "docs_total": result.docs, "tokens_total": result.tokens, **est.to_dict()})
        return
    if est.fits is None:
        verdict = "not checked"
    elif est.fits:
        verdict = "[green]fits[/]"
    else:
        verdict = f"[red]short by {format_bytes(est.disk_bytes - est.free_bytes)}[/]: extract would refuse (--no-space-check goes on anyway)"
    left = " (left to write on --resume)" if est.resume else ""
    rows = [
        ("store", result.path),
        ("sentences", f"{est.docs:,}{left}"),
        ("token rows", f"{est.tokens:,}{left}"),
        ("raw", format_bytes(est.raw_bytes)),
        ("on disk (estimate)", f"{format_bytes(est.disk_bytes)} ({est.compression}, activations ~{est.ratio:.2f}x)"),
        ("free space", "not checked: object store" if est.free_bytes is None else f"{format_bytes(est.free_bytes)} at {est.free_at}"),
        ("verdict", verdict),
    ]
    print_table("extract --dry-run (nothing written)", ["", ""], rows, header=False)
    print_table("arrays", ["array", "shape", "dtype", "raw", "on disk"], [
        (a["name"], " x ".join(f"{n:,}" for n in a["shape"]), a["dtype"], format_bytes(a["raw_bytes"]), format_bytes(a["disk_bytes"])) for a in est.arrays
    ])


@handle_errors
def info_command(
    stores: list[str] = typer.Argument(..., help="A store, or several --part stores read as one."),
    verify: bool = typer.Option(False, "--verify", help="Read every committed row and check that the tables agree."),
    output: OutputFormat = FORMAT,
) -> None:
    """What a store holds: model, sites, layers, widths, counts per label and language, size on disk."""
    store = st.open(stores)
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
            ("compression", f"{info['compression']}, " + (f"{info['compression_ratio']:.2f}x" if info["compression_ratio"] else "?")),
            ("pooled", ", ".join(info["pool"]) or "none"),
            *_corpus_rows(info),
            ("features", (", ".join(info["features"]) or "none") + (f" (lacks {', '.join(info['lacks'])}: written by an older neurostore)" if info["lacks"] else "")),
            ("activations", format_bytes(info["activation_bytes"])),
            ("on disk", format_bytes(info["disk_bytes"])),
        ]
        print_table("store", ["", ""], rows, header=False)
        print_table("sites", ["site", "layers", "n_layers", "width"], [(s, v["layers"], v["n_layers"], v["width"]) for s, v in info["sites"].items()])
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
    app.command("extract")(extract_command)
    app.command("info")(info_command)
