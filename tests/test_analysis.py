"""Every analysis of the query API against a plain numpy / scipy reference on the raw rows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy import stats as sps

import neurostore
from neurostore import query as q
from neurostore.errors import NeurostoreError
from synth import make_store
from test_moments import close, rows_of


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("a") / "s.zarr"), n_docs=120, seed=3)


@pytest.fixture(scope="module")
def store(synth):
    return neurostore.open(synth.path)


def reference_z(x, lang, zscore=True):
    """z within language, population std, z = 0 where std = 0."""
    if not zscore:
        return x.copy()
    z = np.zeros_like(x)
    for l in np.unique(lang):
        m = lang == l
        mu, sd = x[m].mean(0), x[m].std(0)
        z[m] = np.where(sd > 0, (x[m] - mu) / np.where(sd > 0, sd, 1), 0.0)
    return z


def labelled(synth, site, rows, layer_pos):
    x, lang, lab = rows_of(synth, site, rows, layer_pos)
    keep = lab >= 0
    return x[keep], lang[keep], lab[keep]


def reference_M(z, lang, lab, L, E):
    M = np.full((L, E, z.shape[1]), np.nan)
    for l in range(L):
        for e in range(E):
            m = (lang == l) & (lab == e)
            if m.any():
                M[l, e] = z[m].mean(0)
    return M


@pytest.mark.parametrize("zscore", [True, False])
@pytest.mark.parametrize("rows", ["mean", "tokens"])
def test_variance_and_anova(store, synth, zscore, rows):
    x, lang, lab = labelled(synth, "resid", rows, 1)
    z = reference_z(x, lang, zscore)
    res = q.variance(store, "resid", 1, by="label", zscore=zscore, rows=rows, top=3)
    means = np.stack([z[lab == e].mean(0) for e in range(4) if (lab == e).any()])
    close(res.variance, means.var(0))
    groups = [z[lab == e] for e in range(4) if (lab == e).any()]
    with np.errstate(all="ignore"):
        f_ref = np.array([sps.f_oneway(*[g[:, d] for g in groups]).statistic for d in range(z.shape[1])])
    finite = np.isfinite(f_ref)
    close(res.f[finite], f_ref[finite])
    if zscore:
        assert np.isnan(res.f[1]) and res.variance[1] == 0, "constant neuron: z = 0, F undefined"
    assert [n for n, _ in res.top] == list(np.argsort(-res.variance, kind="stable")[:3])
    obj = res.to_json()
    json.dumps(obj, allow_nan=False)
    assert set(obj) >= {"variance", "f", "top", "site", "layer"} and len(obj["variance"]) == 8


def test_variance_per_lang_and_within(store, synth):
    x, lang, lab = labelled(synth, "mlp", "mean", 2)
    z = reference_z(x, lang)
    per = q.variance(store, "mlp", 2, per="lang")
    for l in range(3):
        m = lang == l
        means = np.stack([z[m & (lab == e)].mean(0) for e in range(4) if (m & (lab == e)).any()])
        close(per.variance[l], means.var(0))
        groups = [z[m & (lab == e)] for e in range(4) if (m & (lab == e)).any()]
        with np.errstate(all="ignore"):
            f_ref = np.array([sps.f_oneway(*[g[:, d] for g in groups]).statistic for d in range(z.shape[1])])
        ok = np.isfinite(f_ref)
        close(per.f[l][ok], f_ref[ok])
    within = q.variance(store, "mlp", 2, within=True)
    for e in range(4):
        close(within.variance[e], z[lab == e].var(0))
    obj = within.to_json()
    assert set(obj["variance"]) == set(synth.labels)


def test_filters(store, synth):
    x, lang, lab = labelled(synth, "resid", "mean", 0)
    keep = np.isin(lang, [0, 1]) & np.isin(lab, [0, 1, 2])
    z = reference_z(x[keep], lang[keep])
    res = q.variance(store, "resid", 0, lang=["en", "es"], where={"label": ["anger", "joy", "sadness"]})
    means = np.stack([z[lab[keep] == e].mean(0) for e in range(3)])
    close(res.variance, means.var(0))


@pytest.mark.parametrize("method", ["spearman", "cosine"])
def test_correlate(store, synth, method):
    x, lang, lab = labelled(synth, "mlp", "mean", 0)
    M = reference_M(reference_z(x, lang), lang, lab, 3, 4)
    res = q.correlate(store, "mlp", 0, method=method)
    for e in range(4):
        for a in range(3):
            for b in range(3):
                va, vb = M[a, e], M[b, e]
                if not (np.isfinite(va).all() and np.isfinite(vb).all()):
                    assert np.isnan(res.matrices[e, a, b])
                    continue
                if method == "spearman":
                    ref = sps.spearmanr(va, vb).statistic
                else:
                    ref = va @ vb / np.linalg.norm(va) / np.linalg.norm(vb)
                close(res.matrices[e, a, b], ref)
    assert np.isnan(res.matrices[synth.labels.index("fear"), 2, 0]), "the empty (fr, fear) group"
    with np.errstate(all="ignore"):
        close(res.mean, np.nanmean(res.matrices, axis=0))
    obj = res.to_json()
    assert obj["across"] == synth.langs and obj["groups"] == synth.labels and len(obj["mean"]) == 3


def test_polyglot(store, synth):
    x, lang, lab = labelled(synth, "mlp", "mean", 1)
    M = reference_M(reference_z(x, lang), lang, lab, 3, 4)
    res = q.polyglot(store, "mlp", 1, threshold=0.3, sensitive_top=5)
    var = q.variance(store, "mlp", 1, top=5)
    for e, name in enumerate(synth.labels):
        langs = [l for l in range(3) if np.isfinite(M[l, e]).all()]
        above = M[langs, e] > 0.3
        assert res.polyglot[name] == np.flatnonzero(above.all(0)).tolist()
        for j, l in enumerate(langs):
            only = above[j] & (above.sum(0) == 1)
            assert res.monolingual[name][synth.langs[l]] == np.flatnonzero(only).tolist()
        S = {n for n, _ in var.top}
        share = res.shares[name]
        assert share["polyglot"] == pytest.approx(len(S & set(res.polyglot[name])) / 5)
        assert share["polyglot"] + share["monolingual"] + share["other"] == pytest.approx(1)
    obj = res.to_json()
    assert obj["threshold"] == 0.3 and set(obj["monolingual"]["joy"]) == set(synth.langs)


def reference_lape(synth, filter_rate, top_rate):
    acts = synth.acts["mlp"].astype(np.float64)  # [T, layers, D]
    lang = synth.lang[synth.doc_of_token]
    P = np.stack([(acts[lang == k] > 0).mean(0) for k in range(3)])
    with np.errstate(invalid="ignore"):
        p = P / P.sum(0, keepdims=True)
    p[~np.isfinite(p)] = 0
    with np.errstate(divide="ignore"):
        H = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(0)
    flat = np.sort(P.ravel())
    t = flat[int(round(len(flat) * filter_rate)) - 1]
    cand = (P > t).any(0)
    H = np.where(cand, H, np.inf)
    order = sorted(((H[a, b], a, b) for a in range(H.shape[0]) for b in range(H.shape[1]) if np.isfinite(H[a, b])))
    kept = order[: int(round(top_rate * H.size))]
    return {synth.langs[k]: [(a, b) for _, a, b in kept if P[k, a, b] > t] for k in range(3)}


@pytest.mark.parametrize("filter_rate,top_rate", [(0.95, 0.1), (0.5, 0.2), (0.8, 0.5)])
def test_lape(store, synth, filter_rate, top_rate):
    res = q.lape(store, filter_rate=filter_rate, top_rate=top_rate)
    ref = reference_lape(synth, filter_rate, top_rate)
    assert res.neurons == ref
    obj = res.to_json()
    assert set(obj["neurons"]) == set(synth.langs)


@pytest.mark.parametrize("method", ["frequency", "entropy", "magnitude", "contrast"])
def test_selectors(store, synth, method):
    acts = synth.pooled[("resid", "mean")].astype(np.float64)
    keep = synth.label >= 0
    acts, lab, lang = acts[keep], synth.label[keep], synth.lang[keep]
    res = q.select(store, "resid", method=method, top=4, zscore=False)
    P = np.stack([(acts[lab == e] > 0).mean(0) for e in range(4)])  # [E, layers, D]
    for e, name in enumerate(synth.labels):
        if method == "frequency":
            score = P[e]
        elif method == "contrast":
            score = P[e] - np.delete(P, e, axis=0).max(0)
        elif method == "magnitude":
            score = acts[lab == e].mean(0) - acts[lab != e].mean(0)
        else:
            with np.errstate(invalid="ignore"):
                p = P / P.sum(0, keepdims=True)
            p[~np.isfinite(p)] = 0
            H = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(0)
            flat = np.sort(P.ravel())
            t = flat[int(round(len(flat) * 0.95)) - 1]
            score = np.where(P[e] > t, H, np.nan)
        flat_score = score.ravel()
        ok = np.flatnonzero(np.isfinite(flat_score))
        sign = 1 if method == "entropy" else -1
        order = ok[np.lexsort((ok, sign * flat_score[ok]))][:4]
        D = score.shape[1]
        got = res.selected[name]
        assert [(a, b) for a, b, _ in got] == [(int(i // D), int(i % D)) for i in order]
        close([c for _, _, c in got], flat_score[order])
    # magnitude on z-scored rows
    res = q.select(store, "resid", layers=[2], method="magnitude", top=3)
    z = reference_z(acts[:, 2], lang)
    score = z[lab == 1].mean(0) - z[lab != 1].mean(0)
    assert [b for _, b, _ in res.selected["joy"]] == np.argsort(-score, kind="stable")[:3].tolist()
    assert res.to_json()["layer"] == 2


def test_stats_and_group_values(store, synth):
    res = q.stats(store, "mlp", 2, rows="tokens")
    x, lang, lab = labelled(synth, "mlp", "tokens", 2)
    m = (lang == 0) & (lab == 1)
    close(res.mean[0, 1], x[m].mean(0))
    close(res.std[0, 1], x[m].std(0))
    close(res.p_active[0, 1], (x[m] > 0).mean(0))
    assert np.isnan(res.mean[2, 3]).all(), "the empty (fr, fear) group"
    assert res.p10 is not None and len(res.table([0])) == 12
    json.dumps(res.to_json(), allow_nan=False)
    joy = lab == 1
    close(q.group_values(store, "mlp", 2, "label", "joy", "mean", rows="tokens"), x[joy].mean(0))
    close(q.group_values(store, "mlp", 2, "label", "joy", "std", rows="tokens"), x[joy].std(0))
    xa, la, _ = rows_of(synth, "mlp", "tokens", 2)
    close(q.group_values(store, "mlp", 2, "lang", "es", "p_active", rows="tokens"), (xa[la == 1] > 0).mean(0))
    p90 = q.group_values(store, "mlp", 2, "label", "joy", "p90", rows="tokens")
    ref = np.quantile(x[joy], 0.9, axis=0)
    assert np.all(np.abs(np.arcsinh(p90) - np.arcsinh(ref)) <= 0.3)
    with pytest.raises(NeurostoreError, match="group 'love'"):
        q.group_values(store, "mlp", 2, "label", "love")


def test_top_examples(store, synth):
    ex = q.top_examples(store, "resid", 1, 3, k=5)
    x = synth.acts["resid"][:, 1, 3]
    ref = np.lexsort((np.arange(len(x)), -x.astype(np.float64)))[:5]
    assert [e.row for e in ex] == ref.tolist()
    e0 = ex[0]
    assert synth.doc_of_token[e0.row] == e0.doc and e0.text == synth.texts[e0.doc]
    ex = q.top_examples(store, "resid", 1, 3, k=3, rows="mean", lang=["fr"])
    xs = synth.pooled[("resid", "mean")][:, 1, 3]
    fr = np.flatnonzero(synth.lang == 2)
    assert [e.row for e in ex] == fr[np.argsort(-xs[fr], kind="stable")[:3]].tolist()
    with pytest.raises(NeurostoreError, match="--neuron 99"):
        q.top_examples(store, "resid", 1, 99)


def test_neuron_set_from_json(store):
    v = q.variance(store, "resid", 2, top=3).to_json()
    site, sets = q.neuron_set_from_json(json.loads(json.dumps(v)))
    assert site == "resid" and list(sets) == [2] and sets[2] == sorted(n for n, _ in v["top"])
    s = q.select(store, "mlp", [0, 1], top=2).to_json()
    site, sets = q.neuron_set_from_json(s, "joy")
    assert site == "mlp" and sum(len(x) for x in sets.values()) <= 2 and set(sets) <= {0, 1}
    p = q.polyglot(store, "mlp", 1, threshold=0.0).to_json()
    assert q.neuron_set_from_json(p, "joy")[1] == ({1: sorted(p["polyglot"]["joy"])} if p["polyglot"]["joy"] else {})
    lp = q.lape(store, top_rate=0.1).to_json()
    assert q.neuron_set_from_json(lp, "en")[0] == "mlp"
    with pytest.raises(NeurostoreError, match="no neuron set"):
        q.neuron_set_from_json(q.correlate(store, "mlp", 0).to_json())
    with pytest.raises(NeurostoreError, match="'love' is not in the query JSON"):
        q.neuron_set_from_json(s, "love")


def test_cached_answers_equal_fresh(synth, tmp_path, monkeypatch):
    from neurostore import moments as mo

    path = tmp_path / "s.zarr"
    shutil.copytree(synth.path, path, ignore=shutil.ignore_patterns("cache"))  # no entries of the other tests
    seen = []  # from_cache of every grouped pass the analyses ran
    real = mo.group_moments

    def spy(*args, **kwargs):
        mom = real(*args, **kwargs)
        seen.append(mom.from_cache)
        return mom

    monkeypatch.setattr(mo, "group_moments", spy)
    a = q.correlate(neurostore.open(str(path)), "resid", 0, cache=False)
    assert seen == [[False]] and not (path / "cache").exists(), "cache=False neither reads nor writes"
    q.correlate(neurostore.open(str(path)), "resid", 0)  # computes and writes the cache
    b = q.correlate(neurostore.open(str(path)), "resid", 0)
    assert seen == [[False], [False], [True]], seen
    np.testing.assert_array_equal(a.matrices, b.matrices)


def test_layer_errors(store):
    with pytest.raises(NeurostoreError, match=r"--layer 40: site 'resid' has layers 0-2"):
        q.variance(store, "resid", 40)
    assert q.variance(store, "resid", -1).layer == 2
