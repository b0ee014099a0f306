"""The ``neurostore`` application: one Typer app, one module per command group."""

from __future__ import annotations

import typer

from . import compare as compare_cli
from . import demo as demo_cli
from . import extract as extract_cli
from . import finetune as finetune_cli
from . import info as info_cli
from . import options
from . import intervene as intervene_cli
from . import plot as plot_cli
from . import query as query_cli
from . import report as report_cli

app = typer.Typer(
    name="neurostore",
    help=(
        "Neuron-level activation statistics for transformers over large multilingual corpora.\n\n"
        "demo: the whole study on the sample corpus. "
        "extract: stream activations of every layer and token into a Zarr store. "
        "info: what a store holds. query: out-of-core statistics (variance, correlation, polyglot "
        "neurons, LAPE, selectors). plot: figures from query results. intervene: ablate, set or "
        "amplify neurons and measure the effect on a classifier or a language model. compare: overlap "
        "of neuron sets. report: a browsable HTML page of a neuron set."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    storage_option: list[str] = typer.Option(
        [], "--storage-option", metavar="KEY=VALUE",
        help="fsspec option for s3:// (or other URL) stores, for any command; repeat it: endpoint_url=http://host:9000, "
             "key=..., secret=..., anon=true, client_kwargs.region_name=eu-west-1.", show_default=False),
) -> None:
    """Neuron-level activation statistics for transformers over large multilingual corpora."""
    options.STORAGE_OPTIONS.clear()
    options.STORAGE_OPTIONS.update(options.parse_storage_options(storage_option))


extract_cli.register(app)
info_cli.register(app)
app.add_typer(query_cli.app, name="query")
app.add_typer(plot_cli.app, name="plot")
intervene_cli.register(app)
compare_cli.register(app)
report_cli.register(app)
demo_cli.register(app)
finetune_cli.register(app)


def main() -> None:
    """The console script. ``--storage-option`` belongs to the root (it serves every command), but a
    user writes it after the command too: those pairs move in front of the command."""
    import sys

    front, rest, args, i = [], [], sys.argv[1:], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg == "--storage-option" and i + 1 < len(args):
            front += args[i:i + 2]
            i += 2
            continue
        (front if arg.startswith("--storage-option=") else rest).append(arg)
        i += 1
    app(args=front + rest, prog_name="neurostore")


if __name__ == "__main__":
    main()
