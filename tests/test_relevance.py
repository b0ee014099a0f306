"""Relevance (`extract --quantity relevance|both`): grad-x-act against float64 autograd and Captum,
AttnLRP's rules against their closed forms and its conservation on whole tiny models, queries on
stored relevance against numpy, resume, one-line refusals."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import neurostore
import tiny
from cli.query import app as query_app
from neurostore import query as q
from neurostore import relevance as R
from neurostore.extract import ExtractOptions, extract
from neurostore.store import decode
from test_analysis import reference_lape, reference_z

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_classifier) -> dict[str, Path]:
    """Tiny causal LMs (with their LM heads) of the GPT-2 and LLaMA families, and a BERT classifier."""
    import transformers as T

    root = tmp_path_factory.mktemp("relevance-models")
    out = {"bert": tiny_classifier}
    for family in ("gpt2", "llama"):
        torch.manual_seed(1)
        tok = tiny._tokenizer(family)
        model = T.AutoModelForCausalLM.from_config(tiny._config(family, len(tok), False, 0))
        with torch.no_grad():  # larger weights than the 0.02 init: attention that is not uniform, logits that matter
            for p in model.parameters():
                p.mul_(8 if p.dim() > 1 else 1)
        model.save_pretrained(root / family)
        tok.save_pretrained(root / family)
        out[family] = root / family
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """12 sentences: 4 triples (en, es, fr) of the sample corpus, every label present at least once."""
    lines = tiny.DATA.read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path_factory.mktemp("relevance-corpus") / "c.jsonl"
    path.write_text("".join(lines[i] for i in range(len(lines)) if (i // 3) % 25 == 0), encoding="utf-8")
    return path


def _extract(model: Path, corpus: Path, out: Path, **options) -> neurostore.store.Store:
    opts = dict(sites=["resid", "mlp"], store_dtype="float32", max_batch_tokens=96, buffer_mb=1)
    opts.update(options)
    extract([str(corpus)], str(out), model=str(model), options=ExtractOptions(**opts), overwrite=True, space_check=False)
    return neurostore.open(str(out))


def _mlp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    named = dict(model.named_modules())
    names = [n for n in named if n.endswith((".mlp.act", ".mlp.act_fn", ".intermediate"))]
    return [named[n] for n in sorted(names, key=lambda n: int(re.findall(r"\.(\d+)\.", n)[0]))]


def _reference(model_dir: Path, texts: list[str], labels: list[str] | None) -> list[dict[str, np.ndarray]]:
    """Per sentence, alone (no padding), in float64 with plain autograd: activation x dT/d(activation)
    at every hidden state and MLP activation; T = the sum of next-token log-probabilities, or the
    gold label's logit. Written without neurostore's code."""
    import transformers as T

    config = T.AutoConfig.from_pretrained(model_dir)
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    model = (T.AutoModelForSequenceClassification if classifier else T.AutoModelForCausalLM).from_pretrained(model_dir).double().eval()
    tok = T.AutoTokenizer.from_pretrained(model_dir)
    mods = _mlp_modules(model)
    out = []
    for i, text in enumerate(texts):
        ids = torch.tensor([tok(text)["input_ids"]])
        kept: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: kept.append(o)) for m in mods]
        res = model(input_ids=ids, output_hidden_states=True)
        for h in hooks:
            h.remove()
        if classifier:
            target = res.logits[0, model.config.label2id[labels[i]]]
        else:
            target = torch.log_softmax(res.logits[0, :-1], -1).gather(1, ids[0, 1:, None]).sum()
        hidden = list(res.hidden_states)
        grads = torch.autograd.grad(target, hidden + kept, allow_unused=True)
        rel = [(t * (g if g is not None else torch.zeros_like(t)))[0].detach().numpy() for t, g in zip(hidden + kept, grads)]
        out.append({"resid": np.stack(rel[: len(hidden)], 1), "mlp": np.stack(rel[len(hidden):], 1)})
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_grad_x_act_equals_float64_autograd(models, corpus, tmp_path, family):
    s = _extract(models[family], corpus, tmp_path / "s.zarr", quantity="relevance", rule="grad-x-act")
    assert s.meta["quantities"] == ["relevance"] and s.meta["relevance"]["target"] == ("label" if family == "bert" else "next-token")
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    ref = _reference(models[family], [r["text"] for r in rows], [r["label"] for r in rows])
    start = s.doc_column("token_start")
    for site in ("resid", "mlp"):
        stored = np.asarray(s.groups[0][f"relevance/{site}"][:], dtype=np.float64)
        want = np.concatenate([r[site] for r in ref])
        scale = np.abs(want).max()
        assert scale > 0
        np.testing.assert_allclose(stored, want, atol=2e-5 * scale, rtol=0)
        pooled = np.asarray(s.groups[0][f"relevance_pooled/{site}/first"][:], dtype=np.float64)
        np.testing.assert_allclose(pooled, want[start], atol=2e-5 * scale, rtol=0)


def test_grad_x_act_equals_captum(models, corpus, tmp_path):
    captum_attr = pytest.importorskip("captum.attr")
    import transformers as T

    s = _extract(models["gpt2"], corpus, tmp_path / "s.zarr", quantity="relevance", sites=["mlp"])
    model = T.AutoModelForCausalLM.from_pretrained(models["gpt2"]).double().eval()
    tok = T.AutoTokenizer.from_pretrained(models["gpt2"])
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()][:3]
    stored = np.asarray(s.groups[0]["relevance/mlp"][:], dtype=np.float64)
    start = s.doc_column("token_start")

    def next_token_logprob(ids):
        logits = model(input_ids=ids).logits
        return torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None]).sum((1, 2))

    for i, text in enumerate(texts):
        ids = torch.tensor([tok(text)["input_ids"]])
        for layer, module in enumerate(_mlp_modules(model)):
            attr = captum_attr.LayerGradientXActivation(next_token_logprob, module).attribute(ids)
            want = attr[0].detach().numpy()
            got = stored[start[i]:start[i] + ids.shape[1], layer]
            np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)


# ----------------------------------------------------------------------------------------------
# AttnLRP: each rule on one layer against its closed form


def _leaf(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)


@pytest.mark.parametrize("act", [torch.nn.GELU(), torch.nn.SiLU(), torch.nn.Tanh()])
def test_identity_rule(act):
    x, g = _leaf(5, 7), _leaf(5, 7, seed=1).detach()
    y = R.identity_rule(act, x)
    torch.testing.assert_close(y, act(x))
    y.backward(g)
    torch.testing.assert_close(x * x.grad, y.detach() * g)  # R_in = R_out, element by element


def test_uniform_rule_on_matmul():
    a, b, g = _leaf(4, 3), _leaf(3, 5, seed=1), _leaf(4, 5, seed=2).detach()
    c = R.divide_gradient(a, 2) @ R.divide_gradient(b, 2)
    c.backward(g)
    terms = a.detach()[:, :, None] * b.detach()[None] * g[:, None, :]  # [i, k, j]: a_ik b_kj g_ij, sums to R_out
    torch.testing.assert_close(a * a.grad, terms.sum(2) / 2)
    torch.testing.assert_close(b * b.grad, terms.sum(0) / 2)
    torch.testing.assert_close((a * a.grad).sum() + (b * b.grad).sum(), (c.detach() * g).sum())


def test_epsilon_rule_on_linear():
    lin = torch.nn.Linear(6, 4).double()
    x, g = _leaf(3, 6), _leaf(3, 4, seed=1).detach()
    z = lin(x)
    z.backward(g)
    rel_out = z.detach() * g
    closed = (x.detach()[:, :, None] * lin.weight.detach().T[None] * (rel_out / z.detach())[:, None, :]).sum(2)  # eps -> 0
    torch.testing.assert_close(x * x.grad, closed)
    torch.testing.assert_close((x * x.grad).sum(), rel_out.sum() - (lin.bias.detach() * g).sum())  # the bias' share


def test_norm_rules():
    ln = torch.nn.LayerNorm(6).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    x, g = _leaf(3, 6), _leaf(3, 6, seed=1).detach()
    with R.rules(types.SimpleNamespace(modules=lambda: [ln], config=types.SimpleNamespace(_attn_implementation="sdpa")), "attnlrp"):
        y = ln(x)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (6,), ln.weight, ln.bias, ln.eps))
    y.backward(g)
    xd = x.detach()
    sigma = (xd.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    wg = ln.weight.detach() * g
    torch.testing.assert_close(x * x.grad, xd * (wg - wg.mean(-1, keepdim=True)) / sigma)  # the normaliser a constant
    torch.testing.assert_close((x * x.grad).sum(), ((y.detach() - ln.bias.detach()) * g).sum())
    assert "forward" not in vars(ln)  # put back

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rms = LlamaRMSNorm(6).double()
    with torch.no_grad():
        rms.weight.uniform_(0.5, 1.5)
    x = _leaf(3, 6, seed=3)
    with R.rules(types.SimpleNamespace(modules=lambda: [rms], config=types.SimpleNamespace(_attn_implementation="sdpa")), "attnlrp"):
        y = rms(x)
    y.backward(g)
    torch.testing.assert_close(x * x.grad, y.detach() * g)  # no bias: all relevance passes, element by element


def test_softmax_rule_and_attention_split():
    x, g = _leaf(4, 5), _leaf(4, 5, seed=1).detach()
    s = torch.softmax(x, -1)
    s.backward(g)
    r_out = s.detach() * g
    torch.testing.assert_close(x * x.grad, x.detach() * (r_out - s.detach() * r_out.sum(-1, keepdim=True)))  # AttnLRP eq. (softmax)

    seen = {}

    def attention(module, query, key, value, mask, **kw):
        scores = query @ key.transpose(-1, -2)
        scores.retain_grad()
        seen["scores"] = scores
        return torch.softmax(scores, -1) @ value, None

    qq, kk, vv = _leaf(1, 2, 4, 3), _leaf(1, 2, 4, 3, seed=1), _leaf(1, 2, 4, 3, seed=2)
    out, _ = R._wrap_attention(attention)(None, qq, kk, vv, None)
    go = _leaf(1, 2, 4, 3, seed=3).detach()
    out.backward(go)
    total = (out.detach() * go).sum()
    torch.testing.assert_close((vv * vv.grad).sum(), total / 2)  # softmax(.)v: half to v
    # the scores' gradient inside is the plain one: x * grad there is what the softmax rule gives the
    # scores from the full output; the uniform rule gives them half of it (v has the other), and q.k
    # splits that half evenly
    r_scores = (seen["scores"].detach() * seen["scores"].grad).sum()
    torch.testing.assert_close((qq * qq.grad).sum(), r_scores / 4)
    torch.testing.assert_close((kk * kk.grad).sum(), r_scores / 4)


# ----------------------------------------------------------------------------------------------
# AttnLRP on whole models: conservation, with the biases' and the softmax's shares measured


def _instrumented_attention(shares: list):
    """Plain softmax attention that records each softmax's relevance in and out (float64 test models)."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        if key.shape[1] != query.shape[1]:  # grouped-query attention
            key = key.repeat_interleave(query.shape[1] // key.shape[1], 1)
            value = value.repeat_interleave(query.shape[1] // value.shape[1], 1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = (query @ key.transpose(-1, -2)) * scale
        S = scores.shape[-1]
        if attention_mask is not None:
            mask = attention_mask[..., :S]
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
        elif getattr(module, "is_causal", False) and S > 1:
            scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), torch.finfo(scores.dtype).min)
        scores.retain_grad()
        probs = torch.softmax(scores, -1)
        probs.retain_grad()
        shares.append((scores, probs))
        return (probs @ value).transpose(1, 2).contiguous(), None

    return attention


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_attnlrp_conserves_relevance(models, family):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    loaded = R.load(str(models[family]), torch.device("cpu"), torch.float32)
    loaded.model.double()
    tok = loaded.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(["I feel happy today, truly and deeply happy", "so sad"], padding=True, return_tensors="pt")
    biases = [p for n, p in loaded.model.named_parameters() if n.endswith("bias") or "position_embeddings" in n or "token_type" in n or n.endswith("wpe.weight")]
    for p in biases:
        p.requires_grad_(True)
    shares: list = []
    impl = loaded.model.config._attn_implementation
    ALL_ATTENTION_FUNCTIONS[impl] = _instrumented_attention(shares)
    try:
        gold = torch.tensor([1, 3]) if family == "bert" else None
        r_in, target, r_logits = R.input_relevance(loaded, enc["input_ids"], enc["attention_mask"], "attnlrp",
                                                   "label" if family == "bert" else "next-token", gold, dtype=torch.float64)
    finally:
        del ALL_ATTENTION_FUNCTIONS[impl]
    assert shares, "the attention ran through the wrapped registry entry"
    bias_share = sum(float((p.detach() * p.grad).sum()) for p in biases if p.grad is not None)
    # inside the attention the gradients are plain ones: the uniform rule gives softmax(.) half of the output's
    # relevance, so the softmax keeps half of what (probs - scores) relevance differ by here
    softmax_share = 0.5 * sum(float((pr.detach() * pr.grad).sum() - (sc.detach() * sc.grad).sum()) for sc, pr in shares)
    total_in = float(r_in.sum())
    if family == "bert":
        assert float(r_logits) == pytest.approx(float(target))  # a logit: the target itself
    # every unit of the logits' relevance is accounted for: the input embeddings, the biases, the softmaxes
    assert total_in + bias_share + softmax_share == pytest.approx(float(r_logits), rel=1e-6, abs=1e-9)
    # measured here (float64; share of the logits' relevance: inputs / biases / softmaxes): gpt2 0.34 / 0.38 / 0.28,
    # llama 0.59 / 0 / 0.41 (no biases), bert 0.24 / 0.76 / 0.005 (a near-zero logit of a random classifier)
    share = {k: v / float(r_logits) for k, v in (("inputs", total_in), ("biases", bias_share), ("softmax", softmax_share))}
    if family == "llama":
        assert bias_share == 0
    assert share["inputs"] >= 0.15 and abs(share["softmax"]) <= 0.5


def test_attnlrp_refuses_other_families(tiny_models, corpus, tmp_path):
    with pytest.raises(neurostore.NeurostoreError, match="supported: bert, roberta, xlm-roberta, gpt2, llama, qwen2"):
        _extract(tiny_models["distilbert"], corpus, tmp_path / "x.zarr", quantity="relevance", rule="attnlrp")
    with pytest.raises(neurostore.NeurostoreError, match="no language-model head"):
        _extract(tiny_models["llama"], corpus, tmp_path / "y.zarr", quantity="relevance")


# ----------------------------------------------------------------------------------------------
# stored relevance through the queries; resume; refusals


@pytest.fixture(scope="module")
def both(models, corpus, tmp_path_factory):
    return _extract(models["gpt2"], corpus, tmp_path_factory.mktemp("both") / "b.zarr", quantity="both", rule="attnlrp")


def test_both_quantities_query_like_numpy(both):
    s = both
    g = s.groups[0]
    assert {"acts", "pooled", "relevance", "relevance_pooled"} <= set(g.keys())
    lang, lab = s.doc_column("lang"), s.doc_column("label")
    doc_of = s.token_column("doc")
    for quantity, prefix in (("activation", "pooled"), ("relevance", "relevance_pooled")):
        x = decode(np.asarray(g[f"{prefix}/mlp/mean"][:]), "float32").astype(np.float64)[:, 1]
        plan = neurostore.plan.resolve(s, "mlp", 1, rows="mean", by="label", quantity=quantity)
        res = q.variance(s, "mlp", plan=plan)
        z = reference_z(x, lang, True)
        means = np.stack([z[lab == e].mean(0) for e in np.unique(lab)])
        np.testing.assert_allclose(res.variance, means.var(0), rtol=1e-6, atol=1e-12)
        acts = np.asarray(g[("acts" if quantity == "activation" else "relevance") + "/mlp"][:], dtype=np.float64)
        synth = types.SimpleNamespace(acts={"mlp": acts}, lang=lang, doc_of_token=doc_of, langs=s.categories("lang"))
        lape = q.lape(s, filter_rate=0.5, top_rate=0.2, where={"quantity": [quantity]} if quantity != "activation" else None)
        assert lape.neurons == reference_lape(synth, 0.5, 0.2)
    rel = np.asarray(g["relevance/mlp"][:, 1, 3], dtype=np.float64)
    top = q.top_examples(s, "mlp", 1, 3, k=3, rows="tokens", where={"quantity": ["relevance"]})
    np.testing.assert_allclose([e.value for e in top], np.sort(rel)[::-1][:3], rtol=1e-6)
    # the two quantities have their own cache entries: activation keys stay as before relevance
    sel = neurostore.plan.resolve(s, "mlp", 1, rows="mean", quantity="relevance").selection
    from neurostore import cache

    assert cache.cache_key(s, sel, 1)[0] != cache.cache_key(s, neurostore.plan.resolve(s, "mlp", 1, rows="mean").selection, 1)[0]


def test_query_cli_quantity(both, tmp_path, models, corpus):
    res = runner.invoke(query_app, ["variance", str(both.paths[0]), "--site", "mlp", "--quantity", "relevance", "--format", "json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["provenance"]["selection"]["quantity"] == "relevance"
    plain = _extract(models["gpt2"], corpus, tmp_path / "a.zarr", sites=["mlp"])
    res = runner.invoke(query_app, ["variance", str(plain.paths[0]), "--site", "mlp", "--quantity", "relevance"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "extract it with --quantity relevance" in lines[0] and "Traceback" not in res.stderr


def test_resume_gives_the_same_store(models, corpus, tmp_path, both):
    """A full disk after the first window's commit (injected), then --resume: the store of an
    uninterrupted run, activations and relevance alike."""
    from faults import FaultyStore

    class FullAfterFirstCommit(FaultyStore):
        async def set(self, key, value):
            if key == "zarr.json":
                attrs = json.loads(value.to_bytes()).get("attributes", {}).get("neurostore") or {}
                if attrs.get("committed_docs", 0) > 0:
                    self.plan.failed.append("armed")
            elif self.plan.failed and key.startswith(("acts/", "relevance")):
                raise OSError(28, "No space left on device", key)
            await self._store.set(key, value)

    out = tmp_path / "r.zarr"
    opts = ExtractOptions(sites=["resid", "mlp"], store_dtype="float32", max_batch_tokens=96, buffer_mb=1, quantity="both", rule="attnlrp")
    with pytest.raises(neurostore.errors.Fault, match="--resume"):
        extract([str(corpus)], str(out), model=str(models["gpt2"]), options=opts, space_check=False, wrap_store=FullAfterFirstCommit.wrapping(None))
    meta = neurostore.store.read_meta(neurostore.store.open_group(str(out)))
    assert not meta["complete"] and meta["committed_docs"] > 0
    with pytest.raises(neurostore.NeurostoreError, match="--rule grad-x-act differs"):
        extract([str(corpus)], str(out), model=str(models["gpt2"]), options=ExtractOptions(quantity="both", rule="grad-x-act"), resume=True,
                space_check=False)
    extract([str(corpus)], str(out), model=str(models["gpt2"]), options=ExtractOptions(), resume=True, space_check=False)
    done = neurostore.open(str(out))
    assert done.complete
    for name in ("acts/mlp", "relevance/resid", "relevance/mlp", "relevance_pooled/mlp/mean"):
        np.testing.assert_array_equal(np.asarray(done.groups[0][name][:]), np.asarray(both.groups[0][name][:]))


def test_refusals(models, corpus, tmp_path):
    cases = [
        (dict(rule="attnlrp"), "add --quantity relevance"),
        (dict(quantity="relevance", stats_only=True), "--stats-only --quantity relevance"),
        (dict(quantity="relevance", relevance_target="label"), "causal LM, not a classifier"),
        (dict(quantity="sideways"), "use activation, relevance or both"),
    ]
    for options, message in cases:
        with pytest.raises(neurostore.NeurostoreError, match=message):
            _extract(models["gpt2"], corpus, tmp_path / "x.zarr", **options)


def test_overwrite_takes_the_new_options(models, corpus, tmp_path):
    """--overwrite replaces a store with the options given (it used to resume with the old ones)."""
    _extract(models["gpt2"], corpus, tmp_path / "o.zarr", sites=["mlp"])
    s = _extract(models["gpt2"], corpus, tmp_path / "o.zarr", sites=["mlp"], quantity="relevance")
    assert s.meta["quantities"] == ["relevance"] and s.complete
