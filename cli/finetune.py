"""`neurostore finetune`: LoRA masked to a neuron set, against random sets of the same size.

The workflow is the library's (``neurostore.finetune.run``); this module parses options, shows the
progress bar with the loss and renders the result. torch, transformers and peft are imported
inside the command, so `neurostore --help` stays fast.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .common import OutputFormat, console, err_console, fail, handle_errors, print_json, print_table, write_csv
from .options import DEVICE, FORMAT, INPUT_FORMAT, split_names


class Task(str, enum.Enum):
    auto = "auto"
    classify = "classify"
    lm = "lm"


def register(app: typer.Typer) -> None:
    """Add the ``finetune`` command to the application."""
    app.command(
        "finetune",
        help=(
            "Fine-tune only a neuron set: LoRA on the MLP projections of the set's layers, its update masked to "
            "the set's neurons (up/gate rows, down columns), the classifier head (and, with --attention, "
            "attention LoRA) trained too. --controls N repeats the training with N random sets of the same count "
            "per layer. Evaluation per language and label before and after: accuracy and macro-F1 (classifiers), "
            "loss and perplexity (language models). Adapters are saved in peft's format under --out."
        ),
    )(finetune_command)


@handle_errors
def finetune_command(
    train: list[Path] = typer.Argument(..., help="Training corpus (JSONL, CSV, TSV): labelled for a classifier, any text for --task lm."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to fine-tune: a local folder or a hub name; a model without a classifier head gets one for the training labels.", show_default="the packaged all-MiniLM-L6-v2"),
    neurons: str = typer.Option(..., "--neurons", help="Neuron set of site mlp: a query JSON output (lape, select, variance, polyglot) or layer:neuron pairs like 3:17,3:40."),
    group: Optional[str] = typer.Option(None, "--group", help="Which entry of the JSON to use (a language of a lape output, a group of select).", show_default="union of all entries"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder of the adapters (the selected set's; controls under controls/) and finetune.json."),
    controls: int = typer.Option(0, "--controls", help="Random neuron sets of the same count per layer, each trained the same way.", min=0),
    eval_files: Optional[list[Path]] = typer.Option(None, "--eval", help="Evaluation corpus (repeatable); scored per language and label before and after.", show_default="the training files, every language"),
    train_lang: Optional[list[str]] = typer.Option(None, "--train-lang", help="Train on these languages of the training corpus only (comma-separated or repeated), e.g. en for zero-shot transfer.", show_default="all"),
    task: Task = typer.Option(Task.auto, "--task", help="classify (sequence classifier) or lm (next-token loss); auto: classify when every training sentence has a label."),
    epochs: int = typer.Option(3, "--epochs", help="Passes over the training corpus.", min=1),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimiser steps (overrides --epochs).", show_default="epochs x batches", min=1),
    batch_size: int = typer.Option(16, "--batch-size", help="Sentences per optimiser step.", min=1),
    lr: float = typer.Option(5e-4, "--lr", help="AdamW learning rate (LoRA factors and head)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW decoupled weight decay."),
    rank: int = typer.Option(8, "--rank", help="LoRA rank r.", min=1),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha", help="LoRA alpha (the update is scaled by alpha / r)."),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", help="Dropout on the LoRA input."),
    attention: bool = typer.Option(False, "--attention/--no-attention", help="Also LoRA (unmasked) on every layer's attention projections, as in the study."),
    train_head: bool = typer.Option(True, "--train-head/--freeze-head", help="Train the classifier head (saved with the adapter)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the head, the LoRA initialisation, the data order and the controls."),
    save_every: int = typer.Option(50, "--save-every", help="Write a checkpoint every this many steps.", min=1),
    resume: bool = typer.Option(False, "--resume", help="Continue the runs in --out from their last checkpoints; finished runs are kept."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    device: str = DEVICE,
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Truncate sentences to this many tokens.", show_default="the model's limit"),
    max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", help="Token budget per evaluation batch, padding included.", show_default="512 on CPU, 32768 on CUDA"),
    input_format: Optional[str] = INPUT_FORMAT,
    text_col: str = typer.Option("text", "--text-col", help="Column holding the sentence."),
    label_col: str = typer.Option("label", "--label-col", help="Column holding the label."),
    lang_col: str = typer.Option("lang", "--lang-col", help="Column holding the language (gives per-language scores)."),
    fmt: OutputFormat = FORMAT,
) -> None:
    from neurostore import finetune as ft

    if resume and overwrite:
        fail("--resume and --overwrite contradict each other: continue the runs in --out, or replace them")
    hyper = ft.Hyper(
        rank=rank, lora_alpha=lora_alpha, dropout=lora_dropout, lr=lr, weight_decay=weight_decay, epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, max_length=max_length, attention=attention, train_head=train_head,
        seed=seed, save_every=save_every,
    )
    quiet = fmt is not OutputFormat.table
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
        TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=err_console, disable=quiet, transient=False,
    )
    tasks: dict[str, Any] = {}

    def start(name: str, total: int, done: int) -> None:
        bar.start()
        if done:
            err_console.print(f"{name}: resuming after step {done}")
        tasks[name] = bar.add_task(name, total=total, completed=done, loss="-")

    def step(name: str, _step: int, loss: float) -> None:
        bar.update(tasks[name], advance=1, loss=f"{loss:.4f}")

    def say(msg: str) -> None:
        if not quiet:
            err_console.print(f"[dim]{msg}[/]")

    try:
        result = ft.run(
            train, model, neurons, out, group=group, controls=controls, eval_files=eval_files, task=task.value,
            train_lang=split_names(train_lang), hyper=hyper, device=device, resume=resume, overwrite=overwrite,
            input_format=input_format, text_col=text_col, label_col=label_col, lang_col=lang_col,
            max_batch_tokens=max_batch_tokens, progress=ft.Progress(start=start, step=step, say=say),
        )
    except KeyboardInterrupt:
        bar.stop()
        fail(f"interrupted; continue with: neurostore finetune ... --out {out} --resume", code=130)
    finally:
        bar.stop()
    data = result.to_json()
    if fmt is OutputFormat.json:
        print_json(data)
    elif fmt is OutputFormat.csv:
        write_csv(*rows(data))
    else:
        _render(data)


def rows(data: dict) -> tuple[list[str], list[list[Any]]]:
    """One row per number and group: before, after (selected), change, controls' change mean and std."""
    metrics = ("accuracy", "macro_f1") if data["task"] == "classify" else ("loss", "perplexity")
    summary = data.get("controls_summary") or {}
    after, change = data["selected"]["after"], data["selected"]["change"]
    columns = ["metric", "group", "before", "after", "change", "controls_change_mean", "controls_change_std"]
    out = []

    def add(metric: str, group: str, b: dict, a: dict, c: dict, s: dict | None) -> None:
        spread = (s or {}).get(metric)
        out.append([metric, group, b[metric], a[metric], c.get(metric),
                    spread["mean"] if spread else None, spread["std"] if spread else None])

    for metric in metrics:
        add(metric, "all", data["before"]["all"], after["all"], change["all"], summary.get("all"))
        for lang, b in data["before"]["per_lang"].items():
            add(metric, f"lang {lang}", b, after["per_lang"][lang], change["per_lang"][lang],
                (summary.get("per_lang") or {}).get(lang))
    if data["task"] == "classify":
        for label, b in data["before"]["all"]["per_label"].items():
            spread = ((summary.get("all") or {}).get("per_label") or {}).get(label)
            out.append(["label_accuracy", f"label {label}", b, after["all"]["per_label"][label],
                        change["all"]["per_label"][label], spread["mean"] if spread else None, spread["std"] if spread else None])
    return columns, out


def _cell(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _render(data: dict) -> None:
    neurons, sel = data["neurons"], data["selected"]
    per_layer = ", ".join(f"L{layer}: {n}" for layer, n in neurons["per_layer"].items())
    n_controls = len(data["controls"])
    title = (
        f"finetune ({data['task']}): {neurons['n']} mlp neurons ({per_layer})"
        f"{' of ' + repr(neurons['group']) if neurons.get('group') else ''}, {data['n_train']} training and "
        f"{data['n_eval']} evaluation sentences, {sel['steps']} steps"
    )
    header = ["metric", "group", "before", "after", "change"] + ([f"controls change, n={n_controls} (mean ± std)"] if n_controls else [])
    table = []
    for metric, group, b, a, c, cmean, cstd in rows(data)[1]:
        row = [metric, group, _cell(b), _cell(a), _cell(c, True)]
        if n_controls:
            row.append("-" if cmean is None else f"{cmean:+.3f} ± {cstd:.3f}")
        table.append(row)
    print_table(title, header, table)
    speed = sel.get("tokens_per_s")
    console.print(
        f"adapter: {sel['adapter']} (load with PeftModel.from_pretrained); training loss {_cell(sel['first_loss'])} -> "
        f"{_cell(sel['last_loss'])}" + (f", {speed:,.0f} tokens/s" if speed else "") + f"; result: {Path(data['out']) / 'finetune.json'}"
    )
    if not n_controls:
        console.print("[dim]No controls: add --controls N to see whether random sets of the same size do as much.[/]")
