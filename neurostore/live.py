"""Statistics-only extraction: each live batch reduced into grouped statistics as it leaves the model.

A corpus too large to store (a 7B model's MLP neurons are 0.70 MB a token in float16) can still be
studied, because almost every query reads grouped moments only. Here every batch, after the cast to
the store dtype (the values a full store would hold), is reduced into per-*cell* statistics, a cell
being one (token kind, language, label) combination that occurs in the corpus (pooled rows: one
(language, label)): count, mean and M2 (Chan's merge, float64), positives, min, max, the quantile
sketch and a streaming top-k of rows per neuron. Cells are the finest key: every grouping, language
filter and token-kind filter a query asks for is a merge of cells (:mod:`neurostore.statsonly`).

Two implementations of one reduction, tested against each other: on the host the rows of each
cell are a contiguous slice and :func:`neurostore.moments.reduce_sorted` (the query pass's own
reduction) reduces them; on CUDA :class:`TorchCells` does the same by cell id (sums by a one-hot
matmul, min/max by ``index_reduce_``, the sketch by integer ``index_add_``), all on the device,
with no host sync per batch (every index comes from the host's batch plan). Both shift each value by the cell's running mean before summing
squares, in float64, so M2 never cancels catastrophically.

Top-k ties are ranked explicitly, like :func:`neurostore.moments.top_rows`: by value, then by the
lowest row. Each candidate is one int64 key, the value's order key (:func:`moments.order_keys`) in
the high bits and ``ROW_MAX - row`` in the low ones, so a plain max is the ranking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import moments as mo
from . import sketch as sk
from .errors import NeurostoreError
from .sketch import HIST_BINS

EMPTY = np.iinfo(np.int64).min  # an unfilled top-k slot: below every real key


def row_bits(store_dtype: str) -> int:
    """Low bits of a top-k key that hold the row (the order key of the value takes the rest)."""
    return 31 if store_dtype == "float32" else 47


def check_rows(n_rows: int, store_dtype: str, what: str) -> None:
    if n_rows >= 1 << row_bits(store_dtype):
        raise NeurostoreError(
            f"{what}: {n_rows:,} rows are more than a stats-only part can rank (2^{row_bits(store_dtype)}); split it with --part"
        )


# ----------------------------------------------------------------------------------------------
# cells


@dataclass
class Cells:
    """The cells of one row kind: ``table [C, 3]`` (token kind, language, label codes; -1 where
    missing or not kept, kind -1 for pooled rows), and how to find a row's cell: ``doc_cell`` (the
    sentence's (language, label) combination) and ``lookup [kinds, combos]`` (-> cell id)."""

    table: np.ndarray
    doc_cell: np.ndarray
    lookup: np.ndarray
    rows: np.ndarray  # rows of each cell in the part (for the size estimate)

    def of_docs(self, docs: np.ndarray) -> np.ndarray:
        return self.lookup[0, self.doc_cell[docs]]

    def of_tokens(self, docs: np.ndarray, lengths: np.ndarray, kinds: np.ndarray) -> np.ndarray:
        return self.lookup[kinds, np.repeat(self.doc_cell[docs], lengths)]


def cells(lang: np.ndarray, label: np.ndarray, groups: list[str], kind: np.ndarray | None = None,
          n_tokens: np.ndarray | None = None) -> Cells:
    """The cells that occur among the part's sentences (pooled rows) or token rows (``kind`` and
    ``n_tokens`` given). A grouping not in ``groups`` is not kept: its code is -1 everywhere."""
    lang = np.asarray(lang, np.int64) if "lang" in groups else np.full(len(lang), -1, np.int64)
    label = np.asarray(label, np.int64) if "label" in groups else np.full(len(label), -1, np.int64)
    n_label = int(label.max(initial=-1)) + 2
    combos, doc_cell, doc_rows = np.unique((lang + 1) * n_label + (label + 1), return_inverse=True, return_counts=True)
    pairs = np.stack([combos // n_label - 1, combos % n_label - 1], axis=1)
    if kind is None:
        lookup = np.arange(len(combos), dtype=np.int64)[None, :]
        table = np.concatenate([np.full((len(combos), 1), -1), pairs], axis=1)
        return Cells(table.astype(np.int32), doc_cell.astype(np.int64), lookup, doc_rows)
    n_kinds = int(kind.max(initial=0)) + 1
    keys, rows = np.unique(kind.astype(np.int64) * len(combos) + np.repeat(doc_cell, n_tokens), return_counts=True)
    lookup = np.full((n_kinds, len(combos)), -1, np.int64)
    lookup[keys // len(combos), keys % len(combos)] = np.arange(len(keys))
    table = np.concatenate([(keys // len(combos))[:, None], pairs[keys % len(combos)]], axis=1)
    return Cells(table.astype(np.int32), doc_cell.astype(np.int64), lookup, rows)


def stream_cells(meta: dict, lang: np.ndarray, label: np.ndarray, kind: np.ndarray, n_tokens: np.ndarray) -> dict[str, Cells]:
    """The cells of a stats-only extraction: ``tokens`` (token rows) and ``docs`` (pooled rows)."""
    groups = meta["stats"]["groups"]
    out = {}
    if meta["tokens"]:
        check_rows(int(n_tokens.sum()), meta["store_dtype"], "--stats-only")
        out["tokens"] = cells(lang, label, groups, kind, n_tokens)
    if meta["pool"]:
        out["docs"] = cells(lang, label, groups)
    return out


def stats_bytes(meta: dict, cells: dict[str, Cells]) -> dict[str, tuple[tuple[int, ...], int, int]]:
    """Shape, raw bytes and bytes on disk (an estimate) of each stream's statistics: per cell and
    neuron 5 float64/int64 moments, the sketch (128 x 4 bytes) and the top-k (16 bytes a slot).
    On disk the empty bins and slots compress away: the estimate counts 40 bytes of moments, 4
    bytes for each of up to 16 filled bins and 8 for each filled top-k slot per neuron and cell,
    an overestimate by ~2.7x on the sample corpus (108 MB on disk, 1.26 GB raw)."""
    settings = meta["stats"]
    k, hist = int(settings["k"]), HIST_BINS * 4 if settings["sketch"] else 0
    out = {}
    for site, spec in meta["sites"].items():
        for rows in (["tokens"] if meta["tokens"] else []) + list(meta["pool"]):
            c = cells["tokens" if rows == "tokens" else "docs"]
            neurons = len(spec["layers"]) * spec["width"]
            raw = len(c.table) * neurons * (5 * 8 + hist + 16 * k)
            filled = np.minimum(c.rows, 16).sum() * (4 if hist else 0) + np.minimum(c.rows, k).sum() * 8
            out[f"stats/{site}/{rows}"] = ((len(c.table), len(spec["layers"]), spec["width"]), raw, int(neurons * (len(c.table) * 40 + filled)))
    return out


# ----------------------------------------------------------------------------------------------
# top-k keys


def top_keys(values: np.ndarray, rows: np.ndarray, store_dtype: str) -> np.ndarray:
    """int64 ranking keys of stored values ``[n, W]`` (bfloat16 as uint16 bits) at ``rows [n]``."""
    bits = row_bits(store_dtype)
    return (mo.order_keys(values).astype(np.int64) << bits) | ((1 << bits) - 1 - rows.astype(np.int64))[:, None]


def split_keys(keys: np.ndarray, store_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(values float64, rows int64) of ranking keys; empty slots give (nan, -1)."""
    bits = row_bits(store_dtype)
    empty = keys == EMPTY
    rows = np.where(empty, -1, (1 << bits) - 1 - (keys & ((1 << bits) - 1)))
    order = (keys >> bits).astype(np.int32 if store_dtype == "float32" else np.int16)
    values = mo._from_keys(order, store_dtype)
    return np.where(empty, np.nan, values), rows


def keys_of(values: np.ndarray, rows: np.ndarray, store_dtype: str) -> np.ndarray:
    """The keys :func:`split_keys` came from (values exactly representable in the store dtype)."""
    empty = rows < 0
    v = np.where(empty, 0, values)
    if store_dtype == "float16":
        stored = v.astype(np.float16)
    elif store_dtype == "bfloat16":
        stored = (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    else:
        stored = v.astype(np.float32)
    bits = row_bits(store_dtype)
    keys = (mo.order_keys(stored).astype(np.int64) << bits) | ((1 << bits) - 1 - np.where(empty, 0, rows).astype(np.int64))
    return np.where(empty, EMPTY, keys)


def _keep_top(current: np.ndarray, new: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest keys per column of ``current [k, W]`` and ``new [n, W]`` (unordered)."""
    both = np.concatenate([current, new])
    if len(both) <= k:
        out = np.full((k, both.shape[1]), EMPTY, np.int64)
        out[: len(both)] = both
        return out
    return np.partition(both, len(both) - k, axis=0)[-k:]


# ----------------------------------------------------------------------------------------------
# the accumulators


def entry_from_partial(acc: dict, top: np.ndarray | None, store_dtype: str) -> dict:
    """A committed entry (numpy arrays, the layout :mod:`neurostore.statsonly` writes) of one layer."""
    out = {k: acc[k] for k in ("count", "mean", "m2", "pos", "vmin", "vmax")}
    if acc.get("hist") is not None:
        out["hist"] = acc["hist"]
    if top is not None:
        ordered = np.sort(top.transpose(0, 2, 1), axis=-1)[..., ::-1]  # [C, W, k], best first (EMPTY sorts last)
        out["top_value"], out["top_row"] = split_keys(ordered, store_dtype)
    return out


class HostCells:
    """The host reduction of one row kind (tokens, or one pooling) of one site: per layer a
    :mod:`neurostore.moments` partial over the cells, and the top-k keys ``[C, k, W]``."""

    def __init__(self, n_cells: int, n_layers: int, width: int, store_dtype: str, sketch: bool, k: int) -> None:
        self.store_dtype, self.sketch, self.k = store_dtype, sketch, k
        self.acc = [mo.empty_partial(n_cells, width, sketch) for _ in range(n_layers)]
        self.top = [np.full((n_cells, k, width), EMPTY, np.int64) for _ in range(n_layers)] if k else None
        # the k-th best key per cell and neuron: a row below it cannot enter the top-k, and after
        # the first batches almost none can, so most (cell, neuron) lists are not touched at all
        self.floor = [np.full((n_cells, width), EMPTY, np.int64) for _ in range(n_layers)] if k else None

    def add(self, x: Any, cell: np.ndarray, rows: np.ndarray) -> None:
        """Reduce ``x [layers, n, W]`` (stored values; a torch CPU tensor or numpy) whose rows
        belong to cells ``cell [n]`` and are rows ``rows [n]`` of the part."""
        batch = self.prepare(x, cell, rows)
        if batch is not None:
            for j in range(len(self.acc)):
                self.add_layer(j, batch)

    def prepare(self, x: Any, cell: np.ndarray, rows: np.ndarray) -> tuple | None:
        """The batch in cell order, for :meth:`add_layer` (None: no row). Layers are independent,
        so they can be reduced in parallel; one layer's batches must be added in order."""
        values = host_values(x)
        order = mo._group_order(cell)
        if order is None:
            return None
        perm, groups, starts, counts = order
        return values, perm, groups, starts, counts, rows if perm is None else rows[perm], x

    def add_layer(self, j: int, batch: tuple) -> None:
        values, perm, groups, starts, counts, rows, _ = batch
        xl = values[j] if perm is None else values[j][perm]
        mo.merge_into(self.acc[j], mo.reduce_sorted(xl, groups, starts, counts, self.store_dtype, self.sketch), groups)
        if self.top is not None:
            keys = top_keys(xl, rows, self.store_dtype)
            for g, s, n in zip(groups.tolist(), starts.tolist(), counts.tolist()):
                new = keys[s:s + n]
                cols = np.flatnonzero((new > self.floor[j][g]).any(axis=0))
                if not len(cols):
                    continue
                if len(cols) == new.shape[1]:
                    self.top[j][g] = _keep_top(self.top[j][g], new, self.k)
                else:
                    self.top[j][g][:, cols] = _keep_top(self.top[j][g][:, cols], new[:, cols], self.k)
                self.floor[j][g][cols] = self.top[j][g][:, cols].min(axis=0)

    def entries(self) -> list[dict]:
        return [entry_from_partial(self.acc[j], None if self.top is None else self.top[j], self.store_dtype) for j in range(len(self.acc))]

    def load(self, entries: list[dict]) -> None:
        """Continue from committed entries (a resume): the state is restored exactly."""
        for j, e in enumerate(entries):
            for key in self.acc[j]:
                if self.acc[j][key] is not None:
                    self.acc[j][key] = np.array(e[key], dtype=self.acc[j][key].dtype)
            if self.top is not None:
                self.top[j] = keys_of(e["top_value"], e["top_row"], self.store_dtype).transpose(0, 2, 1).copy()
                self.floor[j] = self.top[j].min(axis=1)


def host_values(x: Any) -> np.ndarray:
    """Stored values as numpy (bfloat16 as its uint16 bits, the way the query pass reads them)."""
    if isinstance(x, np.ndarray):
        return x
    from .transfer import numpy_view

    return numpy_view(x.detach())


class TorchCells:
    """The same reduction on the device (CUDA; runs on CPU tensors too, which the tests compare
    with :class:`HostCells`). State ``[layers, C, W]`` in float64 / int64 / int32 (sketch)."""

    def __init__(self, n_cells: int, n_layers: int, width: int, store_dtype: str, sketch: bool, k: int, device: Any) -> None:
        import torch

        self.torch, self.device = torch, device
        self.store_dtype, self.sketch, self.k, self.width = store_dtype, sketch, k, width
        shape = (n_layers, n_cells, width)
        f64 = dict(dtype=torch.float64, device=device)
        self.count = np.zeros(n_cells, np.int64)  # known on the host from the batch plan
        self.mean, self.m2 = torch.zeros(shape, **f64), torch.zeros(shape, **f64)
        self.pos = torch.zeros(shape, dtype=torch.int64, device=device)
        self.vmin, self.vmax = torch.full(shape, np.inf, **f64), torch.full(shape, -np.inf, **f64)
        self.hist = torch.zeros((*shape, HIST_BINS), dtype=torch.int32, device=device) if sketch else None
        self.top = torch.full((n_layers, n_cells, k, width), EMPTY, dtype=torch.int64, device=device) if k else None
        if sketch:
            self.lut = torch.as_tensor(sk.table(store_dtype).astype(np.int64), device=device)
        self.columns = torch.arange(width, device=device, dtype=torch.int64)

    def add(self, x: Any, cell: np.ndarray, rows: np.ndarray) -> None:
        torch = self.torch
        counts = np.bincount(cell, minlength=len(self.count))
        self.count += counts
        n_b = torch.as_tensor(counts, dtype=torch.float64, device=self.device)[:, None]
        n = torch.as_tensor(self.count, dtype=torch.float64, device=self.device)[:, None]
        frac = torch.where(n > 0, n_b / n.clamp(min=1), torch.zeros_like(n))
        gid = torch.as_tensor(cell, dtype=torch.int64).to(self.device, non_blocking=True)
        present = np.flatnonzero(counts)
        order = np.argsort(cell, kind="stable")
        sorted_rows = torch.as_tensor(((1 << row_bits(self.store_dtype)) - 1 - rows[order]).astype(np.int64)).to(self.device, non_blocking=True)
        perm = torch.as_tensor(order, dtype=torch.int64).to(self.device, non_blocking=True)
        starts = np.concatenate(([0], np.cumsum(counts[present])[:-1]))
        # sums by one-hot matmul, not index_add_: float atomics would add in a different order each
        # run, and a resumed extraction must give the same bits as an uninterrupted one
        onehot = torch.nn.functional.one_hot(gid, len(self.count)).T.to(torch.float64)
        onehot32 = onehot.float()  # counts of x > 0: exact in float32 below 2^24 rows a batch
        for j in range(x.shape[0]):
            xl = x[j]
            d = xl.double()
            ref = self.mean[j]
            shifted = d - ref.index_select(0, gid)
            s1 = onehot @ shifted
            s2 = onehot @ (shifted * shifted)
            # Chan's merge with the batch's (mean, M2) about the running mean: delta = s1 / n_b
            m2_b = torch.where(n_b > 0, (s2 - s1 * s1 / n_b.clamp(min=1)).clamp(min=0), torch.zeros_like(s2))
            delta = torch.where(n_b > 0, s1 / n_b.clamp(min=1), torch.zeros_like(s1))
            na = n - n_b
            self.m2[j] += m2_b + delta * delta * na * frac
            self.mean[j] += delta * frac
            self.pos[j] += (onehot32 @ (xl > 0).float()).to(torch.int64)
            self.vmin[j].index_reduce_(0, gid, d, "amin")
            self.vmax[j].index_reduce_(0, gid, d, "amax")
            if self.hist is not None:
                flat = (gid[:, None] * self.width + self.columns[None, :]) * HIST_BINS + self._bins(xl)
                self.hist[j].view(-1).index_add_(0, flat.view(-1), torch.ones(flat.numel(), dtype=torch.int32, device=self.device))
            if self.top is not None:
                keys = (self._order(xl).index_select(0, perm).to(torch.int64) << row_bits(self.store_dtype)) | sorted_rows[:, None]
                for c, s, m in zip(present.tolist(), starts.tolist(), counts[present].tolist()):
                    both = torch.cat([self.top[j, c], keys[s:s + m]])
                    self.top[j, c] = both.topk(self.k, dim=0).values if len(both) > self.k else torch.cat(
                        [both, torch.full((self.k - len(both), self.width), EMPTY, dtype=torch.int64, device=self.device)])

    def _order(self, x: Any) -> Any:
        """:func:`moments.order_keys` on the device."""
        torch = self.torch
        h = x.view(torch.int32 if x.element_size() == 4 else torch.int16)
        return h ^ ((h >> (8 * x.element_size() - 1)) & torch.iinfo(h.dtype).max)

    def _bins(self, x: Any) -> Any:
        """:func:`sketch.bins` on the device (float32: the exact bin where the top 16 bits straddle an edge)."""
        torch = self.torch
        if x.element_size() == 2:
            return self.lut[x.view(torch.int16).to(torch.int64) & 0xFFFF]
        b = self.lut[(x.view(torch.int32).to(torch.int64) >> 16) & 0xFFFF]
        exact = torch.floor((torch.asinh(x.double()) + sk.HIST_RANGE) / sk.HIST_WIDTH).nan_to_num(0).clamp(0, HIST_BINS - 1).to(torch.int64)
        return torch.where(b == 255, exact, b)

    def entries(self) -> list[dict]:
        out = []
        for j in range(self.mean.shape[0]):
            acc = {
                "count": self.count.copy(), "mean": self.mean[j].cpu().numpy(), "m2": self.m2[j].cpu().numpy(),
                "pos": self.pos[j].cpu().numpy(), "vmin": self.vmin[j].cpu().numpy(), "vmax": self.vmax[j].cpu().numpy(),
                "hist": None if self.hist is None else self.hist[j].cpu().numpy().astype(np.uint32),
            }
            out.append(entry_from_partial(acc, None if self.top is None else self.top[j].cpu().numpy(), self.store_dtype))
        return out

    def load(self, entries: list[dict]) -> None:
        torch = self.torch
        for j, e in enumerate(entries):
            self.count = np.asarray(e["count"], np.int64).copy()
            for name in ("mean", "m2", "pos", "vmin", "vmax"):
                target = getattr(self, name)[j]
                target.copy_(torch.as_tensor(np.asarray(e[name]), dtype=target.dtype))
            if self.hist is not None:
                self.hist[j].copy_(torch.as_tensor(np.asarray(e["hist"]).astype(np.int32)))
            if self.top is not None:
                self.top[j].copy_(torch.as_tensor(keys_of(e["top_value"], e["top_row"], self.store_dtype).transpose(0, 2, 1).copy()))


# ----------------------------------------------------------------------------------------------
# the extractor's sink: batches in, committed statistics out


class Reducer:
    """Takes the extraction loop's batches in place of the writer: reduces each into the cells of
    every stream (a site's token rows, each pooling) and commits the statistics with the committed
    sentence count, atomically, at window ends at most every ``commit_seconds`` (each commit
    writes the statistics whole) and at the last window."""

    def __init__(self, group: Any, meta: dict, *, token_start: np.ndarray, kind: np.ndarray, cells: dict[str, Cells], device: Any,
                 host: bool, commit_seconds: float, kill_at: dict[str, int] | None = None, on_batch: Any = None,
                 threads: int = 2) -> None:
        import time
        from concurrent.futures import ThreadPoolExecutor

        from . import statsonly

        self.group, self.meta, self.token_start = group, meta, token_start
        self.store_dtype = meta["store_dtype"]
        settings = meta["stats"]
        self.k, self.sketch = int(settings["k"]), bool(settings["sketch"])
        self.commit_seconds, self.kill_at, self.on_batch = commit_seconds, dict(kill_at or {}), on_batch
        self.host, self.device = host, device
        self.seen: dict[str, int] = {}
        self.kind = kind
        self.counts: dict[str, dict[str, int]] = {}
        self.device_counts: dict[str, Any] = {}
        self.real = self.padded = 0
        self.timers = {"reduce": 0.0, "commit": 0.0}
        self.cells = cells
        self.streams: dict[tuple[str, str], Any] = {}
        for site, spec in meta["sites"].items():
            for rows in (["tokens"] if meta["tokens"] else []) + list(meta["pool"]):
                table = self.cells["tokens" if rows == "tokens" else "docs"].table
                args = (len(table), len(spec["layers"]), spec["width"], self.store_dtype, self.sketch, self.k)
                self.streams[(site, rows)] = HostCells(*args) if host else TorchCells(*args, device)
        self.entry = settings.get("entry")
        self.seq = int(self.entry[1:]) + 1 if self.entry else 0
        statsonly.drop_other_entries(group, self.entry)  # a kill between writing an entry and naming it
        if self.entry is not None:
            for (site, rows), stream in self.streams.items():
                found = statsonly.read_entries(group, meta, site, rows, meta["sites"][site]["layers"])
                table = self.cells["tokens" if rows == "tokens" else "docs"].table
                if found is None or not np.array_equal(found[0], table):
                    from .errors import Fault

                    raise Fault(f"{statsonly._where(group)}: the committed statistics of {site}/{rows} do not match the corpus's groups; "
                                "the store is damaged: extract it again with --overwrite")
                stream.load(found[1])
        self.last_commit = time.perf_counter()
        # host: a batch's layers are reduced on a pool while the next batch runs forward; one batch
        # in flight at a time, so each layer's batches are merged in order (the same bits on resume)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="neurostore-reduce") if host and threads > 0 else None
        self.pending: list[Any] = []

    def wait(self) -> None:
        """Until the batch in flight is reduced (its error, if any, is raised here)."""
        import time

        t0 = time.perf_counter()
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()
        self.timers["wait_reduce"] = self.timers.get("wait_reduce", 0.0) + time.perf_counter() - t0

    def close(self) -> None:
        if self.pool is not None:
            for future in self.pending:
                future.cancel()
            self.pool.shutdown(wait=True)

    def _fault(self, point: str) -> None:
        if point in self.kill_at:
            import os
            import signal

            self.seen[point] = self.seen.get(point, 0) + 1
            if self.seen[point] == self.kill_at[point]:
                os.kill(os.getpid(), signal.SIGKILL)

    def add(self, values: dict[str, Any], docs: np.ndarray, lengths: np.ndarray, padded_tokens: int) -> None:
        """One batch: ``values`` as :func:`neurostore.extract.gather` returns them (store dtype,
        layer-major), ``docs`` the part's sentence indices in batch order, ``lengths`` their tokens."""
        import time

        self.wait()
        t0 = time.perf_counter()
        docs, lengths = np.asarray(docs, np.int64), np.asarray(lengths, np.int64)
        n_real = int(lengths.sum())
        tok_rows = np.repeat(self.token_start[docs] - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths) + np.arange(n_real)
        tok_cell = self.cells["tokens"].of_tokens(docs, lengths, self.kind[tok_rows]) if "tokens" in self.cells else None
        doc_cell = self.cells["docs"].of_docs(docs) if "docs" in self.cells else None
        nbytes = 0
        for (site, rows), stream in self.streams.items():
            x = values[f"tok:{site}" if rows == "tokens" else f"doc:{site}/{rows}"]
            cell, where = (tok_cell, tok_rows) if rows == "tokens" else (doc_cell, docs)
            if self.pool is None:
                stream.add(x, cell, where)
            else:
                batch = stream.prepare(x, cell, where)
                if batch is not None:
                    self.pending += [self.pool.submit(stream.add_layer, j, batch) for j in range(x.shape[0])]
            nbytes += x.numel() * x.element_size()
        self._count_nonfinite(values)
        self.real += n_real
        self.padded += int(padded_tokens)
        self.timers["reduce"] += time.perf_counter() - t0
        if self.on_batch is not None:
            self.on_batch(len(docs), n_real, nbytes)
        self._fault("batch")

    def _count_nonfinite(self, values: dict[str, Any]) -> None:
        """Values the cast to the store dtype made inf. On the host only layers whose extremes
        (before the cast, from the gather) leave the dtype's range are scanned, so the common case
        costs nothing; on CUDA every value is checked on the device and the counts are read at the
        commit (reading the extremes would sync the host once a batch)."""
        import torch

        from . import store as st

        limit = st.finite_limit(self.store_dtype)
        for site, spec in self.meta["sites"].items():
            bad = None
            if self.host:
                ext = values[f"ext:{site}"].numpy()  # [layers, 2]
                bad = np.flatnonzero(~((ext[:, 0] >= -limit) & (ext[:, 1] <= limit))).tolist()
            for rows in (["tokens"] if self.meta["tokens"] else []) + list(self.meta["pool"]):
                x = values[f"tok:{site}" if rows == "tokens" else f"doc:{site}/{rows}"]
                name = f"acts/{site}" if rows == "tokens" else f"pooled/{site}/{rows}"
                if bad is None:
                    counts = (~torch.isfinite(x)).sum(dim=(1, 2))
                    self.device_counts[name] = counts if name not in self.device_counts else self.device_counts[name] + counts
                    continue
                found = {str(spec["layers"][j]): int((~torch.isfinite(x[j])).sum()) for j in bad}
                found = {layer: n for layer, n in found.items() if n}
                if found:
                    st.add_counts(self.counts, {name: found})

    def _device_counts(self) -> None:
        from . import store as st

        for name, counts in self.device_counts.items():
            site = name.split("/")[1]
            layers = self.meta["sites"][site]["layers"]
            found = {str(layer): int(n) for layer, n in zip(layers, counts.cpu().tolist()) if n}
            if found:
                st.add_counts(self.counts, {name: found})
        self.device_counts = {}

    def end_window(self, docs_end: int, tokens_end: int) -> None:
        import time

        self._fault("window")
        self.wait()
        last = docs_end >= self.meta["n_docs"]
        if last or time.perf_counter() - self.last_commit >= self.commit_seconds:
            self.commit(docs_end, tokens_end, last)

    def commit(self, docs_end: int, tokens_end: int, complete: bool) -> None:
        import time

        from . import statsonly
        from . import store as st

        t0 = time.perf_counter()
        self._device_counts()
        name = statsonly.entry_name(self.seq)
        streams = {key: (self.cells["tokens" if key[1] == "tokens" else "docs"].table, self.meta["sites"][key[0]]["layers"], stream.entries())
                   for key, stream in self.streams.items()}
        statsonly.write(self.group, name, streams, "checksums" in self.meta.get("features", []))
        self._fault("commit")
        meta = dict(self.meta, stats=dict(self.meta["stats"], entry=name))
        self.meta = st.commit(self.group, meta, docs_end, tokens_end, complete=complete, nonfinite=self.counts,
                              real_tokens=self.real, padded_tokens=self.padded)
        self.counts, self.real, self.padded = {}, 0, 0
        statsonly.drop_other_entries(self.group, name)
        self.entry, self.seq = name, self.seq + 1
        self.last_commit = time.perf_counter()
        self.timers["commit"] += self.last_commit - t0
