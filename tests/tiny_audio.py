"""Tiny random audio models built from configs and saved with their feature extractor (and, for the
audio-language model, a tokenizer trained here): nothing is downloaded.

Random weights are enough: the tests compare neurostore against the same model's own outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny import _tokenizer

SPEECH = Path(__file__).resolve().parent.parent / "data" / "speech.jsonl"
ENCODERS = ("wav2vec2", "hubert", "wavlm", "whisper")
# the real models' convolutional front end (320 samples a frame at 16 kHz), with few channels
_CONV = dict(conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2))


def make_encoder(family: str, folder: Path, seed: int = 0) -> Path:
    """A tiny speech encoder and its feature extractor (wav2vec2-style: layer norm, attention mask)."""
    import transformers as T

    torch.manual_seed(seed)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True)
    if family == "whisper":
        # 4 s windows: 400 mel frames, 200 encoder frames (the real model: 30 s, 1500)
        config = T.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                                 encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=80, max_source_positions=200,
                                 max_target_positions=32, vocab_size=64, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
        model = T.WhisperModel(config)
        extractor = T.WhisperFeatureExtractor(feature_size=80, chunk_length=4)
    else:
        config = {"wav2vec2": T.Wav2Vec2Config, "hubert": T.HubertConfig, "wavlm": T.WavLMConfig}[family](**small, **_CONV)
        model = T.AutoModel.from_config(config)
        extractor = T.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                               return_attention_mask=True)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    extractor.save_pretrained(folder)
    return folder


def make_qwen2_audio(folder: Path, seed: int = 0) -> Path:
    """A tiny Qwen2-Audio (whisper-style audio encoder + qwen2 language model) with its processor."""
    import transformers as T

    torch.manual_seed(seed)
    tok = _tokenizer("llama")
    tok.add_special_tokens({"additional_special_tokens": ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]})
    tok.pad_token = "</s>"
    audio = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48, num_mel_bins=80, max_source_positions=200)
    text = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=56, max_position_embeddings=512)
    config = T.Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"))
    model = T.Qwen2AudioForConditionalGeneration(config)
    extractor = T.WhisperFeatureExtractor(feature_size=80, chunk_length=4)
    processor = T.Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tok)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_audio_flamingo3(folder: Path, seed: int = 0) -> Path:
    """A tiny Audio Flamingo 3 (whisper-style encoder with a 2x average pool, a projector, a qwen2 language
    model) with its processor; 4 s windows of 100 audio tokens (the real model: 30 s, 750), so an utterance
    longer than 4 s spans several windows."""
    import transformers as T

    torch.manual_seed(seed)
    tok = _tokenizer("llama")
    tok.add_special_tokens({"additional_special_tokens": ["<sound>"]})
    tok.pad_token = "</s>"
    audio = dict(model_type="audioflamingo3_encoder", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                 num_mel_bins=80, max_source_positions=200)
    text = dict(model_type="qwen2", vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=56, max_position_embeddings=512)
    config = T.AudioFlamingo3Config(audio_config=audio, text_config=text, audio_token_id=tok.convert_tokens_to_ids("<sound>"))
    model = T.AudioFlamingo3ForConditionalGeneration(config)
    extractor = T.WhisperFeatureExtractor(feature_size=80, chunk_length=4)
    processor = T.AudioFlamingo3Processor(feature_extractor=extractor, tokenizer=tok, max_audio_len=12)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_qwen2_5_omni(folder: Path, seed: int = 0, whole: bool = False) -> Path:
    """A tiny Qwen2.5-Omni thinker (whisper-style audio encoder, a one-block vision encoder, a qwen2 language
    model with 3-d rotary positions) with its tokenizer and feature extractor; ``whole``: saved as the whole
    model (``qwen2_5_omni``, no talker). Its processor is not saved: it needs torchvision's video processor."""
    import transformers as T

    torch.manual_seed(seed)
    tok = _tokenizer("llama")
    names = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>", "image_token": "<|IMAGE|>",
             "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>"}
    tok.add_special_tokens({"additional_special_tokens": list(names.values())})
    tok._set_model_specific_special_tokens(special_tokens=names)
    tok.pad_token = "</s>"
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}
    audio = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48, num_mel_bins=80, max_source_positions=200,
                 n_window=50, output_dim=32)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0])
    text = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=56,
                max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    config = T.Qwen2_5OmniThinkerConfig(
        audio_config=audio, vision_config=vision, text_config=text, audio_token_index=ids["audio_token"], image_token_index=ids["image_token"],
        video_token_index=ids["video_token"], audio_start_token_id=ids["audio_bos_token"], audio_end_token_id=ids["audio_eos_token"],
        vision_start_token_id=ids["vision_bos_token"], vision_end_token_id=ids["vision_eos_token"])
    if whole:
        model = T.Qwen2_5OmniForConditionalGeneration(T.Qwen2_5OmniConfig(thinker_config=config.to_dict(), enable_audio_output=False))
    else:
        model = T.Qwen2_5OmniThinkerForConditionalGeneration(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    T.WhisperFeatureExtractor(feature_size=80, chunk_length=4).save_pretrained(folder)
    tok.save_pretrained(folder)
    if whole:  # the whole model's loader reads the talker's speakers, as a real checkpoint has them
        torch.save({}, folder / "spk_dict.pt")
    return folder


if __name__ == "__main__":  # build them all in a folder, to look at
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny_audio")
    for fam in ENCODERS:
        print(make_encoder(fam, out / fam))
    print(make_qwen2_audio(out / "qwen2_audio"))
    print(make_audio_flamingo3(out / "audioflamingo3"))
    print(make_qwen2_5_omni(out / "qwen2_5_omni_thinker"))
