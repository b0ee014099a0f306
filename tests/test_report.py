"""`neurostore report`: the page's numbers and examples against numpy on the stored arrays (one store,
a collection, a stats-only store, audio rows), one-line CLI errors, and the page in a real browser
(headless Chromium: the index table, sorting, shaded tokens; a screenshot kept in the test's tmp)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import neurostore
import tiny
from cli.main import app
from neurostore import report as rp
from neurostore.extract import ExtractOptions, extract
from neurostore.neurons import NeuronSet
from synth import make_store

runner = CliRunner()
SET = NeuronSet("resid", {1: [0, 3, 5], 2: [4, 7]})


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("report") / "s.zarr"), n_docs=60, seed=3)


def page(store, neurons=SET, **options):
    return rp.build(store, neurons, **options).data


# ----------------------------------------------------------------------------------------------
# numpy references on the synthetic store's arrays


def ref_examples(acts, doc_of, layer_index, neuron, k, keep=None):
    """Top-k sentences by their highest kept token: [(doc, value, position of the max)]."""
    x = acts[:, layer_index, neuron].astype(np.float64)
    keep = np.ones(len(x), bool) if keep is None else keep
    best = {}
    for row in np.flatnonzero(keep):
        d = int(doc_of[row])
        if d not in best or x[row] > best[d][0]:
            best[d] = (x[row], row)
    order = sorted(best, key=lambda d: (-best[d][0], d))[:k]
    first = {int(d): int(np.flatnonzero(doc_of == d)[0]) for d in order}
    return [(d, best[d][0], best[d][1] - first[d]) for d in order]


def ref_stats(x, lang, label, n_langs, n_labels):
    """Mean z within language per (lang, label), mean z per label, z per language against all rows,
    P(x > 0): over the rows with a label (as the grouped statistics count them)."""
    keep = label >= 0
    x, lang, label = x[keep].astype(np.float64), lang[keep], label[keep]
    z = np.zeros_like(x)
    for li in range(n_langs):
        m = lang == li
        if m.any() and x[m].std() > 0:
            z[m] = (x[m] - x[m].mean()) / x[m].std()
    heat = np.full((n_langs, n_labels), np.nan)
    for li in range(n_langs):
        for g in range(n_labels):
            m = (lang == li) & (label == g)
            if m.any():
                heat[li, g] = z[m].mean()
    z_label = np.array([z[label == g].mean() if (label == g).any() else np.nan for g in range(n_labels)])
    z_lang = np.array([(x[lang == li].mean() - x.mean()) / x.std() if (lang == li).any() else np.nan for li in range(n_langs)])
    return heat, z_label, z_lang, (x > 0).mean()


def check_page(data, acts, pooled, doc_of, lang, label, k, kinds_keep=None):
    for e in data["neurons"]:
        li = [0, 1, 2].index(e["layer"])
        want = ref_examples(acts, doc_of, li, e["neuron"], k, kinds_keep)
        got = [(x["doc"], x["value"], x["max"]) for x in e["examples"]]
        assert [g[0] for g in got] == [w[0] for w in want], (e["layer"], e["neuron"])
        np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-3)
        assert [g[2] for g in got] == [w[2] for w in want]
        for x in e["examples"]:  # every token of the sentence, shaded by its own value
            np.testing.assert_allclose(x["values"], acts[doc_of == x["doc"], li, e["neuron"]], rtol=1e-3, atol=1e-6)
        heat, z_label, z_lang, p = ref_stats(pooled[:, li, e["neuron"]], lang, label, len(data["langs"]), len(data["groups"]))
        np.testing.assert_allclose(np.array(e["heat"], float), heat, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(np.array(e["z_label"], float), z_label, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(np.array(e["z_lang"], float), z_lang, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(e["p_active"], p, rtol=1e-3)
        assert sum(sum(c) for c in e["dist"]["counts"]) == int((label >= 0).sum())  # the sketch counts every grouped row


def test_numbers_and_examples_equal_numpy(synth):
    s = synth
    data = page(neurostore.open(s.path), k=4)
    assert [(e["layer"], e["neuron"]) for e in data["neurons"]] == [(1, 0), (1, 3), (1, 5), (2, 4), (2, 7)]
    check_page(data, s.acts["resid"], s.pooled[("resid", "mean")], s.doc_of_token, s.lang, s.label, 4)
    assert data["shaded"] and data["provenance"]["analysis"] == "report"
    assert data["provenance"]["parameters"]["neurons"]["n"] == 5
    assert all(data["docs"][str(x["doc"])]["text"] == s.texts[x["doc"]] for e in data["neurons"] for x in e["examples"])


def test_token_kinds_filter_the_examples(synth):
    s = synth
    data = page(neurostore.open(s.path), k=5, token_kind=["text"])
    check_page(data, s.acts["resid"], s.pooled[("resid", "mean")], s.doc_of_token, s.lang, s.label, 5, s.kind == 0)
    tokens = data["docs"][str(data["neurons"][0]["examples"][0]["doc"])]["toks"]
    assert tokens[0][2] == "special" and tokens[0][3] == "[CLS]"  # no offsets stored: specials by name, text tokens by id


def test_collection_reads_as_one(synth, tmp_path):
    other = make_store(str(tmp_path / "b.zarr"), n_docs=40, seed=8, fingerprint="synth-b")
    data = page(neurostore.open([synth.path, other.path]), k=6)
    cat = lambda a, b: np.concatenate([a, b])  # noqa: E731
    check_page(data, cat(synth.acts["resid"], other.acts["resid"]), cat(synth.pooled[("resid", "mean")], other.pooled[("resid", "mean")]),
               cat(synth.doc_of_token, other.doc_of_token + 60), cat(synth.lang, other.lang), cat(synth.label, other.label), 6)
    assert any(x["doc"] >= 60 for e in data["neurons"] for x in e["examples"])


def test_audio_rows_are_frames_not_text(tmp_path):
    s = make_store(str(tmp_path / "audio.zarr"), n_docs=20, seed=4)
    kind = zarr.open_group(s.path, mode="r+")["tokens/kind"]
    codes = np.asarray(kind[:])
    codes[: s.n_tokens[:5].sum()] = 2  # the first five sentences are speech: audio frames
    kind[:] = codes
    data = page(neurostore.open(s.path), NeuronSet("resid", {2: list(range(8))}), k=20)
    toks = data["docs"]["0"]["toks"]
    assert [t[3] for t in toks] == [f"audio frame {i}" for i in range(len(toks))] and all(t[2] == "audio" for t in toks)
    rp.render(data)  # renders


# ----------------------------------------------------------------------------------------------
# a real extraction: stats-only against full, the CLI, the browser


@pytest.fixture(scope="module")
def extracted(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report-extract")
    rows = tiny.DATA.read_text(encoding="utf-8").splitlines()[:60]
    corpus = folder / "c.jsonl"
    corpus.write_text("\n".join(rows) + "\n", encoding="utf-8")
    common = dict(sites=["resid", "mlp"], pool=["mean"], max_batch_tokens=256, buffer_mb=1, device="cpu")
    for name, stats_only in (("full", False), ("stats", True)):
        extract([str(corpus)], str(folder / f"{name}.zarr"), model=str(tiny_models["bert"]), options=ExtractOptions(**common, stats_only=stats_only))
    return folder


def test_stats_only_store_marks_the_max_token_without_shading(extracted):
    neurons = NeuronSet("mlp", {0: [3, 9], 1: [40]})
    full = page(neurostore.open(str(extracted / "full.zarr")), neurons, k=5)
    stats = page(neurostore.open(str(extracted / "stats.zarr")), neurons, k=5)
    assert not stats["shaded"] and any("without per-token shading" in n for n in stats["notes"])
    for a, b in zip(full["neurons"], stats["neurons"]):
        n = len(b["examples"])  # all k, or fewer when the kept top rows fall in fewer sentences (and the page says so)
        assert n == len(a["examples"]) or any("fewer than 5 sentences" in note for note in stats["notes"])
        assert [(x["doc"], x["max"]) for x in a["examples"][:n]] == [(x["doc"], x["max"]) for x in b["examples"]]
        np.testing.assert_allclose([x["value"] for x in a["examples"][:n]], [x["value"] for x in b["examples"]], rtol=1e-3)
        assert all("values" not in x for x in b["examples"])
        for key in ("heat", "z_label", "z_lang", "p_active"):
            np.testing.assert_allclose(np.array(a[key], float), np.array(b[key], float), rtol=1e-3, atol=1e-6)
    doc = full["docs"][str(full["neurons"][0]["examples"][0]["doc"])]
    assert any(t[0] >= 0 and doc["text"][t[0]:t[1]].strip() for t in doc["toks"])  # token text from the stored offsets


def one_line(args, message, code=2):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_cli_writes_the_page_and_refuses_in_one_line(synth, tmp_path):
    out = tmp_path / "r.html"
    res = runner.invoke(app, ["report", synth.path, "--neurons", "1:3,2:5", "--site", "resid", "--out", str(out), "--format", "json"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    summary = json.loads(res.stdout)
    assert summary["neurons"] == 2 and summary["provenance"]["analysis"] == "report" and out.stat().st_size == summary["bytes"]
    text = out.read_text(encoding="utf-8")
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|url\(", text)  # nothing loaded from anywhere
    one_line(["report", synth.path, "--neurons", "1:3", "--site", "resid", "--out", tmp_path / "r.pdf"], "one HTML file")
    one_line(["report", synth.path, "--neurons", "1:99", "--site", "resid", "--out", out], "out of range")
    one_line(["report", synth.path, "--neurons", "1:3", "--out", out], "needs --site")
    one_line(["report", synth.path, "--neurons", "1:3", "--site", "resid", "--out", out, "--quantity", "relevance"], "no relevance")
    one_line(["report", synth.path, "--neurons", "1:3", "--site", "resid", "--out", out, "--lang", "xx"], "no value 'xx'")
    one_line(["report", synth.path, "--neurons", "1:3", "--site", "resid", "--out", out, "--by", "lang"], "shows languages already")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browse(url: str, *flags: str) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000", *flags, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_in_a_real_browser(extracted, tmp_path):
    store = neurostore.open(str(extracted / "full.zarr"))
    neurons = NeuronSet("resid", {0: [1, 2, 3], 2: [5, 8, 13, 21]})
    out = tmp_path / "report.html"
    rep = rp.report(store, neurons, out, k=5)
    url = out.as_uri()

    def order(dom: str) -> list[str]:
        return re.findall(r'<tr class="nrow" data-id="(n-\d+-\d+)"', dom)

    dom = browse(url, "--dump-dom")
    assert 'data-ready="1"' in dom
    assert sorted(order(dom)) == sorted(f"n-{e['layer']}-{e['neuron']}" for e in rep.data["neurons"]) and len(order(dom)) == 7
    by_p = sorted(rep.data["neurons"], key=lambda e: -e["p_active"])
    sorted_dom = browse(url + "#sort=p_active&dir=desc", "--dump-dom")
    assert order(sorted_dom) == [f"n-{e['layer']}-{e['neuron']}" for e in by_p] != order(dom)
    p = {f"n-{e['layer']}-{e['neuron']}": e["p_active"] for e in rep.data["neurons"]}
    rising = [p[i] for i in order(browse(url + "#sort=p_active&dir=asc", "--dump-dom"))]
    assert rising == sorted(rising) and rising != [p[i] for i in order(sorted_dom)]
    shaded = re.findall(r'<span class="tok( max)?" style="background:rgba\(', dom)
    assert len(shaded) > 20 and any(m for m in shaded)  # shaded tokens, the highest one outlined
    shot = tmp_path / "neuron.png"
    browse(url + "#show=0:1", "--window-size=1100,900", f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000


def test_damaged_chunk_is_one_line_fault(tmp_path):
    s = make_store(str(tmp_path / "d.zarr"), n_docs=20, seed=6)
    shards = sorted(p for p in (tmp_path / "d.zarr" / "acts" / "resid").rglob("*") if p.is_file() and p.name != "zarr.json")
    for shard in shards:  # flipped bits in every chunk (the index at the end kept): checksums no longer match
        raw = bytearray(shard.read_bytes())
        for i in range(0, len(raw) // 2, 64):
            raw[i] ^= 0xFF
        shard.write_bytes(bytes(raw))
    one_line(["report", s.path, "--neurons", "1:3", "--site", "resid", "--out", tmp_path / "r.html"], "damaged", code=1)
    assert not (tmp_path / "r.html").exists()
