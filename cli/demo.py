"""``neurostore demo``: the whole study on the sample corpus, end to end.

Extract (resid + mlp, every token, pooled) -> the paper's analysis on the pooled sentence vectors
of the last layer (label variance, cross-lingual correlation, polyglot / monolingual neurons) and
LAPE on the MLP neurons -> figures -> the neuron browser (report.html) of the label-sensitive neurons.
Then, where espeak-ng is on PATH (or with ``--speech``), the same on speech: a small corpus synthesized
with espeak-ng (voice settings as labels), a speech encoder's every frame, the contrast selector per label
and LAPE on the MLP's audio rows. Each step is the same library call the other commands make.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, handle_errors, print_table, run_extract
from .options import INPUT_FORMAT, SAMPLE_CORPUS


@handle_errors
def demo_command(
    out_dir: Path = typer.Option(Path("neurostore-demo"), "--out-dir", help="Folder for the store and the figures."),
    corpus: Path = typer.Option(SAMPLE_CORPUS, "--corpus", help="Labelled multilingual corpus (text, label, lang)."),
    input_format: Optional[str] = INPUT_FORMAT,
    model: Optional[str] = typer.Option(None, "--model", help="Model folder or hub name.", show_default="the packaged all-MiniLM-L6-v2"),
    pool: str = typer.Option("mean", "--pool", help="Sentence vectors the analysis reads: first or mean."),
    threshold: float = typer.Option(0.5, "--threshold", help="Polyglot threshold on mean z-scored activations."),
    top: int = typer.Option(10, "--top", help="Neurons listed in the variance table."),
    speech: Optional[bool] = typer.Option(None, "--speech/--no-speech", help="Also run the speech part (synthesizes its corpus with espeak-ng).",
                                          show_default="when espeak-ng is on PATH"),
    speech_model: Optional[Path] = typer.Option(None, "--speech-model", help="Speech encoder folder (wav2vec2, HuBERT, WavLM, Whisper) for the speech part.",
                                                show_default="a small wav2vec2 with random weights in OUT_DIR/speech-model"),
    speech_clips: Optional[int] = typer.Option(None, "--speech-clips", hidden=True, help="Synthesize the first N clips only (tests)."),
) -> None:
    """Extract the sample corpus and run the paper's analysis on it; figures land in OUT_DIR/figures.
    With espeak-ng on PATH, then the same on a synthesized speech corpus (OUT_DIR/speech.zarr)."""
    from neurostore.errors import NeurostoreError
    from neurostore.extract import ExtractOptions
    from neurostore import open as open_store
    from neurostore import plots
    from neurostore import query as q

    missing = _speech_missing()
    if speech and missing:
        raise NeurostoreError(f"--speech: {missing}; run without --speech for the text part")
    if speech is not False and speech_model is not None and not speech_model.is_dir():  # refused before the text part runs
        raise NeurostoreError(f"--speech-model {speech_model}: no such folder; give a speech encoder saved with save_pretrained, or leave it out")
    if speech_clips is not None and speech_clips < 1:
        raise NeurostoreError(f"--speech-clips {speech_clips}: expected at least 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    store_path = out_dir / "emotions.zarr"
    resume = store_path.exists()
    console.print(f"[bold]1. extract[/] {corpus} -> {store_path}" + (" (exists: resuming, nothing to do if complete)" if resume else ""))
    options = None if resume else ExtractOptions(sites=["resid", "mlp"], pool=["first", "mean"])
    run_extract([str(corpus)], str(store_path), model=model, options=options, corpus_options={"fmt": input_format}, resume=resume)
    store = open_store(str(store_path))
    figures = out_dir / "figures"
    layer = store.sites["resid"]["layers"][-1]
    console.print(f"\n[bold]2. analysis[/]: site resid, layer {layer}, pooled '{pool}' sentence vectors, z-scored within language")

    var = q.variance(store, "resid", layer, by="label", top=top, rows=pool)  # the figure draws this same result
    print_table(f"top {top} label-variance neurons (variance of label means of z; ANOVA F); the variance figure marks them", ["neuron", "variance", "F"],
                [(n, v, float(var.f[n])) for n, v in var.top])
    corr = q.correlate(store, "resid", layer, by="label", method="spearman", rows=pool)
    print_table("cross-lingual Spearman correlation of label profiles, mean over labels", ["", *corr.across],
                [(a, *row) for a, row in zip(corr.across, corr.mean.tolist())])
    poly = q.polyglot(store, "resid", layer, threshold=threshold, by="label", sensitive_top=50, rows=pool)
    counts = poly.counts()
    print_table(f"polyglot / monolingual neurons (M > {threshold})", ["label", "polyglot", *poly.langs, "share polyglot among top-50 variance"],
                [(g, counts[g]["polyglot"], *(counts[g].get(l, "-") for l in poly.langs), poly.shares[g]["polyglot"]) for g in poly.groups])
    lape = q.lape(store, "mlp")
    print_table("LAPE language-specific MLP neurons (token rows, all layers)", ["lang", "neurons", "per layer"],
                [(l, len(v), " ".join(map(str, lape.per_layer()[l]))) for l, v in lape.neurons.items()])

    console.print("\n[bold]3. figures[/]")
    means = q.group_means(store, "resid", layer, by="label", rows=pool)
    label = "joy" if "joy" in means.groups else means.groups[0]
    written = [
        plots.save(plots.variance_figure(var), figures / f"variance-resid-L{layer}.png"),
        plots.save(plots.correlation_figure(corr), figures / f"correlate-resid-L{layer}.png"),
        plots.save(plots.means_figure(means, label, means.top_neurons(label, top)), figures / f"means-{label}-resid-L{layer}.png"),
        plots.save(plots.polyglot_figure(poly), figures / f"polyglot-resid-L{layer}.png"),
        plots.save(plots.lape_figure(lape), figures / "lape-mlp.png"),
    ]
    for path in written:
        console.print(f"  {path}")

    from neurostore import report as rp
    from neurostore.neurons import neuron_set_from_json

    page = out_dir / "report.html"
    sensitive = neuron_set_from_json(var.to_json(), source="the variance top")
    rep = rp.build(store, sensitive, scores={(layer, n): v for n, v in var.top}, score_name="variance", k=20, rows=pool,
                   title=f"top {top} label-variance neurons, resid layer {layer}")
    rp.write(rep, page)
    console.print(f"\n[bold]4. report[/]: the {sensitive.n} label-sensitive neurons, browsable: [bold]{page}[/] (open it in a browser)")
    console.print(f"\n[green]done[/]: store {store_path}, figures in [bold]{figures}[/], report {page}")

    if speech is None and missing:
        console.print(f"\n(speech part skipped: {missing})")
    elif speech is not False:
        _speech_part(out_dir, speech_model, speech_clips)


def _speech_missing() -> Optional[str]:
    """Why the speech part cannot run here (None: it can): it needs espeak-ng and soundfile."""
    import importlib.util

    from neurostore import speech_corpus

    if not speech_corpus.available():
        return "espeak-ng is not on PATH (Debian/Ubuntu: apt-get install espeak-ng)"
    if importlib.util.find_spec("soundfile") is None:
        return "writing and reading speech clips needs soundfile: pip install 'neurostore[speech]'"
    return None


def _speech_part(out_dir: Path, model: Optional[Path], clips: Optional[int]) -> None:
    """Synthesize the speech corpus, extract a speech encoder's every frame, select label-sensitive
    MLP neurons on the audio rows and LAPE by language: the text part's library calls on speech."""
    from neurostore import open as open_store
    from neurostore import query as q
    from neurostore import speech_corpus
    from neurostore.extract import ExtractOptions

    corpus = out_dir / "speech" / "speech.jsonl"
    console.print(f"\n[bold]5. speech corpus[/] (espeak-ng) -> {corpus}" + (" (exists: reusing it)" if corpus.exists() else ""))
    if not corpus.exists():
        speech_corpus.synthesize(corpus.parent, clips=clips)
    rows = sum(1 for _ in corpus.open(encoding="utf-8"))
    console.print(f"  {rows} clips: en/es/fr sentences, four 'emotions' that are voice settings (pitch, speed, loudness), not acted emotion")
    if model is None:
        model = out_dir / "speech-model"
        if not (model / "config.json").exists():
            speech_corpus.random_encoder(model)
        console.print(f"  model: a small wav2vec2 with [bold]random weights[/] ({model}; nothing downloaded). With random weights the "
                      "neurons react to the sound of the voice (pitch, speed, loudness), which is all the labels are here; "
                      "give a trained encoder with --speech-model")
    store_path = out_dir / "speech.zarr"
    resume = store_path.exists()
    console.print(f"\n[bold]6. extract[/] {corpus} -> {store_path} (resid + mlp, every frame a token row of kind audio, pooled mean)"
                  + (" (exists: resuming, nothing to do if complete)" if resume else ""))
    options = None if resume else ExtractOptions(sites=["resid", "mlp"], pool=["mean"])
    run_extract([str(corpus)], str(store_path), model=str(model), options=options, corpus_options=None, resume=resume)
    store = open_store(str(store_path))

    audio = {"token_kind": ["audio"]}
    console.print("\n[bold]7. analysis[/]: site mlp, all layers, token rows of kind audio (query select/lape --tokens --token-kind audio)")
    sel = q.select(store, "mlp", by="label", method="contrast", rows="tokens", where=audio)
    print_table("label-sensitive MLP neurons (contrast selector: P(act > 0) in the label minus elsewhere)", ["label", "neurons", "top (layer:neuron score)"],
                [(g, len(v), "  ".join(f"{a}:{b} {c:.2f}" for a, b, c in v[:3])) for g, v in sel.selected.items()])
    lape = q.lape(store, "mlp", rows="tokens", where=audio)
    print_table("LAPE language-specific MLP neurons (audio frames, all layers)", ["lang", "neurons", "per layer"],
                [(l, len(v), " ".join(map(str, lape.per_layer()[l]))) for l, v in lape.neurons.items()])
    console.print(f"\n[green]done[/]: speech store {store_path}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
