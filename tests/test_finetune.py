"""`neurostore finetune`: the mask holds on the effective weights, controls, per-language scores
against a computation by hand, the peft adapter loads, one-line refusals, and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tiny
from cli.main import app
from neurostore import finetune as ft
from neurostore.neurons import NeuronSet, random_controls

SET = {0: [1, 5, 7], 2: [3, 40]}  # bert: 3 layers of 48 neurons
HYPER = dict(epochs=1, batch_size=8, lr=1e-2, seed=3)


def _spread_model(family: str, folder: Path, *, classifier: bool = True) -> Path:
    """A tiny random model with larger initial weights, so its predictions differ between sentences
    (tiny's initializer_range 0.02 predicts one class for everything)."""
    import transformers as T

    tiny.make_model(family, folder, classifier=classifier)
    config = T.AutoConfig.from_pretrained(folder)
    config.initializer_range = 0.5
    torch.manual_seed(0)
    loader = T.AutoModelForSequenceClassification if classifier else T.AutoModelForCausalLM
    loader.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return _spread_model("bert", tmp_path_factory.mktemp("ft") / "bert")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """Every 3rd triple of the sample corpus: 100 sentences, every language and label."""
    return tiny.sample_subset(tmp_path_factory.mktemp("ft-data") / "small.jsonl", every=3)


@pytest.fixture(scope="module")
def trained(bert, small, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft-out") / "run"
    result = ft.run([small], str(bert), NeuronSet("mlp", SET), out, controls=2, train_lang=["en"],
                    hyper=ft.Hyper(**HYPER), device="cpu")
    return result, out


def _merged(base: Path, adapter: str | Path):
    """The base model with the adapter loaded by peft and merged: W + delta."""
    import transformers as T
    from peft import PeftModel

    model = T.AutoModelForSequenceClassification.from_pretrained(base)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()


def _weights(folder: Path):
    import transformers as T

    return T.AutoModelForSequenceClassification.from_pretrained(folder).eval()


def _check_mask(base_model, merged, up: list[str], down: list[str], layers: dict[int, list[int]], blocks: str, head: tuple[str, ...]):
    """Unselected rows of up/gate and columns of down bit-identical, every selected one changed,
    every other weight but the head bit-identical."""
    base = dict(base_model.named_parameters())
    after = dict(merged.named_parameters())
    assert base.keys() == after.keys()
    checked = set()
    for layer, ids in layers.items():
        for rel, axis in [(r, "out") for r in up] + [(r, "in") for r in down]:
            name = f"{blocks}.{layer}.{rel}.weight"
            w0, w1 = base[name], after[name]
            conv = rel.startswith("mlp.c_")  # gpt2 Conv1D stores [in, out]
            dim = (1 if axis == "out" else 0) if conv else (0 if axis == "out" else 1)
            keep = torch.ones(w0.shape[dim], dtype=torch.bool)
            keep[ids] = False
            assert torch.equal(w0.index_select(dim, keep.nonzero().ravel()), w1.index_select(dim, keep.nonzero().ravel())), name
            for j in ids:  # every selected neuron moved
                assert not torch.equal(w0.select(dim, j), w1.select(dim, j)), (name, j)
            checked.add(name)
    for name in base:
        if name in checked or name.split(".")[0] in head:
            continue
        assert torch.equal(base[name], after[name]), name


def test_mask_keeps_unselected_neurons_bit_identical(bert, trained):
    result, out = trained
    base = _weights(bert)
    for run in [result.selected] + result.controls:
        merged = _merged(bert, run.adapter)
        _check_mask(base, merged, ["intermediate.dense"], ["output.dense"], run.neurons, "bert.encoder.layer", ("classifier",))
        assert not torch.equal(base.classifier.weight, merged.classifier.weight)  # the head trained too


@pytest.mark.parametrize(
    "family,up,down,blocks,head",
    [("gpt2", ["mlp.c_fc"], ["mlp.c_proj"], "transformer.h", ("score",)),
     ("llama", ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"], "model.layers", ("score",))],
)
def test_mask_other_families(tmp_path, family, up, down, blocks, head):
    folder = _spread_model(family, tmp_path / family)
    layers = {1: [0, 9, 30]}
    result = ft.run([tiny.sample_subset(tmp_path / "small.jsonl", every=5)], str(folder), NeuronSet("mlp", layers), tmp_path / "out", train_lang=["en"],
                    hyper=ft.Hyper(max_steps=3, batch_size=8, lr=1e-2), device="cpu")
    _check_mask(_weights(folder), _merged(folder, result.selected.adapter), up, down, layers, blocks, head)


def test_attention_lora_is_unmasked_and_mlp_still_masked(bert, small, tmp_path):
    result = ft.run([small], str(bert), NeuronSet("mlp", {1: [2]}), tmp_path / "out", train_lang=["en"],
                    hyper=ft.Hyper(max_steps=2, batch_size=8, lr=1e-2, attention=True), device="cpu")
    base, merged = _weights(bert), _merged(bert, result.selected.adapter)
    w0 = base.bert.encoder.layer[0].attention.self.query.weight
    w1 = merged.bert.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(w0, w1)  # every layer's attention, unmasked
    keep = [j for j in range(48) if j != 2]
    for lay in (0, 2):  # no MLP LoRA outside the set's layers
        assert torch.equal(base.bert.encoder.layer[lay].intermediate.dense.weight, merged.bert.encoder.layer[lay].intermediate.dense.weight)
    assert torch.equal(base.bert.encoder.layer[1].intermediate.dense.weight[keep], merged.bert.encoder.layer[1].intermediate.dense.weight[keep])


def test_controls_same_count_per_layer_disjoint_and_seeded(trained):
    result, _ = trained
    chosen = result.selected.neurons
    assert [c.name for c in result.controls] == ["control-1", "control-2"]
    for control in result.controls:
        assert {k: len(v) for k, v in control.neurons.items()} == {k: len(v) for k, v in chosen.items()}
        for layer, ids in control.neurons.items():
            assert not set(ids) & set(chosen[layer]) and all(0 <= j < 48 for j in ids)
    assert result.controls[0].neurons != result.controls[1].neurons
    expected = random_controls(NeuronSet("mlp", SET), 48, 2, seed=HYPER["seed"])
    assert [c.layers for c in expected] == [c.neurons for c in result.controls]


def _by_hand(gold: list[str], pred: list[str]) -> tuple[float, float]:
    """Accuracy and macro-F1 over the labels present in gold, without numpy."""
    acc = sum(g == p for g, p in zip(gold, pred)) / len(gold)
    f1s = []
    for label in sorted(set(gold)):
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return acc, sum(f1s) / len(f1s)


def _predict_one_by_one(model, folder: Path, data: Path) -> list[str]:
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    out = []
    with torch.no_grad():
        for row in rows:
            enc = tok(row["text"], return_tensors="pt")
            out.append(model.config.id2label[int(model(**enc).logits.argmax(-1))])
    return out


def test_per_language_scores_match_a_computation_by_hand(bert, small, trained):
    result, out = trained
    rows = [json.loads(line) for line in small.read_text(encoding="utf-8").splitlines()]
    for scores, model in ((result.before, _weights(bert)), (result.selected.after, _merged(bert, result.selected.adapter))):
        pred = _predict_one_by_one(model, bert, small)
        assert len(set(pred)) > 1  # a real check: the model tells sentences apart
        for lang in sorted({r["lang"] for r in rows}):
            sel = [i for i, r in enumerate(rows) if r["lang"] == lang]
            acc, f1 = _by_hand([rows[i]["label"] for i in sel], [pred[i] for i in sel])
            assert scores["per_lang"][lang]["accuracy"] == pytest.approx(acc, abs=1e-12)
            assert scores["per_lang"][lang]["macro_f1"] == pytest.approx(f1, abs=1e-12)
            assert scores["per_lang"][lang]["n"] == len(sel)
        acc, f1 = _by_hand([r["label"] for r in rows], pred)
        assert scores["all"]["accuracy"] == pytest.approx(acc, abs=1e-12)
        assert scores["all"]["macro_f1"] == pytest.approx(f1, abs=1e-12)
    change = result.selected.change["per_lang"]["es"]["accuracy"]
    assert change == pytest.approx(result.selected.after["per_lang"]["es"]["accuracy"] - result.before["per_lang"]["es"]["accuracy"])
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["provenance"]["analysis"] == "finetune" and saved["provenance"]["seeds"]["controls"] == HYPER["seed"]
    assert saved["provenance"]["train"]["langs"] == ["en"] and saved["n_train"] == sum(r["lang"] == "en" for r in rows)
    assert saved["controls_summary"]["per_lang"]["es"]["accuracy"]["mean"] == pytest.approx(
        np.mean([c.change["per_lang"]["es"]["accuracy"] for c in result.controls]))


def test_language_model_loss_and_perplexity(tmp_path):
    import transformers as T

    folder = tiny.make_model("gpt2", tmp_path / "gpt2")
    data = tiny.sample_subset(tmp_path / "small.jsonl", every=5)
    result = ft.run([data], str(folder), "1:3,1:4", tmp_path / "out", task="lm",
                    hyper=ft.Hyper(max_steps=2, batch_size=8, lr=1e-2), device="cpu")
    model = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = T.AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if '"lang": "fr"' in line]
    total = count = 0.0
    with torch.no_grad():
        for row in rows:
            ids = tok(row["text"], return_tensors="pt")["input_ids"]
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    fr = result.before["per_lang"]["fr"]
    assert fr["loss"] == pytest.approx(total / count, rel=1e-5)
    assert fr["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.selected.after["all"]["loss"] != result.before["all"]["loss"]


def test_resume_continues_from_the_last_checkpoint(bert, tmp_path):
    hyper = dict(max_steps=6, batch_size=8, lr=1e-2, save_every=2)
    neurons = NeuronSet("mlp", {1: [4, 8]})
    data = [tiny.sample_subset(tmp_path / "small.jsonl", every=10)]  # 30 sentences: four runs stay quick

    def stop_at(n):
        def step(name, step, loss):
            if step == n:
                raise KeyboardInterrupt

        return ft.Progress(step=step)

    with pytest.raises(KeyboardInterrupt):
        ft.run(data, str(bert), neurons, tmp_path / "cut", hyper=ft.Hyper(**hyper), device="cpu", progress=stop_at(3))
    assert (tmp_path / "cut" / ft.CHECKPOINTS / "selected.pt").exists()
    with pytest.raises(ft.NeurostoreError, match="--resume"):
        ft.run(data, str(bert), neurons, tmp_path / "cut", hyper=ft.Hyper(**hyper), device="cpu")
    resumed = ft.run(data, str(bert), neurons, tmp_path / "cut", hyper=ft.Hyper(**hyper), device="cpu", resume=True)
    whole = ft.run(data, str(bert), neurons, tmp_path / "whole", hyper=ft.Hyper(**hyper), device="cpu")
    assert resumed.selected.resumed_from == 2 and whole.selected.resumed_from is None
    assert resumed.selected.steps == whole.selected.steps == 6
    assert not (tmp_path / "cut" / ft.CHECKPOINTS).exists()
    from safetensors.torch import load_file

    a = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    b = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.selected.after == whole.selected.after
    # a finished run is kept, not trained again
    again = ft.run(data, str(bert), neurons, tmp_path / "cut", hyper=ft.Hyper(**hyper), device="cpu", resume=True)
    assert again.selected.seconds == resumed.selected.seconds


runner = CliRunner()


def _one_line_error(args: list[str], message: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_bad_neuron_sets_are_one_line(bert, tmp_path):
    common = ["finetune", str(tiny.DATA), "--model", str(bert), "--out", str(tmp_path / "o"), "--device", "cpu"]
    _one_line_error(common + ["--neurons", "7:1"], "layer 7 is not a layer")
    _one_line_error(common + ["--neurons", "1:48"], "neuron 48 of layer 1 is out of range")
    resid = tmp_path / "resid.json"
    resid.write_text(json.dumps({"site": "resid", "layer": 1, "top": [[3, 1.0]]}))
    _one_line_error(common + ["--neurons", str(resid)], "finetune masks MLP neurons")
    lape = tmp_path / "lape.json"
    lape.write_text(json.dumps({"site": "mlp", "neurons": {"en": [[0, 1]], "es": [[1, 2]]}}))
    _one_line_error(common + ["--neurons", str(lape), "--group", "de"], "--group 'de'")
    _one_line_error(common + ["--neurons", "1:2", "--train-lang", "xx"], "--train-lang xx")


def test_cli_json_from_a_lape_output(bert, small, tmp_path):
    lape = tmp_path / "lape.json"
    lape.write_text(json.dumps({"site": "mlp", "neurons": {"en": [[0, 1], [0, 2]], "es": [[1, 2]]}}))
    res = runner.invoke(app, ["finetune", str(small), "--model", str(bert), "--neurons", str(lape), "--group", "es",
                              "--out", str(tmp_path / "o"), "--controls", "1", "--max-steps", "2", "--batch-size", "8",
                              "--train-lang", "en", "--device", "cpu", "--format", "json"])
    assert res.exit_code == 0, (res.stderr, res.exception)
    data = json.loads(res.stdout)
    assert data["neurons"]["layers"] == {"1": [2]} and data["neurons"]["group"] == "es"
    assert data["selected"]["steps"] == 2 and len(data["controls"]) == 1
    assert data["provenance"]["parameters"]["mlp_targets"] == ["bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense"]
    assert (tmp_path / "o" / "adapter_config.json").exists() and (tmp_path / "o" / "controls" / "control-1" / "adapter_config.json").exists()
