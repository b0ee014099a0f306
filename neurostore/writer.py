"""The background write pipeline: a bounded queue, window buffers, whole shards, commit marks.

The extraction loop hands each batch's activations (already on the host, padding stripped) to one
writer thread. The writer scatters them into a buffer that covers one *window* of sentences in
corpus order; when the window's last batch arrives it writes whole shards through
:class:`~neurostore.store.ShardAppender` and then commits. Windows are a pure function of the
sentence lengths and options, so a resumed run replays exactly the windows and batches that an
uninterrupted run would have used, and the store comes out identical.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import zarr

from . import store as st


def _fault_plan() -> dict[str, int]:
    """Fault injection for the resume tests: ``NEUROSTORE_FAULT=flush:3`` SIGKILLs the process
    the 3rd time it reaches that point (``batch``, ``flush`` or ``commit``). Unset in normal use."""
    spec = os.environ.get("NEUROSTORE_FAULT", "")
    plan = {}
    for item in filter(None, spec.split(",")):
        point, _, count = item.partition(":")
        plan[point] = int(count or 1)
    return plan


_FAULTS = _fault_plan()
_SEEN: dict[str, int] = {}


def _fault(point: str) -> None:
    if point in _FAULTS:
        _SEEN[point] = _SEEN.get(point, 0) + 1
        if _SEEN[point] == _FAULTS[point]:
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Batch:
    """One forward pass's results on the host. ``docs`` are store-local sentence indices."""

    docs: np.ndarray
    lengths: np.ndarray
    tokens: dict[str, Any]  # site -> [n_real_tokens, n_layers, width], docs in ``docs`` order
    pooled: dict[str, Any]  # "site/pool" -> [len(docs), n_layers, width]
    logits: Any | None = None
    ready: Any | None = None  # a CUDA event to wait on before reading the host tensors

    def host(self, value: Any) -> np.ndarray:
        """A numpy view of a host tensor (bfloat16 bits come back as uint16)."""
        if isinstance(value, np.ndarray):
            return value
        import torch

        if value.dtype == torch.bfloat16:
            return value.view(torch.int16).numpy().view(np.uint16)
        return value.numpy()


@dataclass
class Window:
    """A contiguous range of sentences (and their token rows) written and committed together."""

    index: int
    docs: tuple[int, int]
    tokens: tuple[int, int]


@dataclass
class _Begin:
    """Queue marker: the batches that follow belong to ``window``; the window itself ends it."""

    window: Window


def plan_windows(n_tokens: np.ndarray, bytes_per_token: int, bytes_per_doc: int, budget: int) -> list[tuple[int, int]]:
    """Contiguous sentence ranges whose buffered activations stay under ``budget`` bytes.

    Each window holds at least one sentence. Deterministic: resume depends on it.
    """
    windows, start, used = [], 0, 0
    for i, n in enumerate(n_tokens.tolist()):
        cost = n * bytes_per_token + bytes_per_doc
        if i > start and used + cost > budget:
            windows.append((start, i))
            start, used = i, 0
        used += cost
    if start < len(n_tokens):
        windows.append((start, len(n_tokens)))
    return windows


@dataclass
class Writer:
    """Owns every write to the store's growing arrays; runs in its own thread."""

    group: zarr.Group
    meta: dict
    token_start: np.ndarray
    start_doc: int
    on_batch: Callable[[int, int, int], None] | None = None  # (docs, tokens, bytes)
    queue_size: int = 4
    _queue: queue.Queue = field(init=False)
    _thread: threading.Thread = field(init=False)
    error: BaseException | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._queue = queue.Queue(maxsize=self.queue_size)
        start_token = int(self.token_start[self.start_doc]) if self.start_doc < len(self.token_start) else self.meta["n_tokens"]
        self.token_arrays = {}
        self.doc_arrays = {}
        for site in self.meta["sites"]:
            if self.meta["tokens"]:
                self.token_arrays[site] = st.ShardAppender(self.group[f"acts/{site}"], start_token)
            for pool in self.meta["pool"]:
                self.doc_arrays[f"{site}/{pool}"] = st.ShardAppender(self.group[f"pooled/{site}/{pool}"], self.start_doc)
        if self.meta["model"].get("classifier"):
            self.doc_arrays["logits"] = st.ShardAppender(self.group["docs/logits"], self.start_doc)
            self.doc_arrays["pred"] = st.ShardAppender(self.group["docs/pred"], self.start_doc)
        self._buffers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._window: Window | None = None
        self._thread = threading.Thread(target=self._run, name="neurostore-writer", daemon=True)
        self._thread.start()

    # -- called from the extraction loop ---------------------------------------------------------

    def put(self, item: Batch | Window | _Begin | None) -> None:
        """Hand over work; blocks while the queue is full (that is what bounds memory)."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise RuntimeError("the writer thread stopped") from self.error

    def begin_window(self, window: Window) -> None:
        self.put(_Begin(window))

    def close(self) -> None:
        """Stop the writer after the queued work (``None`` is the end marker)."""
        if self._thread.is_alive():
            try:
                self.put(None)
            except BaseException:  # noqa: BLE001 - the writer already failed; error is kept
                pass
            self._thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Drop queued work and stop; whatever window was in flight stays uncommitted."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, _Begin):
                    self._begin(item.window)
                elif isinstance(item, Batch):
                    self._scatter(item)
                else:
                    self._finish(item)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            self.error = err

    def _begin(self, window: Window) -> None:
        (d0, d1), (t0, t1) = window.docs, window.tokens
        self._window = window
        self._buffers = {f"tok:{k}": a.buffer(t1 - t0) for k, a in self.token_arrays.items()}
        self._buffers.update({f"doc:{k}": a.buffer(d1 - d0) for k, a in self.doc_arrays.items()})

    def _scatter(self, batch: Batch) -> None:
        if batch.ready is not None:
            batch.ready.synchronize()
        assert self._window is not None
        d0, t0 = self._window.docs[0], self._window.tokens[0]
        starts = self.token_start[batch.docs] - t0
        # destination rows of every real token, in the order the batch produced them
        dest = np.repeat(starts - np.concatenate(([0], np.cumsum(batch.lengths)[:-1])), batch.lengths)
        dest += np.arange(int(batch.lengths.sum()))
        nbytes = 0
        for site, values in batch.tokens.items():
            host = batch.host(values)
            self._buffers[f"tok:{site}"][1][dest] = host
            nbytes += host.nbytes
        rows = batch.docs - d0
        for key, values in batch.pooled.items():
            host = batch.host(values)
            self._buffers[f"doc:{key}"][1][rows] = host
            nbytes += host.nbytes
        if batch.logits is not None:
            logits = batch.host(batch.logits)
            self._buffers["doc:logits"][1][rows] = logits
            self._buffers["doc:pred"][1][rows] = logits.argmax(axis=1)
        if self.on_batch is not None:
            self.on_batch(len(batch.docs), int(batch.lengths.sum()), nbytes)
        _fault("batch")

    def _finish(self, window: Window) -> None:
        for key, appender in self.token_arrays.items():
            appender.flush(self._buffers[f"tok:{key}"][0])
            _fault("flush")
        for key, appender in self.doc_arrays.items():
            appender.flush(self._buffers[f"doc:{key}"][0])
            _fault("flush")
        self._buffers = {}
        _fault("commit")
        done = window.docs[1] >= self.meta["n_docs"]
        self.meta = st.commit(self.group, self.meta, window.docs[1], window.tokens[1], complete=done)
