"""Random activation stores for tests, built through the store API itself.

``make_store`` writes a small store with unequal group sizes, an empty (lang, label) group, a
constant neuron and several chunks per array (``CHUNK_BYTES``/``SHARD_BYTES`` are lowered while the
store is created). It returns the in-memory truth next to the path so tests can compare against
plain numpy / scipy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from neurostore import store as st

LABELS = ["anger", "joy", "sadness", "fear"]
LANGS = ["en", "es", "fr"]


@dataclass
class Synth:
    path: str
    sites: dict
    labels: list[str]
    langs: list[str]
    label: np.ndarray  # [n_docs] codes, -1 missing
    lang: np.ndarray
    n_tokens: np.ndarray
    doc_of_token: np.ndarray
    acts: dict = field(default_factory=dict)  # site -> [n_tokens, n_layers, width] float32 (decoded)
    pooled: dict = field(default_factory=dict)  # (site, pool) -> [n_docs, n_layers, width]
    texts: list = field(default_factory=list)
    kind: np.ndarray | None = None  # [n_tokens] store.TOKEN_KINDS codes (None: the store records none)


def _values(rng: np.random.Generator, n: int, n_layers: int, width: int, group: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Activations with a group-dependent offset (so groups differ), a large common offset on some
    neurons (to exercise cancellation), negatives and exact zeros, and neuron 1 constant."""
    x = rng.standard_normal((n, n_layers, width)).astype(np.float64)
    x += 0.3 * ((group[:, None, None] * 7 + np.arange(width)[None, None, :]) % 5)
    x[..., 2 % width] -= 50.0  # big mean, small spread (never active)
    x[..., 0] = np.maximum(x[..., 0], 0)  # relu-like neuron: many exact zeros
    if width > 1:
        x[..., 1] = -0.75  # constant neuron (never active)
    return x.astype(dtype)


def make_store(
    path: str,
    *,
    n_docs: int = 90,
    sites: dict | None = None,
    store_dtype: str = "float32",
    pools: tuple[str, ...] = ("first", "mean", "last"),
    tokens: bool = True,
    seed: int = 0,
    chunk_bytes: int = 256,
    shard_bytes: int = 2048,
    complete: bool = True,
    commit_docs: int | None = None,
    empty_group: tuple[str, str] | None = ("fr", "fear"),
    missing_label: bool = True,
    part: list[int] | None = None,
    fingerprint: str = "synth",
    keep: bool = True,
    block_docs: int = 4096,
    max_tokens: int = 6,
    token_kinds: bool = True,
) -> Synth:
    """Create a random store at ``path``. Activations are written ``block_docs`` sentences at a time,
    so large stores never sit in memory (pass ``keep=False`` to not keep them for comparison).
    With ``token_kinds`` a sentence's first token is special ([CLS]), and its last too where it has
    three tokens or more ([SEP]); no character offsets are stored."""
    rng = np.random.default_rng(seed)
    sites = sites or {"resid": {"layers": [0, 1, 2], "width": 8}, "mlp": {"layers": [0, 1, 2], "width": 12}}
    # unequal group sizes: skewed label and language probabilities
    label = rng.choice(len(LABELS), size=n_docs, p=[0.45, 0.3, 0.15, 0.1]).astype(np.int32)
    lang = rng.choice(len(LANGS), size=n_docs, p=[0.5, 0.3, 0.2]).astype(np.int32)
    if empty_group:
        li, ei = LANGS.index(empty_group[0]), LABELS.index(empty_group[1])
        bad = (lang == li) & (label == ei)
        label[bad] = (ei + 1) % len(LABELS)
    if missing_label and n_docs > 5:
        label[3] = -1
    n_tok = rng.integers(1, max_tokens + 1, size=n_docs).astype(np.int32)
    total = int(n_tok.sum())
    doc_of = np.repeat(np.arange(n_docs, dtype=np.int32), n_tok)
    texts = [f"sentence {i} {LABELS[label[i]] if label[i] >= 0 else '?'} {LANGS[lang[i]]}" for i in range(n_docs)]
    token_ids = rng.integers(0, 1000, size=total).astype(np.int32)
    kind = None
    if token_kinds:
        first = np.concatenate([[0], np.cumsum(n_tok)[:-1]]).astype(np.int64)
        last = (first + n_tok - 1)[n_tok >= 3]
        kind = np.zeros(total, np.int8)
        kind[first], kind[last] = 1, 1
        token_ids[first], token_ids[last] = 1001, 1002

    corpus = {"fingerprint": fingerprint}
    if part is not None:
        corpus["part"] = part
    meta = st.new_meta(
        model={"name": "synth-model", "model_type": "synth"},
        compute_dtype="float32",
        store_dtype=store_dtype,
        sites=sites,
        pool=list(pools),
        tokens=tokens,
        options={},
        corpus=corpus,
        n_docs=n_docs,
        n_tokens=total,
        n_truncated=0,
        version="test",
    )
    old = st.CHUNK_BYTES, st.SHARD_BYTES
    st.CHUNK_BYTES, st.SHARD_BYTES = chunk_bytes, shard_bytes
    try:
        group = st.create(
            path, meta, texts=texts, label=(LABELS, label), lang=(LANGS, lang), n_tokens=n_tok,
            truncated=np.zeros(n_docs, bool), token_ids=token_ids, classes=None,
            token_kind=kind, special_tokens={1001: "[CLS]", 1002: "[SEP]"},
        )
    finally:
        st.CHUNK_BYTES, st.SHARD_BYTES = old
    synth = Synth(path, sites, LABELS, LANGS, label, lang, n_tok, doc_of, texts=texts, kind=kind)
    np_dtype = np.float32 if store_dtype == "bfloat16" else np.dtype(store_dtype)
    token_start = np.concatenate([[0], np.cumsum(n_tok)]).astype(np.int64)
    for site, spec in sites.items():
        L, W = len(spec["layers"]), spec["width"]
        names = ([f"acts/{site}"] if tokens else []) + [f"pooled/{site}/{p}" for p in pools]
        for name in names:
            is_tok = name.startswith("acts")
            arr = group[name]
            app = st.ShardAppender(arr, 0)
            kept = []
            for lo in range(0, n_docs, block_docs):
                hi = min(n_docs, lo + block_docs)
                if is_tok:
                    rows = doc_of[token_start[lo]:token_start[hi]]
                else:
                    rows = np.arange(lo, hi)
                g = (label[rows] + 1) * 3 + lang[rows] + (0 if is_tok else 1)
                x = _values(rng, len(rows), L, W, g, np_dtype)
                if store_dtype == "bfloat16":
                    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
                    x = st.decode(bits, "bfloat16")
                    stored = bits
                else:
                    stored = x
                full, new = app.buffer(len(rows))
                new[:] = stored
                app.flush(full)
                if keep:
                    kept.append(np.asarray(x, dtype=np.float32))
            if keep:
                data = np.concatenate(kept) if kept else np.zeros((0, L, W), np.float32)
                if is_tok:
                    synth.acts[site] = data
                else:
                    synth.pooled[(site, name.rsplit("/", 1)[1])] = data
    docs = n_docs if commit_docs is None else commit_docs
    st.commit(group, st.read_meta(group), docs, int(n_tok[:docs].sum()), complete=complete and docs == n_docs)
    return synth


def close_results(a, b, path: str = "") -> None:
    """Equal JSON results (a query's ``to_json()``), numbers to 1e-6 relative, provenance aside (it names the paths)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            if key != "provenance":
                close_results(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)) and any(isinstance(x, (list, tuple, dict, str)) for x in list(a) + list(b)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            close_results(x, y, f"{path}[{i}]")
    elif isinstance(a, str) or a is None or isinstance(a, bool):
        assert a == b, path
    else:
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-6, atol=1e-12, equal_nan=True, err_msg=path)
