"""Speech: audio corpora, speech encoders and Qwen2-Audio against the models' own outputs, the CLI end to end."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

sf = pytest.importorskip("soundfile")

import neurostore  # noqa: E402
from cli.main import app  # noqa: E402
from neurostore.corpus import read_corpus  # noqa: E402
from neurostore.errors import NeurostoreError  # noqa: E402
from neurostore.extract import ExtractOptions, extract  # noqa: E402
from tiny_audio import SPEECH, make_encoder, make_qwen2_audio  # noqa: E402

runner = CliRunner()
FAMILIES = ("wav2vec2", "hubert", "wavlm", "whisper", "qwen2_audio")


@pytest.fixture(scope="module")
def audio_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_audio")
    out = {fam: make_encoder(fam, root / fam) for fam in FAMILIES if fam != "qwen2_audio"}
    out["qwen2_audio"] = make_qwen2_audio(root / "qwen2_audio")
    return out


def subset(path: Path, every: int = 4, prompt: bool = False) -> Path:
    """Every ``every``-th clip of data/speech.jsonl (all labels and languages), paths made absolute."""
    rows = [json.loads(line) for line in SPEECH.read_text(encoding="utf-8").splitlines()]
    keep = [dict(r, audio=str(SPEECH.parent / r["audio"])) for i, r in enumerate(rows) if (i // 12) % every == 0 or i % every == 0]
    if prompt:
        for r in keep[::2]:
            r["prompt"] = "How does the speaker feel?"
    path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
    return path


def sine(rate: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_corpus_paths_durations_and_resampling(tmp_path):
    (tmp_path / "clips").mkdir()
    shutil.copy(SPEECH.parent / "speech" / "en_0_joy.flac", tmp_path / "clips" / "a.flac")
    stereo = np.stack([sine(22050, 1.0), sine(22050, 1.0)], axis=1)
    sf.write(tmp_path / "clips" / "b.wav", stereo, 22050)
    sf.write(tmp_path / "c.ogg", sine(8000, 0.5), 8000, format="OGG")
    rows = [{"audio": "clips/a.flac", "label": "joy"}, {"audio": "clips/b.wav", "label": "neutral", "prompt": "Which emotion?"},
            {"audio": str(tmp_path / "c.ogg"), "label": "joy"}]
    corpus_file = tmp_path / "c.jsonl"
    corpus_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = read_corpus([corpus_file], prompt="Default prompt.")
    assert c.audio[0] == str(tmp_path / "clips" / "a.flac") and c.texts[1] == "clips/b.wav"
    assert c.prompts == ["Default prompt.", "Which emotion?", "Default prompt."]
    assert np.allclose(c.durations, [sf.info(tmp_path / "clips" / "a.flac").duration, 1.0, 0.5], atol=1e-3)
    from neurostore import audio

    wave = audio.load_waveform(c.audio[1], 16000)  # stereo 22.05 kHz -> mono 16 kHz
    assert len(wave) == audio.resampled_length(22050, 22050, 16000) == 16000
    mid = slice(1000, 15000)  # away from the filter's edges: the sine sampled at 16 kHz
    assert np.abs(wave[mid] - sine(16000, 1.0)[mid]).max() < 5e-3


def test_bad_rows_named_or_skipped(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    rows = [{"audio": "missing.flac", "label": "a"}, {"audio": str(SPEECH.parent / "speech" / "en_0_joy.flac"), "label": "b"},
            {"audio": "junk.wav", "label": "a"}, {"audio": "", "label": "a"}]
    corpus_file = tmp_path / "c.jsonl"
    corpus_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(NeurostoreError, match=r"c\.jsonl:1: audio file 'missing.flac': no such file .*--skip-bad"):
        read_corpus([corpus_file], skip_bad=False)
    c = read_corpus([corpus_file], skip_bad=True)
    assert len(c) == 1 and len(c.skipped) == 3
    assert "c.jsonl:3: audio file 'junk.wav': cannot decode it" in c.skipped[1] and "c.jsonl:4: no audio file named" in c.skipped[2]


def reference(loaded, wave: np.ndarray, prompt_ids: list[int] | None) -> dict:
    """The model's own outputs for the processor's inputs of one utterance alone."""
    import transformers.activations as A

    spec, model, config = loaded.audio, loaded.model, loaded.config
    fe = spec.extractor
    captured = []
    if spec.family == "lalm":
        mods = [(b.mlp.gate_proj, A.ACT2FN[config.text_config.hidden_act]) for b in loaded.blocks]
    elif spec.family == "whisper":
        mods = [(b.fc1, A.ACT2FN[config.activation_function]) for b in loaded.blocks]
    else:
        mods = [(b.feed_forward.intermediate_dense, A.ACT2FN[config.hidden_act]) for b in loaded.blocks]
    handles = [m.register_forward_hook(lambda _m, _i, o, act=act: captured.append(act(o))) for m, act in mods]
    with torch.inference_mode():
        if spec.family == "lalm":  # the processor builds the text with the audio tokens itself
            text = "<|audio_bos|><|AUDIO|><|audio_eos|>" + (prompt_ids or "")
            enc = spec.processor(text=[text], audio=[wave], sampling_rate=16000, return_tensors="pt")
            out = model(**enc, output_hidden_states=True)
            ids = enc["input_ids"][0].numpy()
        elif spec.family == "whisper":
            out = model(fe(wave, sampling_rate=16000, return_tensors="pt")["input_features"], output_hidden_states=True)
            ids = None
        else:
            enc = fe(wave, sampling_rate=16000, return_tensors="pt")
            out = model(enc["input_values"], output_hidden_states=True)
            ids = None
    for h in handles:
        h.remove()
    resid = torch.stack(out.hidden_states, dim=2)[0].numpy()  # [rows, layers, width]
    mlp = torch.stack(captured, dim=2)[0].numpy()
    return {"resid": resid, "mlp": mlp, "ids": ids}


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_frames_match_model(family, audio_models, tmp_path):
    corpus = subset(tmp_path / "c.jsonl", prompt=family == "qwen2_audio")
    out = tmp_path / "s.zarr"
    opts = ExtractOptions(sites=["resid", "mlp"], pool=["first", "mean"], store_dtype="float32", max_batch_tokens=400, device="cpu")
    result = extract([str(corpus)], str(out), model=str(audio_models[family]), options=opts)
    assert result.meta["complete"] and result.stages["decode"] > 0
    s = neurostore.open(str(out))
    from neurostore import audio
    from neurostore.models import load

    loaded = load(str(audio_models[family]), torch.device("cpu"))
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    resid, mlp = np.asarray(s.acts("resid")), np.asarray(s.acts("mlp"))
    starts, lengths = s.doc_column("token_start"), s.doc_column("n_tokens")
    kinds, ids = s.token_column("kind"), s.token_column("token_id")
    assert np.allclose(s.doc_column("duration"), [sf.info(r["audio"]).duration for r in rows], atol=1e-4)
    assert starts[0] == 0 and np.array_equal(starts[1:], np.cumsum(lengths)[:-1])  # utterance boundaries
    for i, row in enumerate(rows):
        wave = audio.load_waveform(row["audio"], 16000)
        ref = reference(loaded, wave, row.get("prompt"))
        span = slice(starts[i], starts[i] + lengths[i])
        n = lengths[i]
        if ref["ids"] is not None:  # the LM's rows are the processor's tokens, audio ones marked audio
            assert np.array_equal(ids[span], ref["ids"])
            assert np.array_equal(kinds[span] == 2, ref["ids"] == loaded.audio.audio_token_id)
            assert set(kinds[span][ref["ids"] != loaded.audio.audio_token_id].tolist()) <= {0, 1} and (kinds[span] == 1).sum() >= 2
        else:  # every frame a row of kind audio: as many as the model's real frames
            assert (kinds[span] == 2).all() and (ids[span] == -1).all()
            assert n <= ref["resid"].shape[0] and (family == "whisper" or n == ref["resid"].shape[0])
        scale = np.abs(ref["resid"][:n]).max()
        assert np.abs(resid[span] - ref["resid"][:n]).max() < 1e-4 * scale, f"resid of utterance {i}"
        assert np.abs(mlp[span] - ref["mlp"][:n]).max() < 1e-4 * np.abs(ref["mlp"][:n]).max(), f"mlp of utterance {i}"
        assert np.abs(np.asarray(s.pooled("resid", "mean")[i]) - ref["resid"][:n].mean(axis=0)).max() < 1e-4 * scale


def encoder_reference(loaded, wave: np.ndarray, prompt: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The audio encoder's own ``output_hidden_states`` (and fc1's activation) inside the model's
    forward on the processor's inputs, pooled two frames to one by hand: ``[tokens, layers, width]``
    for resid and mlp, and the LM's input ids."""
    import torch.nn.functional as F
    import transformers.activations as A

    tower, got, fc1 = loaded.audio.tower, [], []
    act = A.ACT2FN[loaded.config.audio_config.activation_function]
    plain = tower.forward
    tower.forward = lambda *a, **k: got.append(plain(*a, **k, output_hidden_states=True)) or got[-1]
    handles = [b.fc1.register_forward_hook(lambda _m, _i, o: fc1.append(act(o))) for b in tower.layers]
    try:
        enc = loaded.audio.processor(text=["<|audio_bos|><|AUDIO|><|audio_eos|>" + (prompt or "")], audio=[wave], sampling_rate=16000,
                                     return_tensors="pt")
        with torch.inference_mode():
            loaded.model(**enc)
    finally:
        tower.forward = plain
        for h in handles:
            h.remove()
    ids = enc["input_ids"][0].numpy()
    n = int((ids == loaded.audio.audio_token_id).sum())
    hs = got[0].hidden_states  # block inputs at the frame rate, then the encoder's (pooled, normed) output

    def pool(h):
        return F.avg_pool1d(h.transpose(1, 2), 2, 2).transpose(1, 2)[0, :n]

    resid = torch.stack([pool(h) for h in hs[:-1]] + [hs[-1][0, :n]], dim=1).numpy()
    mlp = torch.stack([pool(h) for h in fc1], dim=1).numpy()
    return resid, mlp, ids


def test_audio_encoder_sites(audio_models, tmp_path):
    """audio.resid / audio.mlp of Qwen2-Audio: the encoder's own hidden states, pooled to the audio
    tokens and placed on the LM's audio rows; pooled vectors over those rows; queries read them only."""
    from neurostore import audio
    from neurostore import query as q
    from neurostore.models import load

    corpus = subset(tmp_path / "c.jsonl", prompt=True)
    out = tmp_path / "s.zarr"
    opts = ExtractOptions(sites=["resid", "audio.resid", "audio.mlp"], pool=["first", "mean", "last"], store_dtype="float32",
                          max_batch_tokens=400, device="cpu")
    extract([str(corpus)], str(out), model=str(audio_models["qwen2_audio"]), options=opts)
    s = neurostore.open(str(out))
    assert s.sites["audio.resid"]["layers"] == [0, 1, 2] and s.sites["audio.mlp"]["layers"] == [0, 1]
    assert s.sites["audio.resid"]["rows"] == "audio" and "rows" not in s.sites["resid"]
    assert "site_rows" in s.meta["features"]  # a reader that does not know it refuses the store, not averages its zeros
    loaded = load(str(audio_models["qwen2_audio"]), torch.device("cpu"))
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    acts = {site: np.asarray(s.acts(site)) for site in ("audio.resid", "audio.mlp")}
    starts, lengths, kinds = s.doc_column("token_start"), s.doc_column("n_tokens"), s.token_column("kind")
    for i, row in enumerate(rows):
        ref_resid, ref_mlp, ids = encoder_reference(loaded, audio.load_waveform(row["audio"], 16000), row.get("prompt"))
        span = slice(starts[i], starts[i] + lengths[i])
        on_audio = kinds[span] == 2
        assert np.array_equal(on_audio, ids == loaded.audio.audio_token_id)
        for site, ref in (("audio.resid", ref_resid), ("audio.mlp", ref_mlp)):
            got = acts[site][span]
            assert np.abs(got[on_audio] - ref).max() < 1e-4 * np.abs(ref).max(), (site, i)
            assert not got[~on_audio].any()  # prompt and special rows hold no encoder value
            for pool, expect in (("mean", ref.mean(axis=0)), ("first", ref[0]), ("last", ref[-1])):
                assert np.abs(np.asarray(s.pooled(site, pool)[i]) - expect).max() < 1e-4 * np.abs(ref).max(), (site, pool, i)
    # queries over token rows read the audio rows only, whatever the default
    keep = kinds == 2
    labels = np.repeat(np.asarray(s.categories("label"))[s.doc_column("label")], lengths)
    langs = np.repeat(np.asarray(s.categories("lang"))[s.doc_column("lang")], lengths)
    stats = q.group_means(s, "audio.resid", 2, by="label", rows="tokens", zscore=False)
    for (li, lang), (g, label) in itertools.product(enumerate(stats.langs), enumerate(stats.groups)):
        rows_ = keep & (labels == label) & (langs == lang)
        assert stats.count[li, g] == rows_.sum() and np.allclose(stats.M[li, g], acts["audio.resid"][rows_, 2].mean(axis=0), atol=1e-5)
    for args, msg in ((["query", "variance", str(out), "--site", "audio.resid", "--tokens", "--token-kind", "text"], "holds values on audio token rows only"),
                      (["extract", str(corpus), "--model", str(audio_models["wav2vec2"]), "--sites", "audio.resid", "--out", str(tmp_path / "x.zarr"),
                        "--device", "cpu", "--quiet"], "is a speech encoder"),
                      (["intervene", str(corpus), "--model", str(audio_models["qwen2_audio"]), "--neurons", "1:0", "--site", "audio.mlp",
                        "--label-words", "anger=angry,joy=happy,neutral=calm,sadness=sad", "--device", "cpu"], "interventions act on the language model")):
        res = runner.invoke(app, args)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and msg in lines[0] and "Traceback" not in res.stderr, (args[0], res.stderr)
    res = runner.invoke(app, ["query", "select", str(out), "--by", "label", "--method", "contrast", "--top", "3", "--tokens", "--site", "audio.mlp",
                              "--format", "json"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert set(json.loads(res.stdout)["selected"]) == {"anger", "joy", "neutral", "sadness"}
    view = s.to_xarray()["acts_audio.resid"]
    assert np.isnan(view.values[~keep]).all() and np.allclose(view.values[keep], acts["audio.resid"][keep])
    reduced = tmp_path / "stats.zarr"  # --stats-only: the same rows reduced live give the same answers
    opts.stats_only = True
    res = extract([str(corpus)], str(reduced), model=str(audio_models["qwen2_audio"]), options=opts)
    assert res.stages["decode"] > 0  # the stats-only loop times the audio's decoding too
    live = q.group_means(neurostore.open(str(reduced)), "audio.resid", 2, by="label", rows="tokens", zscore=False)
    assert np.array_equal(live.count, stats.count) and np.allclose(live.M, stats.M, atol=1e-5, equal_nan=True)
    for rows_ in ("tokens", "mean"):
        a, b = (q.variance(neurostore.open(str(x)), "audio.mlp", 1, by="label", rows=rows_) for x in (out, reduced))
        assert np.allclose(a.variance, b.variance, atol=1e-6), rows_


def test_cli_extract_select_by_label(audio_models, tmp_path):
    corpus = subset(tmp_path / "c.jsonl", every=2)
    out = tmp_path / "s.zarr"
    res = runner.invoke(app, ["extract", str(corpus), "--model", str(audio_models["wav2vec2"]), "--out", str(out), "--sites", "resid,mlp",
                              "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    res = runner.invoke(app, ["query", "select", str(out), "--by", "label", "--method", "contrast", "--top", "3", "--tokens", "--token-kind", "audio",
                              "--site", "mlp", "--format", "json"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    sel = json.loads(res.stdout)
    assert set(sel["selected"]) == {"anger", "joy", "neutral", "sadness"}
    res = runner.invoke(app, ["query", "variance", str(out), "--pool", "mean", "--format", "json"])
    assert res.exit_code == 0, (res.stdout, res.stderr)


def test_cli_one_line_errors(audio_models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"audio": "nope.wav", "label": "joy"}) + "\n")
    for args, expect in (
        (["extract", str(bad), "--model", str(audio_models["wav2vec2"])], "bad.jsonl:1: audio file 'nope.wav': no such file"),
        (["extract", str(subset(tmp_path / "c.jsonl", every=4)), "--model", str(audio_models["wav2vec2"]).replace("wav2vec2", "missing")],
         "no such folder"),
    ):
        res = runner.invoke(app, [*args, "--out", str(tmp_path / "x.zarr"), "--device", "cpu", "--quiet"])
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and expect in lines[0] and "Traceback" not in res.stderr, res.stderr


def test_intervene_label_words(audio_models, tmp_path):
    """Qwen2-Audio as a classifier by label words: scores equal the label words' log-probabilities
    computed from the model's own outputs; ablation, self/cross and controls as for classifiers."""
    from neurostore import audio
    from neurostore import intervene as iv
    from neurostore.models import load

    corpus = subset(tmp_path / "c.jsonl", every=4)
    words = "anger=angry,joy=happy,neutral=calm,sadness=sad"
    loaded = load(str(audio_models["qwen2_audio"]), torch.device("cpu"))
    c = read_corpus([corpus], prompt="The speaker sounds")
    data = iv.prepare_audio(loaded, c, words, max_batch_tokens=256)
    scores = iv.predict(loaded, data)
    tok = loaded.tokenizer
    for i in (0, 5):  # independent: the processor's own inputs, one forward per label word
        wave = audio.load_waveform(c.audio[i], 16000)
        for k, word in enumerate(["angry", "happy", "calm", "sad"]):
            enc = loaded.audio.processor(text=["<|audio_bos|><|AUDIO|><|audio_eos|>The speaker sounds"], audio=[wave], sampling_rate=16000,
                                         return_tensors="pt")
            w = tok(" " + word, add_special_tokens=False)["input_ids"]
            ids = torch.cat([enc["input_ids"], torch.tensor([w])], dim=1)
            with torch.inference_mode():
                logp = torch.log_softmax(loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=enc["input_features"],
                                                      feature_attention_mask=enc["feature_attention_mask"]).logits[0].float(), -1)
            n = enc["input_ids"].shape[1]
            expect = sum(float(logp[n - 1 + j, t]) for j, t in enumerate(w))
            assert abs(scores[i, k] - expect) < 1e-4 * max(1.0, abs(expect))
    res = runner.invoke(app, ["intervene", str(corpus), "--model", str(audio_models["qwen2_audio"]), "--neurons", "1:0,1:3,2:5", "--site", "mlp",
                              "--label-words", words, "--prompt", "The speaker sounds", "--target", "joy", "--controls", "2", "--device", "cpu",
                              "--format", "json"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    out = json.loads(res.stdout)
    assert out["task"] == "label-words" and set(out["baseline"]["per_label"]) == {"anger", "joy", "neutral", "sadness"}
    assert out["intervened"]["effect"]["by"] == "label" and len(out["controls"]) == 2
    res = runner.invoke(app, ["intervene", str(corpus), "--model", str(audio_models["qwen2_audio"]), "--neurons", "1:0", "--site", "mlp",
                              "--label-words", "joy=happy", "--device", "cpu"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "no word for label(s) anger" in res.stderr


def test_remote_code_refused(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "kimi_audio", "auto_map": {"AutoConfig": "configuration_kimi.KimiConfig"}}))
    res = runner.invoke(app, ["extract", str(SPEECH), "--model", str(folder), "--out", str(tmp_path / "x.zarr"), "--device", "cpu", "--quiet"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "--trust-remote-code" in lines[0], res.stderr


def test_clip_too_short_for_one_row_is_refused(audio_models, tmp_path):
    """A clip that gives the model no frame (wav2vec2: under 400 samples) or no audio token is one
    line naming it, not a sentence without rows."""
    sf.write(tmp_path / "tick.wav", sine(16000, 0.01), 16000)  # 160 samples
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"audio": "tick.wav", "label": "joy", "lang": "en"}) + "\n")
    for family in ("wav2vec2", "qwen2_audio"):
        res = runner.invoke(app, ["extract", str(corpus), "--model", str(audio_models[family]), "--out", str(tmp_path / f"{family}.zarr"),
                                  "--device", "cpu", "--quiet"])
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and "tick.wav): 10 ms of audio gives" in lines[0] and "Traceback" not in res.stderr, res.stderr
        assert not (tmp_path / f"{family}.zarr").exists()
