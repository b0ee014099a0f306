"""Extraction: corpus -> tokenised windows -> forward passes with hooks -> the writer.

The forward pass of the next batch overlaps the device-to-host copy, compression and writing of
the previous one: on CUDA the copy runs on its own stream into pinned host memory and the writer
waits on an event; on CPU the writer thread compresses while the model computes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__, batching, models
from . import store as st
from .corpus import categories, read_corpus
from .errors import NeurostoreError
from .writer import Batch, Window, Writer, plan_windows

# Options that decide what is stored and how it is batched: a resume must use the same ones.
IDENTITY = ("sites", "layers", "pool", "tokens", "dtype", "store_dtype", "max_length", "max_batch_tokens", "buffer_mb", "module_pattern", "part")


@dataclass
class ExtractOptions:
    """What to extract and how. ``None`` means the default (or, on resume, what the store used)."""

    sites: list[str] | None = None  # default ["resid"]
    layers: list[int] | None = None  # default: all
    pool: list[str] | None = None  # default ["first", "mean"]
    tokens: bool | None = None  # default True
    dtype: str | None = None  # compute dtype; default float16 on CUDA, float32 on CPU
    store_dtype: str | None = None  # default float16
    max_length: int | None = None  # default: the model's limit
    max_batch_tokens: int | None = None  # padded tokens per batch; default 512 on CPU, 32768 on CUDA
    buffer_mb: int | None = None  # window buffer; default 256
    module_pattern: str | None = None
    part: tuple[int, int] | None = None
    device: str = "auto"


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


def _existing(out: str) -> tuple[Any, dict | None] | None:
    """The group and metadata at ``out`` if something is there; None if nothing is."""
    if "://" not in out:
        path = Path(out)
        if not path.exists():
            return None
        if path.is_file():
            raise NeurostoreError(f"{out}: is a file, not a store")
        if not (path / "zarr.json").exists():
            if any(path.iterdir()):
                raise NeurostoreError(f"{out}: exists and is not a Zarr store; refusing to write into it")
            return None
    try:
        group = st.open_group(out, mode="r+")
    except Exception:  # noqa: BLE001 - nothing (readable) there
        return None
    return group, st.read_meta(group)


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
            if given is not None and given != was:
                raise NeurostoreError(
                    f"--{key.replace('_', '-')} {_show(given)} differs from the store's {_show(was)}; "
                    "drop the option to resume, or use --overwrite to start again"
                )
            setattr(resolved, key, was)
        return resolved
    resolved.sites = opts.sites or ["resid"]
    resolved.pool = opts.pool if opts.pool is not None else ["first", "mean"]
    resolved.tokens = True if opts.tokens is None else opts.tokens
    resolved.store_dtype = opts.store_dtype or "float16"
    resolved.buffer_mb = opts.buffer_mb or 256
    for site in resolved.sites:
        if site not in st.SITES:
            raise NeurostoreError(f"--sites: unknown site {site!r} (use {', '.join(st.SITES)})")
    for pool in resolved.pool:
        if pool not in st.POOLS:
            raise NeurostoreError(f"--pool: unknown pooling {pool!r} (use {', '.join(st.POOLS)})")
    if resolved.store_dtype not in st.STORE_DTYPES:
        raise NeurostoreError(f"--store-dtype {resolved.store_dtype!r}: use one of {', '.join(st.STORE_DTYPES)}")
    if not resolved.tokens and not resolved.pool:
        raise NeurostoreError("--no-tokens with no --pool would store nothing")
    if len(set(resolved.sites)) != len(resolved.sites):
        raise NeurostoreError("--sites names a site twice")
    return resolved


def extract(
    corpus_paths: list[str],
    out: str,
    *,
    model: str | None = None,
    options: ExtractOptions | None = None,
    corpus_options: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_start: Callable[[int, int, int, int], None] | None = None,
    on_batch: Callable[[int, int, int], None] | None = None,
) -> ExtractResult:
    """Extract activations of ``corpus_paths`` into the store at ``out``.

    ``on_start(total_docs, total_tokens, done_docs, done_tokens)`` and ``on_batch(docs, tokens,
    bytes)`` report progress. Safe to kill at any moment: ``resume=True`` continues from the last
    commit and yields the same store as an uninterrupted run.
    """
    options = options or ExtractOptions()
    t_start = time.perf_counter()
    if resume and overwrite:
        raise NeurostoreError("--resume and --overwrite contradict each other: pick one")
    found = _existing(out)
    stored = found[1] if found else None
    if found and not resume and not overwrite:
        raise NeurostoreError(f"{out}: already exists; pass --resume to continue it or --overwrite to replace it")
    if resume and (stored is None or not stored.get("created")):
        stored = None  # nothing committed yet: start afresh
    if stored is not None and stored.get("schema_version") != st.SCHEMA_VERSION:
        raise NeurostoreError(f"{out}: store schema {stored.get('schema_version')} cannot be resumed by this version")
    opts = _resolve_options(options, stored)

    corpus = read_corpus(corpus_paths, **(corpus_options or {}))
    label_names, label_codes = categories(corpus.labels)
    lang_names, lang_codes = categories(corpus.langs)
    lo, hi = _part_range(len(corpus), opts.part)
    part = corpus.slice(lo, hi)
    if len(part) == 0:
        raise NeurostoreError(f"--part {opts.part[0]}/{opts.part[1]}: that part of the corpus is empty")
    if stored is not None:
        if stored["corpus"]["fingerprint"] != corpus.fingerprint:
            raise NeurostoreError(f"{out}: was made from another corpus (or other column options); use --overwrite to start again")
        model = model or stored["model"]["path"]
        if model != stored["model"]["path"]:
            raise NeurostoreError(f"--model {model!r} differs from the store's {stored['model']['path']!r}")

    device = models.resolve_device(options.device)
    compute = models.resolve_dtype(opts.dtype, device)
    opts.dtype = str(compute).removeprefix("torch.")
    loaded = models.load(model, device)
    sites = models.resolve_sites(loaded, opts.sites, opts.layers, opts.module_pattern)
    limit = loaded.max_length()
    if opts.max_length is None:
        opts.max_length = limit
    elif not (1 <= opts.max_length <= limit):
        raise NeurostoreError(f"--max-length {opts.max_length}: the model accepts 1 to {limit} tokens")
    if opts.max_batch_tokens is None:
        opts.max_batch_tokens = batching.default_batch_tokens(device)
    if opts.max_batch_tokens < 1:
        raise NeurostoreError(f"--max-batch-tokens {opts.max_batch_tokens}: must be at least 1")

    ids, truncated = batching.tokenize(loaded.tokenizer, part.texts, opts.max_length)
    n_tokens = np.array([len(x) for x in ids], dtype=np.int64)
    token_start = np.concatenate(([0], np.cumsum(n_tokens)[:-1])).astype(np.int64)

    if stored is None:
        meta = st.new_meta(
            model={
                "name": loaded.name,
                "path": model or models.default_model(),
                "model_type": loaded.model_type,
                "classifier": loaded.classes is not None,
                "n_layers": loaded.n_layers,
                "config": models.config_summary(loaded.config),
            },
            compute_dtype=opts.dtype,
            store_dtype=opts.store_dtype,
            sites={name: {"layers": s.layers, "width": s.width} for name, s in sites.items()},
            pool=opts.pool,
            tokens=opts.tokens,
            options={k: v for k, v in asdict(opts).items() if k != "device"},
            corpus={
                "files": corpus.files,
                "fingerprint": corpus.fingerprint,
                "n_docs_total": len(corpus),
                "part": list(opts.part) if opts.part else None,
                "doc_offset": lo,
            },
            n_docs=len(part),
            n_tokens=int(n_tokens.sum()),
            n_truncated=int(truncated.sum()),
            version=__version__,
        )
        group = st.create(
            out,
            meta,
            texts=part.texts,
            label=(label_names, np.asarray(label_codes[lo:hi], dtype=np.int32)),
            lang=(lang_names, np.asarray(lang_codes[lo:hi], dtype=np.int32)),
            n_tokens=n_tokens,
            truncated=truncated,
            token_ids=np.concatenate([np.asarray(x, dtype=np.int32) for x in ids]),
            classes=loaded.classes,
        )
        meta = st.read_meta(group)
    else:
        group = found[0]
        meta = stored

    itemsize = st.numpy_store_dtype(opts.store_dtype).itemsize
    per_row = {name: len(s.layers) * s.width * itemsize for name, s in sites.items()}
    windows = plan_windows(
        n_tokens,
        bytes_per_token=sum(per_row.values()) if opts.tokens else 0,
        bytes_per_doc=sum(per_row.values()) * len(opts.pool),
        budget=opts.buffer_mb << 20,
    )
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

    _cap_heap_growth()
    writer = Writer(group, meta, token_start, start_doc, on_batch=on_batch)
    try:
        _run(loaded, sites, opts, device, compute, ids, n_tokens, token_start, windows[first_window:], first_window, writer)
    except OSError as err:  # disk full, permissions, a lost mount: the user's to fix, then resume
        writer.abort()
        raise NeurostoreError(f"{out}: writing failed ({err}); fix it and continue with --resume") from None
    except BaseException:
        writer.abort()  # the window in flight is not committed: a resume redoes it
        raise
    writer.close()
    result.meta = writer.meta
    result.seconds = time.perf_counter() - t_start
    return result


def _cap_heap_growth() -> None:
    """Serve buffers over 1 MiB from mmap on glibc, so freed window buffers go back to the OS.

    glibc raises its mmap threshold each time a large block is freed, after which window-sized
    buffers come from the heap and fragment it: peak RSS then grew with corpus length (843 ->
    1217 MiB floor over a 4x corpus in benchmarks/README.md); with a fixed threshold it stays flat.
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
    first_index: int,
    writer: Writer,
) -> None:
    store_torch = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[opts.store_dtype]
    cuda = device.type == "cuda"
    copy_stream = torch.cuda.Stream(device) if cuda else None
    hooked = {name: s.modules for name, s in sites.items() if s.modules}
    want_hidden = "resid" in sites
    total_tokens = int(n_tokens.sum())

    with torch.inference_mode(), models.capture(hooked) as captured:
        for offset, (d0, d1) in enumerate(windows):
            t1 = int(token_start[d1]) if d1 < len(n_tokens) else total_tokens
            window = Window(first_index + offset, (d0, d1), (int(token_start[d0]), t1))
            writer.begin_window(window)
            for docs in batching.plan_batches(n_tokens, opts.max_batch_tokens, np.arange(d0, d1)):
                input_ids, mask = batching.pad([ids[i] for i in docs], loaded.pad_id, device, pin=cuda)
                with models.autocast(device, compute):
                    out = loaded.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=want_hidden)
                layers_of = {}
                for name, site in sites.items():
                    if name == "resid":
                        layers_of[name] = [out.hidden_states[i] for i in site.layers]
                    else:
                        layers_of[name] = list(captured[name])
                tokens, pooled = _gather(layers_of, mask, opts, store_torch)
                logits = out.logits.float() if loaded.classes is not None else None
                batch = Batch(docs=np.asarray(docs), lengths=n_tokens[docs], tokens=tokens, pooled=pooled, logits=logits)
                if cuda:
                    _to_host_async(batch, copy_stream)
                writer.put(batch)
            writer.put(window)


def _gather(
    layers_of: dict[str, list[torch.Tensor]], mask: torch.Tensor, opts: ExtractOptions, store_dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Real tokens ``[n_real, n_layers, width]`` and pooled vectors, cast to the store dtype on the device."""
    flat_mask = mask.reshape(-1).bool()
    real = flat_mask.nonzero().squeeze(1)
    lengths = mask.sum(1)
    batch = torch.arange(mask.shape[0], device=mask.device)
    weights = (mask / lengths[:, None]).float().unsqueeze(1)  # [B, 1, S]: mean pooling as one matmul
    tokens, pooled = {}, {}
    for name, layers in layers_of.items():
        width = layers[0].shape[-1]
        if opts.tokens:
            out = torch.empty((len(real), len(layers), width), dtype=store_dtype, device=mask.device)
            for j, h in enumerate(layers):
                out[:, j] = h.reshape(-1, width).index_select(0, real)
            tokens[name] = out
        for pool in opts.pool:
            out = torch.empty((mask.shape[0], len(layers), width), dtype=store_dtype, device=mask.device)
            for j, h in enumerate(layers):
                if pool == "first":
                    out[:, j] = h[:, 0]
                elif pool == "last":
                    out[:, j] = h[batch, lengths - 1]
                else:
                    out[:, j] = torch.bmm(weights, h.float()).squeeze(1)
            pooled[f"{name}/{pool}"] = out
    return tokens, pooled


def _to_host_async(batch: Batch, stream: "torch.cuda.Stream") -> None:
    """Copy a batch's device tensors into pinned host memory on the copy stream.

    The forward of the next batch goes on while the copy runs; the writer waits on the event.
    ``record_stream`` tells the caching allocator not to reuse the device memory too early.
    """
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):

        def move(t: torch.Tensor) -> torch.Tensor:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            t.record_stream(stream)
            return host

        batch.tokens = {k: move(v) for k, v in batch.tokens.items()}
        batch.pooled = {k: move(v) for k, v in batch.pooled.items()}
        if batch.logits is not None:
            batch.logits = move(batch.logits)
        event = torch.cuda.Event()
        event.record(stream)
    batch.ready = event
