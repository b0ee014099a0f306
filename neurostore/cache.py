"""The statistics cache: finalised group moments kept inside the store under ``cache/<key>``.

One entry per layer; the key hashes site, layer, rows, grouping, filters, token kinds, quantity and the
committed counts of every part, so an entry stops matching as soon as extraction commits more rows.
Read-only stores just recompute. Entries carry checksums; a damaged one is dropped with a warning
and recomputed (the cache of a full store is derived data). Entries are written under a temporary
name and renamed, so concurrent queries need no lock.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from . import store as st
from .plan import Selection

if TYPE_CHECKING:
    from .moments import GroupMoments

CACHE_VERSION = 2  # 2: the streaming pass (run-grouped float64 sums, sketch by lookup table)


def cache_key(store: st.Store, sel: Selection, layer: int) -> tuple[str, dict]:
    """Hash of everything the statistics depend on, including every part's committed counts."""
    slice_ = {
        "v": CACHE_VERSION, "site": sel.site, "layer": int(layer), "rows": sel.rows, "by": sel.by,
        "filters": sorted([c, sorted(v)] for c, v in sel.filters),
        "parts": [[m["corpus"].get("part"), m["corpus"].get("fingerprint")] for m in store.metas],
    }
    if sel.token_kind is not None:  # absent for every row, so the keys of unfiltered passes stay as they were
        slice_["token_kind"] = sorted(sel.token_kind)
    if sel.quantity != "activation":  # likewise: activation keys stay as they were
        slice_["quantity"] = sel.quantity
    counts = [[m["committed_docs"], m["committed_tokens"]] for m in store.metas]
    full = dict(slice_, counts=counts)
    digest = hashlib.sha1(json.dumps(full, sort_keys=True).encode()).hexdigest()[:20]
    return digest, slice_


def read(store: st.Store, sel: Selection, layer: int, quantiles: bool) -> dict | None:
    """A cached entry, or None; a damaged one (checksum, truncated, bad metadata) is dropped with one
    warning and recomputed: the cache of a full store is derived data, never worth an error."""
    key, _ = cache_key(store, sel, layer)
    try:
        entry = store.groups[0][f"cache/{key}"]
    except (KeyError, FileNotFoundError):
        return None
    except Exception as err:  # noqa: BLE001 - damaged metadata of the entry
        return _damaged_entry(store, key, err)
    try:
        attrs = dict(entry.attrs)
        if not attrs.get("ok") or (quantiles and not attrs.get("hist")):
            return None
        out = {k: np.asarray(entry[k][...]) for k in ("count", "mean", "m2", "pos", "vmin", "vmax")}
        out["hist"] = np.asarray(entry["hist"][...]) if quantiles else None
        out["langs"], out["groups"] = attrs["langs"], attrs["groups"]
    except Exception as err:  # noqa: BLE001 - a checksum mismatch, a truncated chunk, a missing array
        return _damaged_entry(store, key, err)
    return out


def _damaged_entry(store: st.Store, key: str, err: BaseException) -> None:
    text = str(err).splitlines()[0][:100] if str(err) else type(err).__name__
    warnings.warn(f"{store.paths[0]}: cached statistics cache/{key} are damaged ({text}); recomputing them", stacklevel=3)
    return None


def _open_writable(path: str, storage_options: dict | None = None) -> Any:
    return st.open_group(path, "r+", storage_options)


def write(store: st.Store, sel: Selection, mom: GroupMoments) -> bool:
    """Write one entry per layer into the first part; False where that did not happen.

    A local entry is written under a temporary name and renamed into place, so a reader never sees
    half an entry and concurrent queries need no lock. A store that cannot be written (read-only
    shared storage) is skipped silently; any other failure (a full disk, an I/O error) is one
    warning: the result is the same without the cache."""
    try:
        root = _open_writable(store.paths[0], store.storage_options)
        cache = _cache_group(root)
        folder = st.local_folder(root, "cache")
        for i, layer in enumerate(mom.layers):
            key, slice_ = cache_key(store, sel, layer)
            _drop_stale(cache, folder, key, slice_)
            arrays = {
                "count": mom.count, "mean": mom.mean[:, :, i], "m2": mom.m2[:, :, i], "pos": mom.pos[:, :, i],
                "vmin": mom.vmin[:, :, i], "vmax": mom.vmax[:, :, i],
            }
            if mom.hist is not None:
                arrays["hist"] = mom.hist[:, :, i]
            attrs = {"ok": True, "slice": slice_, "hist": mom.hist is not None, "langs": mom.langs, "groups": mom.groups}
            _write_entry(cache, folder, key, arrays, attrs)
        st.consolidate(root)
        return True
    except (PermissionError, NotImplementedError):  # read-only (shared) storage: recompute next time, silently
        return False
    except Exception as err:  # noqa: BLE001 - a full disk, an I/O error, anything else: say so once
        if isinstance(err, OSError) and err.errno == errno.EROFS:
            return False
        why = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}"
        warnings.warn(f"{store.paths[0]}: could not write the statistics cache ({why}); the results are not affected", stacklevel=2)
        return False


def _cache_group(root: Any) -> Any:
    """The store's ``cache`` group; one whose own metadata is damaged is removed and made again."""
    try:
        return root.require_group("cache")
    except (ValueError, TypeError):
        folder = st.local_folder(root, "cache")
        if folder is None:
            raise
        shutil.rmtree(folder)
        return root.require_group("cache")


def _drop_stale(cache: Any, folder: str | None, key: str, slice_: dict) -> None:
    """Entries of the same slice at other committed counts are stale; damaged ones go too."""
    names = sorted(os.listdir(folder)) if folder is not None and os.path.isdir(folder) else list(cache.group_keys())
    for old in names:
        if old == key or old.startswith(".") or old == "zarr.json":
            continue
        try:
            stale = dict(cache[old].attrs).get("slice") == slice_
        except Exception:  # noqa: BLE001 - damaged: nothing can ever read it
            stale = folder is not None
        if stale:
            if folder is not None:
                shutil.rmtree(os.path.join(folder, old), ignore_errors=True)
            else:
                del cache[old]


def _write_entry(cache: Any, folder: str | None, key: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    name = f".tmp-{uuid.uuid4().hex}" if folder is not None else key
    try:
        entry = cache.require_group(name)
        entry.attrs.update({"ok": False})
        for array, value in arrays.items():
            value = np.ascontiguousarray(value)
            entry.create_array(array, data=value, compressors=st.table_codecs(), overwrite=True,
                               dimension_names=st.stat_dims(array, value.ndim, ("lang", "group")))
        entry.attrs.update(attrs)
        if folder is None:
            return
        final, old = os.path.join(folder, key), os.path.join(folder, f".old-{uuid.uuid4().hex}")
        if os.path.exists(final):
            os.rename(final, old)
        os.rename(os.path.join(folder, name), final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if folder is not None:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
