"""Stored activations against the model's own outputs, on fresh random models of every family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import neurostore
from neurostore import models
from neurostore.extract import ExtractOptions, extract

import tiny

FAMILIES = ["bert", "xlm-roberta", "gpt2", "llama", "distilbert"]


def write_corpus(path: Path, n: int, seed: int = 0) -> Path:
    """A random slice of the sample corpus, so lengths vary and batches mix them."""
    rows = [json.loads(line) for line in tiny.DATA.read_text(encoding="utf-8").splitlines()]
    rng = np.random.default_rng(seed)
    picked = [rows[i] for i in rng.choice(len(rows), size=n, replace=False)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in picked) + "\n", encoding="utf-8")
    return path


def reference(model_path: Path, texts: list[str], max_length: int = 512) -> dict:
    """Per sentence, one at a time (no padding at all): hidden states, MLP outputs from weights, logits."""
    loaded = models.load(str(model_path), torch.device("cpu"))
    model = loaded.model
    mlp_inputs: list[torch.Tensor] = []
    linears = _mlp_linears(loaded)
    handles = [module.register_forward_pre_hook(lambda _m, args: mlp_inputs.append(args[0])) for module, *_ in linears]
    out = {"resid": [], "mlp": [], "logits": [], "ids": []}
    try:
        with torch.inference_mode():
            for text in texts:
                enc = loaded.tokenizer(text, truncation=True, max_length=min(max_length, loaded.max_length()), return_tensors="pt")
                mlp_inputs.clear()
                res = model(**enc, output_hidden_states=True)
                out["ids"].append(enc["input_ids"][0].numpy())
                out["resid"].append(torch.stack(res.hidden_states, dim=2)[0].numpy())  # [T, L+1, D]
                # hand-computed MLP neurons: activation(x @ W.T + b) from the block's own weights
                mlp = [act(torch.nn.functional.linear(x, w, b)) for x, (_, w, b, act) in zip(mlp_inputs, linears)]
                out["mlp"].append(torch.stack(mlp, dim=2)[0].numpy())
                if loaded.classes is not None:
                    out["logits"].append(res.logits[0].numpy())
    finally:
        for h in handles:
            h.remove()
    return out


def _mlp_linears(loaded: models.LoadedModel) -> list[tuple]:
    """Per block: (module whose input feeds the MLP, weight [out, in], bias, activation function)."""
    import transformers.activations as A

    config = loaded.config
    out = []
    for block in loaded.blocks:
        if loaded.model_type in ("bert", "xlm-roberta"):
            lin = block.intermediate.dense
            out.append((lin, lin.weight, lin.bias, A.ACT2FN[config.hidden_act]))
        elif loaded.model_type == "distilbert":
            lin = block.ffn.lin1
            out.append((lin, lin.weight, lin.bias, A.ACT2FN[config.activation]))
        elif loaded.model_type == "gpt2":
            conv = block.mlp.c_fc  # Conv1D: weight is [in, out]
            out.append((conv, conv.weight.T, conv.bias, A.ACT2FN[config.activation_function]))
        elif loaded.model_type == "llama":
            lin = block.mlp.gate_proj
            out.append((lin, lin.weight, None, A.ACT2FN[config.hidden_act]))
    return out


def stored(path: Path) -> neurostore.Store:
    return neurostore.open(str(path))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_mlp_pooled_match_model(family, tiny_models, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 24, seed=1)
    out = tmp_path / "s.zarr"
    opts = ExtractOptions(sites=["resid", "mlp"], pool=["first", "mean", "last"], store_dtype="float32", max_batch_tokens=64, device="cpu")
    result = extract([str(corpus)], str(out), model=str(tiny_models[family]), options=opts)
    assert result.meta["complete"]
    texts = [json.loads(l)["text"] for l in corpus.read_text().splitlines()]
    ref = reference(tiny_models[family], texts)
    s = stored(out)
    resid = np.asarray(s.acts("resid"))
    mlp = np.asarray(s.acts("mlp"))
    starts, lengths = s.doc_column("token_start"), s.doc_column("n_tokens")
    token_ids = s.token_column("token_id")
    for i in range(len(texts)):
        rows = slice(starts[i], starts[i] + lengths[i])
        assert np.array_equal(token_ids[rows], ref["ids"][i])
        assert rel_err(resid[rows], ref["resid"][i]) < 1e-5, f"resid of sentence {i}"
        assert rel_err(mlp[rows], ref["mlp"][i]) < 1e-5, f"mlp of sentence {i}"
        for site, values in (("resid", ref["resid"][i]), ("mlp", ref["mlp"][i])):
            assert rel_err(np.asarray(s.pooled(site, "first")[i]), values[0]) < 1e-5
            assert rel_err(np.asarray(s.pooled(site, "last")[i]), values[-1]) < 1e-5
            assert rel_err(np.asarray(s.pooled(site, "mean")[i]), values.mean(axis=0)) < 1e-5
    assert s.sites["resid"]["layers"] == list(range(ref["resid"][0].shape[1]))
    assert s.doc_column("text").tolist() == texts


def test_minilm_real_weights(minilm, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 12, seed=2)
    out = tmp_path / "s.zarr"
    extract([str(corpus)], str(out), model=str(minilm), options=ExtractOptions(sites=["resid"], store_dtype="float32", device="cpu"))
    texts = [json.loads(l)["text"] for l in corpus.read_text().splitlines()]
    ref = reference(minilm, texts)
    s = stored(out)
    resid = np.asarray(s.acts("resid"))
    starts, lengths = s.doc_column("token_start"), s.doc_column("n_tokens")
    for i in range(len(texts)):
        assert rel_err(resid[starts[i] : starts[i] + lengths[i]], ref["resid"][i]) < 1e-5


def test_values_do_not_depend_on_batch(tiny_models, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 40, seed=3)
    stores = []
    for budget in (32, 4096):
        out = tmp_path / f"b{budget}.zarr"
        extract([str(corpus)], str(out), model=str(tiny_models["bert"]),
                options=ExtractOptions(sites=["resid", "mlp"], store_dtype="float32", max_batch_tokens=budget, device="cpu"))
        stores.append(stored(out))
    for site in ("resid", "mlp"):
        a, b = np.asarray(stores[0].acts(site)), np.asarray(stores[1].acts(site))
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-5


def test_classifier_logits_and_layers_subset(tiny_classifier, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 16, seed=4)
    out = tmp_path / "s.zarr"
    extract([str(corpus)], str(out), model=str(tiny_classifier),
            options=ExtractOptions(sites=["resid"], layers=[0, 2], pool=["first"], store_dtype="float32", device="cpu"))
    texts = [json.loads(l)["text"] for l in corpus.read_text().splitlines()]
    ref = reference(tiny_classifier, texts)
    g = zarr.open_group(str(out), mode="r")
    logits = g["docs/logits"][:]
    assert rel_err(logits, np.stack(ref["logits"])) < 1e-5
    assert np.array_equal(g["docs/pred"][:], logits.argmax(1))
    assert g["docs/pred"].attrs["categories"] == ["neutral", "joy", "love", "anger", "fear", "sadness"]
    s = stored(out)
    assert s.sites["resid"]["layers"] == [0, 2]
    resid = np.asarray(s.acts("resid"))
    assert resid.shape[1] == 2
    first = ref["resid"][0]
    assert rel_err(resid[: len(first)], first[:, [0, 2]]) < 1e-5


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16"])
def test_half_storage(store_dtype, tiny_models, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 10, seed=5)
    out32, out16 = tmp_path / "f32.zarr", tmp_path / "half.zarr"
    for path, dtype in ((out32, "float32"), (out16, store_dtype)):
        extract([str(corpus)], str(path), model=str(tiny_models["llama"]),
                options=ExtractOptions(sites=["resid"], store_dtype=dtype, device="cpu"))
    full = np.asarray(stored(out32).acts("resid"))
    raw = np.asarray(stored(out16).acts("resid"))
    half = neurostore.store.decode(raw, store_dtype)
    expected = torch.from_numpy(full).to(getattr(torch, store_dtype)).float().numpy()
    assert np.array_equal(half, expected)  # exactly the rounding of the float32 values: lossless storage


def test_bf16_autocast_cpu_is_close(tiny_models, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 8, seed=6)
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    extract([str(corpus)], str(a), model=str(tiny_models["bert"]), options=ExtractOptions(store_dtype="float32", device="cpu"))
    extract([str(corpus)], str(b), model=str(tiny_models["bert"]), options=ExtractOptions(dtype="bfloat16", store_dtype="float32", device="cpu"))
    x, y = np.asarray(stored(a).acts("resid")), np.asarray(stored(b).acts("resid"))
    assert stored(b).meta["compute_dtype"] == "bfloat16"
    assert rel_err(y, x) < 0.1 and not np.array_equal(x, y)


def test_no_tokens_and_parts(tiny_models, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 30, seed=7)
    whole = tmp_path / "whole.zarr"
    opts = dict(sites=["resid"], pool=["mean"], tokens=False, store_dtype="float32", device="cpu")
    extract([str(corpus)], str(whole), model=str(tiny_models["bert"]), options=ExtractOptions(**opts))
    parts = []
    for i in (2, 0, 1):  # any order: parts are sorted by index when opened
        p = tmp_path / f"part{i}.zarr"
        extract([str(corpus)], str(p), model=str(tiny_models["bert"]), options=ExtractOptions(part=(i, 3), **opts))
        parts.append(str(p))
    one, many = stored(whole), neurostore.open(parts)
    assert "acts" not in zarr.open_group(str(whole), mode="r")
    assert many.n_docs == one.n_docs == 30
    assert rel_err(np.asarray(many.pooled("resid", "mean")), np.asarray(one.pooled("resid", "mean"))) < 1e-5
    assert np.array_equal(many.doc_column("token_start"), one.doc_column("token_start"))
    assert np.array_equal(many.doc_column("label"), one.doc_column("label"))
    assert many.categories("label") == one.categories("label")
    assert np.array_equal(many.token_column("doc"), one.token_column("doc"))


def test_truncation_counted(tiny_models, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 20, seed=8)
    out = tmp_path / "s.zarr"
    res = extract([str(corpus)], str(out), model=str(tiny_models["bert"]), options=ExtractOptions(max_length=8, store_dtype="float32", device="cpu"))
    s = stored(out)
    lengths = s.doc_column("n_tokens")
    assert lengths.max() == 8
    assert res.truncated == int(s.doc_column("truncated").sum()) > 0
    assert s.meta["n_truncated"] == res.truncated
    texts = [json.loads(l)["text"] for l in corpus.read_text().splitlines()]
    ref = reference(tiny_models["bert"], texts, max_length=8)
    resid = np.asarray(s.acts("resid"))
    starts = s.doc_column("token_start")
    for i in range(len(texts)):
        assert rel_err(resid[starts[i] : starts[i] + lengths[i]], ref["resid"][i]) < 1e-5


def test_fsspec_url_store(tiny_models, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 12, seed=9)
    local, remote = tmp_path / "local.zarr", "memory://neurostore-test/s.zarr"
    for out in (str(local), remote):
        extract([str(corpus)], out, model=str(tiny_models["gpt2"]), options=ExtractOptions(sites=["mlp"], device="cpu"))
    a, b = neurostore.open(str(local)), neurostore.open(remote)
    assert b.complete and np.array_equal(np.asarray(a.acts("mlp")), np.asarray(b.acts("mlp")))
    assert np.array_equal(a.doc_column("text"), b.doc_column("text"))
