"""`neurostore intervene`: ablate, set or amplify a neuron set in a classifier or a causal LM and
measure the effect.

The workflow is the library's (``neurostore.intervene.run``); this module parses options and renders.
torch and transformers are imported inside the command, so `neurostore --help` stays fast.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, Optional

import typer

from .common import OutputFormat, console, err_console, handle_errors, print_json, print_table, write_csv
from .options import DEVICE, FORMAT, INPUT_FORMAT, open_stores, storage_options
from neurostore.errors import NeurostoreError


class Mode(str, enum.Enum):
    ablate = "ablate"
    set = "set"
    gain = "gain"


class Stat(str, enum.Enum):
    mean = "mean"
    p10 = "p10"
    p90 = "p90"


class Positions(str, enum.Enum):
    all = "all"
    first = "first"
    last = "last"


def register(app: typer.Typer) -> None:
    """Add the ``intervene`` command to the application."""
    app.command(
        "intervene",
        help=(
            "Ablate, set or amplify a neuron set of a sequence classifier (accuracy and macro-F1 before "
            "and after, overall and per label) or of a causal LM (next-token loss and perplexity per "
            "language and label, CRANE's selectivity): the self vs cross effect, and random controls.\n\n"
            "Neurons come from any query JSON output or from --neurons 11:523,11:87 with --site. Modes: "
            "ablate (0), set (--stat of --of, read from the --stats store), gain (x --alpha). --controls N "
            "runs N random sets with the same count per layer (reproducible with --seed)."
        ),
    )(intervene_command)


@handle_errors
def intervene_command(
    corpus: list[Path] = typer.Argument(..., help="Evaluation corpus (JSONL, CSV, TSV): for a classifier with gold labels (the model's labels); for a causal LM texts with a language and/or label column."),
    model: str = typer.Option(..., "--model", "-m", help="A sequence classifier or a causal LM (config names ...ForCausalLM / ...LMHeadModel): a local folder or a hub name."),
    neurons: str = typer.Option(..., "--neurons", help="A query JSON output (variance top, polyglot, lape, select) or layer:neuron pairs like 11:523,11:87 (with --site)."),
    site: Optional[str] = typer.Option(None, "--site", help="Site of a layer:neuron list: resid or mlp (a JSON file names its own).", show_default=False),
    group: Optional[str] = typer.Option(None, "--group", help="Which label/language entry of the JSON to use (LABEL/LANG for monolingual polyglot neurons); also the default --target.", show_default="union of all entries"),
    target: Optional[str] = typer.Option(None, "--target", help="Label (or language) whose accuracy drop (LM: loss increase) is the self effect; the others give the cross effect.", show_default="--group"),
    mode: Mode = typer.Option(Mode.ablate, "--mode", help="ablate: set to 0; set: overwrite with --stat of --of (needs --stats); gain: multiply by --alpha."),
    alpha: float = typer.Option(2.0, "--alpha", help="Gain factor for --mode gain."),
    stat: Stat = typer.Option(Stat.mean, "--stat", help="Statistic written by --mode set: the group's mean, 10th or 90th percentile."),
    of: Optional[str] = typer.Option(None, "--of", help="Group whose statistic --mode set writes: a label or language of the store (or label:NAME, lang:NAME, pred:NAME).", show_default="--target"),
    stats: Optional[str] = typer.Option(None, "--stats", help="Store of the same model and site: its cached group statistics feed --mode set; its site width and dtype are checked.", show_default=False),
    positions: Positions = typer.Option(Positions.all, "--positions", help="Act at every real token, or only the pooled position (first for encoders, last for decoder classifiers; not last for a causal LM). Padding is never touched."),
    controls: int = typer.Option(0, "--controls", help="Random neuron sets of the same size per layer to run as controls.", min=0),
    seed: int = typer.Option(0, "--seed", help="Seed of the random controls."),
    device: str = DEVICE,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: float16, bfloat16 or float32 (autocast).", show_default="float16 on CUDA, float32 on CPU"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Truncate sentences to this many tokens.", show_default="the model's limit"),
    max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", help="Token budget per batch, padding included; batches are length-sorted.", show_default="512 on CPU, 32768 on CUDA"),
    module_pattern: Optional[str] = typer.Option(None, "--module-pattern", help="Glob naming the modules whose outputs are the mlp site, for architectures not known.", show_default=False),
    input_format: Optional[str] = INPUT_FORMAT,
    text_col: str = typer.Option("text", "--text-col", help="Column holding the sentence."),
    label_col: str = typer.Option("label", "--label-col", help="Column holding the gold label."),
    lang_col: str = typer.Option("lang", "--lang-col", help="Column holding the language (optional; gives per-language accuracy)."),
    label_words: Optional[str] = typer.Option(None, "--label-words", help="Audio-language models: the word of each label, e.g. joy=happy,anger=angry; the prediction is the label whose word has the highest log-probability after the prompt.", show_default=False),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Audio-language models: the text after the audio, for rows without a 'prompt' column, e.g. 'The speaker sounds'.", show_default=False),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a figure of the per-label accuracy change, selected vs controls (png, pdf, svg).", show_default=False),
    fmt: OutputFormat = FORMAT,
) -> None:
    from neurostore import intervene as iv

    quiet = fmt is not OutputFormat.table
    if plot is not None:  # before the runs: the figure draws a classifier's per-label accuracy
        from neurostore import models as M

        if iv.is_causal_lm_config(M.read_config(model)):
            raise NeurostoreError(f"--plot: the figure draws a classifier's per-label accuracy; --model {model} is a causal LM (drop --plot)")
    result = iv.run(
        corpus, model, neurons, site=site, group=group, target=target, mode=mode.value, alpha=alpha, stat=stat.value,
        of=of, stats=open_stores([stats]) if stats and storage_options() else stats, positions=positions.value, controls=controls, seed=seed, device=device, dtype=dtype,
        max_length=max_length, max_batch_tokens=max_batch_tokens, module_pattern=module_pattern,
        input_format=input_format, text_col=text_col, label_col=label_col, lang_col=lang_col, label_words=label_words, prompt=prompt,
        progress=None if quiet else (lambda msg: err_console.print(f"[dim]{msg}[/]")),
    )
    if plot is not None:
        from neurostore.plots import plot_intervention

        plot_intervention(result, plot)
    lm = result.get("task") == "lm"
    if fmt is OutputFormat.json:
        print_json(result)
    elif fmt is OutputFormat.csv:
        write_csv(*(_lm_rows(result) if lm else _rows(result)))
    elif lm:
        _render_lm(result)
    else:
        _render(result, plot)


def _spread_cell(spread: dict | None) -> str:
    if not spread:
        return "-"
    return f"{spread['mean']:+.3f} ± {spread['std']:.3f}"


def _rows(result: dict) -> tuple[list[str], list[list[Any]]]:
    """One row per number: overall, per label, per language; controls as mean and std of the change."""
    base, after, summary = result["baseline"], result["intervened"], result.get("controls_summary") or {}
    columns = ["metric", "group", "baseline", "intervened", "change", "controls_change_mean", "controls_change_std"]
    rows = []

    def add(metric: str, group: str, b: float, a: float, ctrl: dict | None) -> None:
        mean = std = None
        if ctrl:
            mean, std = ctrl["mean"] - b, ctrl["std"]
        rows.append([metric, group, b, a, a - b, mean, std])

    add("accuracy", "all", base["accuracy"], after["accuracy"], summary.get("accuracy"))
    add("macro_f1", "all", base["macro_f1"], after["macro_f1"], summary.get("macro_f1"))
    for key, metric in (("per_label", "label_accuracy"), ("per_lang", "lang_accuracy")):
        for name, b in (base.get(key) or {}).items():
            add(metric, name, b, after[key][name], (summary.get(key) or {}).get(name))
    return columns, rows


def _render(result: dict, plot: Path | None) -> None:
    neurons = result["neurons"]
    per_layer = ", ".join(f"L{layer}: {n}" for layer, n in neurons["per_layer"].items()) or "none"
    if result["mode"] == "gain":
        how = f"gain x{result['alpha']:g}"
    elif result["mode"] == "set":
        how = f"set to {result.get('stat')} of {result.get('of')!r}"
    else:
        how = "ablate"
    title = (
        f"{how}: {neurons['n']} {neurons['site']} neurons ({per_layer})"
        f"{' of ' + repr(neurons['group']) if neurons.get('group') else ''}, positions {result['positions']}, "
        f"{result['n_sentences']} sentences"
    )
    n_controls = len(result["controls"])
    columns, rows = _rows(result)
    header = ["", "baseline", "intervened", "change"] + ([f"controls change, n={n_controls} (mean ± std)"] if n_controls else [])
    table_rows = []
    for metric, group, b, a, change, cmean, cstd in rows:
        label = {"accuracy": "accuracy", "macro_f1": "macro-F1"}.get(metric) or (
            f"label {group}" if metric == "label_accuracy" else f"lang {group}"
        )
        if group == result.get("target"):
            label += " (target)"
        row = [label, f"{b:.3f}", f"{a:.3f}", f"{change:+.3f}"]
        if n_controls:
            row.append(f"{cmean:+.3f} ± {cstd:.3f}")
        table_rows.append(row)
    print_table(title, header, table_rows)

    eff = result["intervened"]["effect"]
    ceff = (result.get("controls_summary") or {}).get("effect") or {}
    names = [
        ("accuracy_drop", "accuracy drop"),
        ("macro_f1_drop", "macro-F1 drop"),
        ("self_drop", f"self drop ({result.get('target')})"),
        ("cross_drop", f"cross drop (other {eff.get('by') or 'group'}s)"),
        ("toward_target", "toward target (share)"),
        ("target_prob_change", "target prob. change"),
        ("changed", "changed predictions"),
    ]
    effect_rows = []
    for key, label in names:
        if key not in eff or eff[key] is None:
            continue
        row = [label, f"{eff[key]:+.3f}"]
        if n_controls:
            row.append(_spread_cell(ceff.get(key)))
            spread = ceff.get(key)
            row.append(f"{spread['min']:+.3f} .. {spread['max']:+.3f}" if spread else "-")
        effect_rows.append(row)
    header = ["effect", "selected"] + (["controls (mean ± std)", "controls (min .. max)"] if n_controls else [])
    print_table("Effect of the intervention (positive drop = worse than baseline)", header, effect_rows)
    if not n_controls:
        console.print("[dim]No controls: add --controls N to see whether random sets of the same size do as much.[/]")
    if plot is not None:
        console.print(f"plot written to {plot}")


def _lm_rows(result: dict) -> tuple[list[str], list[list[Any]]]:
    """One row per number of a causal LM: loss and perplexity, overall, per language, per label."""
    base, after, summary = result["baseline"], result["intervened"], result.get("controls_summary") or {}
    columns = ["metric", "group", "tokens", "baseline", "intervened", "change", "controls_change_mean", "controls_change_std"]
    rows = []
    groups = [("all", "all", base, after, summary)]
    for key, kind in (("per_lang", "lang"), ("per_label", "label")):
        for name in base.get(key) or {}:
            groups.append((kind, name, base[key][name], after[key][name], (summary.get(key) or {}).get(name) or {}))
    for metric in ("loss", "perplexity"):
        for kind, name, b, a, ctrl in groups:
            spread = ctrl.get(metric)
            mean = std = None
            if spread:
                mean, std = spread["mean"] - b[metric], spread["std"]
            rows.append([metric, name if kind == "all" else f"{kind}:{name}", b["tokens"], b[metric], a[metric],
                         a[metric] - b[metric], mean, std])
    return columns, rows


def _how(result: dict) -> str:
    if result["mode"] == "gain":
        return f"gain x{result['alpha']:g}"
    if result["mode"] == "set":
        return f"set to {result.get('stat')} of {result.get('of')!r}"
    return "ablate"


def _render_lm(result: dict) -> None:
    neurons = result["neurons"]
    per_layer = ", ".join(f"L{layer}: {n}" for layer, n in neurons["per_layer"].items()) or "none"
    title = (
        f"{_how(result)}: {neurons['n']} {neurons['site']} neurons ({per_layer})"
        f"{' of ' + repr(neurons['group']) if neurons.get('group') else ''}, "
        f"{result['n_sentences']} sentences: next-token loss (nats per token) and perplexity"
    )
    n_controls = len(result["controls"])
    base, after, summary = result["baseline"], result["intervened"], result.get("controls_summary") or {}
    header = ["", "tokens", "loss", "loss after", "change", "perplexity", "ppl. after"]
    header += [f"controls loss change, n={n_controls} (mean ± std)"] if n_controls else []
    rows = []
    groups = [("all", base, after, summary)]
    for key, kind in (("per_lang", "lang"), ("per_label", "label")):
        for name in base.get(key) or {}:
            label = f"{kind} {name}" + (" (target)" if name == result.get("target") and after["effect"].get("by") == kind else "")
            groups.append((label, base[key][name], after[key][name], (summary.get(key) or {}).get(name) or {}))
    for label, b, a, ctrl in groups:
        row = [label, str(b["tokens"]), f"{b['loss']:.4f}", f"{a['loss']:.4f}", f"{a['loss'] - b['loss']:+.4f}",
               f"{b['perplexity']:.2f}", f"{a['perplexity']:.2f}"]
        if n_controls:
            spread = ctrl.get("loss")
            row.append(f"{spread['mean'] - b['loss']:+.4f} ± {spread['std']:.4f}" if spread else "-")
        rows.append(row)
    print_table(title, header, rows)

    eff = after["effect"]
    ceff = summary.get("effect") or {}
    by = eff.get("by") or "group"
    names = [
        ("loss_increase", "loss increase (all)"),
        ("self_degradation", f"self degradation ({result.get('target')})"),
        ("cross_degradation", f"cross degradation (mean of other {by}s)"),
        ("selectivity", "selectivity (self / cross)"),
    ]
    effect_rows = []
    for key, label in names:
        value = eff.get(key)
        if value is None and key != "selectivity":
            continue
        if value is None and eff.get("self_degradation") is None:
            continue
        row = [label, "n/a (cross <= 0)" if value is None else (f"{value:.2f}" if key == "selectivity" else f"{value:+.4f}")]
        if n_controls:
            spread = ceff.get(key)
            fmt = "{:.2f}" if key == "selectivity" else "{:+.4f}"
            row.append(f"{fmt.format(spread['mean'])} ± {fmt.format(spread['std']).lstrip('+')}" if spread else "-")
            row.append(f"{fmt.format(spread['min'])} .. {fmt.format(spread['max'])}" if spread else "-")
        effect_rows.append(row)
    header = ["effect (degradation = loss increase, nats)", "selected"]
    header += ["controls (mean ± std)", "controls (min .. max)"] if n_controls else []
    print_table("Effect of the intervention (positive = worse than baseline)", header, effect_rows)
    if not n_controls:
        console.print("[dim]No controls: add --controls N to see whether random sets of the same size do as much.[/]")
    if result.get("target") is None:
        console.print("[dim]No target: pass --group or --target LANG for the self vs cross effect and the selectivity.[/]")
