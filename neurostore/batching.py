"""The batch plan: tokenise once, cut the corpus into write windows and length-sorted batches.

Shared by extraction and intervention so that both see the model through the same batches,
truncation and padding (right padding, attention mask 0 on padding). The plan is a pure function
of the sentence lengths and the options, so a resumed extraction replays exactly the windows and
batches of an uninterrupted one. A store records the version of the plan that wrote it
(``PLAN_VERSION``) and is always resumed with that version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .errors import NeurostoreError

TOKENIZE_CHUNK = 4096
# 1: batches fill the token budget regardless of padding (stores without a "plan" entry).
# 2: a batch is also cut where its real-token share would fall under MIN_REAL_SHARE.
PLAN_VERSION = 2
MIN_REAL_SHARE = 0.8


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], np.ndarray]:
    """Token ids per text (special tokens included) and which texts were cut at ``max_length``.

    Texts are tokenised in full first so that truncation can be counted; only the long ones are
    tokenised again with truncation, which keeps the model's own end-of-sequence tokens.
    """
    ids, truncated, _ = _encode(tokenizer, texts, max_length, details=False)
    return ids, truncated


@dataclass
class TokenDetails:
    """What extraction stores about every token row (the texts' tokens concatenated), so that a
    query can filter and show tokens without loading the tokenizer."""

    kind: np.ndarray  # int8 codes of store.TOKEN_KINDS
    offsets: np.ndarray  # int32 [n_tokens, 2] character spans; -1 where the tokenizer has no offset mapping
    special: dict[int, str]  # id -> string of the special tokens


def tokenize_details(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], np.ndarray, TokenDetails]:
    """:func:`tokenize`, and each token's kind and character span (one tokenizer call, not two).

    A token is *special* when the tokenizer added it (its special-tokens mask: [CLS], [SEP], <s>
    ...) or when it is one of the tokenizer's special tokens met in the text; the unknown token
    stands for text and stays *text*. A fast tokenizer gives each token's span in its text; an
    added special token has none, so it gets the empty span where it sits (the end of the tokens
    before it). A slow tokenizer has no offset mapping: its offsets are -1.
    """
    return _encode(tokenizer, texts, max_length, details=True)


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int, details: bool) -> tuple[list[list[int]], np.ndarray, TokenDetails | None]:
    fast = bool(getattr(tokenizer, "is_fast", False))
    extra = {"return_special_tokens_mask": True, "return_offsets_mapping": fast} if details else {}
    unk = getattr(tokenizer, "unk_token_id", None)
    special_ids = [int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None and i != unk]
    ids: list[list[int]] = []
    truncated: list[bool] = []
    kinds: list[np.ndarray] = []
    spans: list[np.ndarray] = []
    found: set[int] = set()  # ids of the special-kind tokens met
    for lo in range(0, len(texts), TOKENIZE_CHUNK):
        batch = list(texts[lo : lo + TOKENIZE_CHUNK])
        enc = {k: list(v) for k, v in tokenizer(batch, add_special_tokens=True, truncation=False, **extra).items()}
        long = [j for j, row in enumerate(enc["input_ids"]) if len(row) > max_length]
        if long:
            redo = tokenizer([batch[j] for j in long], add_special_tokens=True, truncation=True, max_length=max_length, **extra)
            for key in enc:
                for j, row in zip(long, redo[key]):
                    enc[key][j] = row
        flags = np.zeros(len(batch), dtype=bool)
        flags[long] = True
        truncated.extend(flags.tolist())
        for j, row in enumerate(enc["input_ids"]):
            if not row:
                raise NeurostoreError(f"sentence {lo + j}: the tokenizer produced no tokens for {batch[j][:40]!r}")
        ids.extend(enc["input_ids"])
        if details:
            kind, span, seen = _details(enc, special_ids, fast)
            kinds.append(kind)
            spans.append(span)
            found |= seen
    if not details:
        return ids, np.array(truncated, dtype=bool), None
    kind = np.concatenate(kinds) if kinds else np.zeros(0, np.int8)
    special = {i: str(tokenizer.convert_ids_to_tokens(i)) for i in sorted(found | set(special_ids))}
    offsets = np.concatenate(spans) if spans else np.zeros((0, 2), np.int32)
    return ids, np.array(truncated, dtype=bool), TokenDetails(kind, offsets, special)


def _details(enc: dict, special_ids: list[int], fast: bool) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """Kinds (int8), spans (int32 [n, 2]) and the special ids met, of one tokenised chunk."""
    lengths = np.array([len(row) for row in enc["input_ids"]], dtype=np.int64)
    flat = np.fromiter((t for row in enc["input_ids"] for t in row), dtype=np.int64, count=int(lengths.sum()))
    mask = np.fromiter((m for row in enc["special_tokens_mask"] for m in row), dtype=np.int8, count=len(flat))
    kind = ((mask != 0) | np.isin(flat, special_ids)).astype(np.int8)  # 0 text, 1 special (store.TOKEN_KINDS)
    seen = set(np.unique(flat[kind == 1]).tolist())
    if not fast:
        return kind, np.full((len(flat), 2), -1, np.int32), seen
    span = np.array([pair for row in enc["offset_mapping"] for pair in row], dtype=np.int64).reshape(-1, 2)
    # an added special token has no span: place it where it sits, after the text tokens before it
    seg = np.repeat(np.arange(len(lengths)), lengths)
    big = int(span[:, 1].max(initial=0)) + 1
    upto = np.maximum.accumulate(seg * big + span[:, 1]) - seg * big  # largest end so far in the text
    before = np.r_[0, upto[:-1]]
    before[np.r_[0, np.cumsum(lengths)[:-1]][lengths > 0]] = 0
    empty = (kind == 1) & (span[:, 0] == span[:, 1])
    span[empty] = before[empty, None]
    return kind, span.astype(np.int32), seen


def default_batch_tokens(device: torch.device, bytes_per_token: int = 0) -> int:
    """Padded tokens per batch when none is given.

    On CPU small batches are fastest (benchmarks/README.md: 512 tokens ran 1.7-3.4x faster than
    8192 for MiniLM and an XLM-R-base-sized model). A GPU wants large ones, but one batch's
    activations also travel through a pinned host buffer: above ~1 GiB a batch (a 7B-class model
    with every layer stored) the budget shrinks so that the buffers stay a few GiB.
    """
    if device.type != "cuda":
        return 512
    if bytes_per_token <= 0:
        return 32768
    return int(min(32768, max(1024, ((1 << 30) // bytes_per_token) // 256 * 256)))


def default_buffer_mb(device: torch.device, batch_tokens: int, bytes_per_token: int) -> int:
    """Window buffer (MB) when none is given: 256 on CPU; on CUDA at least four full batches.

    Batches are planned inside a window: a window that holds only one batch's worth of tokens
    forces every length into that batch (most of the GPU's work would be padding), or, with the
    padding bound, into small batches. Four batches per window leave the sort room to work.
    """
    if device.type != "cuda" or bytes_per_token <= 0:
        return 256
    return max(256, -(-4 * batch_tokens * bytes_per_token // (1 << 20)))


def plan_windows(n_tokens: np.ndarray, bytes_per_token: int, bytes_per_doc: int, budget: int) -> list[tuple[int, int]]:
    """Contiguous sentence ranges whose buffered activations stay under ``budget`` bytes.

    A window is the unit of writing and committing. Each holds at least one sentence.
    """
    cost = np.asarray(n_tokens, dtype=np.int64) * bytes_per_token + bytes_per_doc
    windows, start, used = [], 0, 0
    for i, c in enumerate(cost.tolist()):
        if i > start and used + c > budget:
            windows.append((start, i))
            start, used = i, 0
        used += c
    if start < len(cost):
        windows.append((start, len(cost)))
    return windows


def plan_batches(
    lengths: np.ndarray, max_batch_tokens: int, indices: np.ndarray | None = None, version: int = PLAN_VERSION
) -> list[np.ndarray]:
    """Batches of sentence indices, longest first, each with ``len(batch) * max_len <= budget``.

    From version 2 on, a batch also ends where adding the next (shorter) sentence would make
    padding more than ``1 - MIN_REAL_SHARE`` of its tokens, so that the device computes mostly
    real tokens even when one window spans every length. The sort is stable.
    """
    if indices is None:
        indices = np.arange(len(lengths))
    order = indices[np.argsort(-lengths[indices], kind="stable")]
    sorted_lengths = np.asarray(lengths[order], dtype=np.int64)
    batches, start, n = [], 0, len(order)
    while start < n:
        longest = int(sorted_lengths[start])
        size = max(1, max_batch_tokens // max(longest, 1))
        stop = min(n, start + size)
        if version >= 2 and stop - start > 1:
            # real share of [start, start + k) is cumsum / (k * longest): non-increasing in k
            real = np.cumsum(sorted_lengths[start:stop])
            k = np.arange(1, stop - start + 1)
            ok = real >= MIN_REAL_SHARE * k * longest
            stop = start + int(np.argmin(ok)) if not ok.all() else stop
            stop = max(stop, start + 1)
        batches.append(order[start:stop])
        start = stop
    return batches


@dataclass
class Padded:
    """One batch as host arrays: ids and mask ``[B, S]``, and the flat positions of real tokens.

    ``real`` is built on the host from the known lengths, so the device never has to be asked
    where the real tokens are (``nonzero`` would stall the host until the device caught up).
    """

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    real: np.ndarray


def pad_host(rows: Sequence[Sequence[int]], pad_id: int) -> Padded:
    """Right-padded ids, the attention mask and the real-token positions, without a per-row loop."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    longest = int(lengths.max())
    mask = np.arange(longest)[None, :] < lengths[:, None]
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    ids[mask] = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
    return Padded(ids, mask.astype(np.int64), lengths, np.flatnonzero(mask))


def pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` on the device."""
    padded = pad_host(rows, pad_id)
    return to_device(torch.from_numpy(padded.ids), device, pin), to_device(torch.from_numpy(padded.mask), device, pin)


def to_device(t: torch.Tensor, device: torch.device, pin: bool = False) -> torch.Tensor:
    """Host tensor to the device; pinned and non-blocking on CUDA when ``pin``."""
    if device.type != "cuda":
        return t
    if pin:
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
