"""The write pipeline: scatter batches into window buffers, write whole shards in parallel, commit.

One *scatter* thread takes batches from the extraction loop (in host ring slots, padding already
stripped), copies each sentence's rows into the buffer of the current *window* (a contiguous
range of sentences in corpus order) and hands the slot back. When a window is complete it goes
to the *flush* thread, which writes its shards on a pool of ``writers`` threads (Zarr and Blosc
release the GIL, and every shard is its own file) and then commits. Two window buffers are
allocated once and reused: the scatter thread fills one while the other is written, so the
forward pass waits only when the disk is the bottleneck. Windows commit strictly in order, and a
window's carried partial shard is written before the next window rewrites that shard whole.

Windows and batches are a pure function of the sentence lengths and options (``batching``), so a
resumed run replays exactly the windows of an uninterrupted one and the store comes out identical.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import zarr

from . import shards
from . import store as st


KILL_POINTS = ("batch", "window", "flush", "commit")


def kill_points(spec: str | dict[str, int] | None) -> dict[str, int]:
    """Fault injection for the resume tests: ``"flush:3"`` (or ``{"flush": 3}``) SIGKILLs the
    process the 3rd time the writer reaches that point (``batch``, ``window``, ``flush`` or
    ``commit``; several: ``"batch:2,commit:1"``). Empty in normal use."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return {str(k): int(v) for k, v in spec.items()}
    plan = {}
    for item in filter(None, spec.split(",")):
        point, _, count = item.partition(":")
        plan[point] = int(count or 1)
    return plan


def default_writers() -> int:
    """Shard writer threads: one per core, at least two, at most eight.

    A writer spends much of its time in the kernel writing (the GIL released, the core often
    idle), so one per core overlaps compression with I/O; measured on 2 cores with a null
    forward (benchmarks/pipeline.py), 2 writers moved 1.9x (lz4) to 2.9x (none) the bytes of 1.
    """
    return max(2, min(8, os.cpu_count() or 2))


def _layer_major(n_rows: int, inner: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A ``[n_rows, n_layers, width]`` buffer whose memory is ``[n_layers, n_rows, width]``: each
    layer's rows (a Zarr chunk) are contiguous, so chunks compress and write without a copy."""
    if len(inner) != 2:
        return np.empty((n_rows, *inner), dtype=dtype)
    return np.empty((inner[0], n_rows, inner[1]), dtype=dtype).swapaxes(0, 1)


@dataclass
class Batch:
    """One forward pass's results in a host ring slot. ``docs`` are store-local sentence indices.

    ``rows`` maps slot keys to the rows this batch filled: ``tok:{site}`` (real tokens, sentences
    in ``docs`` order), ``doc:{site}/{pool}`` and ``doc:logits`` (one row per sentence), ``ext:{site}``
    (per layer: min and max before the cast to the store dtype). ``slot.host(key, rows)`` reads them.
    """

    docs: np.ndarray
    lengths: np.ndarray
    padded_tokens: int
    slot: Any
    rows: dict[str, int]
    release: Callable[[Any], None] | None = None


@dataclass
class Window:
    """A contiguous range of sentences (and their token rows) written and committed together."""

    index: int
    docs: tuple[int, int]
    tokens: tuple[int, int]


@dataclass
class _Begin:
    window: Window


@dataclass
class _End:
    window: Window


@dataclass
class _Job:
    window: Window
    writes: list[tuple[zarr.Array, shards.ShardEncoder | None, int, int, np.ndarray]]
    buffers: int  # which buffer set to free once written
    counts: dict[str, dict[str, int]]
    real: int
    padded: int


@dataclass
class Writer:
    """Owns every write to the store's growing arrays."""

    group: zarr.Group
    meta: dict
    token_start: np.ndarray
    start_doc: int
    max_window: tuple[int, int]  # most token rows and sentences of any window
    on_batch: Callable[[int, int, int], None] | None = None  # (docs, tokens, bytes)
    writers: int = 0  # 0: default_writers()
    queue_size: int = 8
    kill_at: dict[str, int] = field(default_factory=dict)  # fault injection (:func:`kill_points`)
    error: BaseException | None = field(init=False, default=None)
    timers: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.writers = self.writers or default_writers()
        self.timers = {"scatter": 0.0, "wait_copy": 0.0, "wait_batch": 0.0, "wait_buffer": 0.0, "encode": 0.0, "write": 0.0,
                       "encode_cpu": 0.0, "write_cpu": 0.0, "commit": 0.0, "flush_wall": 0.0}
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._seen_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=self.queue_size)
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self._free_sets: queue.Queue = queue.Queue()
        self._aborted = threading.Event()
        start_token = int(self.token_start[self.start_doc]) if self.start_doc < len(self.token_start) else self.meta["n_tokens"]
        self.rows: dict[str, st.Rows] = {}
        self._names: dict[str, str] = {}  # slot key -> array path
        for quantity in st.quantities(self.meta):  # relevance is more arrays, keyed relevance:{site}
            for site in self.meta["sites"]:
                key = st.stream(site, quantity)
                if self.meta["tokens"]:
                    self._names[f"tok:{key}"] = st.array_path(site, "tokens", quantity)
                for pool in self.meta["pool"]:
                    self._names[f"doc:{key}/{pool}"] = st.array_path(site, pool, quantity)
        for key, name in self._names.items():
            self.rows[key] = st.Rows(self._array(name), start_token if key.startswith("tok:") else self.start_doc)
        if self.meta["model"].get("classifier"):
            self.rows["doc:logits"] = st.Rows(self._array("docs/logits"), self.start_doc)
            self.rows["doc:pred"] = st.Rows(self._array("docs/pred"), self.start_doc)
        self._encoders = {key: shards.encoder(rows.array) for key, rows in self.rows.items()}
        self._sets: list[dict[str, np.ndarray]] = [{}, {}]
        for i in range(2):
            self._free_sets.put(i)
        self._pool = ThreadPoolExecutor(self.writers, thread_name_prefix="neurostore-write")
        self._window: Window | None = None
        self._blocks: dict[str, np.ndarray] = {}
        self._set = -1
        self._counts: dict[str, dict[str, int]] = {}
        self._real = self._padded = 0
        self._scatter_thread = threading.Thread(target=self._guard(self._scatter_loop), name="neurostore-scatter", daemon=True)
        self._flush_thread = threading.Thread(target=self._guard(self._flush_loop), name="neurostore-flush", daemon=True)
        self._scatter_thread.start()
        self._flush_thread.start()

    def _fault(self, point: str) -> None:
        if point in self.kill_at:
            with self._seen_lock:
                self._seen[point] = self._seen.get(point, 0) + 1
                if self._seen[point] == self.kill_at[point]:
                    os.kill(os.getpid(), signal.SIGKILL)

    def _array(self, name: str) -> zarr.Array:
        # every chunk is written whatever its values: skips a full comparison pass with the fill value
        return self.group[name].with_config({"write_empty_chunks": True})

    # -- called from the extraction loop ---------------------------------------------------------

    def alive(self) -> None:
        """Raise the writer's error, if it has one (called while the loop waits on the writer)."""
        if self.error is not None:
            raise self.error
        if not (self._scatter_thread.is_alive() and self._flush_thread.is_alive()):
            raise RuntimeError("the writer stopped")

    def put(self, item: Batch | _Begin | _End | None) -> None:
        """Hand over work; blocks while the queue is full."""
        while True:
            self.alive()
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def begin_window(self, window: Window) -> None:
        self.put(_Begin(window))

    def end_window(self, window: Window) -> None:
        self.put(_End(window))

    def close(self) -> None:
        """Write and commit everything queued, then stop."""
        if self._scatter_thread.is_alive():
            try:
                self.put(None)
            except BaseException:  # noqa: BLE001 - the writer already failed; error is kept
                pass
        self._scatter_thread.join()
        self._flush_thread.join()
        self._pool.shutdown(wait=True)
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Drop queued work and stop; a window not yet committed stays uncommitted."""
        self._aborted.set()
        for q in (self._queue, self._jobs):
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
        if self._scatter_thread.is_alive():
            self._queue.put(None)
        self._scatter_thread.join()
        if self._flush_thread.is_alive():
            self._jobs.put(None)
        self._flush_thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- threads ---------------------------------------------------------------------------------

    def _guard(self, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                loop()
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                if self.error is None:
                    self.error = err
                self._aborted.set()

        return run

    def _scatter_loop(self) -> None:
        try:
            while True:
                t0 = time.perf_counter()
                item = self._queue.get()
                self.timers["wait_batch"] += time.perf_counter() - t0
                if item is None or self._aborted.is_set():
                    return
                t0 = time.perf_counter()
                if isinstance(item, _Begin):
                    self._begin(item.window)
                    self.timers["wait_buffer"] += time.perf_counter() - t0
                elif isinstance(item, Batch):
                    waited = self.timers["wait_copy"]
                    self._scatter(item)
                    self.timers["scatter"] += time.perf_counter() - t0 - (self.timers["wait_copy"] - waited)
                else:
                    self._end(item.window)
        finally:
            while not self._aborted.is_set():
                try:
                    self._jobs.put(None, timeout=0.2)
                    break
                except queue.Full:
                    continue

    def _begin(self, window: Window) -> None:
        (d0, d1), (t0, t1) = window.docs, window.tokens
        while True:  # a buffer set is free once the window that used it two windows ago is written
            try:
                self._set = self._free_sets.get(timeout=0.2)
                break
            except queue.Empty:
                if self._aborted.is_set():
                    raise RuntimeError("the writer was stopped")
        buffers = self._sets[self._set]
        self._window = window
        self._blocks = {}
        for key, rows in self.rows.items():
            n_new = (t1 - t0) if key.startswith("tok:") else (d1 - d0)
            need = (self.max_window[0] if key.startswith("tok:") else self.max_window[1]) + rows.shard
            if key not in buffers or len(buffers[key]) < len(rows.carry) + n_new:
                buffers[key] = _layer_major(max(need, len(rows.carry) + n_new), rows.array.shape[1:], rows.array.dtype)
            self._blocks[key] = rows.block(buffers[key], n_new)
        self._counts, self._real, self._padded = {}, 0, 0

    def _scatter(self, batch: Batch) -> None:
        if batch.slot.ready is not None:  # wait for the copies into the slot (not writer work)
            t0 = time.perf_counter()
            batch.slot.ready.synchronize()
            self.timers["wait_copy"] += time.perf_counter() - t0
        window = self._window
        assert window is not None
        d0, t0 = window.docs[0], window.tokens[0]
        nbytes = 0
        # token rows: each sentence's rows are contiguous in the batch and in the window; runs of
        # sentences that are also neighbours in the corpus are copied as one slice
        src = np.concatenate(([0], np.cumsum(batch.lengths)))
        dest = self.token_start[batch.docs] - t0
        breaks = np.flatnonzero(dest[1:] != dest[:-1] + batch.lengths[:-1]) + 1
        runs = np.concatenate(([0], breaks, [len(batch.docs)]))
        for key in (k for k in self.rows if k.startswith("tok:")):
            host = batch.slot.host(key, batch.rows[key])
            block = self._blocks[key]
            carry = len(block) - (window.tokens[1] - t0)
            for a, b in zip(runs[:-1].tolist(), runs[1:].tolist()):
                lo = carry + int(dest[a])
                block[lo : lo + int(src[b] - src[a])] = host[src[a] : src[b]]
            nbytes += host.nbytes
        rows = batch.docs - d0
        for key in (k for k in self.rows if k.startswith("doc:") and k not in ("doc:logits", "doc:pred")):
            host = batch.slot.host(key, batch.rows[key])
            block = self._blocks[key]
            block[len(block) - (window.docs[1] - d0) + rows] = host
            nbytes += host.nbytes
        if "doc:logits" in self.rows:
            logits = batch.slot.host("doc:logits", batch.rows["doc:logits"])
            for key, values in (("doc:logits", logits), ("doc:pred", logits.argmax(axis=1))):
                block = self._blocks[key]
                block[len(block) - (window.docs[1] - d0) + rows] = values
        self._count_nonfinite(batch)
        self._real += int(batch.lengths.sum())
        self._padded += batch.padded_tokens
        if batch.release is not None:
            batch.release(batch.slot)
        if self.on_batch is not None:
            self.on_batch(len(batch.docs), int(batch.lengths.sum()), nbytes)
        self._fault("batch")

    def _count_nonfinite(self, batch: Batch) -> None:
        """Count values the store cast made non-finite, where the batch's extremes say there are any.

        The extremes (min and max per layer, before the cast) come with the batch, so the common
        case costs nothing here; only a layer whose values leave the store dtype's range is scanned.
        """
        limit = st.finite_limit(self.meta["store_dtype"])
        for site, stream in ((s, st.stream(s, q)) for q in st.quantities(self.meta) for s in self.meta["sites"]):
            ext = batch.slot.host(f"ext:{stream}", batch.rows[f"ext:{stream}"])
            bad = np.flatnonzero(~((ext[:, 0] >= -limit) & (ext[:, 1] <= limit)))
            if not len(bad):
                continue
            layers = self.meta["sites"][site]["layers"]
            for key in self.rows:
                if not (key == f"tok:{stream}" or key.startswith(f"doc:{stream}/")):
                    continue
                host = st.decode(batch.slot.host(key, batch.rows[key]), self.meta["store_dtype"])
                name = self._names[key]
                found = {str(layers[j]): int(np.count_nonzero(~np.isfinite(host[:, j]))) for j in bad.tolist()}
                found = {layer: n for layer, n in found.items() if n}
                if found:
                    st.add_counts(self._counts, {name: found})

    def _end(self, window: Window) -> None:
        self._fault("window")
        writes = [(rows.array, self._encoders[key], lo, hi, values) for key, rows in self.rows.items() for lo, hi, values in rows.cut(self._blocks[key])]
        job = _Job(window, writes, self._set, self._counts, self._real, self._padded)
        self._blocks, self._window = {}, None
        while True:
            try:
                self._jobs.put(job, timeout=0.2)
                return
            except queue.Full:
                if self._aborted.is_set():
                    raise RuntimeError("the writer was stopped")

    def _flush_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._aborted.is_set():
                return
            t0 = time.perf_counter()
            futures = [self._pool.submit(self._write, *write) for write in job.writes]
            for f in futures:
                f.result()  # the first failure is raised here, after the others finished or failed
            self.timers["flush_wall"] += time.perf_counter() - t0
            if self._aborted.is_set():
                return
            t0 = time.perf_counter()
            self._fault("commit")
            self.meta = st.commit(
                self.group, self.meta, job.window.docs[1], job.window.tokens[1],
                complete=job.window.docs[1] >= self.meta["n_docs"],
                nonfinite=job.counts, real_tokens=job.real, padded_tokens=job.padded,
            )
            self.timers["commit"] += time.perf_counter() - t0
            self._free_sets.put(job.buffers)

    def _write(self, array: zarr.Array, encoder: shards.ShardEncoder | None, lo: int, hi: int, values: np.ndarray) -> None:
        """Write rows ``[lo, hi)``: one shard (or its carried tail) of an activation array, or any
        rows of a small table through Zarr."""
        t0, c0 = time.perf_counter(), time.thread_time()
        if encoder is None:
            array[lo:hi] = values
            encoded, c1 = t0, c0
        else:
            data = encoder.encode(values)
            encoded, c1 = time.perf_counter(), time.thread_time()
            encoder.store(lo // encoder.shard_rows, data)
        t1, c2 = time.perf_counter(), time.thread_time()
        with self._lock:
            self.timers["encode"] += encoded - t0
            self.timers["write"] += t1 - encoded
            self.timers["encode_cpu"] += c1 - c0
            self.timers["write_cpu"] += c2 - c1
        self._fault("flush")
