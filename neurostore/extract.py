"""Extraction: corpus -> the batch plan -> forward passes with hooks -> gather -> the writer.

The forward pass of the next batch overlaps the device-to-host copy, scatter, compression and
writing of the previous ones: each batch's real tokens are gathered on the device, cast to the
store dtype and moved (on CUDA by a side stream, into a pinned ring slot) to the writer, which
scatters them into window buffers and writes whole shards on a pool of threads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from . import __version__, batching, live, lock, models, relevance, space, statsonly, transfer
from . import store as st
from .corpus import categories, read_corpus
from .errors import MACHINE_ERRNOS, NeurostoreError, io_fault
from .writer import Batch, Window, Writer, kill_points

# Options that decide what is stored and how it is batched: a resume must use the same ones.
IDENTITY = (
    "sites", "layers", "pool", "tokens", "dtype", "store_dtype", "max_length", "max_batch_tokens", "buffer_mb",
    "module_pattern", "part", "compression", "stats_only", "groups", "k", "sketch", "quantity", "rule", "relevance_target",
)
RING_SLOTS = 4


@dataclass
class ExtractOptions:
    """What to extract and how. ``None`` means the default (or, on resume, what the store used)."""

    sites: list[str] | None = None  # default ["resid"]
    layers: list[int] | None = None  # default: all
    pool: list[str] | None = None  # default ["first", "mean"]
    tokens: bool | None = None  # default True
    dtype: str | None = None  # compute dtype; default: see models.default_dtype
    store_dtype: str | None = None  # default float16
    max_length: int | None = None  # default: the model's limit
    max_batch_tokens: int | None = None  # padded tokens per batch; default batching.default_batch_tokens
    buffer_mb: int | None = None  # one window buffer; default batching.default_buffer_mb
    module_pattern: str | None = None
    part: tuple[int, int] | None = None
    compression: str | None = None  # none, lz4 or zstd[:LEVEL]; default lz4
    device: str = "auto"
    writers: int = 0  # shard writer threads; 0: writer.default_writers() (does not change the bytes)
    checksums: bool = True  # a CRC32C per chunk; off only to measure their cost (benchmarks/pipeline.py)
    stats_only: bool | None = None  # grouped statistics instead of activations (neurostore.statsonly); default False
    groups: list[str] | None = None  # stats-only: the groupings kept; default lang,label
    k: int | None = None  # stats-only: top rows kept per neuron; default statsonly.DEFAULT_K
    sketch: bool | None = None  # stats-only: keep the quantile sketch; default True
    commit_seconds: float = 60.0  # stats-only: commit at most this often (a commit writes the statistics whole)
    quantity: str | None = None  # activation, relevance or both (neurostore.relevance); default activation
    rule: str | None = None  # relevance: grad-x-act or attnlrp; default grad-x-act
    relevance_target: str | None = None  # relevance: next-token, label or predicted; default by the model's head
    trust_remote_code: bool = False  # load an architecture whose code comes from the model's repository


@dataclass
class ExtractResult:
    path: str
    docs: int
    tokens: int
    truncated: int
    seconds: float
    resumed_from: int
    already_complete: bool = False
    meta: dict = field(default_factory=dict, repr=False)
    stages: dict = field(default_factory=dict)  # seconds per pipeline stage, ring occupancy, writers
    warnings: list[str] = field(default_factory=list)  # e.g. values the store cast made non-finite
    estimate: space.Estimate | None = None  # the store's size against the free space (see dry_run)


def _part_range(n: int, part: tuple[int, int] | None) -> tuple[int, int]:
    if part is None:
        return 0, n
    i, count = part
    if not (count >= 1 and 0 <= i < count):
        raise NeurostoreError(f"--part {i}/{count}: expected i/N with 0 <= i < N")
    return (n * i) // count, (n * (i + 1)) // count


def parse_part(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        i, count = (int(x) for x in value.split("/"))
    except ValueError:
        raise NeurostoreError(f"--part {value!r}: expected i/N, e.g. 0/4 for the first of four parts") from None
    _part_range(max(count, 1), (i, count))
    return i, count


def _existing(out: str, target: Any, overwrite: bool) -> tuple[Any, dict | None] | None:
    """The group and metadata at ``out`` if a store is there; None if nothing is. Damaged metadata
    is a :class:`Fault` unless the store is to be overwritten anyway."""
    if "://" not in out:
        if not (Path(out) / "zarr.json").exists():
            return None
        if not overwrite:
            st.check_metadata(out)
    try:
        group = st.open_group(target, mode="r+")
    except Exception:  # noqa: BLE001 - nothing (readable) there
        return None
    return group, st.read_meta(group)


def _check_writable(out: str) -> None:
    """Refuse an ``--out`` that cannot be written, before any work: one line, not zarr's traceback."""
    if "://" in out:
        return
    probe = space.nearest_existing(out)
    if not probe.is_dir():
        raise NeurostoreError(f"--out {out}: {probe} is a file, not a folder; choose another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise NeurostoreError(f"--out {out}: cannot write in {probe} (read-only folder or file system); choose another --out")


def _make_folder(out: str) -> None:
    """Create a local store's folder (and parents): what a permission check cannot foresee (ACLs,
    root on a pseudo file system, a read-only mount) is one line here, not zarr's traceback."""
    if "://" in out:
        return
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EEXIST):
            raise  # a full disk, an I/O error: a fault, reported as one
        raise NeurostoreError(f"--out {out}: cannot create the store's folder ({err.strerror}); choose another --out") from None


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "(none)"
    return str(value)


def _resolve_options(opts: ExtractOptions, stored: dict | None) -> ExtractOptions:
    """Fill defaults; on resume, take the store's options and refuse explicit conflicting ones."""
    resolved = ExtractOptions(**asdict(opts))
    if stored is not None:
        previous = stored["options"]
        for key in IDENTITY:
            given = getattr(opts, key)
            was = previous.get(key)
            if key == "part" and was is not None:
                was = tuple(was)
            if key == "quantity" and was is None:  # stores from before --quantity hold activations
                was = "activation"
            if given is not None and given != was:
                raise NeurostoreError(
                    f"--{key.replace('_', '-')} {_show(given)} differs from the store's {_show(was)}; "
                    "drop the option to resume, or use --overwrite to start again"
                )
            setattr(resolved, key, was)
        if resolved.compression is None:  # stores from before --compression
            resolved.compression = stored.get("compression", st.DEFAULT_COMPRESSION)
        return resolved
    resolved.sites = opts.sites or ["resid"]
    resolved.pool = opts.pool if opts.pool is not None else ["first", "mean"]
    resolved.tokens = True if opts.tokens is None else opts.tokens
    resolved.store_dtype = opts.store_dtype or "float16"
    resolved.compression = st.parse_compression(opts.compression or st.DEFAULT_COMPRESSION)
    for site in resolved.sites:
        if site not in st.SITES:
            raise NeurostoreError(f"--sites: unknown site {site!r} (use resid, mlp; audio.resid, audio.mlp for an audio-language model)")
    for pool in resolved.pool:
        if pool not in st.POOLS:
            raise NeurostoreError(f"--pool: unknown pooling {pool!r} (use {', '.join(st.POOLS)})")
    if resolved.store_dtype not in st.STORE_DTYPES:
        raise NeurostoreError(f"--store-dtype {resolved.store_dtype!r}: use one of {', '.join(st.STORE_DTYPES)}")
    if not resolved.tokens and not resolved.pool:
        raise NeurostoreError("--no-tokens with no --pool would store nothing")
    resolved.stats_only = bool(opts.stats_only)
    if resolved.stats_only:
        resolved.groups = statsonly.parse_groups(opts.groups or list(statsonly.DEFAULT_GROUPS))
        resolved.k = statsonly.DEFAULT_K if opts.k is None else opts.k
        if resolved.k < 0:
            raise NeurostoreError(f"--k {resolved.k}: give the number of top rows to keep per neuron (0: none)")
        resolved.sketch = True if opts.sketch is None else bool(opts.sketch)
    else:
        given = [name for name, v in (("--groups", opts.groups), ("--k", opts.k), ("--no-sketch", opts.sketch is False)) if v not in (None, False)]
        if given:
            raise NeurostoreError(f"{', '.join(given)}: they shape a stats-only store; add --stats-only, or drop them")
    if len(set(resolved.sites)) != len(resolved.sites):
        raise NeurostoreError("--sites names a site twice")
    resolved.quantity = opts.quantity or "activation"
    if "relevance" in relevance.quantities(resolved.quantity):
        if resolved.stats_only:
            raise NeurostoreError("--stats-only --quantity relevance: a stats-only store keeps activation statistics only for now; drop one of them")
        resolved.rule = opts.rule or "grad-x-act"
        if resolved.rule not in relevance.RULES:
            raise NeurostoreError(f"--rule {resolved.rule!r}: use {' or '.join(relevance.RULES)}")
    else:
        given = [name for name, v in (("--rule", opts.rule), ("--relevance-target", opts.relevance_target)) if v is not None]
        if given:
            raise NeurostoreError(f"{', '.join(given)}: they shape relevance; add --quantity relevance (or both), or drop them")
    return resolved



def extract(
    corpus_paths: list[str],
    out: str,
    *,
    model: str | models.LoadedModel | None = None,
    options: ExtractOptions | None = None,
    corpus_options: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_start: Callable[[int, int, int, int], None] | None = None,
    on_batch: Callable[[int, int, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    space_check: bool = True,
    dry_run: bool = False,
    wrap_store: Callable[[Any], Any] | None = None,
    kill_at: str | dict[str, int] | None = None,
    lock_owner: str | None = None,
    storage_options: dict | None = None,
) -> ExtractResult:
    """Extract activations of ``corpus_paths`` into the store at ``out``.

    ``model`` is a local folder or hub name, or an already loaded :class:`models.LoadedModel`
    (benchmarks and notebooks that hold one). ``on_start(total_docs, total_tokens, done_docs,
    done_tokens)`` and ``on_batch(docs, tokens, bytes)`` report progress; ``on_warning(line)``
    gets warnings found before the first forward pass (default: ``warnings.warn``). Safe to kill
    at any moment: ``resume=True`` continues from the last commit and yields the same store as an
    uninterrupted run. One extraction writes a store at a time (:mod:`neurostore.lock`).

    Before creating anything, the store's size is estimated from the tokenised corpus
    (:mod:`neurostore.space`) and a target short of space is refused (:class:`Fault`) unless
    ``space_check=False``; ``dry_run=True`` returns that estimate in ``result.estimate`` and
    writes nothing (and takes no lock).

    A full disk or an I/O error is a :class:`~neurostore.errors.Fault` (one line: what failed,
    where, the free space); every committed row stays, and ``resume=True`` completes the store.
    ``wrap_store`` wraps the Zarr store every write goes through (tests inject faults with it);
    ``kill_at`` (e.g. ``"flush:3"``, see :func:`writer.kill_points`) SIGKILLs the process at a write
    point, for the resume tests (the CLI takes it from ``NEUROSTORE_FAULT``, the way those tests reach
    a ``neurostore extract`` child process; the library reads no environment). ``lock_owner``: see
    :func:`neurostore.lock.acquire` (``extract --parts`` on a cluster).
    """
    options = options or ExtractOptions()
    t_start = time.perf_counter()
    if options.writers < 0:
        raise NeurostoreError(f"--writers {options.writers}: give a number of threads, or 0 for one per core")
    if resume and overwrite:
        raise NeurostoreError("--resume and --overwrite contradict each other: pick one")
    _check_target(out)
    made = _first_missing(out)
    target = st.zarr_store(out, storage_options)  # storage_options: of an s3:// (fsspec) --out
    if wrap_store is not None:
        target = wrap_store(target)
    kills = kill_points(kill_at)
    run = dict(model=model, options=options, corpus_options=corpus_options, resume=resume, overwrite=overwrite,
               on_start=on_start, on_batch=on_batch, on_warning=on_warning, space_check=space_check, dry_run=dry_run, t_start=t_start,
               kill_at=kills)
    if dry_run:
        return _extract(corpus_paths, out, target, **run)
    _check_writable(out)
    _make_folder(out)  # here, not in the lock's first write: what the system refuses is one line
    try:
        held = lock.acquire(target, out, owner=lock_owner)
        try:
            return _extract(corpus_paths, out, target, **run)
        finally:
            with contextlib.suppress(OSError):  # a lock left behind is taken over by the next run
                lock.release(held)
    except PermissionError as err:
        raise NeurostoreError(f"{out}: cannot write the store ({err.strerror}: {err.filename}); choose another --out") from None
    except OSError as err:
        if err.errno not in MACHINE_ERRNOS:
            raise
        if err.filename and "://" not in out and not os.path.isabs(str(err.filename)):
            err.filename = os.path.join(out, str(err.filename))  # a key of the store: name the file
        raise io_fault(err, f"{out}: writing the store failed",
                       "every committed row is kept: make room or fix the device, then run the same command with --resume") from None
    finally:
        if made is not None:  # failed before creating anything: leave no empty folders behind
            folder = Path(out).absolute()
            while folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                if folder == made:
                    break
                folder = folder.parent


def _first_missing(out: str) -> Path | None:
    """The outermost folder of a local ``out`` that does not exist yet (None: it exists, or a URL)."""
    if "://" in out:
        return None
    path, probe = Path(out).absolute(), space.nearest_existing(out)
    return None if path == probe else probe / path.relative_to(probe).parts[0]


def _check_target(out: str) -> None:
    """Refuse a file, or a folder holding something other than a store, before anything is written."""
    if "://" in out:
        return
    path = Path(out)
    if path.is_file():
        raise NeurostoreError(f"{out}: is a file, not a store")
    if path.is_dir() and not (path / "zarr.json").exists() and any(p.name != lock.KEY for p in path.iterdir()):
        raise NeurostoreError(f"{out}: exists and is not a Zarr store; refusing to write into it")


def _extract(
    corpus_paths: list[str], out: str, target: Any, *, model: str | models.LoadedModel | None, options: ExtractOptions,
    corpus_options: dict | None, resume: bool, overwrite: bool,
    on_start: Callable[[int, int, int, int], None] | None, on_batch: Callable[[int, int, int], None] | None,
    on_warning: Callable[[str], None] | None, space_check: bool, dry_run: bool, t_start: float, kill_at: dict[str, int],
) -> ExtractResult:
    """The extraction itself, with the store's lock held (but for a dry run)."""
    found = _existing(out, target, overwrite)
    stored = found[1] if found else None
    if found and not resume and not overwrite:
        raise NeurostoreError(f"{out}: already exists; pass --resume to continue it or --overwrite to replace it")
    if overwrite or (resume and (stored is None or not stored.get("created"))):
        stored = None  # replaced, or nothing committed yet: start afresh with the options given
    if stored is not None:
        st.store_features(stored, out)
    opts = _resolve_options(options, stored)
    plan_version = stored.get("plan", 1) if stored is not None else batching.PLAN_VERSION

    corpus_options = {"skip_bad": False, **(corpus_options or {})}
    if stored is not None and stored["corpus"].get("skip_bad"):
        corpus_options["skip_bad"] = True  # a resume reads the corpus as its store was made
    corpus = read_corpus(corpus_paths, **corpus_options)
    missing = corpus.missing_columns_warning() if stored is None else None
    if missing:
        (on_warning or (lambda line: warnings.warn(line, UserWarning, stacklevel=3)))(missing)
    label_names, label_codes = categories(corpus.labels)
    lang_names, lang_codes = categories(corpus.langs)
    lo, hi = _part_range(len(corpus), opts.part)
    part = corpus.slice(lo, hi)
    if len(part) == 0:
        raise NeurostoreError(f"--part {opts.part[0]}/{opts.part[1]}: that part of the corpus is empty")
    given = model if isinstance(model, models.LoadedModel) else None
    model_path = given.path if given is not None else model
    if stored is not None:
        if stored["corpus"]["fingerprint"] != corpus.fingerprint:
            raise NeurostoreError(f"{out}: was made from another corpus (or other column options); use --overwrite to start again")
        model_path = model_path or stored["model"]["path"]
        if model_path != stored["model"]["path"] and models.resolve(model_path) != stored["model"]["path"]:
            raise NeurostoreError(f"--model {model_path!r} differs from the store's {stored['model']['path']!r}")

    device = given.device if given is not None else models.resolve_device(options.device)
    stored_quantities = relevance.quantities(opts.quantity)
    explains = "relevance" in stored_quantities
    if given is not None:
        compute = models.resolve_dtype(opts.dtype, device, given.config)
        loaded = given
    else:
        compute = models.resolve_dtype(opts.dtype, device, models.read_config(model_path))
        loaded = (relevance.load if explains else models.load)(model_path, device, dtype=compute, trust_remote_code=options.trust_remote_code)
    opts.dtype = str(compute).removeprefix("torch.")
    explainer = None
    if loaded.audio is not None and (explains or part.audio is None):
        raise NeurostoreError("--quantity relevance is for text models for now; extract activations" if explains else
                              f"{loaded.name}: an audio model needs an audio corpus (a column 'audio' naming each row's file)")
    if loaded.audio is None and part.audio is not None:
        raise NeurostoreError(f"{corpus.files[0]}: an audio corpus needs an audio model (wav2vec2, HuBERT, WavLM, Whisper, Qwen2-Audio, Audio Flamingo 3, Qwen2.5-Omni); "
                              f"{loaded.name} is a text model ({loaded.model_type})")
    if explains:
        opts.relevance_target = opts.relevance_target or relevance.default_target(loaded)
        relevance.check(opts.rule, opts.relevance_target, loaded)
    sites = models.resolve_sites(loaded, opts.sites, opts.layers, opts.module_pattern)
    limit = loaded.max_length()
    if opts.max_length is None:
        opts.max_length = limit
    elif not (1 <= opts.max_length <= limit):
        raise NeurostoreError(f"--max-length {opts.max_length}: the model accepts 1 to {limit} tokens")
    itemsize = st.numpy_store_dtype(opts.store_dtype).itemsize
    per_row = sum(len(s.layers) * s.width * itemsize for s in sites.values()) * len(stored_quantities)
    bytes_per_token = per_row if opts.tokens else 0
    if opts.max_batch_tokens is None:
        opts.max_batch_tokens = batching.default_batch_tokens(device, bytes_per_token)
        if explains:  # the backward pass keeps the forward's intermediates: bounded by the device's memory
            opts.max_batch_tokens = relevance.default_batch_tokens(loaded, device, opts.max_batch_tokens, bytes_per_token)
    if opts.max_batch_tokens < 1:
        raise NeurostoreError(f"--max-batch-tokens {opts.max_batch_tokens}: must be at least 1")
    if opts.buffer_mb is None:
        opts.buffer_mb = batching.default_buffer_mb(device, opts.max_batch_tokens, bytes_per_token)
    if opts.buffer_mb < 1:
        raise NeurostoreError(f"--buffer-mb {opts.buffer_mb}: must be at least 1")

    if loaded.audio is not None:
        from . import audio

        ids, truncated, details = audio.rows(loaded, part, opts.max_length, (corpus_options or {}).get("storage_options"))
    else:
        ids, truncated, details = batching.tokenize_details(loaded.tokenizer, part.texts, opts.max_length)
    n_tokens = np.array([len(x) for x in ids], dtype=np.int64)
    token_start = np.concatenate(([0], np.cumsum(n_tokens)[:-1])).astype(np.int64)

    stats_only = bool(opts.stats_only)
    doc_lang, doc_label = np.asarray(lang_codes[lo:hi], dtype=np.int32), np.asarray(label_codes[lo:hi], dtype=np.int32)
    if explains:
        gold = relevance.gold_classes(loaded, label_names, doc_label) if opts.relevance_target == "label" else None
        explainer = relevance.Explainer(opts.rule, opts.relevance_target, stored_quantities, gold)
    cells = None
    stats_settings = {"groups": opts.groups, "k": opts.k, "sketch": opts.sketch, "entry": None} if stats_only else None
    if stats_only:
        shape = {"stats": stats_settings, "tokens": opts.tokens, "pool": opts.pool, "store_dtype": opts.store_dtype,
                 "sites": {name: s.meta() for name, s in sites.items()}}
        kinds = details.kind if details.kind is not None else np.zeros(int(n_tokens.sum()), np.int8)
        cells = live.stream_cells(shape, doc_lang, doc_label, kinds, n_tokens)
    estimate = space.estimate(
        {st.stream(name, q): (len(s.layers), s.width) for q in stored_quantities for name, s in sites.items()},
        store_dtype=opts.store_dtype,
        pool=[] if stats_only else opts.pool,
        tokens=opts.tokens and not stats_only,
        n_tokens=n_tokens,
        texts=part.texts,
        n_classes=0 if stats_only else len(loaded.classes or ()),
        compression=opts.compression,
        done_docs=stored["committed_docs"] if stored is not None else 0,
        done_tokens=stored["committed_tokens"] if stored is not None else 0,
    )
    if stats_only:
        for name, (shape_, raw, disk) in live.stats_bytes(shape, cells).items():
            space.add_array(estimate, name, shape_, "statistics", raw, 2 * disk)  # a commit writes the new entry before dropping the old
    space.measure_free(estimate, out, reclaim=found is not None and overwrite)
    if dry_run:
        done = stored["committed_docs"] if stored is not None else 0
        return ExtractResult(out, len(part), int(n_tokens.sum()), int(truncated.sum()), 0.0, done, meta=stored or {}, estimate=estimate)
    if space_check and not (stored or {}).get("complete"):
        space.check(estimate, out)

    if stored is None:
        meta = st.new_meta(
            model={
                "name": loaded.name,
                "path": model_path or models.default_model(),
                "model_type": loaded.model_type,
                "classifier": loaded.classes is not None,
                "n_layers": loaded.n_layers,
                "config": models.config_summary(loaded.config),
            },
            compute_dtype=opts.dtype,
            store_dtype=opts.store_dtype,
            sites={name: s.meta() for name, s in sites.items()},
            pool=opts.pool,
            tokens=opts.tokens,
            options={k: v for k, v in asdict(opts).items() if k not in ("device", "writers", "checksums")},
            corpus={
                "files": corpus.files,
                "fingerprint": corpus.fingerprint,
                "n_docs_total": len(corpus),
                "part": list(opts.part) if opts.part else None,
                "doc_offset": lo,
                # where labels and languages came from (None: nowhere), rows --skip-bad left out
                "sources": corpus.sources,
                "skip_bad": bool(corpus_options.get("skip_bad")),
                "skipped": len(corpus.skipped),
                "skipped_rows": corpus.skipped[:10],
            },
            n_docs=len(part),
            n_tokens=int(n_tokens.sum()),
            n_truncated=int(truncated.sum()),
            version=__version__,
            plan=plan_version,
            compression=opts.compression,
            checksums=opts.checksums,
            stats=stats_settings,
            relevance={"quantities": stored_quantities, "rule": opts.rule, "target": opts.relevance_target} if explains else None,
        )
        group = st.create(
            target,
            meta,
            texts=part.texts,
            label=(label_names, doc_label),
            lang=(lang_names, doc_lang),
            n_tokens=n_tokens,
            truncated=truncated,
            token_ids=np.concatenate([np.asarray(x, dtype=np.int32) for x in ids]),
            classes=None if stats_only else loaded.classes,
            token_kind=details.kind,
            special_tokens=details.special,
            offsets=details.offsets,
            extra_docs={"duration": np.asarray(part.durations, np.float32), "audio": part.audio} if part.audio is not None else None,
        )
        meta = st.read_meta(group)
    else:
        group = found[0]
        meta = stored

    windows = plan_windows(n_tokens, per_row, opts)
    start_doc = meta["committed_docs"]
    starts = [w[0] for w in windows] + [len(part)]
    if start_doc not in starts:
        raise NeurostoreError(f"{out}: committed count {start_doc} is not at a window boundary; the store is damaged, use --overwrite")
    first_window = starts.index(start_doc)
    result = ExtractResult(out, len(part), int(n_tokens.sum()), int(truncated.sum()), 0.0, start_doc, meta=meta)
    if meta["complete"]:
        result.already_complete = True
        return result
    if on_start:
        on_start(len(part), int(n_tokens.sum()), start_doc, int(token_start[start_doc]) if start_doc < len(part) else int(n_tokens.sum()))

    todo = windows[first_window:]
    plans = plan_batches(n_tokens, todo, opts, plan_version)
    if loaded.audio is not None and not loaded.audio.batchable:  # no attention mask: padding would change the frames
        plans = [[b[i : i + 1] for b in plan for i in range(len(b))] for plan in plans]
    _cap_heap_growth()
    if stats_only:
        t_loop = time.perf_counter()
        reducer = live.Reducer(group, meta, token_start=token_start, kind=kinds, cells=cells, device=device, host=device.type != "cuda",
                               commit_seconds=opts.commit_seconds, kill_at=kill_at, on_batch=on_batch)
        try:
            stages = _run_reduced(loaded, sites, opts, device, compute, ids, n_tokens, token_start, todo, plans, reducer)
        finally:
            reducer.close()
        result.meta = reducer.meta
        result.seconds = time.perf_counter() - t_start
        result.stages = {**stages, **reducer.timers, "loop": time.perf_counter() - t_loop}
        result.warnings = st.describe_nonfinite(reducer.meta.get("nonfinite", {}), opts.store_dtype)
        return result
    window_tokens = max(int(n_tokens[d0:d1].sum()) for d0, d1 in windows)
    window_docs = max(d1 - d0 for d0, d1 in windows)
    writer = Writer(group, meta, token_start, start_doc, (window_tokens, window_docs), on_batch=on_batch, writers=opts.writers,
                    kill_at=kill_at)
    t_loop = time.perf_counter()
    try:
        stages = _run(loaded, sites, opts, device, compute, ids, n_tokens, token_start, todo, plans, first_window, writer, explainer)
    except BaseException:
        writer.abort()  # the window in flight is not committed: a resume redoes it
        raise
    writer.close()
    result.meta = writer.meta
    result.seconds = time.perf_counter() - t_start
    # "loop": first forward to last commit, without reading, tokenising and creating the store
    result.stages = {**stages, **writer.timers, "writers": writer.writers, "loop": time.perf_counter() - t_loop}
    result.warnings = st.describe_nonfinite(writer.meta.get("nonfinite", {}), opts.store_dtype)
    return result


def plan_windows(n_tokens: np.ndarray, per_row: int, opts: ExtractOptions) -> list[tuple[int, int]]:
    """The write windows of a resolved extraction (``per_row``: stored bytes per token row)."""
    return batching.plan_windows(
        n_tokens,
        bytes_per_token=per_row if opts.tokens else 0,
        bytes_per_doc=per_row * len(opts.pool),
        budget=opts.buffer_mb << 20,
    )


def plan_batches(n_tokens: np.ndarray, windows: list[tuple[int, int]], opts: ExtractOptions, version: int) -> list[list[np.ndarray]]:
    """The batches of each window, as the extraction runs them (benchmarks run the same list bare)."""
    return [batching.plan_batches(n_tokens, opts.max_batch_tokens, np.arange(d0, d1), version) for d0, d1 in windows]


def _cap_heap_growth() -> None:
    """Serve buffers over 1 MiB from mmap on glibc, so freed buffers go back to the OS.

    glibc raises its mmap threshold each time a large block is freed, after which large buffers
    come from the heap and fragment it: peak RSS then grew with corpus length (843 -> 1217 MiB
    floor over a 4x corpus in benchmarks/README.md); with a fixed threshold it stays flat.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        pass


STORE_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def ring_specs(
    sites: dict[str, models.Site], opts: ExtractOptions, n_classes: int, max_real: int, max_docs: int, max_padded: int, inputs: bool
) -> dict[str, transfer.Spec]:
    """The buffers of one ring slot, sized for the largest batch of the plan (keys: ``writer.Batch``)."""
    store = STORE_TORCH[opts.store_dtype]
    specs: dict[str, transfer.Spec] = {}
    for name, site in ((st.stream(n, q), s) for q in relevance.quantities(opts.quantity) for n, s in sites.items()):
        inner = (len(site.layers), site.width)
        if opts.tokens:
            specs[f"tok:{name}"] = transfer.Spec(max_real, inner, store, layer_major=True)
        for pool in opts.pool:
            specs[f"doc:{name}/{pool}"] = transfer.Spec(max_docs, inner, store, layer_major=True)
        specs[f"ext:{name}"] = transfer.Spec(len(site.layers), (2,), torch.float32)
    if n_classes:
        specs["doc:logits"] = transfer.Spec(max_docs, (n_classes,), torch.float32)
    if inputs:  # host staging of the inputs, so uploads need no pinned allocation per batch
        specs.update({"in:ids": transfer.Spec(max_padded, (), torch.int64), "in:mask": transfer.Spec(max_padded, (), torch.int64),
                      "in:real": transfer.Spec(max_real, (), torch.int64), "in:lengths": transfer.Spec(max_docs, (), torch.int64)})
    return specs


def _run(
    loaded: models.LoadedModel,
    sites: dict[str, models.Site],
    opts: ExtractOptions,
    device: torch.device,
    compute: torch.dtype,
    ids: list[list[int]],
    n_tokens: np.ndarray,
    token_start: np.ndarray,
    windows: list[tuple[int, int]],
    plans: list[list[np.ndarray]],
    first_index: int,
    writer: Writer,
    explainer: relevance.Explainer | None = None,
) -> dict:
    """The forward loop. Returns seconds per stage (host side) and the ring's occupancy."""
    store_torch = STORE_TORCH[opts.store_dtype]
    api = transfer.cuda_api(device)
    batches = [b for plan in plans for b in plan]
    max_real = max(int(n_tokens[b].sum()) for b in batches)
    max_docs = max(len(b) for b in batches)
    max_padded = max(len(b) * int(n_tokens[b].max()) for b in batches)
    n_classes = len(loaded.classes) if loaded.classes is not None else 0
    ring = transfer.HostRing(ring_specs(sites, opts, n_classes, max_real, max_docs, max_padded, api is not None), RING_SLOTS, api)
    copier = transfer.Copier(device, api) if api is not None else None
    hooked = {name: s.modules for name, s in sites.items() if s.modules}
    want_hidden = "resid" in sites
    total_tokens = int(n_tokens.sum())
    timers = {"prepare": 0.0, "forward": 0.0, "gather": 0.0, "copy": 0.0}
    clock = time.perf_counter

    rules = explainer.context(loaded.model) if explainer is not None else contextlib.nullcontext()
    with transfer.on_device(device, api), torch.inference_mode(explainer is None), rules, models.capture(hooked) as captured:
        for offset, ((d0, d1), plan) in enumerate(zip(windows, plans)):
            t1 = int(token_start[d1]) if d1 < len(n_tokens) else total_tokens
            window = Window(first_index + offset, (d0, d1), (int(token_start[d0]), t1))
            writer.begin_window(window)
            for docs in plan:
                t = clock()
                padded = batching.pad_host([ids[i] for i in docs], loaded.pad_id)
                timers["prepare"] += clock() - t
                slot = ring.acquire(writer.alive)
                t = clock()
                inputs = _batch_inputs(loaded, padded, docs, slot, device, api)
                timers["prepare"] += clock() - t
                t = clock()
                if explainer is None:
                    out, layers_of = _forward(loaded, sites, inputs, device, compute, captured, want_hidden)
                else:  # forward and backward: activations and/or relevances, detached
                    out, layers_of = relevance.forward_backward(explainer, loaded, sites, inputs, device, compute, captured, want_hidden, docs)
                timers["forward"] += clock() - t
                t = clock()
                with _one_thread(api is None), torch.no_grad():
                    values = gather(layers_of, inputs, opts.tokens, opts.pool, store_torch, None if api is not None else slot)
                if loaded.classes is not None:
                    values["doc:logits"] = out.logits.float()
                del out, layers_of  # the next forward must not find this batch's outputs still referenced
                _forget(captured)
                timers["gather"] += clock() - t
                t = clock()
                if copier is not None:
                    rows = copier.to_host(values, slot)
                else:
                    rows = {key: int(v.shape[1] if slot.specs[key].layer_major else v.shape[0]) for key, v in values.items()}
                    if "doc:logits" in values:
                        slot.view("doc:logits", len(docs)).copy_(values["doc:logits"])
                del values
                timers["copy"] += clock() - t
                writer.put(Batch(docs=np.asarray(docs), lengths=padded.lengths, padded_tokens=int(padded.ids.size), slot=slot, rows=rows, release=ring.release))
            writer.end_window(window)
    stages = {**timers, **_decode_stage(loaded), "wait_slot": ring.waited, "ring": ring.occupancy()}
    if copier is not None:
        stages["copy_device"] = copier.seconds()  # device time of the copies (CUDA events)
    return stages


def _run_reduced(
    loaded: models.LoadedModel, sites: dict[str, models.Site], opts: ExtractOptions, device: torch.device, compute: torch.dtype,
    ids: list[list[int]], n_tokens: np.ndarray, token_start: np.ndarray, windows: list[tuple[int, int]], plans: list[list[np.ndarray]],
    reducer: live.Reducer,
) -> dict:
    """The forward loop of a stats-only extraction: the same batches, forward and gather (so the
    values are those a full store would hold), reduced by ``reducer`` where they are (on the
    device), committed at window ends; no ring and no copy."""
    store_torch = STORE_TORCH[opts.store_dtype]
    api = transfer.cuda_api(device)
    hooked = {name: s.modules for name, s in sites.items() if s.modules}
    want_hidden = "resid" in sites
    total_tokens = int(n_tokens.sum())
    timers = {"prepare": 0.0, "forward": 0.0, "gather": 0.0}
    clock = time.perf_counter
    with transfer.on_device(device, api), torch.inference_mode(), models.capture(hooked) as captured:
        for (d0, d1), plan in zip(windows, plans):
            for docs in plan:
                t = clock()
                padded = batching.pad_host([ids[i] for i in docs], loaded.pad_id)
                inputs = _batch_inputs(loaded, padded, docs, None, device, api)
                timers["prepare"] += clock() - t
                t = clock()
                out, layers_of = _forward(loaded, sites, inputs, device, compute, captured, want_hidden)
                timers["forward"] += clock() - t
                t = clock()
                with _one_thread(api is None):
                    values = gather(layers_of, inputs, opts.tokens, opts.pool, store_torch)
                del out, layers_of
                _forget(captured)
                timers["gather"] += clock() - t
                reducer.add(values, np.asarray(docs), padded.lengths, int(padded.ids.size))
                del values
            reducer.end_window(d1, int(token_start[d1]) if d1 < len(n_tokens) else total_tokens)
    return {**timers, **_decode_stage(loaded)}


def _batch_inputs(loaded: models.LoadedModel, padded: batching.Padded, docs: np.ndarray, slot: transfer.Slot | None,
                  device: torch.device, api: transfer.CudaApi | None) -> dict[str, Any]:
    """The batch's inputs on the device: ids, mask and positions (:func:`_inputs`), and an audio
    model's decoded, resampled and featurised audio (:mod:`neurostore.audio`)."""
    inputs = _inputs(padded, slot, device, api)
    if loaded.audio is not None:
        from . import audio

        inputs["audio"] = audio.features(loaded, docs, device)
    return inputs


def _forget(captured: dict[str, list]) -> None:
    """Drop the hooks' references to this batch's outputs, so the next forward can reuse the memory."""
    for name in captured:
        captured[name] = [None] * len(captured[name])


def _decode_stage(loaded: models.LoadedModel) -> dict[str, float]:
    """An audio model's decode + resample + feature seconds (inside "prepare"), for the stage timers."""
    return {"decode": loaded.audio.seconds} if loaded.audio is not None else {}


def _forward(loaded: models.LoadedModel, sites: dict[str, models.Site], inputs: dict[str, torch.Tensor], device: torch.device,
             compute: torch.dtype, captured: dict[str, list], want_hidden: bool) -> tuple[Any, dict[str, list[torch.Tensor]]]:
    """One forward pass: the model's output and each site's layers (hidden states, hooked modules)."""
    if loaded.audio is not None:
        from . import audio

        with models.autocast(device, compute), audio.encoder_capture(loaded, sites) as encoded:
            out = audio.forward(loaded, inputs, want_hidden)
        inputs["row_masks"] = audio.row_masks(loaded, sites, inputs)
        return out, audio.layers_of(loaded, out, sites, captured, encoded, inputs)
    with models.autocast(device, compute):
        out = loaded.model(input_ids=inputs["ids"], attention_mask=inputs["mask"], output_hidden_states=want_hidden)
    return out, {name: ([out.hidden_states[i] for i in site.layers] if name == "resid" else list(captured[name])) for name, site in sites.items()}


def _pooling_of(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First row, last row and mean weights ``[B, 1, S]`` of the rows marked in ``rows`` ``[B, S]``."""
    marked = rows.to(torch.int8)
    first = marked.argmax(dim=1)
    last = rows.shape[1] - 1 - marked.flip(1).argmax(dim=1)
    weights = (rows.float() / rows.sum(dim=1, keepdim=True).clamp(min=1)).unsqueeze(1)
    return first, last, weights


@contextlib.contextmanager
def _one_thread(host: bool) -> Iterator[None]:
    """Gather on the host with one torch thread: its copies are small, and an OpenMP team of
    several threads stalls at every barrier while the writer threads hold the cores (measured on
    2 cores: the gather of a null forward took 4-15 s per GB with 2 threads, under 2 with 1)."""
    if not host:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _inputs(padded: batching.Padded, slot: transfer.Slot, device: torch.device, api: transfer.CudaApi | None) -> dict[str, torch.Tensor]:
    """The batch's ids, mask, real-token positions and lengths on the device.

    On CUDA they are staged in the slot's pinned buffers and uploaded without blocking; the
    real-token positions come from the host, so the gather needs no ``nonzero`` (a device sync).
    """
    B, S = padded.ids.shape
    host = {"ids": padded.ids, "mask": padded.mask, "real": padded.real, "lengths": padded.lengths}
    if api is None:
        return {k: torch.from_numpy(v) for k, v in host.items()}
    if slot is None:  # no staging ring (a stats-only extraction): small synchronous uploads
        return {k: torch.from_numpy(v).to(device) for k, v in host.items()}
    out = {}
    for key, values in host.items():
        flat = values.reshape(-1)
        staged = slot.view(f"in:{key}", len(flat))
        slot.host(f"in:{key}", len(flat))[:] = flat
        out[key] = api.to_device(staged, device)
    out["ids"], out["mask"] = out["ids"].view(B, S), out["mask"].view(B, S)
    return out


def gather(
    layers_of: dict[str, list[torch.Tensor]],
    inputs: dict[str, torch.Tensor],
    tokens: bool,
    pools: list[str],
    store_dtype: torch.dtype,
    dest: transfer.Slot | None = None,
) -> dict[str, torch.Tensor]:
    """Real tokens ``[n_layers, n_real, width]``, pooled vectors ``[n_layers, n_docs, width]`` and
    per-layer extremes, on the device, keyed like ``writer.Batch``.

    Values are cast to the store dtype as they are gathered, layer-major so that each layer's rows
    stay one contiguous block down to the compressed chunk. The extremes (``ext:{site}``, min and
    max per layer before the cast) let the writer count values the cast turns into inf without a
    pass over every value. With ``dest`` (a host slot, on a CPU) results go straight into it.
    Nothing here waits for the device.
    """
    real, lengths, mask = inputs["real"], inputs["lengths"], inputs["mask"]
    n_docs = mask.shape[0]
    weights = None
    if "mean" in pools:
        weights = (mask / lengths[:, None]).float().unsqueeze(1)  # [B, 1, S]: mean pooling as one matmul
    values: dict[str, torch.Tensor] = {}
    some_rows = {name: _pooling_of(m) for name, m in (inputs.get("row_masks") or {}).items()}  # sites with values on some rows only

    def target(key: str, rows: int, n_layers: int, width: int) -> torch.Tensor:
        if dest is not None:
            return dest.view(key, rows)
        return torch.empty((n_layers, rows, width), dtype=store_dtype, device=mask.device)

    runs = None
    if dest is not None and tokens:  # host: each sentence's rows are one slice (no index temporary)
        runs = list(zip(np.concatenate(([0], np.cumsum(inputs["lengths"].numpy())))[:-1].tolist(), inputs["lengths"].tolist()))
    for name, layers in layers_of.items():
        width, n_layers = layers[0].shape[-1], len(layers)
        if tokens:
            out = target(f"tok:{name}", len(real), n_layers, width)
            for j, h in enumerate(layers):
                if runs is None:
                    out[j] = h.reshape(-1, width).index_select(0, real)
                else:  # measured on 2 cores: 6.4 GB/s of float16 out, against 1.2 for index_select + cast
                    for b, (start, n) in enumerate(runs):
                        out[j, start : start + n] = h[b, :n]
            values[f"tok:{name}"] = out
        for pool in pools:
            out = target(f"doc:{name}/{pool}", n_docs, n_layers, width)
            for j, h in enumerate(layers):
                if name in some_rows:
                    first, last, site_weights = some_rows[name]
                    pick = {"first": first, "last": last}.get(pool)
                    if pick is None:
                        out[j] = torch.bmm(site_weights, h.float()).squeeze(1)
                    else:
                        out[j] = h[torch.arange(n_docs, device=h.device), pick]
                elif pool == "first":
                    out[j] = h[:, 0]
                elif pool == "last":
                    out[j] = h[torch.arange(n_docs, device=h.device), lengths - 1]
                else:
                    out[j] = torch.bmm(weights, h.float()).squeeze(1)
            values[f"doc:{name}/{pool}"] = out
        ext = torch.stack([torch.stack(torch.aminmax(h)).float() for h in layers])
        if dest is not None:
            dest.view(f"ext:{name}", n_layers).copy_(ext)
            values[f"ext:{name}"] = dest.view(f"ext:{name}", n_layers)
        else:
            values[f"ext:{name}"] = ext
    return values
