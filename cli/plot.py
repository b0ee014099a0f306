"""`neurostore plot`: (being written)."""

import typer

app = typer.Typer(help="(being written)", no_args_is_help=True)
