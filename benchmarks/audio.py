"""Speech extraction benchmark: seconds of speech per second against the bare forward on the same inputs.

    python -m benchmarks.audio            # wav2vec2-base-sized encoder (random weights), data/speech.jsonl
    python -m benchmarks.audio --quick    # a 2-layer encoder, one repeat (seconds)
    python -m benchmarks.audio --model qwen2-audio   # an audio-language model: resid + audio.resid

Rows, interleaved over repeats, on one loaded model: **decode** (read, mono, resample every clip:
what the audio adds before any model runs), **bare** (the same batches as the extraction: decode,
featurise, forward with hidden states, outputs dropped) and **extract** (``extract()`` of ``resid``,
every layer and frame, pooled mean; the loop from the first forward to the last commit, its decode
and featurise time shown apart). Reported: seconds of speech per second, x bare, MB/s written.
The model is built from ``Wav2Vec2Config`` (its defaults are wav2vec2-base: 12 layers, hidden 768;
speed does not depend on the weights) with a feature extractor that returns an attention mask, so
utterances batch together. ``--model qwen2-audio`` builds a Qwen2-Audio instead (a Whisper-base-sized
audio encoder, 6 x 512, over its 30 s window; a 6-layer, 512-wide language model; a byte-level BPE
tokenizer trained here on the sample corpus) and extracts ``resid`` (the language model) and
``audio.resid`` (its encoder, pooled onto the audio rows), every token and pooled mean, with the
prompt "The speaker sounds".
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from benchmarks import common

SPEECH = Path(__file__).resolve().parent.parent / "data" / "speech.jsonl"


def build(folder: Path, quick: bool) -> Path:
    import torch
    import transformers as T

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if quick else {}
    model = T.Wav2Vec2Model(T.Wav2Vec2Config(feat_extract_norm="layer", do_stable_layer_norm=True, **small))
    extractor = T.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                           return_attention_mask=True)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    extractor.save_pretrained(folder)
    return folder


def build_lalm(folder: Path, quick: bool) -> Path:
    """A Qwen2-Audio with random weights and a tokenizer trained on the sample corpus (no download)."""
    import json

    import torch
    import transformers as T
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    texts = [json.loads(line)["text"] for line in (SPEECH.parent / "emotions.jsonl").read_text(encoding="utf-8").splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>", "</s>", "<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = T.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]})
    width, layers = (64, 2) if quick else (512, 6)
    audio = dict(d_model=width, encoder_layers=layers, encoder_attention_heads=8, encoder_ffn_dim=4 * width, num_mel_bins=80,
                 max_source_positions=1500)
    text = dict(vocab_size=len(tok), hidden_size=width, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=int(2.7 * width), max_position_embeddings=2048)
    config = T.Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"))
    model = T.Qwen2AudioForConditionalGeneration(config)
    processor = T.Qwen2AudioProcessor(feature_extractor=T.WhisperFeatureExtractor(feature_size=80), tokenizer=tok)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.audio", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="A 2-layer encoder and one repeat.")
    p.add_argument("--model", choices=("wav2vec2", "qwen2-audio"), default="wav2vec2", help="A speech encoder or an audio-language model.")
    p.add_argument("--repeats", type=int, default=None, help="Interleaved repeats (default 2; quick 1).")
    p.add_argument("--batch-tokens", type=int, default=4096, help="Frame rows per batch, padding included.")
    p.add_argument("--work", default=None, help="Scratch folder (default: a temporary folder).")
    p.add_argument("--results", default=str(common.RESULTS), help="Folder for the results JSON.")
    a = p.parse_args(argv)
    with common.scratch(a.work, "ns-audio-") as work:
        return _measure(a, work, argv)


def _measure(a: argparse.Namespace, work: Path, argv: list[str] | None) -> int:
    import numpy as np
    import torch

    from neurostore import audio, batching, models
    from neurostore.corpus import read_corpus
    from neurostore.extract import ExtractOptions, extract

    repeats = a.repeats or (1 if a.quick else 2)
    lalm = a.model == "qwen2-audio"
    maker = build_lalm if lalm else build
    loaded = models.load(str(maker(work / (a.model + ("-quick" if a.quick else "")), a.quick)), torch.device("cpu"))
    prompt = "The speaker sounds" if lalm else None
    sites = ["resid", "audio.resid"] if lalm else ["resid"]
    corpus = read_corpus([str(SPEECH)], prompt=prompt)
    ids, _, _ = audio.rows(loaded, corpus, loaded.max_length())
    rows = np.array([len(x) for x in ids], dtype=np.int64)
    batches = batching.plan_batches(rows, a.batch_tokens)
    seconds_of_speech = float(sum(n / r for n, r in zip(corpus.audio_frames, corpus.audio_rates)))
    spec = loaded.audio
    audio.load_waveform(spec.refs[0], spec.rate)  # imports and first-call set-up (soundfile, scipy) outside every clock

    def decode() -> dict:
        t = time.perf_counter()
        for ref in spec.refs:
            audio.load_waveform(ref, spec.rate)
        return {"seconds": time.perf_counter() - t}

    def bare() -> dict:
        t = time.perf_counter()
        spec.seconds = 0.0
        with torch.inference_mode():
            for docs in batches:
                feats = audio.features(loaded, docs, loaded.device)
                if lalm:
                    padded = batching.pad_host([ids[i] for i in docs], loaded.pad_id)
                    audio.forward(loaded, {"ids": torch.from_numpy(padded.ids), "mask": torch.from_numpy(padded.mask), "audio": feats}, True)
                else:
                    loaded.model(**feats, output_hidden_states=True)
        return {"seconds": time.perf_counter() - t, "decode_featurise": spec.seconds}

    def run_extract() -> dict:
        out = work / "store.zarr"
        shutil.rmtree(out, ignore_errors=True)
        res = extract([str(SPEECH)], str(out), model=loaded, corpus_options={"prompt": prompt} if prompt else None,
                      options=ExtractOptions(sites=sites, pool=["mean"], max_batch_tokens=a.batch_tokens, device="cpu"))
        disk = common.dir_bytes(out)
        shutil.rmtree(out, ignore_errors=True)
        return {"seconds": res.stages["loop"], "decode_featurise": res.stages.get("decode"), "disk_bytes": disk, "frames": res.tokens}

    rows_out: dict[str, list[dict]] = {"decode": [], "bare": [], "extract": []}
    for rep in range(repeats):
        for name, fn in (("decode", decode), ("bare", bare), ("extract", run_extract)):
            r = fn()
            r["speech_s_per_s"] = seconds_of_speech / r["seconds"]
            rows_out[name].append(r)
            print(f"  [rep {rep + 1}/{repeats}] {name:8s} {r['seconds']:.2f} s  {r['speech_s_per_s']:,.1f} s of speech per s", flush=True)
    best = {name: min(v, key=lambda r: r["seconds"]) for name, v in rows_out.items()}
    summary = {
        "seconds_of_speech": seconds_of_speech, "clips": len(corpus), "frames": best["extract"]["frames"], "batches": len(batches),
        "decode_s": best["decode"]["seconds"],
        "bare_s": best["bare"]["seconds"], "bare_speech_s_per_s": best["bare"]["speech_s_per_s"],
        "extract_s": best["extract"]["seconds"], "extract_speech_s_per_s": best["extract"]["speech_s_per_s"],
        "x_bare": best["bare"]["seconds"] / best["extract"]["seconds"],
        "extract_decode_featurise_s": best["extract"]["decode_featurise"], "bare_decode_featurise_s": best["bare"]["decode_featurise"],
        "mb_s_written": best["extract"]["disk_bytes"] / best["extract"]["seconds"] / 1e6, "disk_mb": best["extract"]["disk_bytes"] / 1e6,
    }
    print(f"{summary['clips']} clips, {seconds_of_speech:.1f} s of speech, {summary['frames']:,} {'token' if lalm else 'frame'} rows: bare "
          f"{summary['bare_speech_s_per_s']:.1f} s/s, extract {summary['extract_speech_s_per_s']:.1f} s/s ({summary['x_bare']:.2f}x bare), "
          f"{summary['mb_s_written']:.1f} MB/s written; decode + resample alone {summary['decode_s']:.2f} s, decode + featurise inside "
          f"extract {summary['extract_decode_featurise_s']:.2f} s")
    payload = {"benchmark": "audio", "quick": a.quick, "command": "python -m benchmarks.audio " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": common.machine(work), "settings": {"model": (("qwen2-audio" if lalm else "wav2vec2") + " (random weights)"
                                                                        + (" 2 layers" if a.quick else " 6 x 512" if lalm else "-base size")),
                                                              "sites": sites, "pool": ["mean"], "batch_tokens": a.batch_tokens, "repeats": repeats},
               "summary": summary, "rows": rows_out}
    name = "audio" + ("-lalm" if lalm else "") + ("-quick" if a.quick else "")
    path = common.save_results(payload, name, Path(a.results))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
