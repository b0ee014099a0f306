"""``neurostore extract``: stream a corpus's activations into a store."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .common import OutputFormat, handle_errors, print_json, print_table, run_extract, run_parts
from .options import DEVICE, INPUT_FORMAT, SAMPLE_CORPUS, parse_int_list, split_names
from neurostore.space import format_bytes


def _split(value: Optional[str]) -> Optional[list[str]]:
    return split_names([value]) if value else None


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
    sites: Optional[str] = typer.Option(None, "--sites", help="Sites to store, comma-separated: resid (hidden_states\\[i]) and/or mlp (MLP neurons); for an audio-language model also audio.resid / audio.mlp (its audio encoder, on the audio rows). \\[default: resid]", show_default=False),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers to store: all, or numbers like 0,5,11 or 3-7. \\[default: all layers]", show_default=False),
    pool: Optional[str] = typer.Option(None, "--pool", help="Pooled sentence vectors to store: first, mean, last (comma-separated), or none. \\[default: first,mean]", show_default=False),
    no_tokens: bool = typer.Option(False, "--no-tokens", help="Store pooled vectors only, not every token."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: float16, bfloat16 or float32. \\[default: float32 on CPU; on CUDA the checkpoint's own half dtype, else float16]", show_default=False),
    store_dtype: Optional[str] = typer.Option(None, "--store-dtype", help="Stored dtype: float16, bfloat16 (kept losslessly as uint16 bits) or float32. Values float16 cannot hold are counted and reported. \\[default: float16]", show_default=False),
    compression: Optional[str] = typer.Option(None, "--compression", help="Chunk compression: none, lz4 (bit-shuffled) or zstd[:LEVEL]. \\[default: lz4]", show_default=False),
    writers: int = typer.Option(0, "--writers", help="Threads that compress and write shards (0: one per core, 2 to 8). Does not change the stored bytes."),
    device: str = DEVICE,
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Truncate sentences to this many tokens; truncations are counted. \\[default: the model's limit]", show_default=False),
    max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", help="Token budget per batch, padding included; batches are length-sorted and at least 80% real tokens. \\[default: auto from the device: 512 on CPU; 32768 on CUDA, less where a batch's activations pass 1 GiB]", show_default=False),
    buffer_mb: Optional[int] = typer.Option(None, "--buffer-mb", help="One window of activations, written and committed together (two are held). \\[default: auto from the device: 256 on CPU; on CUDA four batches' worth]", show_default=False),
    module_pattern: Optional[str] = typer.Option(None, "--module-pattern", help="Glob naming the modules whose outputs are the mlp site, for architectures not known, e.g. 'encoder.layer.*.intermediate'. \\[default: the known module of the model's family]", show_default=False),
    parts: Optional[int] = typer.Option(None, "--parts", help="Extract in N parts into the folder --out (one store per part, read as one by every command), on --devices or a --scheduler cluster, or one after another. \\[default: one store]", show_default=False),
    devices: Optional[str] = typer.Option(None, "--devices", help="With --parts: a local cluster with one worker per device, e.g. cuda:0,cuda:1 (cpu,cpu runs two CPU workers). \\[default: the parts run one after another here]", show_default=False),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="With --parts: run each part as a task on this Dask scheduler (tcp://host:8786); start each worker with --resources GPU=1 and its own GPU. \\[default: no cluster]", show_default=False),
    part: Optional[str] = typer.Option(None, "--part", help="Extract the i-th of N equal slices of the corpus (0-based, e.g. 0/4) into its own store; query the parts together. \\[default: the whole corpus]", show_default=False),
    input_format: Optional[str] = INPUT_FORMAT,
    fmt: Optional[str] = typer.Option(None, "--format", help="How --dry-run prints its estimate: table or json (jsonl, csv, tsv, text: the corpus format, as --input-format). \\[default: table]", show_default=False),
    text_col: str = typer.Option("text", "--text-col", help="Column holding the sentence."),
    label_col: str = typer.Option("label", "--label-col", help="Column holding the label (optional in the data)."),
    lang_col: str = typer.Option("lang", "--lang-col", help="Column holding the language (optional in the data)."),
    lang: Optional[str] = typer.Option(None, "--lang", help="Language of whole files: one code for all files, or one per file (comma-separated). \\[default: the --lang-col column]", show_default=False),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip and count corpus rows whose text is empty or missing, or whose audio file is missing or undecodable, instead of stopping at the first."),
    audio_col: str = typer.Option("audio", "--audio-col", help="Column naming each row's audio file (relative to the corpus file, absolute, or an fsspec URL); a corpus with it is read as speech."),
    prompt_col: str = typer.Option("prompt", "--prompt-col", help="Column holding an audio-language model's text prompt for the row (optional in the data)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="An audio-language model's text prompt, after the audio, for rows without a --prompt-col value. \\[default: none]", show_default=False),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Load an architecture whose code comes from the model's repository (review that code first)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the store's estimated size (rows, tokens, arrays, bytes raw and on disk) against the free space, and exit without writing."),
    no_space_check: bool = typer.Option(False, "--no-space-check", help="Start even where the estimate says the target has too little free space."),
    stats_only: bool = typer.Option(False, "--stats-only", help="Store no activations: reduce every batch during the forward pass into statistics per language and label (count, mean, variance, P(act > 0), min/max, the quantile sketch, top rows per neuron), enough for variance, correlate, polyglot, lape, select, stats and top-examples. For corpora too large to store; see the README's table of what each mode answers."),
    groups: Optional[str] = typer.Option(None, "--groups", help="With --stats-only: the groupings whose statistics are kept apart, lang and/or label. \\[default: lang,label]", show_default=False),
    k: Optional[int] = typer.Option(None, "--k", help="With --stats-only: the top rows kept per neuron and group, for top-examples (0: none). \\[default: 20]", show_default=False),
    no_sketch: bool = typer.Option(False, "--no-sketch", help="With --stats-only: leave out the quantile sketch (P10/P50/P90; 512 bytes per neuron and group)."),
    commit_every: float = typer.Option(60.0, "--commit-every", help="With --stats-only: commit the statistics at most this often, in seconds (each commit writes them whole; a kill loses what came after the last one)."),
    quantity: Optional[str] = typer.Option(None, "--quantity", help="What to store per neuron: activation, relevance (its contribution to the model's prediction, one backward pass per batch) or both, side by side; queries pick one with --quantity. \\[default: activation]", show_default=False),
    rule: Optional[str] = typer.Option(None, "--rule", help="With --quantity relevance|both: grad-x-act (activation x gradient, any model) or attnlrp (AttnLRP's rules: BERT/XLM-R, GPT-2, LLaMA/Qwen2). \\[default: grad-x-act]", show_default=False),
    relevance_target: Optional[str] = typer.Option(None, "--relevance-target", help="With --quantity relevance|both, what is explained: next-token (causal LMs: the log-probability of each actual next token), label (classifiers: the gold label's logit) or predicted (the predicted label's logit). \\[default: next-token for causal LMs, label for classifiers]", show_default=False),
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
        stats_only=True if stats_only else None,
        groups=_split(groups),
        k=k,
        sketch=False if no_sketch else None,
        quantity=quantity,
        rule=rule,
        relevance_target=relevance_target,
        commit_seconds=commit_every,
        trust_remote_code=trust_remote_code,
    )
    output = OutputFormat.table
    if fmt is not None and fmt in (OutputFormat.table.value, OutputFormat.json.value):
        output = OutputFormat(fmt)
    elif fmt is not None and fmt in FORMATS:  # the corpus format, as before --input-format
        input_format = input_format or fmt
    elif fmt is not None:
        raise NeurostoreError(f"--format {fmt!r}: use table or json (how --dry-run prints); the corpus format is --input-format")
    corpus_options = dict(fmt=input_format, text_col=text_col, label_col=label_col, lang_col=lang_col, lang=lang, skip_bad=skip_bad,
                          audio_col=audio_col, prompt_col=prompt_col, prompt=prompt)
    if parts is not None or devices or scheduler:
        if parts is None:
            raise NeurostoreError("--devices/--scheduler: they run the parts of --parts N; add --parts")
        if dry_run:
            raise NeurostoreError("--dry-run with --parts: estimate one store without --parts (the parts add up to it)")
        run_parts(paths, out, parts, model=model, options=options, corpus_options=corpus_options, resume=resume, overwrite=overwrite,
                  quiet=quiet, devices=_split(devices), scheduler=scheduler)
        return
    result = run_extract(
        paths, out, model=model, options=options, corpus_options=corpus_options, resume=resume, overwrite=overwrite, quiet=quiet,
        space_check=not no_space_check, dry_run=dry_run,
    )
    if dry_run:
        _print_estimate(result, output)


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


def register(app: typer.Typer) -> None:
    app.command("extract")(extract_command)
