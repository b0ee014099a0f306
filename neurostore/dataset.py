"""The store as a labelled, lazy ``xarray.Dataset``: what a researcher opens in a notebook.

Two ways in. Any store opens with plain xarray, ``xr.open_datatree(path, engine="zarr")``: every
array has dimension names (per site for activations: ``resid_layer``, ``resid_neuron``), the
layer numbers are coordinate variables, categorical columns carry CF ``flag_values`` /
``flag_meanings``, and the root's consolidated metadata is rewritten at each commit. That view
is the raw layout: bfloat16 stays ``uint16`` bits, parts and collections stay separate stores.

:func:`to_xarray` (``neurostore.open(path).to_xarray()``) is the view through neurostore's reader:
committed rows only, parts and collection members concatenated (category codes merged), category
names as coordinates, and activations decoded: bfloat16 bits widen exactly to float32, and float16
is read as float32 by default too, because a float16 ``.mean()`` or ``.sum()`` over many tokens
overflows to inf/nan. ``dtype=None`` keeps float16 (half the memory, your own accumulation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import store as st
from .errors import NeurostoreError

if TYPE_CHECKING:
    import xarray as xr

MISSING_NAME = ""  # the category name of a missing (-1) code in the view


def _named(codes: np.ndarray, names: list[str]) -> np.ndarray:
    table = np.array(list(names) + [MISSING_NAME], dtype=object)
    return table[np.where(codes >= 0, codes, len(names))]


def _decoded(arr: Any, store_dtype: str, dtype: str | None) -> Any:
    """A dask array of stored values as floats: bfloat16 bits always decoded, then cast to ``dtype``."""
    if store_dtype == "bfloat16":
        arr = arr.map_blocks(st.decode, "bfloat16", dtype=np.float32)
    if dtype is not None and arr.dtype != np.dtype(dtype):
        arr = arr.astype(dtype)
    return arr


def _on_rows(arr: Any, keep: np.ndarray) -> Any:
    """``arr`` with the token rows outside ``keep`` set to nan (lazily)."""
    import dask.array as da

    mask = da.from_array(np.asarray(keep, dtype=bool), chunks=(arr.chunks[0],))
    return da.where(mask[:, None, None], arr, np.array(np.nan, dtype=arr.dtype))


def to_xarray(store: st.Store, dtype: str | None = "float32") -> "xr.Dataset":
    """The store as one Dataset: per-sentence and per-token coordinates, activations as dask-backed
    variables ``acts_<site>`` ``[token, <site>_layer, <site>_neuron]`` and ``pooled_<site>_<pool>``
    ``[doc, <site>_layer, <site>_neuron]``. Nothing is read until computed but the small tables."""
    try:
        import xarray as xr
    except ImportError:
        raise NeurostoreError("the xarray view needs xarray: pip install xarray") from None
    if dtype is not None and np.dtype(dtype).kind != "f":
        raise NeurostoreError(f"dtype={dtype!r}: give a float dtype (float32, float64, float16) or None for the stored one")
    meta = store.meta
    coords: dict[str, Any] = {
        "doc": np.arange(store.n_docs),
        "token": np.arange(store.n_tokens),
        "text": ("doc", store.doc_column("text").astype(object)),
        "n_tokens": ("doc", store.doc_column("n_tokens")),
        "token_start": ("doc", store.doc_column("token_start")),
        "token_id": ("token", store.token_column("token_id")),
        "token_doc": ("token", store.token_column("doc")),
    }
    docs = store.groups[0]["docs"]
    for name in ("label", "lang", "pred"):
        if name in docs.array_keys():
            codes = store.doc_column(name)
            coords[name] = ("doc", _named(codes, store.categories(name)))
            coords[f"{name}_code"] = ("doc", codes)
    if "kind" in store.groups[0]["tokens"].array_keys():
        kinds = list(store.groups[0]["tokens/kind"].attrs.get("categories", st.TOKEN_KINDS))
        coords["token_kind"] = ("token", _named(store.token_column("kind").astype(np.int64), kinds))
    data: dict[str, Any] = {}
    from .statsonly import is_stats_only

    stats_only = is_stats_only(store)
    for site, spec in store.sites.items():
        layer_dim, neuron_dim = st.site_dims(site)
        coords[layer_dim] = np.asarray(spec["layers"])
        coords[neuron_dim] = np.arange(spec["width"])
        if stats_only:
            continue
        dims = (layer_dim, neuron_dim)
        attrs = {"site": site, "stored_dtype": store.store_dtype}
        if spec.get("rows"):  # values on token rows of one kind only (audio.resid): the others are nan here, not zeros
            attrs["rows"] = spec["rows"]
        if meta["tokens"]:
            acts = _decoded(store.acts(site), store.store_dtype, dtype)
            if spec.get("rows") and "token_kind" in coords:
                acts = _on_rows(acts, coords["token_kind"][1] == spec["rows"])
            data[f"acts_{site}"] = (("token", *dims), acts, attrs)
        for pool in meta["pool"]:
            data[f"pooled_{site}_{pool}"] = (("doc", *dims), _decoded(store.pooled(site, pool), store.store_dtype, dtype),
                                             dict(attrs, pool=pool))
    attrs = {
        "model": meta["model"]["name"], "store_dtype": store.store_dtype, "paths": list(store.paths),
        "mode": "stats-only" if stats_only else "full", "complete": int(store.complete),
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)
