"""`neurostore intervene`: hooks act exactly where asked, controls, metrics, and a constructed
classifier whose decision hangs on one MLP neuron."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from neurostore import batching
from neurostore import intervene as iv
from neurostore import models as M
from neurostore.corpus import read_corpus
from neurostore.errors import NeurostoreError

CPU = torch.device("cpu")
LABELS = ["neutral", "joy", "love", "anger", "fear", "sadness"]


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, M.LoadedModel]:
    """One tiny random sequence classifier per family, loaded (built lazily, once)."""
    root = tmp_path_factory.mktemp("iv-models")
    cache: dict[str, M.LoadedModel] = {}

    class Lazy(dict):
        def __missing__(self, family: str) -> M.LoadedModel:
            folder = tiny.make_model(family, root / family, classifier=True, labels=LABELS)
            cache[family] = M.load(str(folder), CPU)
            return cache[family]

    return Lazy()


def _batch(loaded: M.LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded sentences of different lengths."""
    texts = tiny.sample_texts()[:3]
    ids, _ = batching.tokenize(loaded.tokenizer, texts, 40)
    rows = [ids[0][:9], ids[1][:5], ids[2][:7]]
    return batching.pad(rows, loaded.pad_id, CPU)


def _site_values(loaded: M.LoadedModel, site: str, layer: int, ids, mask, spec=None) -> torch.Tensor:
    """What the model downstream of the hook sees at (site, layer): the mlp module's output as the
    down-projection receives it, or the input of block ``layer`` for resid. The capture hook is
    registered after the intervention's, so it sees what the intervention returned."""
    seen = {}

    def post(_m, _args, out):
        seen["h"] = out.detach().clone()

    def pre(_m, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    hooks = iv.intervention(loaded, spec) if spec is not None else contextlib.nullcontext(None)
    with hooks as state, torch.inference_mode():
        if site == "mlp":
            handle = M.mlp_modules(loaded)[layer].register_forward_hook(post)
        else:
            handle = loaded.blocks[layer].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            if state is not None:
                state.set_mask(mask)
            loaded.model(input_ids=ids, attention_mask=mask)
        finally:
            handle.remove()
    return seen["h"]


def _expected_where(mask: torch.Tensor, positions: str) -> torch.Tensor:
    real = mask.bool()
    where = torch.zeros_like(real)
    lengths = real.sum(1)
    for b in range(real.shape[0]):
        if positions == "all":
            where[b, : lengths[b]] = True
        elif positions == "first":
            where[b, 0] = True
        else:
            where[b, lengths[b] - 1] = True
    return where


# ----------------------------------------------------------------------------------------------
# hooks: exactly where asked, nowhere else


@pytest.mark.parametrize(
    "family,site,layer",
    [("bert", "mlp", 1), ("bert", "resid", 0), ("bert", "resid", 2), ("gpt2", "mlp", 0), ("llama", "resid", 1),
     ("distilbert", "mlp", 1), ("xlm-roberta", "resid", 1)],
)
@pytest.mark.parametrize("positions", ["all", "first", "last"])
def test_set_writes_exact_values_only_where_asked(classifiers, family, site, layer, positions):
    loaded = classifiers[family]
    ids, mask = _batch(loaded)
    width = M.resolve_sites(loaded, [site], [layer])[site].width
    chosen = [1, 4, width - 1]
    values = np.arange(width, dtype=np.float32) * 0.5 + 3.0
    spec = iv.Intervention(iv.NeuronSet(site, {layer: chosen}), "set", values={layer: values}, positions=positions)
    before = _site_values(loaded, site, layer, ids, mask)
    after = _site_values(loaded, site, layer, ids, mask, spec)

    where = _expected_where(mask, positions)
    touched = torch.zeros(after.shape, dtype=torch.bool)
    touched[..., chosen] = where.unsqueeze(-1).expand(-1, -1, len(chosen))
    expected = torch.as_tensor(values)[None, None, :].expand_as(after)
    assert torch.equal(after[touched], expected[touched])
    assert torch.equal(after[~touched], before[~touched])
    assert torch.equal(after[~mask.bool()], before[~mask.bool()])  # padding untouched


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_ablate_and_gain_values(classifiers, family):
    loaded = classifiers[family]
    ids, mask = _batch(loaded)
    neurons = iv.NeuronSet("mlp", {0: [0, 2, 5]})
    before = _site_values(loaded, "mlp", 0, ids, mask)
    ablated = _site_values(loaded, "mlp", 0, ids, mask, iv.Intervention(neurons, "ablate"))
    gained = _site_values(loaded, "mlp", 0, ids, mask, iv.Intervention(neurons, "gain", alpha=3.0))
    real = mask.bool()
    assert torch.all(ablated[real][:, [0, 2, 5]] == 0)
    assert torch.equal(gained[real][:, [0, 2, 5]], before[real][:, [0, 2, 5]] * 3.0)
    others = [i for i in range(before.shape[-1]) if i not in (0, 2, 5)]
    assert torch.equal(ablated[..., others], before[..., others])
    assert torch.equal(gained[~real], before[~real])


def _eval_set(loaded: M.LoadedModel, tmp_path: Path, n: int = 12) -> iv.EvalSet:
    path = tmp_path / "eval.jsonl"
    lines = tiny.DATA.read_text(encoding="utf-8").splitlines()[:n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return iv.prepare(loaded, read_corpus([path]), max_batch_tokens=128)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_empty_set_and_unit_gain_change_nothing(classifiers, family, tmp_path):
    loaded = classifiers[family]
    data = _eval_set(loaded, tmp_path)
    assert len(data.batches) > 1  # several padded batches
    base = iv.predict(loaded, data)
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.model.modules())
    empty = iv.Intervention(iv.NeuronSet("mlp", {}), "ablate")
    assert np.array_equal(iv.predict(loaded, data, spec=empty), base)
    unit = iv.Intervention(iv.NeuronSet("mlp", {0: [0, 1, 2, 3], 1: [5]}), "gain", alpha=1.0, positions="all")
    assert np.array_equal(iv.predict(loaded, data, spec=unit), base)
    resid = iv.Intervention(iv.NeuronSet("resid", {0: [1], 2: [3, 4]}), "gain", alpha=1.0)
    assert np.array_equal(iv.predict(loaded, data, spec=resid), base)
    ablate = iv.Intervention(iv.NeuronSet("mlp", {0: list(range(10))}), "ablate")
    assert not np.array_equal(iv.predict(loaded, data, spec=ablate), base)
    hooks_after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.model.modules())
    assert hooks_after == hooks_before  # every hook removed


def test_hooks_removed_on_error(classifiers):
    loaded = classifiers["bert"]
    count = lambda: sum(len(m._forward_hooks) for m in loaded.model.modules())  # noqa: E731
    before = count()
    with pytest.raises(RuntimeError, match="without a batch mask"):
        with iv.intervention(loaded, iv.Intervention(iv.NeuronSet("mlp", {0: [1]}))):
            assert count() == before + 1
            ids, mask = _batch(loaded)
            loaded.model(input_ids=ids, attention_mask=mask)  # no set_mask: the hook refuses
    assert count() == before


# ----------------------------------------------------------------------------------------------
# controls


def test_controls_same_sizes_disjoint_and_seeded():
    selected = iv.NeuronSet("mlp", {3: [1, 2, 3, 40], 7: [5], 9: list(range(20))}, "joy")
    a = iv.random_controls(selected, 48, 6, seed=11)
    b = iv.random_controls(selected, 48, 6, seed=11)
    c = iv.random_controls(selected, 48, 6, seed=12)
    assert len(a) == 6
    for control in a:
        assert control.per_layer() == selected.per_layer()
        for layer, ids in control.layers.items():
            assert not set(ids) & set(selected.layers[layer])
            assert len(set(ids)) == len(ids) and all(0 <= i < 48 for i in ids)
    assert [x.layers for x in a] == [x.layers for x in b]
    assert [x.layers for x in a] != [x.layers for x in c]
    assert len({json.dumps(x.layers) for x in a}) > 1  # the controls differ from one another
    with pytest.raises(NeurostoreError, match="too few"):
        iv.random_controls(iv.NeuronSet("mlp", {0: list(range(30))}), 48, 1)


# ----------------------------------------------------------------------------------------------
# neuron sets from query outputs


def test_neuron_sets_from_query_json(tmp_path):
    variance = {"site": "mlp", "layer": 5, "variance": [0.1] * 8, "f": [1.0] * 8, "top": [[3, 0.9], [7, 0.5]]}
    polyglot = {"site": "resid", "layer": 2, "threshold": 0.5, "polyglot": {"joy": [4, 1], "anger": [9]},
                "monolingual": {"joy": {"en": [6], "es": []}}}
    lape = {"site": "mlp", "neurons": {"es": [[0, 5], [1, 7], [0, 2]], "en": [[1, 1]]}}
    select = {"site": "mlp", "selected": {"sadness": [[11, 523, 2.5], [11, 87, 1.0], [10, 4, 0.3]]}}
    assert iv.neuron_set_from_json(variance).layers == {5: [3, 7]}
    assert iv.neuron_set_from_json(polyglot, "joy").layers == {2: [1, 4]}
    assert iv.neuron_set_from_json(polyglot, "joy/en").layers == {2: [6]}
    assert iv.neuron_set_from_json(polyglot).layers == {2: [1, 4, 9]}  # no group: the union
    assert iv.neuron_set_from_json(lape, "es").layers == {0: [2, 5], 1: [7]}
    got = iv.neuron_set_from_json(select)
    assert (got.site, got.layers, got.group, got.per_layer()) == ("mlp", {10: [4], 11: [87, 523]}, "sadness", {10: 1, 11: 2})
    per = {"site": "mlp", "layer": 1, "variance": {}, "f": None, "top": {"en": [[1, 0.2]], "es": [[2, 0.3]]}}
    assert iv.neuron_set_from_json(per, "es").layers == {1: [2]}

    path = tmp_path / "sel.json"
    path.write_text(json.dumps(select))
    assert iv.load_neuron_set(str(path), group="sadness").n == 3
    assert iv.load_neuron_set("11:523, 11:87,2:3", site="resid").layers == {2: [3], 11: [87, 523]}
    with pytest.raises(NeurostoreError, match="--group 'joy' is not in"):
        iv.load_neuron_set(str(path), group="joy")
    with pytest.raises(NeurostoreError, match="does not match site"):
        iv.load_neuron_set(str(path), site="resid")
    with pytest.raises(NeurostoreError, match="needs --site"):
        iv.load_neuron_set("11:523")
    with pytest.raises(NeurostoreError, match="no such file"):
        iv.load_neuron_set("missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(NeurostoreError, match="not a JSON file"):
        iv.load_neuron_set(str(tmp_path / "bad.json"))
    with pytest.raises(NeurostoreError, match="no neuron set"):
        iv.neuron_set_from_json({"site": "mlp", "counts": {}})
    with pytest.raises(NeurostoreError, match="out of range"):
        iv.check_neuron_set(iv.NeuronSet("mlp", {1: [3, 48]}), [0, 1, 2], 48)
    with pytest.raises(NeurostoreError, match="not a layer of site"):
        iv.check_neuron_set(iv.NeuronSet("mlp", {3: [3]}), [0, 1, 2], 48)


# ----------------------------------------------------------------------------------------------
# metrics


def test_metrics_by_hand():
    classes = ["a", "b", "c"]
    gold = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 0, 1])
    logits = np.eye(3)[pred] * 5
    m = iv.metrics(gold, logits, classes, langs=["en", "es", "en", "en", "es", "es"], target="b")
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["per_label"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 2), "c": 0.0}
    # F1: a = 2*2/(4+1+1) = 2/3, b = 2/(2+2+1) = 2/5, c = 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 5 + 0) / 3)
    assert m["per_lang"] == {"en": pytest.approx(2 / 3), "es": pytest.approx(1 / 3)}
    assert m["target_share"] == pytest.approx(3 / 6)


# ----------------------------------------------------------------------------------------------
# a classifier that depends on one neuron, by construction

TRIGGER = "casa"
FILLER = ["and", "can", "con", "das", "del", "der", "die", "ein", "for", "her", "ich", "las", "les", "man",
          "mein", "non", "par", "que", "son", "the", "und"]
D, D_OUT, NEURON, LAYER = 0, 1, 17, 2  # signal dimension, output dimension, the neuron, its layer


def _constructed_texts() -> list[tuple[str, str]]:
    """Sentences with the trigger word are 'sadness', without it 'neutral'."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        words = [str(w) for w in rng.choice(FILLER, size=int(rng.integers(3, 12)))]
        if i % 2 == 0:
            words.insert(int(rng.integers(0, len(words) + 1)), TRIGGER)
        rows.append((" ".join(words), "sadness" if i % 2 == 0 else "neutral"))
    return rows


def _build_dependent_classifier(folder: Path) -> Path:
    """A tiny BERT whose 'sadness' logit is driven by MLP neuron NEURON of layer LAYER.

    The trigger token's embedding alone carries dimension D; attention is uniform (query, key = 0)
    and layer 0's attention copies D, so [CLS] carries the share of trigger tokens. Layers 0-1 add
    nothing else. In layer LAYER the neuron reads D at a threshold calibrated between the two kinds
    of sentences, writes D_OUT, which the pooler reads into pooled[0], which the classifier reads
    into the 'sadness' logit. The other neurons keep their small random weights.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tiny.make_model("bert", folder, classifier=True, labels=LABELS)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    trigger = tok.convert_tokens_to_ids(TRIGGER)
    assert trigger != tok.unk_token_id
    with torch.no_grad():
        emb = model.bert.embeddings
        for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
            table.weight[:, [D, D_OUT]] = 0
        emb.word_embeddings.weight[trigger, D] = 10.0
        for i, layer in enumerate(model.bert.encoder.layer):
            att = layer.attention
            for lin in (att.self.query, att.self.key):
                lin.weight.zero_()
                lin.bias.zero_()
            for lin in (att.self.value, att.output.dense) if i == 0 else (att.output.dense,):
                lin.weight.zero_()
                lin.bias.zero_()
                if i == 0:
                    lin.weight[D, D] = 1.0
            if i < LAYER:
                layer.output.dense.weight.zero_()
                layer.output.dense.bias.zero_()
        last = model.bert.encoder.layer[LAYER]
        last.intermediate.dense.weight[NEURON].zero_()
        last.intermediate.dense.weight[NEURON, D] = 1.0
        last.intermediate.dense.bias[NEURON] = 0.0
        last.output.dense.weight[:, NEURON] = 0.0

        seen = {}
        handle = last.intermediate.dense.register_forward_hook(lambda _m, _a, out: seen.__setitem__("x", out))
        pre = {"sadness": [], "neutral": []}
        for text, label in _constructed_texts():
            model(**tok(text, return_tensors="pt"))
            pre[label].append(float(seen["x"][0, 0, NEURON]))
        handle.remove()
        lo, hi = max(pre["neutral"]), min(pre["sadness"])
        assert hi - lo > 0.1, (lo, hi)
        scale = 40.0 / (hi - lo)
        last.intermediate.dense.weight[NEURON, D] = scale
        last.intermediate.dense.bias[NEURON] = -scale * (lo + hi) / 2
        last.output.dense.weight[D_OUT, NEURON] = 4.0
        model.bert.pooler.dense.weight[0].zero_()
        model.bert.pooler.dense.weight[0, D_OUT] = 1.0
        model.bert.pooler.dense.bias[0] = 0.0
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(-10.0)
        model.classifier.weight[LABELS.index("sadness"), 0] = 10.0
        model.classifier.bias[LABELS.index("sadness")] = -3.0
        model.classifier.bias[LABELS.index("neutral")] = 2.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    with open(folder / "eval.jsonl", "w", encoding="utf-8") as f:
        for i, (text, label) in enumerate(_constructed_texts()):
            f.write(json.dumps({"text": text, "label": label, "lang": "xx" if i % 4 < 2 else "yy"}) + "\n")
    return folder


@pytest.fixture(scope="module")
def dependent(tmp_path_factory) -> Path:
    return _build_dependent_classifier(tmp_path_factory.mktemp("dependent") / "model")


@pytest.mark.parametrize("positions", ["all", "first"])
def test_ablating_the_neuron_the_classifier_needs(dependent, positions):
    loaded = M.load(str(dependent), CPU)
    data = iv.prepare(loaded, read_corpus([dependent / "eval.jsonl"]), max_batch_tokens=64)
    spec = iv.Intervention(iv.NeuronSet("mlp", {LAYER: [NEURON]}, "sadness"), "ablate", positions=positions)
    result = iv.evaluate(loaded, data, spec, controls=4, seed=0, width=48, target="sadness")
    assert result["baseline"]["per_label"] == {"neutral": 1.0, "sadness": 1.0}
    assert result["intervened"]["per_label"] == {"neutral": 1.0, "sadness": 0.0}
    effect = result["intervened"]["effect"]
    assert (effect["self_drop"], effect["cross_drop"], effect["by"]) == (1.0, 0.0, "label")
    assert len(result["controls"]) == 4
    for control in result["controls"]:
        assert control["per_label"] == {"neutral": 1.0, "sadness": 1.0}
        assert control["effect"]["self_drop"] == 0.0
        assert NEURON not in control["neurons"][str(LAYER)]
    assert result["controls_summary"]["effect"]["self_drop"] == {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}


def test_setting_the_neuron_steers_toward_the_target(dependent):
    loaded = M.load(str(dependent), CPU)
    data = iv.prepare(loaded, read_corpus([dependent / "eval.jsonl"]))
    values = {LAYER: np.full(48, 5.0, dtype=np.float32)}
    spec = iv.Intervention(iv.NeuronSet("mlp", {LAYER: [NEURON]}), "set", values=values, positions="first")
    result = iv.evaluate(loaded, data, spec, target="sadness")
    effect = result["intervened"]["effect"]
    assert result["baseline"]["target_share"] == 0.5
    assert result["intervened"]["target_share"] == 1.0
    assert effect["toward_target"] == 0.5 and effect["target_prob_change"] > 0.4
    assert result["intervened"]["per_label"] == {"neutral": 0.0, "sadness": 1.0}


def test_cli_json_table_and_plot(dependent, tmp_path):
    from typer.testing import CliRunner
    import typer

    from cli import intervene as intervene_cli

    app = typer.Typer()
    intervene_cli.register(app)

    @app.callback()
    def _root() -> None:  # keep "intervene" as a subcommand
        pass

    runner = CliRunner()
    select = tmp_path / "sadness.json"
    select.write_text(json.dumps({"site": "mlp", "selected": {"sadness": [[LAYER, NEURON, 9.0]], "joy": [[0, 1, 1.0]]}}))
    plot = tmp_path / "effect.png"
    args = ["intervene", str(dependent / "eval.jsonl"), "--model", str(dependent), "--neurons", str(select),
            "--group", "sadness", "--mode", "ablate", "--controls", "3", "--seed", "1", "--device", "cpu"]
    res = runner.invoke(app, args + ["--format", "json", "--plot", str(plot)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["baseline"]["accuracy"] == 1.0 and out["intervened"]["per_label"]["sadness"] == 0.0
    assert out["neurons"]["site"] == "mlp" and out["neurons"]["n"] == 1 and out["neurons"]["per_layer"] == {str(LAYER): 1}
    assert len(out["controls"]) == 3
    assert all({"accuracy", "macro_f1", "per_label"} <= set(c) for c in out["controls"])
    assert out["intervened"]["per_lang"] == {"xx": 0.5, "yy": 0.5}
    assert plot.stat().st_size > 1000

    again = runner.invoke(app, args + ["--format", "json"])
    assert json.loads(again.stdout)["controls"] == out["controls"]  # --seed makes the controls reproducible

    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "self drop" in table.output and "label sadness" in table.output and "(target)" in table.output

    bad = runner.invoke(app, args[:6] + ["--group", "fear"])
    assert bad.exit_code == 2 and "--group 'fear' is not in" in bad.output
    far = runner.invoke(app, args[:4] + ["--neurons", "2:48", "--site", "mlp", "--device", "cpu"])
    assert far.exit_code == 2 and "out of range" in far.output


def test_user_errors(dependent, tmp_path, tiny_models, classifiers):
    loaded = M.load(str(dependent), CPU)
    assert (iv.pooled_position(loaded), iv.pooled_position(classifiers["gpt2"])) == ("first", "last")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"text": "the casa", "label": "surprise"}) + "\n")
    with pytest.raises(NeurostoreError, match="gold label 'surprise' is not a label of the model.*neutral, joy"):
        iv.prepare(loaded, read_corpus([wrong]))
    bare = M.load(str(tiny_models["bert"]), CPU)
    with pytest.raises(NeurostoreError, match="not a sequence classifier"):
        iv.prepare(bare, read_corpus([dependent / "eval.jsonl"]))
    with pytest.raises(NeurostoreError, match="--mode 'zero'"):
        iv.Intervention(iv.NeuronSet("mlp", {0: [1]}), "zero")
    with pytest.raises(NeurostoreError, match="no statistic"):
        iv.Intervention(iv.NeuronSet("mlp", {0: [1]}), "set")


def test_set_reads_group_statistics_through_the_query_layer(monkeypatch):
    calls = []

    def group_values(store, site, layer, by, group, stat, rows=None):
        calls.append((site, layer, by, group, stat, rows))
        return np.full(8, float(layer), dtype=np.float64)

    monkeypatch.setattr(iv.query, "group_values", group_values)

    class Store:
        meta = {"pool": ["first", "mean"], "tokens": True}

        def categories(self, name):
            return {"label": ["joy", "sadness"], "lang": ["en", "es"], "pred": ["joy"]}[name]

    store = Store()
    got = iv.group_statistic(store, "mlp", [1, 3], "sadness", "p90", rows=iv.stat_rows(store, "all"))
    assert list(got) == [1, 3] and got[3][0] == 3.0
    assert calls[0] == ("mlp", 1, "label", "sadness", "p90", "tokens")
    iv.group_statistic(store, "mlp", [0], "lang:es", "mean", rows=iv.stat_rows(store, "first"))
    assert calls[-1][2:] == ("lang", "es", "mean", "first")
    with pytest.raises(NeurostoreError, match="neither a label"):
        iv.group_statistic(store, "mlp", [0], "fr", "mean")
    with pytest.warns(UserWarning, match="no last rows"):
        assert iv.stat_rows(store, "last") == "tokens"


def test_set_to_a_group_statistic_from_a_real_store(dependent, tmp_path):
    """Extract the constructed model's activations, then write sadness's P90 of the neuron at the
    pooled position: every neutral sentence turns to sadness; random controls move nothing."""
    from typer.testing import CliRunner
    import typer

    import neurostore
    from cli import intervene as intervene_cli
    from neurostore import query
    from neurostore.extract import ExtractOptions, extract

    store = tmp_path / "acts.zarr"
    extract([str(dependent / "eval.jsonl")], str(store), model=str(dependent),
            options=ExtractOptions(sites=["mlp"], pool=["first"], store_dtype="float32", device="cpu"))
    p90 = query.group_values(neurostore.open(str(store)), "mlp", LAYER, "label", "sadness", "p90", rows="first")
    assert p90[NEURON] > 1.0  # the neuron fires on sadness sentences

    app = typer.Typer()
    intervene_cli.register(app)
    app.callback()(lambda: None)
    res = CliRunner().invoke(app, [
        "intervene", str(dependent / "eval.jsonl"), "--model", str(dependent), "--neurons", f"{LAYER}:{NEURON}",
        "--site", "mlp", "--target", "sadness", "--mode", "set", "--stat", "p90", "--of", "sadness",
        "--stats", str(store), "--positions", "first", "--controls", "2", "--device", "cpu", "--format", "json",
    ])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["stat"], out["of"], out["stat_rows"]) == ("p90", "sadness", "first")
    assert out["intervened"]["per_label"] == {"neutral": 0.0, "sadness": 1.0}
    assert out["intervened"]["effect"]["toward_target"] == 0.5
    assert all(c["effect"]["toward_target"] == 0.0 for c in out["controls"])


def test_gain_on_half_precision_stays_finite():
    """A large alpha on a float16 site saturates at float16's largest value instead of inf (then nan)."""
    from neurostore.intervene import BatchState, Intervention, _editor
    from neurostore.neurons import parse_neuron_list

    spec = Intervention(parse_neuron_list("0:1,0:2", "mlp"), mode="gain", alpha=1e4)
    state = BatchState()
    state.set_mask(torch.tensor([[1, 1, 0]]))
    h = torch.tensor([[[1.0, 30.0, -50.0], [2.0, 3.0, 4.0], [5.0, 6.0, 7.0]]], dtype=torch.float16)
    out = _editor(state, spec, 0, torch.device("cpu"))(h)
    assert torch.isfinite(out).all()
    assert out[0, 0, 1] == torch.finfo(torch.float16).max and out[0, 0, 2] == -torch.finfo(torch.float16).max
    assert out[0, 1, 1] == 3e4 and out[0, 1, 0] == 2 and torch.equal(out[0, 2], h[0, 2])  # padding untouched
