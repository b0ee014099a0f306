"""Options that several commands share, declared once, and the helpers that turn their values into
the keywords the library takes: the row selection (rows, languages, labels, filters) and the run
options (scheduler, workers, cache).

Every option shows its default in --help; a computed one says how it is computed (show_default as
text: a "[default: ...]" inside the help string would be eaten as rich markup).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .common import OutputFormat, fail

# --- the store and what part of it a query reads --------------------------------------------------
STORES = typer.Argument(..., help="The store, or several --part stores of one extraction read as one.", show_default=False)
SITE = typer.Option("resid", "--site", help="Activation site: resid or mlp (whatever the store holds).")
LAYER = typer.Option(None, "--layer", help="Model layer number; negative counts back from the last.", show_default="last stored layer")
ALL_LAYERS = "all stored"
POOL = typer.Option(None, "--pool", help="Sentence rows from this pooling: first, mean or last.", show_default="mean when stored")
TOKENS = typer.Option(False, "--tokens", help="Token rows instead of sentences (each token takes its sentence's label and language).", show_default="off: sentence rows")
LANG = typer.Option(None, "--lang", help="Keep these languages only (comma-separated or repeated).", show_default="all")
LABEL = typer.Option(None, "--label", help="Keep these labels only (comma-separated or repeated).", show_default="all")
WHERE = typer.Option(None, "--where", help="Keep rows where a stored categorical has these values: COLUMN=V1,V2 (repeatable).", show_default="no filter")
TOKEN_KIND = typer.Option(None, "--token-kind", help="Keep token rows of these kinds only: text, special, audio (comma-separated or repeated; token rows only).", show_default="all kinds")
QUANTITY = typer.Option("activation", "--quantity", help="Read activations or relevances (a store extracted with --quantity relevance or both).")
SKIP_SPECIAL = typer.Option(False, "--skip-special", help="Leave out the tokenizer's special tokens ([CLS], [SEP], <s> ...): --token-kind with every kind but special.", show_default="off: special tokens counted")

# --- the statistic ---------------------------------------------------------------------------------
BY = typer.Option("label", "--by", help="Grouping column: label, or any stored categorical (pred ...).")
ZSCORE = typer.Option(True, "--zscore/--no-zscore", help="Standardise each neuron within each language first.")
PER = typer.Option(None, "--per", help="Give the variance per language (--per lang).", show_default="pooled over languages")
WITHIN = typer.Option(None, "--within", help="Per group of this column, the variance of z over the group's rows (--within label).", show_default="off: variance over group means")
CORRELATION = typer.Option("spearman", "--method", help="spearman (rank correlation) or cosine.")
THRESHOLD = typer.Option(0.5, "--threshold", help="A neuron is above for (lang, label) when M > threshold.")
LAPE_SITE = typer.Option("mlp", "--site", help="Activation site (LAPE is defined on MLP neurons).")
LAPE_LAYERS = typer.Option(None, "--layers", help="Layers, like 0,5,11 or 3-7.", show_default=ALL_LAYERS)
LAPE_FILTER_RATE = typer.Option(0.95, "--filter-rate", help="Quantile of all activation probabilities used as threshold t.")
TOP_RATE = typer.Option(0.01, "--top-rate", help="Share of all neurons kept (lowest entropy).")

# --- how the pass runs, how results are printed ----------------------------------------------------
SCHEDULER = typer.Option(None, "--scheduler", help="Run the pass on this Dask distributed scheduler (tcp://host:8786).", show_default="local threads")
WORKERS = typer.Option(None, "--workers", help="Local threads for the pass.", show_default="CPU count")
NO_CACHE = typer.Option(False, "--no-cache", help="Neither read nor write the statistics cache in the store.", show_default="off: cache used")
FORMAT = typer.Option(OutputFormat.table, "--format", help="How to print results: rich tables, one JSON object, or CSV.")

# --- reading a corpus and running a model (extract, intervene, demo) -------------------------------
SAMPLE_CORPUS = Path(__file__).resolve().parent.parent / "data" / "emotions.jsonl"
INPUT_FORMAT = typer.Option(None, "--input-format", help="Corpus format: jsonl, csv, tsv or text.", show_default="from the extension")
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda.")


def split_names(values: Optional[list[str]]) -> Optional[list[str]]:
    """Repeated and comma-separated values as one list (None: none given)."""
    if not values:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def parse_int_list(value: str, option: str) -> list[int]:
    """``"0,5,11"`` or ``"3-7"`` or mixtures; a clear error naming the option otherwise."""
    out: list[int] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            fail(f"{option} {value!r}: expected integers like 0,5,11 or 3-7")
    return out


def parse_where(values: Optional[list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for value in values or []:
        column, sep, names = value.partition("=")
        if not sep or not column.strip() or not names.strip():
            fail(f"--where {value!r}: expected COLUMN=VALUE[,VALUE...], e.g. --where pred=joy")
        out.setdefault(column.strip(), []).extend(split_names([names]) or [])
    return out


def rows_option(pool: Optional[str], tokens: bool) -> Optional[str]:
    """The ``rows`` keyword: "tokens", a pooling, or None (the library's default)."""
    if tokens and pool:
        fail("--tokens and --pool exclude each other: rows are either tokens or pooled sentences")
    return "tokens" if tokens else pool


def token_kind_option(token_kind: Optional[list[str]], skip_special: bool) -> Optional[list[str]]:
    """The token kinds asked for (None: all rows); the library checks them against rows and store."""
    from neurostore.store import TOKEN_KINDS

    kinds = split_names(token_kind)
    if kinds and skip_special:
        fail("--token-kind and --skip-special exclude each other: --skip-special is --token-kind " + ",".join(k for k in TOKEN_KINDS if k != "special"))
    return [k for k in TOKEN_KINDS if k != "special"] if skip_special else kinds


def filters(lang: Optional[list[str]], label: Optional[list[str]], where: Optional[list[str]],
            token_kind: Optional[list[str]] = None, skip_special: bool = False, quantity: str = "activation") -> dict[str, Any]:
    """The filter keywords every query takes (lang, label, where). Token kinds and the quantity travel
    as ``where["token_kind"]`` and ``where["quantity"]``, which every query function passes on to its selection."""
    where_values = parse_where(where)
    if quantity != "activation":
        where_values["quantity"] = [quantity]
    kinds = token_kind_option(token_kind, skip_special)
    if kinds:
        where_values.setdefault("token_kind", []).extend(kinds)
    return {"lang": split_names(lang), "label": split_names(label), "where": where_values}


def selection(pool: Optional[str], tokens: bool, lang: Optional[list[str]], label: Optional[list[str]], where: Optional[list[str]],
              token_kind: Optional[list[str]] = None, skip_special: bool = False, quantity: str = "activation") -> dict[str, Any]:
    """The row-selection keywords of a query that reads sentence or token rows: rows and filters."""
    return {"rows": rows_option(pool, tokens), **filters(lang, label, where, token_kind, skip_special, quantity)}


def run_options(scheduler: Optional[str], workers: Optional[int], no_cache: Optional[bool] = None) -> dict[str, Any]:
    """The run keywords: scheduler, workers, and ``cache`` for the queries that have a cache
    (``no_cache`` None: the command has no --no-cache)."""
    if workers is not None and workers < 1:
        fail(f"--workers {workers}: expected at least 1")
    run: dict[str, Any] = {"scheduler": scheduler, "workers": workers}
    if no_cache is not None:
        run["cache"] = not no_cache
    return run


def renamed(value: Any, old_value: Any, name: str, old_name: str) -> tuple[Any, str]:
    """An option given by its name or by its old, hidden one (kept for old scripts): the value, and
    the name it came by, for messages."""
    if old_value is None:
        return value, name
    if value is not None and value != old_value:
        fail(f"{old_name} is the old name of {name}: give one of them")
    return old_value, old_name


def open_stores(stores: list[str]) -> Any:
    """The STORES argument as one store (several --part stores, or a collection, read as one)."""
    import neurostore

    return neurostore.open(stores, storage_options=storage_options())


# `neurostore --storage-option KEY=VALUE COMMAND ...` (cli.main's callback sets it for the command)
STORAGE_OPTIONS: dict[str, Any] = {}


def storage_options() -> dict[str, Any] | None:
    """The fsspec options of s3:// (or other URL) stores given to this command; None if none."""
    return dict(STORAGE_OPTIONS) or None


def parse_storage_options(values: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as fsspec storage options: ``true``/``false`` and numbers become values,
    a dotted key nests (``client_kwargs.region_name=eu-west-1``)."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            fail(f"--storage-option {item!r}: give KEY=VALUE, e.g. endpoint_url=http://localhost:9000, anon=true")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    pass
        *path, last = key.strip().split(".")
        into = out
        for part in path:
            into = into.setdefault(part, {})
            if not isinstance(into, dict):
                fail(f"--storage-option {item!r}: {part} is given both as a value and as a group of options")
        into[last] = value
    return out
