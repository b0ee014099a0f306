"""``neurostore demo``: the whole study on the sample corpus, end to end.

Extract (resid + mlp, every token, pooled) -> the paper's analysis on the pooled sentence vectors
of the last layer (label variance, cross-lingual correlation, polyglot / monolingual neurons) and
LAPE on the MLP neurons -> figures -> the neuron browser (report.html) of the label-sensitive neurons. Each step is the same library call the other commands make.
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
) -> None:
    """Extract the sample corpus and run the paper's analysis on it; figures land in OUT_DIR/figures."""
    from neurostore.extract import ExtractOptions
    from neurostore import open as open_store
    from neurostore import plots
    from neurostore import query as q

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


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
