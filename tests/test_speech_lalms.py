"""Audio-language models beside Qwen2-Audio (Audio Flamingo 3, Qwen2.5-Omni's thinker): stored rows against
the model's own outputs for its processor's inputs, the row arithmetic across AF3's windows, the CLI and intervene."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

sf = pytest.importorskip("soundfile")

import neurostore  # noqa: E402
from cli.main import app  # noqa: E402
from neurostore.corpus import read_corpus  # noqa: E402
from neurostore.extract import ExtractOptions, extract  # noqa: E402
from test_speech import subset  # noqa: E402
from tiny_audio import make_audio_flamingo3, make_qwen2_5_omni, make_qwen2_audio  # noqa: E402

runner = CliRunner()
# qwen2_5_omni: the whole model's checkpoint, of which the thinker is read; qwen2_audio: its cut past the window
BUILDERS = {"qwen2_audio": make_qwen2_audio, "audioflamingo3": make_audio_flamingo3, "qwen2_5_omni_thinker": make_qwen2_5_omni, "qwen2_5_omni": partial(make_qwen2_5_omni, whole=True)}
CLI = ("audioflamingo3", "qwen2_5_omni_thinker")
PROMPT = "How does the speaker feel?"


@pytest.fixture(scope="module")
def lalms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_lalms")
    return {fam: build(root / fam) for fam, build in BUILDERS.items()}


def with_long(path: Path, folder: Path, seconds: float = 9.3) -> Path:
    """The corpus plus one utterance over two of the tiny AF3's 4 s windows (noise at 22.05 kHz)."""
    wave = (0.1 * np.random.default_rng(0).standard_normal(int(22050 * seconds))).astype(np.float32)
    sf.write(folder / "long.wav", wave, 22050)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"audio": str(folder / "long.wav"), "label": "neutral", "lang": "en", "prompt": PROMPT}) + "\n")
    return path


def processor_inputs(loaded, wave: np.ndarray, text: str) -> dict:
    """The processor's inputs for one utterance. Qwen2.5-Omni's processor needs torchvision (its video
    processor): its audio step is done here as it does it, with its own count of audio tokens."""
    proc = loaded.audio.processor
    if callable(proc):
        return dict(proc(text=[text], audio=[wave], sampling_rate=16000, return_tensors="pt"))
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

    fe = loaded.audio.extractor(wave, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
    n = int(_get_feat_extract_output_lengths(fe["attention_mask"].sum(-1))[0])
    ids = torch.tensor([loaded.tokenizer(text.replace(proc.audio_token, proc.audio_token * n))["input_ids"]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "input_features": fe["input_features"],
            "feature_attention_mask": fe["attention_mask"]}


def reference(loaded, wave: np.ndarray, prompt: str | None) -> dict:
    """The model's own hidden states and LM MLP activations for the processor's inputs of one utterance."""
    import transformers.activations as A

    proc, captured = loaded.audio.processor, []
    act = A.ACT2FN[loaded.config.text_config.hidden_act]
    handles = [b.mlp.gate_proj.register_forward_hook(lambda _m, _i, o: captured.append(act(o))) for b in loaded.blocks]
    text = f"{getattr(proc, 'audio_bos_token', '')}{proc.audio_token}{getattr(proc, 'audio_eos_token', '')}{prompt or ''}"
    enc = processor_inputs(loaded, wave, text)
    tower, towered, fc1 = loaded.audio.tower, [], []
    if tower is not None:  # the encoder's own output_hidden_states inside the model's forward (audio.resid), fc1 + activation (audio.mlp)
        plain = tower.forward
        tower.forward = lambda *a, **k: towered.append(plain(*a, **{**k, "output_hidden_states": True})) or towered[-1]
        enc_act = A.ACT2FN[loaded.config.audio_config.activation_function]
        handles += [b.fc1.register_forward_hook(lambda _m, _i, o: fc1.append(enc_act(o))) for b in tower.layers]
    try:
        with torch.inference_mode():
            out = loaded.model(**enc, output_hidden_states=True)
    finally:
        if tower is not None:
            tower.forward = plain
        for h in handles:
            h.remove()
    ref = {"resid": torch.stack(out.hidden_states, dim=2)[0].numpy(), "mlp": torch.stack(captured, dim=2)[0].numpy(),
           "ids": enc["input_ids"][0].numpy(), "enc": enc}
    if towered:  # per window: pooled two frames to one by hand (the last entry is pooled already), its valid tokens, windows in order
        mel = next(v for k, v in enc.items() if k.endswith("mask") and k != "attention_mask").sum(-1)
        valid = (((mel - 1) // 2 + 1) - 2) // 2 + 1
        hs = towered[0].hidden_states
        if hs[0].dim() == 2:  # Qwen2.5-Omni: flat frames, its own pair indices; the last block's raw output, then ln_post
            from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import get_pool_indices

            first = get_pool_indices(mel)
            pairs = [(h[first] + h[first + 1]) / 2 for h in hs]
            ref["audio.resid"] = torch.stack(pairs[:-1] + [tower.ln_post(pairs[-1])], dim=1).numpy()
            ref["audio.mlp"] = torch.stack([(h[first] + h[first + 1]) / 2 for h in fc1], dim=1).numpy()
            assert len(hs) == len(tower.layers) + 1 and ref["audio.resid"].shape[0] == valid.sum()
        else:
            def tokens(h):
                return torch.cat([h[w, :n] for w, n in enumerate(valid.tolist())])

            def pool(h):
                return torch.nn.functional.avg_pool1d(h.transpose(1, 2), 2, 2).transpose(1, 2)

            ref["audio.resid"] = torch.stack([tokens(pool(h)) for h in hs[:-1]] + [tokens(hs[-1])], dim=1).numpy()
            ref["audio.mlp"] = torch.stack([tokens(pool(h)) for h in fc1], dim=1).numpy()
    return ref


@pytest.mark.parametrize("family", list(BUILDERS))
def test_stored_rows_match_model(family, lalms, tmp_path):
    from neurostore import audio
    from neurostore.models import load

    corpus = with_long(subset(tmp_path / "c.jsonl", every=6, prompt=True), tmp_path)
    out = tmp_path / "s.zarr"
    opts = ExtractOptions(sites=["resid", "mlp", "audio.resid", "audio.mlp"], pool=["mean"], store_dtype="float32", max_batch_tokens=400,
                          device="cpu")
    result = extract([str(corpus)], str(out), model=str(lalms[family]), options=opts)
    assert result.meta["complete"] and result.truncated == (family != "audioflamingo3")  # the long one: past a 4 s window
    s = neurostore.open(str(out))
    loaded = load(str(lalms[family]), torch.device("cpu"))
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    resid, mlp = np.asarray(s.acts("resid")), np.asarray(s.acts("mlp"))
    starts, lengths = s.doc_column("token_start"), s.doc_column("n_tokens")
    kinds, ids = s.token_column("kind"), s.token_column("token_id")
    token_id = loaded.audio.audio_token_id
    for i, row in enumerate(rows):
        wave = audio.load_waveform(row["audio"], 16000)
        ref = reference(loaded, wave, row.get("prompt"))
        span = slice(starts[i], starts[i] + lengths[i])
        assert np.array_equal(ids[span], ref["ids"]), f"tokens of utterance {i}"  # the processor's count of placeholders
        assert audio.audio_rows(loaded, len(wave)) == int((ref["ids"] == token_id).sum())
        assert np.array_equal(kinds[span] == 2, ref["ids"] == token_id)
        assert set(kinds[span][ref["ids"] != token_id].tolist()) <= {0, 1}
        scale = np.abs(ref["resid"]).max()
        assert np.abs(resid[span] - ref["resid"]).max() < 1e-4 * scale, f"resid of utterance {i}"
        assert np.abs(mlp[span] - ref["mlp"]).max() < 1e-4 * np.abs(ref["mlp"]).max(), f"mlp of utterance {i}"
        for site in ("audio.resid", "audio.mlp"):  # the audio encoder's layers on the audio rows
            got = np.asarray(s.acts(site))[span]
            assert np.abs(got[kinds[span] == 2] - ref[site]).max() < 1e-4 * np.abs(ref[site]).max(), f"{site} {i}"
            assert not got[kinds[span] != 2].any()
    if family == "audioflamingo3":  # the long one: three windows (4 + 4 + 1.3 s: 100 + 100 + 32 tokens)
        assert ref["enc"]["input_features"].shape[0] == 3 and int((ref["ids"] == token_id).sum()) == 232


def test_audio_flamingo3_rows_over_windows(lalms):
    """Placeholder counts from sample counts alone equal the processor's, at and around window edges
    and past ``max_audio_len`` (12 s in the tiny model: cut, as its processor cuts)."""
    from neurostore import audio
    from neurostore.models import load

    loaded = load(str(lalms["audioflamingo3"]), torch.device("cpu"))
    proc = loaded.audio.processor
    for n in (160, 1601, 63999, 64000, 64001, 64160, 64161, 100000, 192000, 200000):
        enc = proc(text=["<sound>"], audio=[np.zeros(n, np.float32)], sampling_rate=16000, return_tensors="pt")
        assert audio.audio_rows(loaded, n) == int((enc["input_ids"] == proc.audio_token_id).sum()), n
        assert audio._cut(loaded, n) == (n > 192000)
        feats = audio._lalm_audio(loaded, [np.zeros(n, np.float32)])
        assert torch.equal(feats["input_features_mask"], enc["input_features_mask"])


@pytest.mark.parametrize("family", CLI)
def test_cli_extract_select_by_label(family, lalms, tmp_path):
    corpus = subset(tmp_path / "c.jsonl", every=4)
    out = tmp_path / "s.zarr"
    res = runner.invoke(app, ["extract", str(corpus), "--model", str(lalms[family]), "--out", str(out), "--sites", "resid,mlp",
                              "--prompt", "The speaker sounds", "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    res = runner.invoke(app, ["query", "select", str(out), "--by", "label", "--method", "contrast", "--top", "3", "--tokens",
                              "--token-kind", "audio", "--site", "mlp", "--format", "json"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert set(json.loads(res.stdout)["selected"]) == {"anger", "joy", "neutral", "sadness"}


@pytest.mark.parametrize("family", CLI)
def test_intervene_label_words(family, lalms, tmp_path):
    """Label-word scores equal the words' log-probabilities from the model's own outputs on the processor's inputs."""
    from neurostore import audio
    from neurostore import intervene as iv
    from neurostore.models import load

    corpus = subset(tmp_path / "c.jsonl", every=6)
    words = "anger=angry,joy=happy,neutral=calm,sadness=sad"
    loaded = load(str(lalms[family]), torch.device("cpu"))
    c = read_corpus([corpus], prompt="The speaker sounds")
    data = iv.prepare_audio(loaded, c, words, max_batch_tokens=256)
    scores = iv.predict(loaded, data)
    for i in (0, 3):
        wave = audio.load_waveform(c.audio[i], 16000)
        enc = reference(loaded, wave, "The speaker sounds")["enc"]
        n = enc["input_ids"].shape[1]
        for k, word in enumerate(["angry", "happy", "calm", "sad"]):
            w = loaded.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            ids = torch.cat([enc["input_ids"], torch.tensor([w])], dim=1)
            feats = {key: v for key, v in enc.items() if key not in ("input_ids", "attention_mask")}
            with torch.inference_mode():
                logp = torch.log_softmax(loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids), **feats).logits[0].float(), -1)
            expect = sum(float(logp[n - 1 + j, t]) for j, t in enumerate(w))
            assert abs(scores[i, k] - expect) < 1e-4 * max(1.0, abs(expect))
    res = runner.invoke(app, ["intervene", str(corpus), "--model", str(lalms[family]), "--neurons", "1:0,1:3,2:5", "--site", "mlp",
                              "--label-words", words, "--prompt", "The speaker sounds", "--target", "joy", "--controls", "2",
                              "--device", "cpu", "--format", "json"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    out = json.loads(res.stdout)
    assert out["task"] == "label-words" and len(out["controls"]) == 2
