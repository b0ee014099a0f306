"""The Zarr layout of an activation store: create, commit, resume, open, summarise, verify.

This module is the contract between extraction and everything that reads a store; outside tools
read the same arrays with plain ``zarr``. Layout (one Zarr v3 group)::

    attrs["neurostore"]             metadata (see ``new_meta``): features, model, sites, dtypes, options,
                                    corpus fingerprint, committed counts, complete or not
    docs/text        [n_docs] str   the sentence as read
    docs/label       [n_docs] int32 category code, -1 = missing; attrs["categories"] = names
    docs/lang        [n_docs] int32 likewise
    docs/token_start [n_docs] int64 first row of the sentence in tokens/* and acts/*
    docs/n_tokens    [n_docs] int32 real (unpadded, possibly truncated) tokens of the sentence
    docs/truncated   [n_docs] bool  cut at --max-length
    docs/duration    [n_docs] float32 seconds of the utterance (audio corpora; docs/audio: its file)
    docs/logits      [n_docs, C] float32   sequence classifiers only
    docs/pred        [n_docs] int32        argmax of logits; attrs["categories"] = id2label
    tokens/token_id  [n_tokens] int32
    tokens/doc       [n_tokens] int32 the sentence each token row belongs to
    tokens/kind      [n_tokens] int8  TOKEN_KINDS code; attrs["categories"] = TOKEN_KINDS,
                                    attrs["special_tokens"] = {token id: string} of the tokenizer
    tokens/offsets   [n_tokens, 2] int32  character span [start, end) of the token in docs/text;
                                    a special token the tokenizer added has the empty span where it
                                    sits (end of the token before it); -1 where the tokenizer gives none
    acts/{site}      [n_tokens, n_layers, width]   absent with --no-tokens
    pooled/{site}/{first|mean|last} [n_docs, n_layers, width]
    relevance/{site}                          like acts/{site}, the neurons' relevance (store feature
    relevance_pooled/{site}/{first|mean|last} ``relevance``; ``neurostore.relevance``): present when
                                    extracted with --quantity relevance or both (attrs["quantities"]
                                    lists what is stored, attrs["relevance"] the rule and target);
                                    acts/ and pooled/ are absent with --quantity relevance
    acts/{site}_layer, pooled/{site}/{site}_layer  [n_layers] int32  the layer numbers (coordinates)

Every array names its dimensions (per site ``{site}_layer``/``{site}_neuron``, so xarray opens the
store with ``xr.open_datatree``) and the root carries consolidated metadata, rewritten with each
commit and cache write for outside readers; neurostore never reads it (:func:`open_group`).

    cache/<key>/...                 statistics of earlier queries (derived data: a damaged entry is
                                    dropped and recomputed)
    neurostore.lock                 held while an extraction writes (see ``lock``)

Every chunk of every array ends in a CRC32C (the store feature ``checksums``), so a flipped bit is a
read error naming the array and rows (``chunks.damaged``), never a silently different value.

Sentences are in corpus order; padding is never stored. Activation arrays are chunked
``(rows, 1, width)`` (one layer per chunk, so reading a layer never reads another) and sharded
``(shard_rows, n_layers, width)`` (one file holds every layer of a block of rows). ``bfloat16`` has
no Zarr dtype: such arrays hold the raw bfloat16 bits as ``uint16`` and carry
``attrs["neurostore_dtype"] = "bfloat16"``; :func:`decode` turns them into float32 losslessly.

Writes go through ``writer.Writer`` (whole shards, in parallel) and become visible through
:func:`commit`, which records how many sentences are safely on disk. Rows past
``committed_docs``/``committed_tokens`` are never trusted.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from .chunks import read_zarr
from .errors import Fault, NeurostoreError

ATTR = "neurostore"
# What a store may hold beyond the first layout (schema 1). New stores list the features this version
# writes; a reader refuses a store naming a feature it does not know (written by a newer neurostore),
# and a store lacking one opens as before (``info`` lists what it lacks).
#   plan_v2     batches planned by batching.PLAN_VERSION 2 (resume keeps a store's own plan)
#   checksums   a CRC32C after every chunk of every array (activations, tables, cache)
#   token_kind  tokens/kind: which token rows are text, special tokens of the tokenizer, or audio
#   token_offsets  tokens/offsets: each token's character span in docs/text (top-examples shows it)
#   stats_only  a mode, not an improvement: grouped statistics in place of activations (statsonly)
#   relevance   relevance/ and relevance_pooled/: each neuron's relevance to the prediction (a choice
#               at extraction, --quantity relevance|both; meta "quantities" and "relevance")
#   site_rows   a site with values on token rows of one kind only (sites {site: {"rows": "audio"}}: the
#               audio encoder's audio.* sites); a reader that ignored it would average the zeros between
FEATURES = ("plan_v2", "checksums", "token_kind", "token_offsets", "stats_only", "relevance", "site_rows")
MODES = ("stats_only", "relevance", "site_rows")  # features a store has by choice: never listed as lacking
# The one layout before features were listed: a store with this and no "features" has none of them.
SCHEMA_VERSION = 1
SITES = ("resid", "mlp", "audio.resid", "audio.mlp")  # audio.*: an audio-language model's audio encoder (neurostore.audio)
POOLS = ("first", "mean", "last")
STORE_DTYPES = ("float16", "bfloat16", "float32")
# Codes of tokens/kind: a text token, a special token of the tokenizer ([CLS], </s>, ...), an audio frame.
TOKEN_KINDS = ("text", "special", "audio")
# What a value of an activation array is: the neuron's activation, or its relevance to the prediction.
QUANTITIES = ("activation", "relevance")


def quantities(meta: dict) -> list[str]:
    """The quantities a store holds (stores from before relevance: activation)."""
    return list(meta.get("quantities") or ["activation"])


def array_path(site: str, rows: str, quantity: str = "activation") -> str:
    """The array of ``site``'s token rows (``rows="tokens"``) or pooled rows of one quantity."""
    if rows == "tokens":
        return f"acts/{site}" if quantity == "activation" else f"relevance/{site}"
    return f"pooled/{site}/{rows}" if quantity == "activation" else f"relevance_pooled/{site}/{rows}"


def stream(site: str, quantity: str = "activation") -> str:
    """A site's name in a batch's keys (``writer.Batch``): the site, or ``relevance:site``."""
    return site if quantity == "activation" else f"relevance:{site}"


def check_quantity(metas: Sequence[dict], paths: Sequence[str], quantity: str) -> None:
    """Refuse, in one line, a quantity a store does not hold."""
    if quantity not in QUANTITIES:
        raise NeurostoreError(f"--quantity {quantity!r}: use {' or '.join(QUANTITIES)}")
    for path, meta in zip(paths, metas):
        if quantity not in quantities(meta):
            if quantity == "relevance" and "stats_only" in (meta.get("features") or []):
                raise NeurostoreError(f"{path}: a stats-only store holds activation statistics only; extract a full store with --quantity relevance (or both)")
            if quantity == "relevance":
                raise NeurostoreError(f"{path}: the store holds no relevance; extract it with --quantity relevance (or both)")
            raise NeurostoreError(f"{path}: the store holds relevance only (extracted with --quantity relevance); add --quantity relevance")

# One (rows, 1, width) chunk: big enough to compress well, small enough to stream.
CHUNK_BYTES = int(os.environ.get("NEUROSTORE_CHUNK_BYTES", 4 << 20))
# One shard file: keeps a billion-token store at thousands, not millions, of files.
SHARD_BYTES = int(os.environ.get("NEUROSTORE_SHARD_BYTES", 64 << 20))


COMPRESSIONS = ("none", "lz4", "zstd")
DEFAULT_COMPRESSION = "lz4"


def parse_compression(value: str) -> str:
    """Check ``none``, ``lz4`` or ``zstd[:LEVEL]`` (level 1-9) and return it normalised."""
    name, _, level = value.strip().lower().partition(":")
    if name not in COMPRESSIONS or (level and (name != "zstd" or not level.isdigit() or not 1 <= int(level) <= 9)):
        raise NeurostoreError(f"--compression {value!r}: use none, lz4 or zstd[:LEVEL] with LEVEL 1-9")
    return f"zstd:{int(level)}" if name == "zstd" and level else name


def compressors(compression: str, itemsize: int, checksum: bool = True) -> tuple:
    """The codec chain of an activation chunk for a ``--compression`` value, ending in a CRC32C.

    ``lz4``: bit-shuffled lz4 at level 1. Activations are noisy floats: what compresses is the sign
    and exponent bits, which the bitshuffle lines up. Measured on real MiniLM float16 activations
    (benchmarks/README.md): the same ratio as zstd-1 with byte shuffle (1.08x) at 590 instead of
    320-390 MB/s. ``zstd[:LEVEL]`` (default level 3) trades speed for a few percent more; ``none``
    writes raw chunks, fastest where the disk is not the bottleneck.

    The CRC32C (Zarr v3's ``crc32c`` codec, after the compressor) makes a flipped bit a read error
    instead of a silently different activation; ``checksum=False`` is for the benchmarks' comparison.
    """
    name, _, level = compression.partition(":")
    crc = (Crc32cCodec(),) if checksum else ()
    if name == "none":
        return crc
    if name == "zstd":
        return (BloscCodec(cname="zstd", clevel=int(level or 3), shuffle="bitshuffle", typesize=itemsize), *crc)
    return (BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle", typesize=itemsize), *crc)


def table_codecs(checksum: bool = True) -> tuple:
    """Codecs of the small tables (docs/, tokens/, cache/): Zarr's default zstd, with a CRC32C."""
    return (ZstdCodec(level=0, checksum=False), *((Crc32cCodec(),) if checksum else ()))


def finite_limit(store_dtype: str) -> float:
    """Largest finite magnitude of the store dtype: beyond it the cast gives inf."""
    return float(np.finfo(np.float16).max) if store_dtype == "float16" else float(np.finfo(np.float32).max)


def _pow2_floor(n: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(n, 1)))))


def row_layout(n_layers: int, width: int, itemsize: int, n_rows: int) -> tuple[int, int]:
    """(chunk rows, shard rows) for an activation array: powers of two, shard a multiple of chunk."""
    chunk = _pow2_floor(CHUNK_BYTES / (width * itemsize))
    shard = max(chunk, _pow2_floor(SHARD_BYTES / (n_layers * width * itemsize)))
    cap = _pow2_floor(max(n_rows, 1)) * 2  # no point in shards far larger than the array
    chunk = max(1, min(chunk, cap))
    shard = max(chunk, min(shard, cap))
    return chunk, shard


def numpy_store_dtype(store_dtype: str) -> np.dtype:
    return np.dtype("uint16") if store_dtype == "bfloat16" else np.dtype(store_dtype)


def decode(values: np.ndarray, store_dtype: str) -> np.ndarray:
    """Stored activations as floats (bfloat16 bits widen exactly to float32)."""
    if store_dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values


# ----------------------------------------------------------------------------------------------
# opening and creating


def open_group(url: Any, mode: str = "r", storage_options: dict | None = None) -> zarr.Group:
    """A local path, any fsspec URL (``s3://``, ``gs://``, ``memory://`` ...) or a Zarr store object.

    Never through the consolidated metadata: it is written for outside readers (xarray) and hides
    nodes added after it (a cache entry, a stats entry), so neurostore itself always lists the store."""
    kwargs: dict[str, Any] = {"mode": mode, "use_consolidated": False}
    if storage_options and isinstance(url, str) and "://" in url:
        kwargs["storage_options"] = storage_options
    return zarr.open_group(url, **kwargs)


def zarr_store(url: str, storage_options: dict | None = None) -> Any:
    """The writable Zarr store object at a local path or fsspec URL: what extraction writes through
    (and what a test wraps to inject faults)."""
    if "://" in url:
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(url, storage_options=storage_options, read_only=False)
    from zarr.storage import LocalStore

    return LocalStore(url, read_only=False)


def fresh_group(store: Any) -> zarr.Group:
    """An empty group in ``store``: everything in it removed but the writer's lock. A local folder
    itself stays as it was (owner, permissions): only its contents go."""
    from zarr.core.sync import sync

    from . import lock

    root = getattr(store, "root", None)
    if root is not None and os.path.isdir(root):
        for entry in os.scandir(root):
            if entry.name != lock.KEY:
                shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
    else:
        async def wipe() -> None:
            keys = [key async for key in store.list()]
            for key in keys:
                if key != lock.KEY:
                    await store.delete(key)

        sync(wipe())
    return zarr.open_group(store, mode="a", use_consolidated=False)


def consolidate(group: zarr.Group) -> bool:
    """Rewrite the root's consolidated metadata (every node's metadata in one document), so xarray
    and remote readers open the store with one read; done after each commit and cache write.

    Best effort: neurostore never reads it (see :func:`open_group`), and a failure (read-only
    storage, damaged metadata in the cache) must not fail the extraction or query it follows."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "consolidated metadata is not in the Zarr 3 specification": known
            zarr.consolidate_metadata(group.store, path=group.path or "")
        return True
    except Exception:  # noqa: BLE001 - anything: the data are written either way
        return False


def stat_dims(key: str, ndim: int, lead: tuple[str, ...]) -> tuple[str, ...]:
    """Dimension names of a statistics array: ``lead`` is ``("cell",)`` in a stats-only entry and
    ``("lang", "group")`` in a cache entry, then the neuron and the sketch bin or top-k rank."""
    if key == "cells":
        return ("cell", "column")
    names = lead + ("neuron", "rank" if key.startswith("top_") else "bin")
    return (names + tuple(f"{key}_dim{i}" for i in range(len(names), ndim)))[:ndim]


def local_folder(group: zarr.Group, name: str) -> str | None:
    """The folder of ``group``'s node ``name`` on a local store (to remove it whole); None elsewhere."""
    base = getattr(group.store, "root", None)
    return None if base is None else os.path.join(str(base), group.path, name) if group.path else os.path.join(str(base), name)


def site_dims(site: str) -> tuple[str, str]:
    """The layer and neuron dimension names of a site's arrays: per site, so that ``resid`` and
    ``mlp`` (other widths, maybe other layers) never clash in one xarray Dataset."""
    return f"{site}_layer", f"{site}_neuron"


def open_checked(path: str, storage_options: dict | None = None, mode: str = "r") -> zarr.Group:
    """Open a store's group, with damaged metadata anywhere in it (not in its cache) as one
    :class:`Fault` naming the file, instead of a JSON traceback from the first read that meets it."""
    check_metadata(path)
    try:
        return open_group(path, mode=mode, storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise NeurostoreError(f"{path}: not a neurostore store (no Zarr group there)") from None
    except PermissionError as err:
        why = err.strerror or str(err).splitlines()[0][:120] or "permission denied"
        hint = "; check the credentials (--storage-option key=... secret=..., or anon=true)" if "://" in path else ""
        raise NeurostoreError(f"{path}: cannot be opened ({why}){hint}") from None


def check_metadata(path: str) -> None:
    """Parse every ``zarr.json`` of a local store, outside ``cache/`` (derived data that heals
    itself); a damaged one is a :class:`Fault` naming it. Remote stores are left to Zarr."""
    if "://" in path or not os.path.isdir(path):
        return
    for dirpath, dirnames, files in os.walk(path):
        if dirpath == path and "cache" in dirnames:
            dirnames.remove("cache")
        if "zarr.json" not in files:
            continue
        name = os.path.join(dirpath, "zarr.json")
        try:
            with builtins.open(name, "rb") as f:
                doc = json.loads(f.read())
            if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or "node_type" not in doc:
                raise ValueError("not Zarr v3 metadata")
        except OSError as err:
            raise Fault(f"{name}: cannot be read ({err.strerror or err}); the store is damaged") from None
        except ValueError as err:
            what = "empty" if isinstance(err, json.JSONDecodeError) and not err.doc else f"invalid ({str(err).splitlines()[0][:80]})"
            raise Fault(
                f"{name}: damaged metadata, {what}; the store cannot be read as it is "
                "(re-extract it, or restore the file from a copy)"
            ) from None
        if doc["node_type"] == "array":
            dirnames.clear()  # an array's folders hold its chunks (thousands of shards), never metadata


def read_meta(group: zarr.Group) -> dict | None:
    meta = group.attrs.get(ATTR)
    return dict(meta) if meta else None


def store_features(meta: dict, path: str) -> list[str]:
    """The features a store was written with; one line if it needs a newer neurostore."""
    if "features" not in meta:
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise NeurostoreError(f"{path}: store schema {meta.get('schema_version')!r} is not one this neurostore reads")
        return []
    unknown = [f for f in meta["features"] if f not in FEATURES]
    if unknown:
        from . import __version__

        raise NeurostoreError(
            f"{path}: the store uses {', '.join(unknown)}, unknown to neurostore {__version__}; upgrade neurostore to read it"
        )
    return list(meta["features"])


def missing_features(meta: dict) -> list[str]:
    """Features this version writes that the store lacks (an older store: it still opens)."""
    have = meta.get("features") or (["plan_v2"] if meta.get("plan", 1) >= 2 else [])
    return [f for f in FEATURES if f not in have and f not in MODES]


def new_meta(
    *,
    model: dict,
    compute_dtype: str,
    store_dtype: str,
    sites: dict[str, dict],
    pool: Sequence[str],
    tokens: bool,
    options: dict,
    corpus: dict,
    n_docs: int,
    n_tokens: int,
    n_truncated: int,
    version: str,
    plan: int = 1,
    compression: str = DEFAULT_COMPRESSION,
    checksums: bool = True,
    stats: dict | None = None,
    relevance: dict | None = None,
) -> dict:
    """The group attribute that describes a store; ``committed_*`` and ``complete`` move as it fills.

    ``plan`` is the batch plan's version (``batching.PLAN_VERSION``; stores without it used 1),
    ``nonfinite`` counts values the cast to the store dtype made inf or nan (array -> layer ->
    count), ``batches`` the real and padded tokens of the forward passes run so far. ``stats``
    (``{"groups", "k", "sketch", "entry"}``) makes a stats-only store (:mod:`neurostore.statsonly`).
    """
    skip = {"plan_v2": plan < 2, "checksums": not checksums, "stats_only": stats is None, "relevance": relevance is None,
            "site_rows": not any(spec.get("rows") for spec in sites.values())}
    extra = {} if stats is None else {"stats": dict(stats)}
    if relevance is not None:  # {"rule", "target", "quantities"}: what --quantity stored and how
        extra.update(quantities=list(relevance["quantities"]), relevance={"rule": relevance["rule"], "target": relevance["target"]})
    return {
        **extra,
        "features": [f for f in FEATURES if not skip.get(f)],
        "neurostore_version": version,
        "model": model,
        "compute_dtype": compute_dtype,
        "store_dtype": store_dtype,
        "sites": sites,
        "pool": list(pool),
        "tokens": tokens,
        "options": options,
        "corpus": corpus,
        "n_docs": n_docs,
        "n_tokens": n_tokens,
        "n_truncated": n_truncated,
        "plan": plan,
        "compression": compression,
        "nonfinite": {},
        "batches": {"real_tokens": 0, "padded_tokens": 0},
        "committed_docs": 0,
        "committed_tokens": 0,
        "complete": False,
        "created": False,
    }


def create(
    url: Any,
    meta: dict,
    *,
    texts: list[str],
    label: tuple[list[str], np.ndarray],
    lang: tuple[list[str], np.ndarray],
    n_tokens: np.ndarray,
    truncated: np.ndarray,
    token_ids: np.ndarray,
    classes: list[str] | None,
    storage_options: dict | None = None,
    token_kind: np.ndarray | None = None,
    special_tokens: dict[int, str] | None = None,
    offsets: np.ndarray | None = None,
    extra_docs: dict[str, Any] | None = None,
) -> zarr.Group:
    """Write everything known before the first forward pass, then mark the store created.

    The per-sentence and per-token tables are complete from the start; only activations (and a
    classifier's logits) fill in as extraction goes. ``created`` is set last, so a store killed
    while being created is recognised and started over, never resumed. ``token_kind`` (TOKEN_KINDS
    codes, with the tokenizer's ``special_tokens``) and ``offsets`` (``[n_tokens, 2]``) are written
    when given; a store made without them does not list their feature.
    """
    group = fresh_group(zarr_store(url, storage_options) if isinstance(url, str) else url)
    n_docs = len(texts)
    crc = "checksums" in meta.get("features", [])
    total = int(n_tokens.sum())
    token_start = np.zeros(n_docs, dtype=np.int64)
    np.cumsum(n_tokens[:-1], out=token_start[1:])

    def table(name: str, values: np.ndarray, dtype: Any, attrs: dict | None = None) -> None:
        n = len(values)
        chunk = max(1, min(n, 1 << 20 if np.dtype(dtype).itemsize <= 8 else 1 << 16))
        arr = group.create_array(name, shape=(n,), chunks=(chunk,), dtype=dtype, fill_value=0, compressors=table_codecs(crc),
                                 dimension_names=("doc",) if name.startswith("docs/") else ("token",))
        if n:
            arr[:] = values
        if attrs:
            arr.attrs.update(categorical_attrs(attrs))

    table("docs/label", label[1], "int32", {"categories": label[0]})
    table("docs/lang", lang[1], "int32", {"categories": lang[0]})
    table("docs/token_start", token_start, "int64")
    table("docs/n_tokens", n_tokens.astype(np.int32), "int32")
    table("docs/truncated", truncated.astype(bool), "bool")
    text = group.create_array("docs/text", shape=(n_docs,), chunks=(max(1, min(n_docs, 1 << 16)),), dtype=str, compressors=table_codecs(crc),
                              dimension_names=("doc",))
    if n_docs:
        text[:] = np.array(texts, dtype=object)
    for name, values in (extra_docs or {}).items():  # audio corpora: docs/duration (seconds), docs/audio (file)
        if isinstance(values, np.ndarray):
            table(f"docs/{name}", values, values.dtype)
        else:
            arr = group.create_array(f"docs/{name}", shape=(n_docs,), chunks=(max(1, min(n_docs, 1 << 16)),), dtype=str,
                                     compressors=table_codecs(crc), dimension_names=("doc",))
            if n_docs:
                arr[:] = np.array(values, dtype=object)
    table("tokens/token_id", token_ids.astype(np.int32), "int32")
    table("tokens/doc", np.repeat(np.arange(n_docs, dtype=np.int32), n_tokens), "int32")
    features = list(meta.get("features", []))
    if token_kind is not None:
        specials = {str(int(k)): str(v) for k, v in sorted((special_tokens or {}).items())}
        table("tokens/kind", np.asarray(token_kind, dtype=np.int8), "int8", {"categories": list(TOKEN_KINDS), "special_tokens": specials})
    elif "token_kind" in features:
        features.remove("token_kind")
    if offsets is not None:
        spans = np.asarray(offsets, dtype=np.int32).reshape(-1, 2)
        arr = group.create_array("tokens/offsets", shape=spans.shape, chunks=(max(1, min(len(spans), 1 << 19)), 2), dtype="int32", fill_value=-1,
                                 compressors=table_codecs(crc), dimension_names=("token", "span"))
        if len(spans):
            arr[:] = spans
    elif "token_offsets" in features:
        features.remove("token_offsets")

    store_dtype = meta["store_dtype"]
    dtype = numpy_store_dtype(store_dtype)
    activations = "stats_only" not in features  # a stats-only store keeps statistics (statsonly) in their place
    for site, spec in meta["sites"].items() if activations else ():
        n_layers, width = len(spec["layers"]), spec["width"]
        layer_dim, neuron_dim = site_dims(site)
        shapes = []
        for quantity in quantities(meta):
            if meta["tokens"]:
                shapes.append((array_path(site, "tokens", quantity), total))
            shapes += [(array_path(site, p, quantity), n_docs) for p in meta["pool"]]
        for name, rows in shapes:
            chunk, shard = row_layout(n_layers, width, dtype.itemsize, rows)
            arr = group.create_array(
                name,
                shape=(rows, n_layers, width),
                chunks=(chunk, 1, width),
                shards=(shard, n_layers, width),
                dtype=dtype,
                compressors=compressors(meta.get("compression", DEFAULT_COMPRESSION), dtype.itemsize, crc),
                fill_value=0,
                dimension_names=("token" if name.startswith(("acts", "relevance/")) else "doc", layer_dim, neuron_dim),
            )
            arr.attrs.update({"neurostore_dtype": store_dtype, "layers": spec["layers"], "site": site})
        # the model's layer numbers as a coordinate variable of every group holding the site's arrays
        for where in sorted({name.rsplit("/", 1)[0] for name, _ in shapes}):
            coord = group.create_array(f"{where}/{layer_dim}", shape=(n_layers,), dtype="int32", fill_value=0,
                                       compressors=table_codecs(crc), dimension_names=(layer_dim,))
            coord[:] = np.asarray(spec["layers"], dtype=np.int32)
    if classes is not None:
        group.create_array("docs/logits", shape=(n_docs, len(classes)), chunks=(max(1, min(n_docs, 1 << 16)), len(classes)), dtype="float32", fill_value=0, compressors=table_codecs(crc),
                           dimension_names=("doc", "class"))
        pred = group.create_array("docs/pred", shape=(n_docs,), chunks=(max(1, min(n_docs, 1 << 20)),), dtype="int32", fill_value=-1, compressors=table_codecs(crc),
                                  dimension_names=("doc",))
        pred.attrs.update(categorical_attrs({"categories": classes}))
    meta = dict(meta, created=True, n_tokens=total)
    if "features" in meta:
        meta["features"] = features
    write_root(group, meta)
    return group


def categorical_attrs(attrs: dict) -> dict:
    """``attrs`` with CF's ``flag_values``/``flag_meanings`` added next to ``categories``, so
    xarray/netCDF tools name the codes (a space inside a name becomes ``_``; -1, missing, is no flag)."""
    names = attrs.get("categories")
    if names is None:
        return attrs
    meanings = " ".join(str(n).replace(" ", "_") or "_" for n in names)
    return {**attrs, "flag_values": list(range(len(names))), "flag_meanings": meanings}


def commit(
    group: zarr.Group,
    meta: dict,
    committed_docs: int,
    committed_tokens: int,
    complete: bool = False,
    *,
    nonfinite: dict[str, dict[str, int]] | None = None,
    real_tokens: int = 0,
    padded_tokens: int = 0,
) -> dict:
    """Record that every row below these counts is on disk, with the window's counters added.

    One atomic metadata write, so the counters always describe exactly the committed rows.
    """
    counts = add_counts(add_counts({}, meta.get("nonfinite", {})), nonfinite or {})
    batches = dict(meta.get("batches") or {"real_tokens": 0, "padded_tokens": 0})
    batches["real_tokens"] += int(real_tokens)
    batches["padded_tokens"] += int(padded_tokens)
    meta = dict(
        meta, committed_docs=int(committed_docs), committed_tokens=int(committed_tokens), complete=bool(complete),
        nonfinite=counts, batches=batches,
    )
    write_root(group, meta)
    return meta


def write_root(group: zarr.Group, meta: dict) -> None:
    """The one metadata write of a commit: ``meta`` and, with it, the consolidated metadata of every
    node (for xarray and remote readers; neurostore never reads it, see :func:`open_group`).

    Consolidation first rewrites the root with the old metadata; the commit then replaces it with
    the new one, consolidated nodes kept. An I/O error is the commit's (a :class:`Fault` upstream); a
    consolidation that fails otherwise (damaged metadata in the cache) leaves the commit plain."""
    target = group
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "consolidated metadata is not in the Zarr 3 specification": known
            target = zarr.consolidate_metadata(group.store, path=group.path or "")
    except OSError:
        raise
    except Exception:  # noqa: BLE001 - the data are committed either way
        target = group
    target.attrs.update({ATTR: meta})
    if target is not group:  # the caller's group object (listed, not consolidated) sees the commit too
        group.metadata.attributes.update({ATTR: meta})


def add_counts(total: dict[str, dict[str, int]], counts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Add non-finite counts (array -> layer -> count) into ``total``, in place, and return it."""
    for name, layers in counts.items():
        into = total.setdefault(name, {})
        for layer, n in layers.items():
            into[layer] = into.get(layer, 0) + int(n)
    return total


class Rows:
    """Where the next rows of one array go, and its partial last shard (the *carry*).

    Rows that do not fill their shard yet are written so they are durable at the next commit, and
    also kept: the next window rewrites that shard whole, starting from the carry. On resume the
    carry is read back from the store.
    """

    def __init__(self, array: zarr.Array, start: int) -> None:
        self.array = array
        self.shard = (array.shards or array.chunks)[0]
        self.base = (start // self.shard) * self.shard
        self.carry = np.asarray(array[self.base:start]) if start > self.base else np.zeros((0, *array.shape[1:]), array.dtype)

    def block(self, buffer: np.ndarray, n_new: int) -> np.ndarray:
        """The rows ``[base, base + carry + n_new)`` in ``buffer``, the carry already in place."""
        full = buffer[: len(self.carry) + n_new]
        full[: len(self.carry)] = self.carry
        return full

    def cut(self, full: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """Shard-aligned writes ``(lo, hi, rows)`` of a filled block; the tail becomes the carry."""
        base, end = self.base, self.base + len(full)
        whole = (end // self.shard) * self.shard
        if end == self.array.shape[0]:
            whole = end  # the last shard is short by construction: it is whole now
        writes = [(lo, min(lo + self.shard, whole), full[lo - base : min(lo + self.shard, whole) - base]) for lo in range(base, whole, self.shard)]
        if end > whole:
            writes.append((whole, end, full[whole - base :]))
        self.carry = full[whole - base :]  # a view: the buffer is not reused before the next window copies it
        self.base = whole
        return writes


class ShardAppender:
    """Append rows in order, whole shards at a time, one block after another (single-threaded).

    For writing a store outside an extraction (synthetic stores in tests and benchmarks): the
    same shard alignment as the extraction's writer.
    """

    def __init__(self, array: zarr.Array, start: int) -> None:
        self.rows = Rows(array, start)

    def buffer(self, n_new: int) -> tuple[np.ndarray, np.ndarray]:
        """A block starting at the last shard boundary with the carry in place, and the view
        that the next ``n_new`` rows go into."""
        carry = len(self.rows.carry)
        full = self.rows.block(np.empty((carry + n_new, *self.rows.array.shape[1:]), self.rows.array.dtype), n_new)
        return full, full[carry:]

    def flush(self, full: np.ndarray) -> None:
        for lo, hi, values in self.rows.cut(full):
            self.rows.array[lo:hi] = values
        self.rows.carry = self.rows.carry.copy()


# ----------------------------------------------------------------------------------------------
# reading: one or several part stores as one


@dataclass
class Store:
    """One store, or several ``--part`` stores read as one (sentences concatenated in part order).

    Only committed rows are visible. Readers get dask arrays (lazy, chunked like the storage) for
    activations and numpy arrays for the small per-sentence and per-token tables.
    """

    paths: list[str]
    groups: list[zarr.Group]
    metas: list[dict]
    warnings: list[str] = field(default_factory=list)
    storage_options: dict | None = None  # of remote paths (s3://...): the cache writes through them too
    _codes: dict = field(default_factory=dict, repr=False)  # (table, column) -> (merged names, per-part code maps)

    @property
    def meta(self) -> dict:
        return self.metas[0]

    @property
    def complete(self) -> bool:
        return all(m["complete"] for m in self.metas)

    @property
    def sites(self) -> dict[str, dict]:
        return self.meta["sites"]

    @property
    def store_dtype(self) -> str:
        return self.meta["store_dtype"]

    @property
    def n_docs(self) -> int:
        return sum(m["committed_docs"] for m in self.metas)

    @property
    def n_tokens(self) -> int:
        return sum(m["committed_tokens"] for m in self.metas)

    def site(self, site: str) -> dict:
        if site not in self.sites:
            raise NeurostoreError(
                f"site {site!r} is not in the store (stored: {', '.join(self.sites)})"
            )
        return self.sites[site]

    def layer_number(self, site: str, layer: int | None, option: str = "--layer") -> int:
        """The model layer number ``layer`` names: None is the last stored layer, a negative counts
        back from it. The one place a ``--layer`` is resolved and checked."""
        layers = self.site(site)["layers"]
        if layer is None:
            return layers[-1]
        if layer < 0 and -len(layers) <= layer:
            return layers[layer]
        if layer not in layers:
            raise NeurostoreError(f"{option} {layer}: site {site!r} has layers {_ranges(layers)}")
        return layer

    def layer_index(self, site: str, layer: int | None) -> int:
        """Position along the stored layer axis of a model layer number (see :meth:`layer_number`)."""
        return self.site(site)["layers"].index(self.layer_number(site, layer))

    def _arrays(self, name: str, rows_key: str) -> list[tuple[zarr.Array, int]]:
        """The array ``name`` of every part, with that part's committed row count."""
        out = []
        for path, group, meta in zip(self.paths, self.groups, self.metas):
            try:
                arr = group[name]
            except KeyError:
                raise NeurostoreError(f"{path}: no array {name!r} in the store") from None
            out.append((arr, meta[rows_key]))
        return out

    def acts(self, site: str) -> "Any":
        """Token activations ``[n_tokens, n_layers, width]`` as a lazy dask array (stored dtype)."""
        self.site(site)
        if not self.meta["tokens"]:
            raise NeurostoreError("the store holds pooled vectors only (extracted with --no-tokens)")
        return self._dask(f"acts/{site}", "committed_tokens")

    def pooled(self, site: str, pool: str) -> "Any":
        """Pooled sentence vectors ``[n_docs, n_layers, width]`` as a lazy dask array (stored dtype)."""
        self.site(site)
        if pool not in self.meta["pool"]:
            raise NeurostoreError(
                f"pooling {pool!r} is not in the store (stored: {', '.join(self.meta['pool'])})"
            )
        return self._dask(f"pooled/{site}/{pool}", "committed_docs")

    def _dask(self, name: str, rows_key: str) -> "Any":
        import dask.array as da

        parts = [da.from_zarr(arr)[:rows] for arr, rows in self._arrays(name, rows_key)]
        return parts[0] if len(parts) == 1 else da.concatenate(parts, axis=0)

    def doc_column(self, name: str) -> np.ndarray:
        """A per-sentence column over all parts; offsets are shifted so they index the whole."""
        return self._column("docs", name, "committed_docs", "token_start", "committed_tokens")

    def token_column(self, name: str) -> np.ndarray:
        """A per-token column over all parts; sentence indices are shifted so they index the whole."""
        return self._column("tokens", name, "committed_tokens", "doc", "committed_docs")

    def _column(self, table: str, name: str, rows_key: str, index_column: str, shift_key: str) -> np.ndarray:
        """``table/name`` of every part, concatenated; ``index_column`` indexes the other table, so
        each part's values are shifted by the rows (``shift_key``) of the parts before it."""
        values, shift = [], 0
        for i, ((arr, rows), meta) in enumerate(zip(self._arrays(f"{table}/{name}", rows_key), self.metas)):
            v = read_zarr(arr, slice(0, rows), 0, rows)
            if name == index_column:
                v = v + shift
            elif "categories" in arr.attrs:
                v = self.recode(f"{table}/{name}", i, v)
            values.append(v)
            shift += meta[shift_key]
        return np.concatenate(values) if values else np.zeros(0)

    def to_xarray(self, dtype: str | None = "float32") -> Any:
        """A labelled, lazy ``xarray.Dataset`` of the store (see :func:`neurostore.dataset.to_xarray`)."""
        from .dataset import to_xarray

        return to_xarray(self, dtype=dtype)

    def categories(self, name: str) -> list[str]:
        """Category names of a categorical column (``label``, ``lang``, ``pred``); in a collection,
        the names of every member merged (the first member's order, then each new name)."""
        try:
            arr = self.groups[0][f"docs/{name}"]
        except KeyError:
            raise NeurostoreError(f"the store has no column {name!r}") from None
        if arr.attrs.get("categories") is None:
            raise NeurostoreError(f"column {name!r} is not categorical")
        return list(self._merged(f"docs/{name}")[0])

    def _merged(self, path: str) -> tuple[list[str], list[np.ndarray | None]]:
        """Merged category names of ``path`` and, per part, its codes' positions in them (None: the same)."""
        if path not in self._codes:
            per_part = [list(g[path].attrs.get("categories") or []) for g in self.groups]
            merged: list[str] = []
            for names in per_part:
                merged += [n for n in names if n not in merged]
            maps = [None if names == merged[: len(names)] else np.array([merged.index(n) for n in names], np.int64)
                    for names in per_part]
            self._codes[path] = (merged, maps)
        return self._codes[path]

    def recode(self, path: str, part: int, codes: np.ndarray) -> np.ndarray:
        """Category codes of part ``part`` (``docs/label`` ...) as codes of the merged names; -1 stays."""
        lookup = self._merged(path)[1][part]
        if lookup is None or not len(codes):
            return codes
        return np.where(codes >= 0, lookup[np.clip(codes, 0, None)], codes).astype(codes.dtype)


def _expand_parts_folders(paths: list[str], storage_options: dict | None = None) -> list[str]:
    """A folder written by ``extract --parts N`` stands for its N part stores."""
    from .parts import read_folder

    out = []
    for path in paths:
        parts = read_folder(path, storage_options) if "://" in path or os.path.isdir(path) else None
        if parts is not None:
            missing = [p for p in parts if "://" not in p and not os.path.exists(os.path.join(p, "zarr.json"))]
            if missing:
                raise NeurostoreError(f"{path}: part {os.path.basename(missing[0])} was never started; finish it with extract --parts ... --resume")
        out += parts if parts is not None else [path]
    return out


def _ranges(values: Iterable[int]) -> str:
    values = sorted(values)
    if values and values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


def open(paths: str | Sequence[str], storage_options: dict | None = None) -> Store:  # noqa: A001
    """Open a store, or several stores as one: ``extract --part`` stores of one corpus, and/or a
    *collection*: stores of one model and the same sites, dtype and poolings extracted from
    different corpora (a language added later is a new extraction).

    Members come in the order given (a corpus' parts by their part index, so its sentences come
    back in corpus order); their category names are merged and codes remapped on read
    (:meth:`Store.recode`). The same corpus (and part) twice is refused. An incomplete store opens
    with a warning and shows its committed rows only.
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise NeurostoreError("no store given")
    paths = _expand_parts_folders([str(p) for p in paths], storage_options)
    loaded = []
    for path in paths:
        group = open_checked(str(path), storage_options)
        meta = read_meta(group)
        if meta is None or not meta.get("created"):
            raise NeurostoreError(f"{path}: not a neurostore store (no '{ATTR}' metadata, or creation never finished)")
        store_features(meta, path)
        loaded.append((str(path), group, meta))
    corpora = list(dict.fromkeys(meta["corpus"]["fingerprint"] for _, _, meta in loaded))
    loaded.sort(key=lambda item: (corpora.index(item[2]["corpus"]["fingerprint"]), (item[2]["corpus"].get("part") or [0, 1])[0]))
    first = loaded[0][2]
    for path, _, meta in loaded[1:]:
        if ("stats_only" in (meta.get("features") or [])) != ("stats_only" in (first.get("features") or [])):
            raise NeurostoreError(f"{path}: a stats-only store and a full store cannot be read as one; open them separately")
        if meta.get("stats", {}).get("groups") != first.get("stats", {}).get("groups"):
            raise NeurostoreError(f"{path}: keeps statistics per {meta['stats']['groups']}, {loaded[0][0]} per {first['stats']['groups']}; "
                                  "stores read as one must keep the same --groups")
        for key in ("sites", "store_dtype", "pool", "tokens"):
            if meta[key] != first[key]:
                raise NeurostoreError(f"{path}: its {key!r} differs from {loaded[0][0]}; stores read as one need the same "
                                      "sites, layers, store dtype, poolings and tokens")
        if meta["model"]["name"] != first["model"]["name"]:
            raise NeurostoreError(f"{path}: made from another model ({meta['model']['name']}) than {loaded[0][0]} "
                                  f"({first['model']['name']}); stores read as one need one model")
    seen: dict[tuple, str] = {}
    for path, _, meta in loaded:
        key = (meta["corpus"]["fingerprint"], tuple(meta["corpus"].get("part") or ()))
        if key in seen:
            raise NeurostoreError(f"{path}: the same corpus{' part' if key[1] else ''} as {seen[key]}; "
                                  "give each corpus (or part) once")
        seen[key] = path
    store = Store([p for p, _, _ in loaded], [g for _, g, _ in loaded], [m for _, _, m in loaded], storage_options=storage_options)
    for path, _, meta in loaded:
        if not meta["complete"]:
            message = (
                f"{path}: extraction is incomplete; using the {meta['committed_docs']} of "
                f"{meta['n_docs']} sentences committed so far"
            )
            store.warnings.append(message)
            warnings.warn(message, stacklevel=2)
    return store


# ----------------------------------------------------------------------------------------------
# summary and verification


def _disk_bytes(group: zarr.Group) -> int | None:
    store = group.store
    root = getattr(store, "root", None)
    if root is None:
        return None
    total = 0
    base = os.path.join(str(root), group.path) if group.path else str(root)
    for dirpath, _, files in os.walk(base):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def summary(store: Store) -> dict:
    """Everything ``neurostore info`` shows, as plain JSON-able values."""
    meta = store.meta
    itemsize = numpy_store_dtype(meta["store_dtype"]).itemsize
    raw = 0
    for spec in meta["sites"].values():
        per_row = len(spec["layers"]) * spec["width"] * itemsize
        raw += per_row * (store.n_tokens if meta["tokens"] else 0)
        raw += per_row * store.n_docs * len(meta["pool"])
    disk = [_disk_bytes(g) for g in store.groups]
    disk_total = None if any(d is None for d in disk) else sum(disk)
    counts = {}
    for column in ("label", "lang"):
        codes = store.doc_column(column)
        names = store.categories(column)
        table = {name: int((codes == i).sum()) for i, name in enumerate(names)}
        if (codes < 0).any():
            table["(missing)"] = int((codes < 0).sum())
        counts[column] = table
    stats_only = "stats_only" in (meta.get("features") or [])
    raw *= len(quantities(meta))
    if stats_only:
        raw = 0  # no activations stored
    return {
        "paths": store.paths,
        "mode": "stats-only" if stats_only else "full",
        "stats": {k: v for k, v in meta["stats"].items() if k != "entry"} if stats_only else None,
        "model": meta["model"]["name"],
        "model_type": meta["model"].get("model_type"),
        "classifier": meta["model"].get("classifier", False),
        "compute_dtype": meta["compute_dtype"],
        "store_dtype": meta["store_dtype"],
        "sites": {s: {"layers": _ranges(v["layers"]), "n_layers": len(v["layers"]), "width": v["width"], "rows": v.get("rows", "all")}
                  for s, v in meta["sites"].items()},
        "quantities": quantities(meta),
        "relevance": meta.get("relevance"),
        "pool": meta["pool"],
        "tokens": meta["tokens"],
        "docs": store.n_docs,
        "docs_total": sum(m["n_docs"] for m in store.metas),
        "token_rows": store.n_tokens,
        "tokens_total": sum(m["n_tokens"] for m in store.metas),
        "truncated": sum(m.get("n_truncated", 0) for m in store.metas),
        "complete": store.complete,
        "parts": [m["corpus"].get("part") for m in store.metas],
        "counts": counts,
        "activation_bytes": raw,
        "disk_bytes": disk_total,
        "compression_ratio": (raw / disk_total) if disk_total else None,
        "compression": meta.get("compression", DEFAULT_COMPRESSION),
        "plan": meta.get("plan", 1),
        "nonfinite": _sum_counts(m.get("nonfinite", {}) for m in store.metas),
        "real_token_share": _real_share(store.metas),
        "features": [f for f in FEATURES if not any(f in missing_features(m) for m in store.metas)
                     and (f not in MODES or all(f in (m.get("features") or []) for m in store.metas))],
        "lacks": sorted(set().union(*(missing_features(m) for m in store.metas))),
        "options": meta["options"],
        # where labels and languages came from (None: none found); unusable rows --skip-bad left out
        # (corpus-wide, the same in every part); both absent (None) in stores from before they were kept
        "sources": meta["corpus"].get("sources"),
        "skipped": meta["corpus"].get("skipped"),
    }


def _sum_counts(parts: Iterable[dict]) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for counts in parts:
        add_counts(total, counts)
    return {name: dict(sorted(layers.items(), key=lambda kv: int(kv[0]))) for name, layers in sorted(total.items())}


def _real_share(metas: Sequence[dict]) -> float | None:
    """Real tokens / tokens computed (padding included) over the forward passes run; None if unknown."""
    real = sum((m.get("batches") or {}).get("real_tokens", 0) for m in metas)
    padded = sum((m.get("batches") or {}).get("padded_tokens", 0) for m in metas)
    return real / padded if padded else None


def describe_nonfinite(counts: dict[str, dict[str, int]], store_dtype: str) -> list[str]:
    """One line per site: how many values the cast made non-finite, in which layers, what to do."""
    by_site: dict[str, dict[str, int]] = {}
    for name, layers in counts.items():
        add_counts(by_site, {name.split("/")[1]: layers})
    lines = []
    for site, layers in by_site.items():
        arrays = ", ".join(f"{name} {sum(v.values()):,}" for name, v in counts.items() if name.split("/")[1] == site)
        lines.append(
            f"site {site}: {sum(layers.values()):,} values non-finite after the cast to {store_dtype}"
            f" (layers {_ranges(int(x) for x in layers)}; {arrays}); extract with --store-dtype bfloat16 or float32 to keep them"
        )
    return lines


def verify(store: Store) -> list[str]:
    """Read every committed row, check every checksum, and check that the tables agree.

    Returns the problems found, one line each: every damaged chunk (array, rows, layer), every
    block with non-finite values, every inconsistency between the tables.
    """
    from . import chunks as ch

    problems: list[str] = []
    for path, group, meta in zip(store.paths, store.groups, store.metas):
        docs, toks = meta["committed_docs"], meta["committed_tokens"]
        tables: dict[str, np.ndarray] = {}
        for sub in ("docs", "tokens"):
            for name, arr in sorted(group[sub].arrays(), key=lambda kv: kv[0]):
                step = arr.chunks[0]
                parts = []
                for lo in range(0, arr.shape[0], step):
                    try:
                        parts.append(ch.read_zarr(arr, slice(lo, lo + step), lo, min(arr.shape[0], lo + step)))
                    except ch.DamagedRows as err:
                        problems.append(err.where)
                        parts = None
                        break
                if parts is not None and parts:
                    tables[f"{sub}/{name}"] = np.concatenate(parts)
        if all(k in tables for k in ("docs/n_tokens", "docs/token_start", "tokens/doc")):
            problems += _check_tables(path, meta, tables["docs/n_tokens"], tables["docs/token_start"], tables["tokens/doc"])
        if "stats_only" in (meta.get("features") or []):
            from . import statsonly

            problems += statsonly.verify(path, group, meta)
            continue
        for name, rows in _activation_arrays(group, meta, docs, toks):
            src = ch.source(group[name])
            chunk, _ = ch.step(src)
            for lo in range(0, rows, chunk):
                hi = min(rows, lo + chunk)
                for li in range(group[name].shape[1]):
                    try:
                        block = next(ch.blocks(src, lo, hi, [li]))[3]
                    except ch.DamagedRows as err:
                        problems.append(err.where if "layer index" in err.where else f"{err.where} (layer index {li})")
                        continue
                    bad = ~np.isfinite(decode(block, meta["store_dtype"]))
                    if bad.any():
                        problems.append(
                            f"{path}: {name} rows {lo}-{hi} layer index {li}: {int(bad.sum())} non-finite values"
                            " (float16 overflow? extract with --store-dtype bfloat16 or float32)"
                        )
    return problems


def _check_tables(path: str, meta: dict, n_tokens: np.ndarray, start: np.ndarray, doc_of: np.ndarray) -> list[str]:
    docs, toks = meta["committed_docs"], meta["committed_tokens"]
    problems = []
    if int(n_tokens[:docs].sum()) != toks:
        problems.append(f"{path}: committed tokens {toks} != sum of n_tokens of committed sentences {int(n_tokens[:docs].sum())}")
    if len(start) and (start[0] != 0 or np.any(start[1:] != np.cumsum(n_tokens)[:-1])):
        problems.append(f"{path}: docs/token_start is not the running sum of docs/n_tokens")
    if not np.array_equal(doc_of, np.repeat(np.arange(len(n_tokens)), n_tokens)):
        problems.append(f"{path}: tokens/doc does not match docs/n_tokens")
    if meta["complete"] and (docs != meta["n_docs"] or toks != meta["n_tokens"]):
        problems.append(f"{path}: marked complete but only {docs}/{meta['n_docs']} sentences committed")
    return problems


def _activation_arrays(group: zarr.Group, meta: dict, docs: int, toks: int) -> list[tuple[str, int]]:
    out = []
    for quantity in quantities(meta):
        for site in meta["sites"]:
            if meta["tokens"]:
                out.append((array_path(site, "tokens", quantity), toks))
            out += [(array_path(site, p, quantity), docs) for p in meta["pool"]]
    return out
