"""The quantile sketch, encoded and decoded here: bin indices on a fixed asinh grid (computed without
``arcsinh`` per value), and quantiles read back from the bin counts (:func:`quantiles`).

Semantics (unchanged, documented in docs/query.md): ``HIST_BINS`` bins of width ``HIST_WIDTH`` over
``asinh(x)`` in ``[-HIST_RANGE, HIST_RANGE]``; values outside fall into the end bins. A bin index is
``floor((asinh(x) + HIST_RANGE) / HIST_WIDTH)`` clipped to ``[0, HIST_BINS - 1]``, with ``asinh``
evaluated in float64 (:func:`reference_bins`).

Why lookup tables: ``arcsinh`` costs ~20 ns a value, more than everything else in the pass together.
A 16-bit store (float16, or bfloat16 kept as uint16 bits) has only 65,536 distinct values, so the bin
of every bit pattern is computed once (with :func:`reference_bins` itself, so the bins are identical)
and binning is one table lookup. Float32 values are looked up by their top 16 bits: the bin is
monotone in ``x``, so where the smallest and largest float32 sharing those 16 bits fall in the same
bin, every value between them does too; the few patterns that straddle a bin edge (at most two per
edge) are marked and those values are binned exactly. NaN goes to bin 0 (a store that holds NaN is
reported by ``verify``; the old per-value path could not bin it at all).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

HIST_BINS = 128
HIST_RANGE = 8.0
HIST_WIDTH = 2 * HIST_RANGE / HIST_BINS
_AMBIGUOUS = 255  # marks a float32 top-16-bit pattern whose values span a bin edge


def reference_bins(x: np.ndarray) -> np.ndarray:
    """Bin index of each value, computed directly (the definition; slow: one ``arcsinh`` a value)."""
    with np.errstate(invalid="ignore"):  # NaN patterns
        x = np.asarray(x, dtype=np.float64)
        idx = np.floor((np.arcsinh(x) + HIST_RANGE) / HIST_WIDTH)
    idx = np.where(np.isnan(idx), 0, idx)
    return np.clip(idx, 0, HIST_BINS - 1).astype(np.int64)


def _patterns_as_float(store_dtype: str) -> np.ndarray:
    bits = np.arange(1 << 16, dtype=np.uint32)
    with np.errstate(invalid="ignore"):  # NaN patterns
        if store_dtype == "float16":
            return bits.astype(np.uint16).view(np.float16).astype(np.float64)
        return (bits << 16).view(np.float32).astype(np.float64)  # bfloat16, or a float32's top 16 bits


@lru_cache(maxsize=None)
def table(store_dtype: str) -> np.ndarray:
    """``uint8[65536]``: the bin of every 16-bit pattern (float16 / bfloat16), or for float32 the
    bin shared by every value with those top 16 bits (``_AMBIGUOUS`` where it is not shared)."""
    if store_dtype in ("float16", "bfloat16"):
        return reference_bins(_patterns_as_float(store_dtype)).astype(np.uint8)
    if store_dtype != "float32":
        raise ValueError(f"no sketch table for dtype {store_dtype!r}")
    top = np.arange(1 << 16, dtype=np.uint32) << 16
    low = reference_bins(top.view(np.float32))
    high = reference_bins((top | 0xFFFF).view(np.float32))
    out = low.astype(np.uint8)
    out[low != high] = _AMBIGUOUS
    return out


def bins(values: np.ndarray, store_dtype: str) -> np.ndarray:
    """``uint8`` bin index of stored values (same shape): 16-bit patterns for float16 and bfloat16
    (bfloat16 arrives as its uint16 bits), float32 values for float32 stores."""
    lut = table(store_dtype)
    if store_dtype in ("float16", "bfloat16"):
        return np.take(lut, np.ascontiguousarray(values).view(np.uint16))
    v = np.ascontiguousarray(values, dtype=np.float32)
    out = np.take(lut, v.view(np.uint32) >> 16)
    odd = out == _AMBIGUOUS
    if odd.any():
        out[odd] = reference_bins(v[odd]).astype(np.uint8)
    return out


def count(b: np.ndarray, out: np.ndarray) -> None:
    """Add the per-column bin counts of ``b [rows, width]`` (uint8 bins) into ``out [width, bins]``."""
    rows, width = b.shape
    if rows == 0:
        return
    flat = b.astype(np.int32)
    flat += (np.arange(width, dtype=np.int32) * HIST_BINS)[None, :]
    out += np.bincount(flat.ravel(), minlength=width * HIST_BINS).reshape(width, HIST_BINS).astype(out.dtype)


def quantiles(hist: np.ndarray, vmin: np.ndarray, vmax: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """Decode the sketch: approximate quantiles from the asinh-grid histogram ``hist [..., bins]``: find the bin where
    the cumulative count reaches q * n, interpolate linearly inside it (in asinh space), clip to the
    exact [vmin, vmax]. Returns ``[len(qs), ...]``; NaN for empty groups."""
    h = hist.astype(np.float64)
    n = h.sum(axis=-1)
    cum = np.cumsum(h, axis=-1)
    out = []
    for q in qs:
        target = q * n
        b = (cum < target[..., None]).sum(axis=-1)
        b = np.minimum(b, h.shape[-1] - 1)
        before = np.take_along_axis(cum, b[..., None], axis=-1)[..., 0] - np.take_along_axis(h, b[..., None], axis=-1)[..., 0]
        inbin = np.take_along_axis(h, b[..., None], axis=-1)[..., 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(inbin > 0, (target - before) / np.where(inbin > 0, inbin, 1), 0.5)
        value = np.sinh(-HIST_RANGE + (b + np.clip(frac, 0, 1)) * HIST_WIDTH)
        value = np.clip(value, vmin, vmax)
        out.append(np.where(n > 0, value, np.nan))
    return np.stack(out)
