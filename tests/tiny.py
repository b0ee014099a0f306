"""Tiny random models of each supported family, built from a config and saved to a folder.

Random weights are enough: every test compares neurostore against the same model's own outputs.
Tokenizers are trained here with the ``tokenizers`` library, so nothing is downloaded.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "data" / "emotions.jsonl"
FAMILIES = ("bert", "xlm-roberta", "gpt2", "llama", "distilbert")


def sample_texts() -> list[str]:
    return [json.loads(line)["text"] for line in DATA.read_text(encoding="utf-8").splitlines()]


def sample_subset(path: Path, every: int = 4) -> Path:
    """Every ``every``-th triple of the sample corpus (one sentence each in en, es, fr): its
    languages and labels in a fraction of the rows, for the benchmarks' smoke tests."""
    lines = DATA.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[i] for i in range(len(lines)) if (i // 3) % every == 0), encoding="utf-8")
    return path


def _tokenizer(family: str, vocab_size: int | None = None):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    texts = sample_texts()
    trained_size = vocab_size or 300  # the BPE trainers (deterministic) for the other families
    if family in ("bert", "distilbert"):
        # The vocabulary is built here, not by WordPieceTrainer: its ties fall differently from run to
        # run, and a tokenizer that changes between sessions makes every test on it a different test.
        # Specials, every character alone and as a continuation, then the most frequent words (800 in
        # all: about as many tokens a sentence as the trained vocabulary of 300 gave).
        vocab_size = vocab_size or 800
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        words = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t)))
        chars = sorted({c for w in words for c in w})
        vocab = specials + chars + ["##" + c for c in chars]
        vocab += [w for w, _ in sorted(words.items(), key=lambda x: (-x[1], x[0])) if len(w) > 1][: max(0, vocab_size - len(vocab))]
        tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
        tok.normalizer, tok.pre_tokenizer = normalizer, pre
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
        )
    if family == "xlm-roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # <pad> = 1, as RoBERTa's positions expect
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=trained_size, special_tokens=specials))
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
            cls_token="<s>", sep_token="</s>", mask_token="<mask>",
        )
    # byte-level BPE for the decoders; llama-style adds a BOS token, gpt2 adds nothing
    specials = ["<|endoftext|>"] if family == "gpt2" else ["<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=trained_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    if family == "gpt2":
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _config(family: str, vocab: int, classifier: bool, num_labels: int):
    import transformers as T

    common = dict(num_labels=num_labels) if classifier else {}
    if family == "bert":
        return T.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=128, **common)
    if family == "xlm-roberta":
        return T.XLMRobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, max_position_embeddings=130, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2, **common)
    if family == "distilbert":
        return T.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, hidden_dim=44,
                                  max_position_embeddings=128, **common)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                            bos_token_id=0, eos_token_id=0, **common)
    if family == "llama":
        return T.LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=56, max_position_embeddings=128,
                             bos_token_id=0, eos_token_id=1, pad_token_id=None, **common)
    raise ValueError(family)


def make_model(family: str, folder: Path, *, classifier: bool = False, labels: list[str] | None = None, seed: int = 0) -> Path:
    """Save a tiny random ``family`` model (optionally a sequence classifier) and its tokenizer."""
    import transformers as T

    torch.manual_seed(seed)
    tokenizer = _tokenizer(family)
    labels = labels or ["neutral", "joy", "love", "anger", "fear", "sadness"]
    config = _config(family, len(tokenizer), classifier, len(labels))
    if classifier:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
        if family in ("gpt2", "llama"):
            config.pad_token_id = tokenizer.eos_token_id
        model = T.AutoModelForSequenceClassification.from_config(config)
    else:
        model = T.AutoModel.from_config(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
