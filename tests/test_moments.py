"""The out-of-core pass against in-memory numpy: grouped moments, quantiles, cache, parts."""

from __future__ import annotations

import numpy as np
import pytest

import neurostore
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
    from neurostore import analysis as an

    s = neurostore.open(synth.path)
    mom = mo.compute(s, mo.Selection("mlp", (0,), "tokens", None), quantiles=True)
    q = an.quantiles(mom.hist[:, 0, 0], mom.vmin[:, 0, 0], mom.vmax[:, 0, 0], (0.1, 0.5, 0.9))
    x, lang, _ = rows_of(synth, "mlp", "tokens", 0)
    for li in range(3):
        ref = np.quantile(x[lang == li], [0.1, 0.5, 0.9], axis=0)
        err = np.abs(np.arcsinh(q[:, li]) - np.arcsinh(ref))
        # one bin of the sketch, plus the gap between neighbouring order statistics
        gap = np.abs(np.arcsinh(np.quantile(x[lang == li], [0.1, 0.5, 0.9], axis=0, method="lower"))
                     - np.arcsinh(np.quantile(x[lang == li], [0.1, 0.5, 0.9], axis=0, method="higher")))
        assert np.all(err <= mo.HIST_WIDTH + gap + 1e-9)


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

    def readonly(path):
        raise PermissionError(f"{path}: read-only file system")

    monkeypatch.setattr(mo, "_open_writable", readonly)
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
