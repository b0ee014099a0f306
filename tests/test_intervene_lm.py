"""`neurostore intervene` on causal LMs: per-group next-token loss against transformers' own loss
with a hand-written hook, CRANE's selectivity, controls, neuron sets across models, the CLI."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from neurostore import intervene as iv
from neurostore import models as M
from neurostore.corpus import read_corpus
from neurostore.errors import NeurostoreError

CPU = torch.device("cpu")
N_SENTENCES = 18  # in en, es, fr, de, it


def make_lm(family: str, folder: Path, seed: int = 0, **config: int) -> Path:
    """A tiny random causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM``) with its tokenizer;
    ``config`` overrides sizes (another width or depth for the mismatch tests)."""
    import transformers as T

    torch.manual_seed(seed)
    tokenizer = tiny._tokenizer(family)
    cfg = tiny._config(family, len(tokenizer), False, 2)
    for key, value in config.items():
        setattr(cfg, key, value)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lms")
    out = {f: make_lm(f, root / f) for f in ("gpt2", "llama")}
    out["gpt2-chat"] = make_lm("gpt2", root / "gpt2-chat", seed=1)  # same architecture, other weights
    out["gpt2-wide"] = make_lm("gpt2", root / "gpt2-wide", n_inner=160)
    return out


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lm-corpus") / "eval.jsonl"
    lines = tiny.DATA.read_text(encoding="utf-8").splitlines()[:N_SENTENCES]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@functools.lru_cache(maxsize=None)
def _hf(folder: Path):
    import transformers as T

    return T.AutoModelForCausalLM.from_pretrained(folder).eval(), T.AutoTokenizer.from_pretrained(folder)


def _reference(folder: Path, corpus: Path, site: str, layer: int, neurons: list[int], edit) -> dict:
    """Per-language mean next-token loss from transformers' own ``loss`` (one unpadded sentence at
    a time) with a hand-written forward hook that applies ``edit`` to the chosen neurons."""
    model, tok = _hf(folder)
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    if site == "mlp":
        module = blocks[layer].mlp.act if hasattr(blocks[layer].mlp, "act") else blocks[layer].mlp.act_fn
    else:
        module = blocks[layer - 1]

    def hook(_m, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[..., neurons] = edit(h[..., neurons])
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    handle = module.register_forward_hook(hook) if edit is not None else None
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    try:
        for line in corpus.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            ids = torch.tensor([tok(row["text"])["input_ids"]])
            with torch.no_grad():
                loss = float(model(input_ids=ids, labels=ids).loss)
            n = ids.shape[1] - 1
            sums[row["lang"]] = sums.get(row["lang"], 0.0) + loss * n
            counts[row["lang"]] = counts.get(row["lang"], 0) + n
    finally:
        if handle is not None:
            handle.remove()
    return {lang: sums[lang] / counts[lang] for lang in sums}


CASES = [
    ("gpt2", "mlp", 1, "ablate", lambda h: torch.zeros_like(h)),
    ("gpt2", "mlp", 0, "gain", lambda h: h * 3.0),
    ("gpt2", "resid", 2, "set", lambda h: torch.full_like(h, 0.5)),
    ("llama", "mlp", 0, "ablate", lambda h: torch.zeros_like(h)),
    ("llama", "mlp", 1, "gain", lambda h: h * -2.0),
]


@pytest.mark.parametrize("family,site,layer,mode,edit", CASES, ids=[f"{c[0]}-{c[1]}{c[2]}-{c[3]}" for c in CASES])
def test_group_losses_match_transformers_loss_with_a_manual_hook(lms, corpus_file, family, site, layer, mode, edit):
    neurons = [0, 3, 7, 11]
    loaded = M.load_causal_lm(str(lms[family]), CPU)
    data = iv.prepare_lm(loaded, read_corpus([corpus_file]), max_batch_tokens=96)
    assert len(data.batches) > 1 and any(len(b) > 1 for b in data.batches)  # padded batches
    width = 32 if site == "resid" else None
    values = {layer: np.full(width or 64, 0.5, np.float32)} if mode == "set" else None
    spec = iv.Intervention(iv.NeuronSet(site, {layer: neurons}), mode, alpha=3.0 if family == "gpt2" else -2.0, values=values)
    result = iv.evaluate_lm(loaded, data, spec, target="es")

    base = _reference(lms[family], corpus_file, site, layer, neurons, None)
    after = _reference(lms[family], corpus_file, site, layer, neurons, edit)
    assert set(base) == set(result["baseline"]["per_lang"]) and len(base) >= 3
    for lang in base:
        assert result["baseline"]["per_lang"][lang]["loss"] == pytest.approx(base[lang], rel=1e-5)
        assert result["intervened"]["per_lang"][lang]["loss"] == pytest.approx(after[lang], rel=1e-5)
        assert result["intervened"]["per_lang"][lang]["perplexity"] == pytest.approx(math.exp(after[lang]), rel=1e-5)
    degr = {lang: after[lang] - base[lang] for lang in base}
    eff = result["intervened"]["effect"]
    assert eff["by"] == "lang" and eff["self_degradation"] == pytest.approx(degr["es"], rel=1e-4, abs=2e-6)
    cross = float(np.mean([d for lang, d in degr.items() if lang != "es"]))
    assert eff["cross_degradation"] == pytest.approx(cross, rel=1e-4, abs=2e-6)
    if abs(cross) > 1e-4:  # a ratio of near-zero float32 differences says nothing
        assert eff["selectivity"] == (pytest.approx(degr["es"] / cross, rel=1e-2) if cross > 0 else None)
    assert result["task"] == "lm" and result["n_unscored"] == 0


def test_effect_and_selectivity_by_hand():
    def entry(en: float, es: float, fr: float) -> dict:
        return {"loss": (en + es + fr) / 3, "perplexity": math.exp((en + es + fr) / 3),
                "per_lang": {g: {"loss": v, "perplexity": math.exp(v), "tokens": 10} for g, v in (("en", en), ("es", es), ("fr", fr))}}

    base, after = entry(2.0, 2.0, 3.0), entry(2.1, 3.0, 3.3)
    eff = iv.lm_effect(base, after, "es")
    assert eff["self_degradation"] == pytest.approx(1.0)
    assert eff["cross_degradation"] == pytest.approx(0.2)  # mean of 0.1 and 0.3
    assert eff["selectivity"] == pytest.approx(5.0)
    assert eff["per_lang"]["fr"] == pytest.approx(0.3)
    assert iv.lm_effect(base, entry(1.9, 3.0, 2.9), "es")["selectivity"] is None  # the others improve
    assert iv.lm_effect(base, after, None)["self_degradation"] is None
    # pooled over tokens, not over sentences
    m = iv.lm_metrics(np.array([3.0, 1.0]), np.array([3, 1]), ["en", "en"], [None, None])
    assert m["per_lang"]["en"] == {"loss": 1.0, "perplexity": math.e, "tokens": 4} and "per_label" not in m


def test_controls_and_empty_set(lms, corpus_file):
    loaded = M.load_causal_lm(str(lms["gpt2"]), CPU)
    data = iv.prepare_lm(loaded, read_corpus([corpus_file]))
    neurons = iv.NeuronSet("mlp", {0: [1, 2, 3], 1: [5]})
    out = iv.evaluate_lm(loaded, data, iv.Intervention(neurons, "ablate"), controls=3, seed=4, width=128, target="en")
    assert len(out["controls"]) == 3
    for c in out["controls"]:
        assert {k: len(v) for k, v in c["neurons"].items()} == {"0": 3, "1": 1}
        assert not set(c["neurons"]["0"]) & {1, 2, 3}
    summary = out["controls_summary"]
    losses = [c["per_lang"]["fr"]["loss"] for c in out["controls"]]
    assert summary["per_lang"]["fr"]["loss"]["mean"] == pytest.approx(np.mean(losses))
    assert summary["effect"]["self_degradation"]["std"] == pytest.approx(
        np.std([c["effect"]["self_degradation"] for c in out["controls"]], ddof=1))
    empty = iv.evaluate_lm(loaded, data, iv.Intervention(iv.NeuronSet("mlp", {}), "ablate"))
    assert empty["intervened"]["per_lang"] == empty["baseline"]["per_lang"]


def _select_json(lm: Path, corpus: Path, tmp: Path) -> Path:
    from neurostore.extract import ExtractOptions, extract
    import neurostore
    from neurostore import query

    store = tmp / "acts.zarr"
    extract([str(corpus)], str(store), model=str(lm), options=ExtractOptions(sites=["mlp"], store_dtype="float32", device="cpu"))
    res = query.select(neurostore.open(str(store)), "mlp", by="lang", method="contrast", top=5)
    path = tmp / "select.json"
    path.write_text(json.dumps(res.to_json()), encoding="utf-8")
    return path


def test_neuron_sets_move_between_models_of_the_same_widths_only(lms, corpus_file, tmp_path):
    select = _select_json(lms["gpt2"], corpus_file, tmp_path)
    out = iv.run([corpus_file], str(lms["gpt2-chat"]), str(select), group="es", controls=1, device="cpu")
    assert out["neurons_from"]["model"] == str(lms["gpt2"]) and out["neurons_from"]["width"] == 128
    assert out["target"] == "es" and out["intervened"]["effect"]["by"] == "lang"
    with pytest.raises(NeurostoreError, match=r"128 wide.*160 wide.*same architecture and widths"):
        iv.run([corpus_file], str(lms["gpt2-wide"]), str(select), group="es", device="cpu")
    with pytest.raises(NeurostoreError, match="found on .*gpt2, 2 layers.*llama, 2 layers"):
        iv.run([corpus_file], str(lms["llama"]), str(select), group="es", device="cpu")


def _cli():
    import typer
    from typer.testing import CliRunner

    from cli import intervene as intervene_cli

    app = typer.Typer()
    intervene_cli.register(app)
    app.callback()(lambda: None)
    return app, CliRunner()


def test_cli_table_json_csv_and_refusals(lms, corpus_file):
    app, runner = _cli()
    args = ["intervene", str(corpus_file), "--model", str(lms["gpt2"]), "--neurons", "1:3,1:9,0:4", "--site", "mlp",
            "--target", "fr", "--controls", "2", "--device", "cpu"]
    res = runner.invoke(app, args + ["--format", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["task"] == "lm" and {"en", "es", "fr"} <= set(out["baseline"]["per_lang"])
    assert out["baseline"]["per_label"] and out["intervened"]["effect"]["by"] == "lang"
    assert "selectivity" in out["intervened"]["effect"] and len(out["controls"]) == 2

    args[-3] = "1"  # one control is enough for the renderings
    table = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    for words in ("perplexity", "lang fr (target)", "selectivity", "controls"):
        assert words in table.output
    csv = runner.invoke(app, args + ["--format", "csv"])
    assert csv.exit_code == 0 and csv.stdout.splitlines()[0].startswith("metric,group,tokens,baseline")

    for extra, words in (
        (["--positions", "last"], "--positions last"),
        (["--target", "xx"], "--target 'xx' is neither a language"),
        (["--plot", "x.png"], "--plot"),
    ):
        bad = runner.invoke(app, args + extra)
        assert bad.exit_code == 2, bad.output
        lines = [line for line in bad.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in bad.output


def test_a_bare_decoder_is_refused(corpus_file, tmp_path):
    bare = tiny.make_model("gpt2", tmp_path / "bare")  # GPT2Model: no language-model head
    with pytest.raises(NeurostoreError, match="neither a sequence classifier nor a causal LM"):
        iv.run([corpus_file], str(bare), "0:1", site="mlp", device="cpu")
