"""Reading activation chunks for the query pass: each shard's index once, chunk bytes by ``pread``,
decompression in the calling thread.

Why not zarr's synchronous API for the pass: every zarr read goes through zarr's one event-loop
thread and its codec pool, and measured here (2 cores, lz4 + bitshuffle float16, warm cache) it
tops out at ~1 GB/s whatever the number of Dask threads, where ``os.pread`` + numcodecs' blosc in
two threads (blosc releases the GIL off the main thread) reads 2.5 GB/s. The layout read directly
is the one ``store.create`` writes, as ``shards.layout`` recognises it (the writer's encoder starts
from the same function), in a local directory. Any other array (a
remote store, other codecs or chunk shapes) is read through zarr (:class:`ZarrSource`), with the
same values. A checksum mismatch, an undecodable chunk or an I/O error raises
:class:`~neurostore.errors.Fault` naming the array and the rows (:func:`damaged`).

Sources are small picklable descriptions (paths and numbers, no open files), so a Dask task on any
worker process can read its rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import Fault

MAX_U64 = 2**64 - 1


@dataclass(frozen=True)
class ShardSource:
    """One activation array stored in local shard files (see the module docstring)."""

    directory: str  # the array's folder
    name: str  # the array's path in the store (acts/resid ...), for messages
    keys: tuple[str, ...]  # relative path of the file of shard i
    dtype: str  # numpy dtype of the stored values (bfloat16 arrives as uint16 bits)
    chunk_rows: int
    shard_rows: int
    n_layers: int
    width: int
    blosc: bool
    chunk_crc: bool
    fill_value: float


@dataclass(frozen=True)
class ZarrSource:
    """Any other array: read through zarr (carries the zarr array itself)."""

    array: Any


def source(array: Any) -> ShardSource | ZarrSource:
    """The fastest reader that can read ``array`` exactly (falls back to zarr)."""
    try:
        return _shard_source(array)
    except (AttributeError, TypeError, ValueError, ImportError):
        return ZarrSource(array)


def _shard_source(array: Any) -> ShardSource:
    from zarr.storage import LocalStore

    from .shards import layout

    store = array.store_path.store
    if not isinstance(store, LocalStore):
        raise ValueError("not a local store")
    lay = layout(array)
    rows, n_layers, width = array.shape
    meta = array.metadata
    keys = tuple(meta.encode_chunk_key((i, 0, 0)) for i in range(-(-rows // lay.shard_rows)))
    directory = os.path.join(str(store.root), array.path) if array.path else str(store.root)
    return ShardSource(
        directory=directory, name=array.path, keys=keys, dtype=np.dtype(array.dtype).str, chunk_rows=lay.chunk_rows, shard_rows=lay.shard_rows,
        n_layers=n_layers, width=width, blosc=lay.blosc is not None, chunk_crc=lay.chunk_crc,
        fill_value=float(meta.fill_value),
    )


def step(src: ShardSource | ZarrSource) -> tuple[int, int]:
    """(chunk rows, shard rows) of a source."""
    if isinstance(src, ShardSource):
        return src.chunk_rows, src.shard_rows
    arr = src.array
    return arr.chunks[0], (arr.shards or arr.chunks)[0]


def blocks(src: ShardSource | ZarrSource, lo: int, hi: int, layers: Sequence[int]) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Yield ``(chunk_lo, chunk_hi, j, values [rows, width])`` for every storage chunk of rows
    ``[lo, hi)`` and every ``layers[j]``, one chunk in memory at a time. For a :class:`ShardSource`
    the rows must lie in one shard, whose index is read once."""
    if isinstance(src, ZarrSource):
        yield from _zarr_blocks(src.array, lo, hi, layers)
        return
    yield from _shard_blocks(src, lo, hi, layers)


class DamagedRows(Fault):
    """Stored rows that cannot be read; ``where`` names them (store, array, rows, what failed)
    without the advice, for ``info --verify``'s list."""

    def __init__(self, where: str, advice: str) -> None:
        super().__init__(f"{where}; {advice}")
        self.where = where


def damaged(store_dir: str, name: str, lo: int, hi: int, what: str) -> DamagedRows:
    """The one error for unreadable stored rows: which store, array and rows, and what to run."""
    return DamagedRows(
        f"{store_dir}: {name} rows {lo}-{hi}: {what}",
        f"the store is damaged there: run `neurostore info --verify {store_dir}` to list every damaged chunk",
    )


def _store_dir(directory: str, name: str) -> str:
    return directory[: -len(name) - 1] if name and directory.endswith(name) else directory


def read_zarr(arr: Any, selection: Any, lo: int, hi: int) -> np.ndarray:
    """``arr[selection]`` through Zarr, with a damaged chunk or an I/O error as one :class:`Fault`."""
    try:
        return np.asarray(arr[selection])
    except Exception as err:  # noqa: BLE001 - codecs fail in many ways (checksum, truncated, I/O)
        root = str(getattr(arr.store_path.store, "root", arr.store_path.store))
        raise damaged(root, arr.path, lo, hi, _why(err)) from err


def _why(err: BaseException) -> str:
    if isinstance(err, OSError):
        return f"I/O error ({err.strerror or err})"
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "checksum" in text.lower():
        return "checksum mismatch"
    return f"undecodable ({text[:120]})"


def _zarr_blocks(arr: Any, lo: int, hi: int, layers: Sequence[int]) -> Iterator[tuple[int, int, int, np.ndarray]]:
    step_ = arr.chunks[0]
    for clo in range((lo // step_) * step_, hi, step_):
        a, b = max(lo, clo), min(hi, clo + step_)
        for j, li in enumerate(layers):
            yield a, b, j, read_zarr(arr, (slice(a, b), li, slice(None)), a, b)


def _shard_blocks(src: ShardSource, lo: int, hi: int, layers: Sequence[int]) -> Iterator[tuple[int, int, int, np.ndarray]]:
    try:
        yield from _shard_chunks(src, lo, hi, layers)
    except Fault:
        raise
    except (OSError, ValueError, RuntimeError) as err:  # an unreadable file, a chunk that does not decode
        base = (lo // src.shard_rows) * src.shard_rows
        raise damaged(_store_dir(src.directory, src.name), src.name, base, base + src.shard_rows, _why(err)) from err


def _shard_chunks(src: ShardSource, lo: int, hi: int, layers: Sequence[int]) -> Iterator[tuple[int, int, int, np.ndarray]]:
    shard = lo // src.shard_rows
    base = shard * src.shard_rows
    if hi > base + src.shard_rows:
        raise ValueError(f"rows {lo}-{hi} span more than shard {shard}")
    path = os.path.join(src.directory, src.keys[shard])
    per_shard = src.shard_rows // src.chunk_rows
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        fd = None  # never written: fill value, as zarr reads it
    try:
        index = None if fd is None else _read_index(fd, per_shard * src.n_layers, src, base)
        dtype = np.dtype(src.dtype)
        if index is not None:
            _read_ahead(fd, index, src, (lo - base) // src.chunk_rows, -(-(hi - base) // src.chunk_rows), layers)
        for c in range((lo - base) // src.chunk_rows, -(-(hi - base) // src.chunk_rows)):
            clo = base + c * src.chunk_rows
            a, b = max(lo, clo), min(hi, clo + src.chunk_rows)
            for j, li in enumerate(layers):
                off, n = (MAX_U64, MAX_U64) if index is None else index[c * src.n_layers + li]
                if off == MAX_U64:
                    values = np.full((src.chunk_rows, src.width), src.fill_value, dtype=dtype)
                else:
                    values = _decode(os.pread(fd, int(n), int(off)), src, dtype, clo, li)
                yield a, b, j, values[a - clo:b - clo]
    finally:
        if fd is not None:
            os.close(fd)


def _read_ahead(fd: int, index: np.ndarray, src: ShardSource, c0: int, c1: int, layers: Sequence[int]) -> None:
    """Ask the kernel to start reading every chunk this task will decode: the reads then overlap
    with the decoding and reduction of the chunks before them, in the same thread."""
    if not hasattr(os, "posix_fadvise"):
        return
    rows = index[[c * src.n_layers + li for c in range(c0, c1) for li in layers]]
    rows = rows[rows[:, 0] != MAX_U64]
    if len(rows):
        start = int(rows[:, 0].min())
        os.posix_fadvise(fd, start, int((rows[:, 0] + rows[:, 1]).max()) - start, os.POSIX_FADV_WILLNEED)


def _read_index(fd: int, n_chunks: int, src: ShardSource, base: int) -> np.ndarray:
    size = n_chunks * 16 + 4
    end = os.fstat(fd).st_size
    raw = os.pread(fd, size, end - size) if end >= size else b""
    where = (_store_dir(src.directory, src.name), src.name, base, base + src.shard_rows)
    if len(raw) != size:
        raise damaged(*where, "shard file shorter than its index (truncated)")
    if not _crc_ok(raw):
        raise damaged(*where, "shard index checksum mismatch")
    index = np.frombuffer(raw[:-4], dtype="<u8").reshape(n_chunks, 2)
    used = index[index[:, 0] != MAX_U64]
    if len(used) and int((used[:, 0] + used[:, 1]).max()) > end - size:
        raise damaged(*where, "shard index points past the chunks (truncated)")
    return index


def _crc_ok(raw: bytes) -> bool:
    from crc32c import crc32c

    return crc32c(memoryview(raw)[:-4]) == int.from_bytes(raw[-4:], "little")


def _decode(raw: bytes, src: ShardSource, dtype: np.dtype, row: int, layer: int) -> np.ndarray:
    if src.chunk_crc:
        if not _crc_ok(raw):
            raise damaged(_store_dir(src.directory, src.name), src.name, row, row + src.chunk_rows, f"chunk checksum mismatch (layer index {layer})")
        raw = memoryview(raw)[:-4]  # no copy of the chunk
    if src.blosc:
        from numcodecs import blosc

        raw = blosc.decompress(raw)
    return np.frombuffer(raw, dtype=dtype).reshape(src.chunk_rows, src.width)
