"""The store as a labelled dataset: plain ``xr.open_datatree`` opens every kind of store (full,
stats-only, with a statistics cache) with named dimensions, and ``Store.to_xarray`` gives the
decoded, labelled, lazy view, checked against the synthetic truth."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import neurostore
import synth
import tiny
from neurostore import query as q
from neurostore.extract import ExtractOptions, extract

xr = pytest.importorskip("xarray")

COMMON = dict(sites=["resid", "mlp"], pool=["first", "mean"], max_batch_tokens=128, buffer_mb=1, device="cpu")


def _every_array(tree) -> int:
    n = 0
    for node in tree.subtree:
        for name, var in node.dataset.variables.items():
            assert var.dims, f"{node.path}/{name}"
            n += 1
    return n


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16"])
def test_open_datatree_and_to_xarray_on_a_synthetic_store(tmp_path, store_dtype):
    s = synth.make_store(str(tmp_path / "s.zarr"), n_docs=30, store_dtype=store_dtype)
    tree = xr.open_datatree(s.path, engine="zarr")  # through the consolidated metadata
    acts = tree["acts"].dataset
    assert acts["resid"].dims == ("token", "resid_layer", "resid_neuron")
    assert acts["mlp"].dims == ("token", "mlp_layer", "mlp_neuron")
    assert list(acts["resid_layer"].values) == s.sites["resid"]["layers"]
    assert tree["pooled/mlp"].dataset["mean"].dims == ("doc", "mlp_layer", "mlp_neuron")
    label = tree["docs"].dataset["label"]
    assert label.attrs["flag_meanings"].split() == synth.LABELS and label.attrs["flag_values"] == list(range(len(synth.LABELS)))
    assert _every_array(tree) > 10

    ds = neurostore.open(s.path).to_xarray()
    assert ds["acts_resid"].dtype == np.float32 and ds["pooled_mlp_mean"].dtype == np.float32
    np.testing.assert_array_equal(ds["acts_resid"].values, s.acts["resid"])
    np.testing.assert_array_equal(ds["pooled_mlp_first"].values, s.pooled[("mlp", "first")])
    names = np.array(synth.LABELS + [""])[np.where(s.label >= 0, s.label, len(synth.LABELS))]
    assert list(ds["label"].values) == list(names)
    assert list(ds["lang"].values) == [synth.LANGS[c] for c in s.lang]
    # labelled selection and a reduction in float32 (float16 would overflow on large sums)
    sel = ds["pooled_resid_mean"].sel(resid_layer=1).where(ds["label"] == "joy", drop=True).mean("doc")
    np.testing.assert_allclose(sel.values, s.pooled[("resid", "mean")][s.label == 1, 1].mean(0), rtol=1e-5)
    kept = neurostore.open(s.path).to_xarray(dtype=None)
    assert kept["acts_resid"].dtype == (np.float16 if store_dtype == "float16" else np.float32)


def test_cache_entries_open_and_consolidated_metadata_stays_current(tmp_path):
    s = synth.make_store(str(tmp_path / "s.zarr"), n_docs=20)
    q.variance(neurostore.open(s.path), "mlp", by="label")  # writes cache/<key> and reconsolidates
    assert zarr.open_group(s.path, mode="r").metadata.consolidated_metadata is not None
    tree = xr.open_datatree(s.path, engine="zarr")
    (entry,) = tree["cache"].children.values()
    assert entry.dataset["mean"].dims == ("lang", "group", "neuron")
    assert entry.dataset["count"].dims == ("lang", "group")


@pytest.fixture(scope="module")
def extracted(tiny_models, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("xarray")
    subset = tiny.sample_subset(folder / "c.jsonl", every=6)
    out = {}
    for mode in ("full", "stats"):
        out[mode] = str(folder / f"{mode}.zarr")
        extract([str(subset)], out[mode], model=str(tiny_models["bert"]), options=ExtractOptions(**COMMON, stats_only=mode == "stats"))
    return out


def test_real_stores_open_both_ways(extracted):
    full = neurostore.open(extracted["full"])
    tree = xr.open_datatree(extracted["full"], engine="zarr")
    ds = full.to_xarray()
    np.testing.assert_array_equal(tree["acts"].dataset["resid"].values.astype(np.float32), ds["acts_resid"].values)
    assert ds.sizes["token"] == full.n_tokens and ds.sizes["doc"] == full.n_docs
    assert set(ds["token_kind"].values) <= {"text", "special"}

    stats = xr.open_datatree(extracted["stats"], engine="zarr")
    _every_array(stats)
    (entry,) = stats["stats"].children.values()
    layer = entry["mlp/tokens/0"].dataset
    assert layer["mean"].dims == ("cell", "neuron") and layer["hist"].dims == ("cell", "neuron", "bin")
    assert layer["top_row"].dims == ("cell", "neuron", "rank")
    assert entry["mlp/tokens"].dataset["cells"].dims == ("cell", "column")
    view = neurostore.open(extracted["stats"]).to_xarray()
    assert "acts_resid" not in view and list(view["resid_layer"].values) == full.sites["resid"]["layers"]


def test_float16_mean_overflows_without_the_float32_view(tmp_path):
    """Why float16 is read as float32 by default: a float16 reduction over dask overflows."""
    s = synth.make_store(str(tmp_path / "s.zarr"), n_docs=400, store_dtype="float16", sites={"resid": {"layers": [0], "width": 4}},
                         pools=("mean",), max_tokens=6)
    store = neurostore.open(s.path)
    big = store.acts("resid")[:, 0, 2]  # neuron 2 sits near -50: its sum passes float16's 65504
    with np.errstate(over="ignore"):
        assert not np.isfinite(float(big.sum().compute()))
    assert np.isfinite(float(store.to_xarray()["acts_resid"].isel(resid_layer=0, resid_neuron=2).sum()))
