"""The planners and the appender, without a model: write windows, batches, the row layout of an
activation array and the shard-aligned appender, each against expectations worked out by hand or
checked from first principles (the plan's promises), not against a copy of the code."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from neurostore import batching
from neurostore import store as st

# ----------------------------------------------------------------------------------------------
# plan_windows: contiguous sentence ranges whose buffered bytes stay under the budget


def test_windows_by_hand():
    # costs 10 * n + 2: 32, 42, 52, 12, 102
    n = np.array([3, 4, 5, 1, 10])
    assert batching.plan_windows(n, 10, 2, 100) == [(0, 2), (2, 4), (4, 5)]
    assert batching.plan_windows(n, 10, 2, 60) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    # a window may fill the budget exactly
    assert batching.plan_windows(np.array([5, 5, 5]), 10, 0, 100) == [(0, 2), (2, 3)]
    # a sentence larger than the budget still gets a window of its own
    assert batching.plan_windows(np.array([1, 50, 1]), 10, 0, 100) == [(0, 1), (1, 2), (2, 3)]
    assert batching.plan_windows(np.array([], dtype=np.int64), 10, 0, 100) == []
    assert batching.plan_windows(np.array([7]), 10, 0, 1 << 30) == [(0, 1)]


@pytest.mark.parametrize("seed", range(5))
def test_windows_cover_in_order_and_are_full(seed):
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 400, 300)
    per_token, per_doc, budget = 24, 100, int(rng.integers(2_000, 40_000))
    windows = batching.plan_windows(n, per_token, per_doc, budget)
    cost = n * per_token + per_doc
    assert windows[0][0] == 0 and windows[-1][1] == len(n)
    for (a0, a1), (b0, _) in zip(windows, windows[1:]):
        assert a1 == b0, "contiguous, in corpus order"
    for w0, w1 in windows:
        assert w1 > w0, "at least one sentence"
        assert cost[w0:w1].sum() <= budget or w1 - w0 == 1, (w0, w1)
        if w1 < len(n):  # greedy: the next sentence did not fit
            assert cost[w0 : w1 + 1].sum() > budget


# ----------------------------------------------------------------------------------------------
# plan_batches: longest first, under the token budget; plan 2 also keeps padding under a fifth


LENGTHS = np.array([10, 10, 9, 5, 5, 5, 1])


def _lists(plan):
    return [b.tolist() for b in plan]


def test_batches_by_hand():
    # plan 1: the longest sentence sets the batch size, budget // longest
    assert _lists(batching.plan_batches(LENGTHS, 40, version=1)) == [[0, 1, 2, 3], [4, 5, 6]]
    # plan 2: [4, 5, 6] would be 11 real of 15 padded tokens (< 0.8): the 1 goes alone
    assert _lists(batching.plan_batches(LENGTHS, 40, version=2)) == [[0, 1, 2, 3], [4, 5], [6]]
    # ties keep corpus order (a stable sort), shorter sentences come later
    assert _lists(batching.plan_batches(np.array([3, 7, 3, 7]), 100, version=1)) == [[1, 3, 0, 2]]
    # a sentence longer than the budget is a batch of its own
    assert _lists(batching.plan_batches(np.array([2, 50, 2]), 16, version=1)) == [[1], [0, 2]]
    # only the given indices, in their own batches
    assert _lists(batching.plan_batches(LENGTHS, 40, np.array([6, 2, 4]), version=1)) == [[2, 4, 6]]
    assert _lists(batching.plan_batches(LENGTHS, 40, np.array([6, 2, 4]), version=2)) == [[2], [4], [6]]


def _mixed(n, seed):
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < 0.3, rng.integers(100, 500, n), rng.integers(3, 60, n))


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_batches_keep_the_plans_promises(version, seed):
    lengths = _mixed(600, seed)
    indices = np.sort(np.random.default_rng(seed).choice(len(lengths), 400, replace=False))
    budget = 1024
    plan = batching.plan_batches(lengths, budget, indices, version)
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == indices.tolist(), "every given sentence in exactly one batch"
    # the batches, read in order, are the given sentences longest first, ties in corpus order
    expect = sorted(indices.tolist(), key=lambda i: (-lengths[i], i))
    assert flat.tolist() == expect
    for b in plan:
        longest = int(lengths[b].max())
        assert len(b) * longest <= budget or len(b) == 1, "padded tokens under the budget"
        if version >= 2 and len(b) > 1:
            assert lengths[b].sum() >= batching.MIN_REAL_SHARE * len(b) * longest, "real-token share"
    # no batch is cut earlier than its plan says
    for b, nxt in zip(plan, plan[1:]):
        longest = int(lengths[b].max())
        grown = np.append(b, nxt[0])
        over_budget = len(grown) * longest > budget
        if version == 1:
            assert over_budget, "plan 1 fills the budget"
        else:
            too_padded = lengths[grown].sum() < batching.MIN_REAL_SHARE * len(grown) * longest
            assert over_budget or too_padded, "plan 2 cuts only for the budget or the padding"


def test_plan_2_cuts_a_budget_that_holds_every_length():
    """Where the budget takes a window's every sentence, plan 1 pads the short ones to the longest."""
    lengths = _mixed(60, 9)
    budget = len(lengths) * int(lengths.max())

    def share(b):
        return lengths[b].sum() / (len(b) * lengths[b].max())

    one = batching.plan_batches(lengths, budget, version=1)
    assert len(one) == 1 and share(one[0]) < batching.MIN_REAL_SHARE
    two = batching.plan_batches(lengths, budget, version=2)
    assert len(two) > 1 and min(share(b) for b in two) >= batching.MIN_REAL_SHARE


# ----------------------------------------------------------------------------------------------
# row_layout: (chunk rows, shard rows) of an activation array


@pytest.fixture()
def small_bytes(monkeypatch):
    """Round limits that make the layouts easy to work out by hand."""
    monkeypatch.setattr(st, "CHUNK_BYTES", 1024)
    monkeypatch.setattr(st, "SHARD_BYTES", 8192)


@pytest.mark.parametrize("n_layers, width, itemsize, n_rows, expect", [
    # a row of one layer is 40 B: 1024 / 40 = 25.6 -> 16 rows a chunk; all 3 layers 120 B: 8192 / 120 = 68.3 -> 64
    (3, 10, 4, 1000, (16, 64)),
    (3, 10, 4, 10**9, (16, 64)),
    # a short array caps both at twice its largest power of two: 20 -> 32
    (3, 10, 4, 20, (16, 32)),
    (3, 10, 4, 5, (8, 8)),
    (3, 10, 4, 1, (2, 2)),
    (3, 10, 4, 0, (2, 2)),
    # many layers: the shard budget gives fewer rows than a chunk, so the shard is one chunk
    (100, 10, 4, 1000, (16, 16)),
    # a row wider than a chunk: one row per chunk; 8192 / 2000 = 4.1 -> 4 rows a shard
    (1, 500, 4, 1000, (1, 4)),
    (1, 10_000, 4, 1000, (1, 1)),
])
def test_row_layout_by_hand(small_bytes, n_layers, width, itemsize, n_rows, expect):
    assert st.row_layout(n_layers, width, itemsize, n_rows) == expect


def test_row_layout_properties():
    for n_layers, width, itemsize, n_rows in [(13, 768, 2, 10**7), (7, 384, 2, 10**6), (33, 4096, 2, 10**8),
                                              (25, 1024, 4, 5000), (2, 16, 2, 3)]:
        chunk, shard = st.row_layout(n_layers, width, itemsize, n_rows)
        for v in (chunk, shard):
            assert v >= 1 and v & (v - 1) == 0, "powers of two"
        assert shard % chunk == 0
        assert chunk == 1 or chunk * width * itemsize <= st.CHUNK_BYTES
        assert shard == chunk or shard * n_layers * width * itemsize <= st.SHARD_BYTES
        assert shard <= 2 * max(n_rows, 1)


# ----------------------------------------------------------------------------------------------
# ShardAppender: rows in order, whole shards at a time, the partial last shard carried


class Recording:
    """A Zarr array that records the row ranges written to it."""

    def __init__(self, array):
        self.array, self.writes = array, []

    def __getattr__(self, name):
        return getattr(self.array, name)

    def __getitem__(self, key):
        return self.array[key]

    def __setitem__(self, key, value):
        self.writes.append((key.start, key.stop))
        self.array[key] = value


def _array(path, n_rows, sharded=True):
    return zarr.create_array(str(path), shape=(n_rows, 2, 3), chunks=(4, 2, 3), shards=(8, 2, 3) if sharded else None,
                             dtype="float32", fill_value=0)


@pytest.mark.parametrize("sharded", [True, False])
def test_appender_rows_land_in_place_across_shards(tmp_path, sharded):
    n_rows, blocks = 29, [3, 5, 1, 9, 2, 8, 1]  # ends in a short last shard (29 = 3 * 8 + 5)
    assert sum(blocks) == n_rows
    values = np.arange(n_rows * 6, dtype=np.float32).reshape(n_rows, 2, 3) + 1
    arr = Recording(_array(tmp_path / "a", n_rows, sharded))
    shard = 8 if sharded else 4
    app = st.ShardAppender(arr, 0)
    written = 0
    for n in blocks:
        full, new = app.buffer(n)
        base = written // shard * shard
        assert len(new) == n and len(full) == written - base + n
        # the carry (rows since the last shard boundary) is already in place
        assert np.array_equal(full[: written - base], values[base:written])
        new[:] = values[written : written + n]
        arr.writes.clear()
        app.flush(full)
        written += n
        for lo, hi in arr.writes:
            assert lo % shard == 0 and (hi - lo == shard or hi == written), (lo, hi)
        # what is written reads back with plain zarr, the rest is still the fill value
        back = zarr.open_array(str(tmp_path / "a"), mode="r")[:]
        assert np.array_equal(back[:written], values[:written]), written
        assert not back[written:].any()


def test_appender_resumes_from_rows_already_stored(tmp_path):
    n_rows = 21
    values = np.random.default_rng(0).standard_normal((n_rows, 2, 3)).astype(np.float32)
    arr = _array(tmp_path / "a", n_rows)
    arr[:11] = values[:11]  # as if a run had stopped after row 11: rows 8-10 are a partial shard
    app = st.ShardAppender(zarr.open_array(str(tmp_path / "a"), mode="r+"), 11)
    full, new = app.buffer(10)
    assert len(full) == 13 and np.array_equal(full[:3], values[8:11]), "the carry is read back from the store"
    new[:] = values[11:]
    app.flush(full)
    assert np.array_equal(zarr.open_array(str(tmp_path / "a"), mode="r")[:], values)


def test_appender_keeps_its_carry_when_the_block_is_reused(tmp_path):
    """flush() keeps a copy of the partial shard: the caller may reuse or drop its block."""
    values = np.arange(12 * 6, dtype=np.float32).reshape(12, 2, 3)
    arr = _array(tmp_path / "a", 12)
    app = st.ShardAppender(arr, 0)
    full, new = app.buffer(5)
    new[:] = values[:5]
    app.flush(full)
    full[:] = -1  # scribble over the block after it was flushed
    full, new = app.buffer(7)
    assert np.array_equal(full[:5], values[:5])
    new[:] = values[5:]
    app.flush(full)
    assert np.array_equal(zarr.open_array(str(tmp_path / "a"), mode="r")[:], values)
