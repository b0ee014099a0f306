"""The out-of-core pass against in-memory numpy: grouped moments, quantiles, cache, parts."""

from __future__ import annotations

import numpy as np
import pytest

import neurostore
from neurostore import cache
from neurostore import moments as mo
from neurostore import store as st
from neurostore.errors import NeurostoreError
from synth import make_store


def rows_of(s, site, rows, layer_pos):
    """(x [N, W] float64, lang [N], label [N]) of a synthetic store's rows, in store order."""
    if rows == "tokens":
        x = s.acts[site][:, layer_pos].astype(np.float64)
        doc = s.doc_of_token
    else:
        x = s.pooled[(site, rows)][:, layer_pos].astype(np.float64)
        doc = np.arange(len(s.label))
    return x, s.lang[doc], s.label[doc]


def close(a, b, rtol=1e-6):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.nanmax(np.abs(b)))) if b.size and np.isfinite(b).any() else 1.0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-9 * scale)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("m") / "s.zarr"))


@pytest.mark.parametrize("rows", ["tokens", "mean", "first"])
def test_moments_match_numpy(synth, rows):
    s = neurostore.open(synth.path)
    arr = s.groups[0]["acts/resid" if rows == "tokens" else f"pooled/resid/{rows}"]
    n_rows = s.n_tokens if rows == "tokens" else s.n_docs
    assert n_rows // arr.chunks[0] >= 4, "the test store must span several chunks"
    mom = mo.compute(s, mo.Selection("resid", (0, 2), rows, "label"), workers=2)
    assert mom.langs == synth.langs and mom.groups == synth.labels
    for k, layer_pos in enumerate([0, 2]):
        x, lang, lab = rows_of(synth, "resid", rows, layer_pos)
        for li in range(len(synth.langs)):
            for ei in range(len(synth.labels)):
                sel = (lang == li) & (lab == ei)
                assert mom.count[li, ei] == sel.sum()
                if not sel.any():
                    assert mom.mean[li, ei, k].sum() == 0 and mom.m2[li, ei, k].sum() == 0
                    continue
                xs = x[sel]
                close(mom.mean[li, ei, k], xs.mean(0))
                close(mom.m2[li, ei, k] / sel.sum(), xs.var(0))
                assert np.array_equal(mom.pos[li, ei, k], (xs > 0).sum(0))
                assert np.array_equal(mom.vmin[li, ei, k], xs.min(0))
                assert np.array_equal(mom.vmax[li, ei, k], xs.max(0))
    # the constructed edge cases are there
    assert (mom.count == 0).any(), "an empty group"
    assert np.all(mom.m2[:, :, :, 1] == 0), "constant neuron 1 has exactly zero spread"
    assert mom.count.sum() < (n_rows), "rows with a missing label are left out"


def test_bfloat16_and_float16_stores(tmp_path):
    for dtype in ("bfloat16", "float16"):
        synth = make_store(str(tmp_path / f"{dtype}.zarr"), store_dtype=dtype, n_docs=40)
        s = neurostore.open(synth.path)
        mom = mo.compute(s, mo.Selection("mlp", (1,), "tokens", None), workers=1)
        x, lang, _ = rows_of(synth, "mlp", "tokens", 1)
        for li in range(3):
            close(mom.mean[li, 0, 0], x[lang == li].mean(0))
            close(mom.m2[li, 0, 0], ((x[lang == li] - x[lang == li].mean(0)) ** 2).sum(0))


def test_quantile_sketch_within_documented_error(synth):
    from neurostore import sketch as sk

    s = neurostore.open(synth.path)
    mom = mo.compute(s, mo.Selection("mlp", (0,), "tokens", None), quantiles=True)
    q = sk.quantiles(mom.hist[:, 0, 0], mom.vmin[:, 0, 0], mom.vmax[:, 0, 0], (0.1, 0.5, 0.9))
    x, lang, _ = rows_of(synth, "mlp", "tokens", 0)
    for li in range(3):
        ref = np.quantile(x[lang == li], [0.1, 0.5, 0.9], axis=0)
        err = np.abs(np.arcsinh(q[:, li]) - np.arcsinh(ref))
        # one bin of the sketch, plus the gap between neighbouring order statistics
        gap = np.abs(np.arcsinh(np.quantile(x[lang == li], [0.1, 0.5, 0.9], axis=0, method="lower"))
                     - np.arcsinh(np.quantile(x[lang == li], [0.1, 0.5, 0.9], axis=0, method="higher")))
        assert np.all(err <= sk.HIST_WIDTH + gap + 1e-9)


def test_cache_hit_reads_no_activations(tmp_path, monkeypatch):
    synth = make_store(str(tmp_path / "c.zarr"), n_docs=50)
    s = neurostore.open(synth.path)
    sel = mo.Selection("resid", (0, 1), "tokens", "label", (("lang", ("en", "es")),))
    fresh = mo.group_moments(s, sel)
    assert fresh.from_cache == [False, False]

    def boom(*args, **kwargs):
        raise AssertionError("activations were read")

    monkeypatch.setattr(mo, "_chunk_task", boom)
    again = mo.group_moments(neurostore.open(synth.path), sel)
    assert again.from_cache == [True, True]
    for key in ("count", "mean", "m2", "pos", "vmin", "vmax"):
        assert np.array_equal(getattr(again, key), getattr(fresh, key))
    # a subset of the cached layers is a hit too
    assert mo.group_moments(s, sel.with_layers([1])).from_cache == [True]
    # another filter is another slice
    with pytest.raises(AssertionError, match="activations were read"):
        mo.group_moments(s, mo.Selection("resid", (0,), "tokens", "label"))


def test_cache_invalidated_when_commits_move(tmp_path):
    synth = make_store(str(tmp_path / "i.zarr"), n_docs=60, commit_docs=30, complete=False)
    with pytest.warns(UserWarning, match="incomplete"):
        s = neurostore.open(synth.path)
    sel = mo.Selection("resid", (0,), "mean", "label")
    first = mo.group_moments(s, sel)
    assert first.count.sum() <= 30
    x, lang, lab = rows_of(synth, "resid", "mean", 0)
    keep = (np.arange(60) < 30) & (lab >= 0)
    assert first.count.sum() == keep.sum()
    group = st.open_group(synth.path, mode="r+")
    st.commit(group, st.read_meta(group), 60, int(synth.n_tokens.sum()), complete=True)
    s2 = neurostore.open(synth.path)
    second = mo.group_moments(s2, sel)
    assert second.from_cache == [False]
    assert second.count.sum() == (lab >= 0).sum()
    # the stale entry was replaced, not kept next to the new one
    assert len(list(group["cache"].group_keys())) == 1


def test_readonly_store_recomputes(tmp_path, monkeypatch):
    synth = make_store(str(tmp_path / "ro.zarr"), n_docs=30)

    def readonly(path, *options):
        raise PermissionError(f"{path}: read-only file system")

    monkeypatch.setattr(cache, "_open_writable", readonly)
    s = neurostore.open(synth.path)
    a = mo.group_moments(s, mo.Selection("resid", (0,), "mean", "label"))
    b = mo.group_moments(s, mo.Selection("resid", (0,), "mean", "label"))
    assert a.from_cache == b.from_cache == [False]
    assert np.array_equal(a.mean, b.mean)
    assert "cache" not in s.groups[0]


def test_parts_read_as_one(tmp_path):
    a = make_store(str(tmp_path / "p0.zarr"), n_docs=40, seed=1, part=[0, 2])
    b = make_store(str(tmp_path / "p1.zarr"), n_docs=30, seed=2, part=[1, 2])
    s = neurostore.open([b.path, a.path])  # order of arguments does not matter
    mom = mo.compute(s, mo.Selection("mlp", (2,), "tokens", "label"))
    xa, la, ea = rows_of(a, "mlp", "tokens", 2)
    xb, lb, eb = rows_of(b, "mlp", "tokens", 2)
    x, lang, lab = np.concatenate([xa, xb]), np.concatenate([la, lb]), np.concatenate([ea, eb])
    for li in range(3):
        for ei in range(4):
            sel = (lang == li) & (lab == ei)
            assert mom.count[li, ei] == sel.sum()
            if sel.any():
                close(mom.mean[li, ei, 0], x[sel].mean(0))
    rows = mo.top_rows(s, mo.Selection("mlp", (2,), "tokens", None), 3, 5, np.ones(s.n_docs, bool))
    ref = np.argsort(-x[:, 3], kind="stable")[:5]
    assert [r for r, _ in rows] == ref.tolist()


def test_bad_selections(synth):
    s = neurostore.open(synth.path)
    with pytest.raises(NeurostoreError, match="site 'attn'"):
        mo.compute(s, mo.Selection("attn", (0,), "mean", "label"))
    with pytest.raises(NeurostoreError, match="layer 9"):
        mo.compute(s, mo.Selection("resid", (9,), "mean", "label"))
    with pytest.raises(NeurostoreError, match="--by: the store has no categorical column 'topic'"):
        mo.compute(s, mo.Selection("resid", (0,), "mean", "topic"))
    with pytest.raises(NeurostoreError, match="--lang de"):
        mo.compute(s, mo.Selection("resid", (0,), "mean", "label", (("lang", ("de",)),)))


# ----------------------------------------------------------------------------------------------
# the streaming reduction against a float64 reference on adversarial data


def _reference(x64, gid, n_groups):
    """Two-pass float64 statistics per group (the definition)."""
    out = []
    for g in range(n_groups):
        xs = x64[gid == g]
        if len(xs) == 0:
            out.append(None)
            continue
        m = xs.mean(0)
        out.append((len(xs), m, ((xs - m) ** 2).sum(0), (xs > 0).sum(0), xs.min(0), xs.max(0)))
    return out


def _check_partial(p, x64, gid, n_groups):
    for g, ref in enumerate(_reference(x64, gid, n_groups)):
        if ref is None:
            assert p["count"][g] == 0 and np.all(p["m2"][g] == 0) and np.all(np.isinf(p["vmin"][g]))
            continue
        n, mean, m2, pos, vmin, vmax = ref
        assert p["count"][g] == n
        scale = np.abs(x64[gid == g]).max(0)
        assert np.all(np.abs(p["mean"][g] - mean) <= 1e-6 * np.abs(mean) + 1e-12 * scale), g
        assert np.all(np.abs(p["m2"][g] - m2) <= 1e-6 * m2), (g, p["m2"][g], m2)
        assert np.array_equal(p["pos"][g], pos)
        assert np.array_equal(p["vmin"][g], vmin) and np.array_equal(p["vmax"][g], vmax)


def _adversarial(rng, rows, width, dtype, gid=None):
    """Per-group offsets of both signs, huge against the spread, float16 extremes and subnormals,
    exact zeros of both signs and a constant neuron."""
    gid = _adversarial_groups(rng, rows) if gid is None else gid
    offset = np.where(np.arange(64) % 2, 1.0, -1.0)[np.maximum(gid, 0)][:, None]
    if dtype == "float16":
        x = 2048.0 * offset + 2.0 * rng.integers(-2, 3, size=(rows, width))  # ulp at 2048 is 2
        x[:, 1] = rng.choice([65504.0, -65504.0, 6e-8, -6e-8, 0.0, -0.0], size=rows)
        x[:, 2] = rng.standard_normal(rows) * 1e-5  # subnormals and tiny normals
        stored = x.astype(np.float16)
        return stored, stored.astype(np.float64), gid
    x = 1e4 * offset + 1e-3 * rng.standard_normal((rows, width))  # cancellation: offset^2 / var = 1e14
    x[:, 1] = 0.0
    x[:, 2] = rng.choice([3e38, -3e38, 1e-38, 0.0], size=rows)
    x[:, 3] = -7.25  # constant
    x = x.astype(np.float32)
    if dtype == "bfloat16":
        bits = (x.view(np.uint32) >> 16).astype(np.uint16)
        return bits, st.decode(bits, "bfloat16").astype(np.float64), gid
    return x, x.astype(np.float64), gid


def _adversarial_groups(rng, rows):
    gid = np.repeat(rng.integers(-1, 9, size=rows // 3 + 1), 3)[:rows]  # runs of 3 rows, -1 = left out
    gid[:5] = 7  # a longer run
    gid[gid == 8] = 6
    gid[rows // 2] = 8  # a one-row group
    gid[gid == 3] = 4  # an empty group
    return gid


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_reduce_block_adversarial(dtype):
    rng = np.random.default_rng(3)
    stored, x64, gid = _adversarial(rng, 999, 16, dtype)
    p = mo.reduce_block(stored, gid, 10, False, store_dtype=dtype)
    _check_partial(p, x64, gid, 10)
    if dtype == "float32":
        assert np.all(p["m2"][:, 3] == 0), "a constant neuron has exactly zero spread"
    # split anywhere and merged (Chan) gives the same statistics
    parts = [mo.reduce_block(stored[a:b], gid[a:b], 10, False, store_dtype=dtype) for a, b in ((0, 1), (1, 400), (400, 999))]
    _check_partial(mo.merge(parts), x64, gid, 10)


def test_pass_adversarial_store(tmp_path):
    """The whole pass (shard reader, runs, tasks, tree) on stored adversarial values."""
    for dtype in ("float16", "bfloat16", "float32"):
        synth = make_store(str(tmp_path / f"a-{dtype}.zarr"), store_dtype=dtype, n_docs=200, pools=(), seed=4,
                           chunk_bytes=2048, shard_bytes=16384)
        s = neurostore.open(synth.path)
        arr = s.groups[0]["acts/mlp"]
        rows = s.n_tokens
        doc = synth.doc_of_token
        gid = np.where(synth.label[doc] >= 0, synth.lang[doc] * len(synth.labels) + synth.label[doc], -1)
        stored, x64, _ = _adversarial(np.random.default_rng(5), rows, 12, dtype, gid)
        group = st.open_group(synth.path, mode="r+")
        full = np.zeros(arr.shape, arr.dtype)
        full[:, 1] = stored
        group["acts/mlp"][...] = full
        mom = mo.compute(neurostore.open(synth.path), mo.Selection("mlp", (1,), "tokens", "label"), workers=2)
        flat = {k: getattr(mom, k)[:, :, 0].reshape(-1, 12) for k in ("mean", "m2", "pos", "vmin", "vmax")}
        flat["count"] = mom.count.reshape(-1)
        _check_partial(flat, x64, gid, len(synth.langs) * len(synth.labels))


def test_shard_reader_matches_zarr(synth, monkeypatch):
    from neurostore import chunks as ch

    s = neurostore.open(synth.path)
    arr = s.groups[0]["acts/mlp"]
    src = ch.source(arr)
    assert isinstance(src, ch.ShardSource), "the store's own layout is read directly"
    chunk, shard = ch.step(src)
    for lo in range(0, s.n_tokens, shard):
        hi = min(s.n_tokens, lo + shard)
        got = list(ch.blocks(src, lo, hi, (0, 2)))
        want = list(ch.blocks(ch.ZarrSource(arr), lo, hi, (0, 2)))
        assert [(a, b, j) for a, b, j, _ in got] == [(a, b, j) for a, b, j, _ in want]
        for g, w in zip(got, want):
            assert np.array_equal(g[3], w[3])
    sel = mo.Selection("mlp", (0, 2), "tokens", "label")
    fast = mo.compute(s, sel, quantiles=True, workers=2)
    monkeypatch.setattr(ch, "source", ch.ZarrSource)
    slow = mo.compute(s, sel, quantiles=True, workers=2)
    for key in ("count", "mean", "m2", "pos", "vmin", "vmax", "hist"):
        assert np.array_equal(getattr(fast, key), getattr(slow, key)), key


def test_damaged_shard_index_is_an_error(tmp_path):
    from pathlib import Path

    synth = make_store(str(tmp_path / "d.zarr"), n_docs=30, pools=())
    shard = sorted(p for p in (Path(synth.path) / "acts" / "resid").rglob("*") if p.is_file() and p.name != "zarr.json")[0]
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # inside the index
    shard.write_bytes(bytes(raw))
    with pytest.raises(NeurostoreError, match="checksum mismatch"):
        mo.compute(neurostore.open(synth.path), mo.Selection("resid", (0,), "tokens", None), workers=1)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sketch_table_is_the_definition(dtype):
    from neurostore import sketch as sk

    bits = np.arange(1 << 16, dtype=np.uint32)
    with np.errstate(invalid="ignore"):
        values = (bits.astype(np.uint16).view(np.float16).astype(np.float64) if dtype == "float16"
                  else (bits << 16).view(np.float32).astype(np.float64))
    ok = ~np.isnan(values)
    assert np.array_equal(sk.bins(bits.astype(np.uint16), dtype)[ok], sk.reference_bins(values[ok]))


def test_sketch_float32_bins_exact():
    from neurostore import sketch as sk

    rng = np.random.default_rng(0)
    edges = np.sinh(-sk.HIST_RANGE + np.arange(sk.HIST_BINS + 1) * sk.HIST_WIDTH)
    x = np.concatenate([
        (rng.standard_normal(200_000) * 30).astype(np.float32),
        edges.astype(np.float32), np.nextafter(edges.astype(np.float32), np.float32(np.inf)),
        np.nextafter(edges.astype(np.float32), np.float32(-np.inf)),
        np.float32([0.0, -0.0, np.inf, -np.inf, 3e38, -3e38, 1e-45, -1e-45]),
    ])
    assert np.array_equal(sk.bins(x, "float32"), sk.reference_bins(x.astype(np.float64)))
