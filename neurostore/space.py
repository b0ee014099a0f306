"""How much disk a store will take, and whether the target has it: known before anything is written.

Everything a store holds is sized by numbers known once the corpus is tokenised: token rows,
sentences, sites x layers x width, pooled arrays and the store dtype. Only compression is not
exact, so the estimate uses the ratio measured per codec (``COMPRESSION_RATIOS``). ``extract``
refuses a target short of space before creating anything (``check``); ``--dry-run`` prints it.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import store as st
from .errors import Fault

# Raw activation bytes / bytes on disk per --compression codec, measured on real MiniLM float16
# activations (benchmarks/README.md: lz4 + bitshuffle 1.082x, zstd-1 + bitshuffle 1.094x; zstd-3
# 1.12x on the pipeline benchmark). The lower figure where two were measured, so the estimate errs
# large; applied to every store dtype (float32 and bfloat16 were not measured).
COMPRESSION_RATIOS = {"none": 1.0, "lz4": 1.08, "zstd": 1.09}
# Per-sentence table bytes (label, lang int32; token_start int64; n_tokens int32; truncated bool;
# a text's length prefix) and per-token ones (token_id, doc int32, a kind byte), written uncompressed
# in the worst case.
DOC_TABLE_BYTES = 4 + 4 + 8 + 4 + 1 + 4
TOKEN_TABLE_BYTES = 4 + 4 + 1
# A new array's metadata, folder and shard indexes, rounded up.
ARRAY_OVERHEAD = 8192


@dataclass
class Estimate:
    """The bytes an extraction will write (``raw``: uncompressed, ``disk``: what lands on disk)."""

    docs: int  # sentences still to write
    tokens: int  # token rows still to write
    arrays: list[dict] = field(default_factory=list)  # name, shape, dtype, raw_bytes, disk_bytes
    raw_bytes: int = 0
    disk_bytes: int = 0
    compression: str = st.DEFAULT_COMPRESSION
    ratio: float = 1.0
    resume: bool = False  # only what is left of a resumed store
    free_bytes: int | None = None  # free space of the target (plus a store --overwrite replaces)
    free_at: str | None = None  # the existing folder whose file system was asked
    note: str = ""

    @property
    def fits(self) -> bool | None:
        """None where nothing was checked (an object store)."""
        return None if self.free_bytes is None else self.disk_bytes <= self.free_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}


def ratio(compression: str) -> float:
    return COMPRESSION_RATIOS[compression.partition(":")[0]]


def estimate(
    sites: dict[str, tuple[int, int]],
    *,
    store_dtype: str,
    pool: Sequence[str],
    tokens: bool,
    n_tokens: np.ndarray,
    texts: Sequence[str] = (),
    n_classes: int = 0,
    compression: str = st.DEFAULT_COMPRESSION,
    done_docs: int = 0,
    done_tokens: int = 0,
) -> Estimate:
    """The store's size from its shapes; ``sites`` maps a site to (layers stored, width).

    ``done_docs``/``done_tokens`` (a resume) leave out what is committed and the tables, which a
    store has from its creation. Uncompressed stores also count the zero padding of each array's
    last chunk (compressed, it costs next to nothing).
    """
    itemsize = st.numpy_store_dtype(store_dtype).itemsize
    n_docs, total = len(n_tokens), int(np.sum(n_tokens))
    left_docs, left_tokens = n_docs - done_docs, total - done_tokens
    r = ratio(compression)
    out = Estimate(docs=left_docs, tokens=left_tokens, compression=compression, ratio=r, resume=bool(done_docs))
    name = np.dtype(store_dtype).name if store_dtype != "bfloat16" else "bfloat16"

    def add(array: str, shape: tuple[int, ...], dtype: str, raw: int, disk: int) -> None:
        disk += 0 if done_docs else ARRAY_OVERHEAD
        out.arrays.append({"name": array, "shape": list(shape), "dtype": dtype, "raw_bytes": raw, "disk_bytes": disk})
        out.raw_bytes += raw
        out.disk_bytes += disk

    for site, (n_layers, width) in sites.items():
        row = n_layers * width * itemsize
        base, quantity = (site[len("relevance:"):], "relevance") if site.startswith("relevance:") else (site, "activation")  # st.stream
        shapes = [(st.array_path(base, "tokens", quantity), total, left_tokens)] if tokens else []
        shapes += [(st.array_path(base, p, quantity), n_docs, left_docs) for p in pool]
        for array, rows, left in shapes:
            raw = left * row
            disk = math.ceil(raw / r)
            if compression == "none" and not done_docs:
                chunk, _ = st.row_layout(n_layers, width, itemsize, rows)
                disk += (-rows % chunk) * row
            add(array, (rows, n_layers, width), name, raw, disk)
    if n_classes:
        raw = left_docs * (n_classes + 1) * 4
        add("docs/logits+pred", (n_docs, n_classes), "float32", raw, raw)
    if not done_docs:
        raw = n_docs * DOC_TABLE_BYTES + sum(len(t.encode("utf-8")) for t in texts)
        add("docs/*", (n_docs,), "tables", raw, raw)
        raw = total * TOKEN_TABLE_BYTES
        add("tokens/*", (total,), "tables", raw, raw)
    return out


def add_array(est: Estimate, name: str, shape: tuple[int, ...], dtype: str, raw: int, disk: int) -> None:
    """Count one more array (a stats-only store's statistics) into the estimate."""
    est.arrays.append({"name": name, "shape": list(shape), "dtype": dtype, "raw_bytes": raw, "disk_bytes": disk})
    est.raw_bytes += raw
    est.disk_bytes += disk


def measure_free(est: Estimate, out: str, *, reclaim: bool = False) -> Estimate:
    """Fill in the free space of ``out``'s file system (the nearest existing folder); with
    ``reclaim`` (``--overwrite``) the old store's bytes count as free. Object stores are not checked."""
    if "://" in out:
        est.note = "object store: free space not checked"
        return est
    probe = nearest_existing(out)
    est.free_at = str(probe)
    est.free_bytes = int(shutil.disk_usage(probe).free)
    if reclaim and probe == Path(out).absolute() and probe.is_dir():
        est.free_bytes += sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(probe) for f in files)
    return est


def nearest_existing(path: str) -> Path:
    """``path`` itself, or its nearest parent that exists (where its file system can be asked)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_bytes(path: str) -> int | None:
    """Free space of the file system that holds (or would hold) ``path``."""
    try:
        return int(shutil.disk_usage(nearest_existing(path)).free)
    except OSError:
        return None


def check(est: Estimate, out: str) -> None:
    """Refuse, before anything is created, a target with less free space than the estimate."""
    if est.fits is False:
        what = "the rest of the store" if est.resume else "the store"
        raise Fault(
            f"{out}: {what} needs about {format_bytes(est.disk_bytes)} ({est.tokens:,} token rows, {est.compression} "
            f"~{est.ratio:.2f}x) but {est.free_at} has {format_bytes(est.free_bytes)} free; free space or choose "
            "another --out, or pass --no-space-check to go on anyway"
        )


def format_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)
