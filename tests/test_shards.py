"""The extraction's own shard encoding gives the bytes Zarr writes, and Zarr reads them back."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from neurostore import shards
from neurostore import store as st


def _array(path, n_rows, dtype, compression, chunk=8, shard=32, layers=3, width=5):
    return zarr.create_array(str(path), shape=(n_rows, layers, width), chunks=(chunk, 1, width), shards=(shard, layers, width),
                             dtype=dtype, compressors=st.compressors(compression, np.dtype(dtype).itemsize), fill_value=0,
                             config={"write_empty_chunks": True})


def _files(path):
    out = {}
    for d, _, fs in os.walk(path):
        for f in fs:
            if f != "zarr.json":
                out[os.path.relpath(os.path.join(d, f), path)] = open(os.path.join(d, f), "rb").read()
    return out


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd:5"])
@pytest.mark.parametrize("dtype", ["float16", "uint16", "float32"])
def test_same_bytes_as_zarr(tmp_path, compression, dtype):
    rng = np.random.default_rng(0)
    n_rows = 32 * 2 + 13  # two whole shards and a short last one, whose last chunk is cut
    values = (rng.standard_normal((n_rows, 3, 5)) * 100).astype(dtype)
    ref = _array(tmp_path / "ref", n_rows, dtype, compression)
    ref[:] = values
    ours = _array(tmp_path / "ours", n_rows, dtype, compression)
    enc = shards.encoder(ours)
    assert enc is not None
    layer_major = np.ascontiguousarray(values.transpose(1, 0, 2)).transpose(1, 0, 2)  # the writer's buffers
    for i, lo in enumerate(range(0, n_rows, 32)):
        enc.store(i, enc.encode((values if i % 2 else layer_major)[lo : lo + 32]))
    assert _files(tmp_path / "ours") == _files(tmp_path / "ref")
    assert np.array_equal(zarr.open_array(str(tmp_path / "ours"))[:], values)


def test_partial_shard_reads_back_with_fill(tmp_path):
    values = np.arange(32 * 2 * 3 * 5, dtype="float32").reshape(64, 3, 5)
    arr = _array(tmp_path / "a", 64, "float32", "lz4")
    enc = shards.encoder(arr)
    enc.store(1, enc.encode(values[32:43]))  # the carried tail of a shard: 11 rows
    got = zarr.open_array(str(tmp_path / "a"))[:]
    assert np.array_equal(got[32:43], values[32:43])
    assert not got[:32].any() and not got[43:].any()


def test_memory_store_gets_the_same_bytes(tmp_path):
    values = np.random.default_rng(1).standard_normal((40, 3, 5)).astype("float16")
    ref = _array(tmp_path / "ref", 40, "float16", "lz4")
    ref[:] = values
    mem = zarr.create_array("memory://shards-test", shape=(40, 3, 5), chunks=(8, 1, 5), shards=(32, 3, 5), dtype="float16",
                            compressors=st.compressors("lz4", 2), fill_value=0)
    enc = shards.encoder(mem)
    for i, lo in enumerate(range(0, 40, 32)):
        enc.store(i, enc.encode(values[lo : lo + 32]))
    assert np.array_equal(mem[:], values)
    shard0 = b"".join(bytes(p) for p in enc.encode(values[:32]))
    assert shard0 == _files(tmp_path / "ref")[os.path.join("c", "0", "0", "0")]


def test_other_layouts_are_left_to_zarr(tmp_path):
    plain = zarr.create_array(str(tmp_path / "p"), shape=(10, 4), chunks=(5, 4), dtype="float32")
    assert shards.encoder(plain) is None


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    values = np.ones((32, 3, 5), dtype="float16")
    enc = shards.encoder(_array(tmp_path / "a", 64, "float16", "lz4"))

    def full_disk(fd, parts):
        os.write(fd, b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards, "_writev_all", full_disk)
    with pytest.raises(OSError):
        enc.store(0, enc.encode(values))
    assert not [p for p in (tmp_path / "a").rglob("*") if p.is_file() and p.name != "zarr.json"]
