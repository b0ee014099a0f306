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
    ids: list[list[int]] = []
    for lo in range(0, len(texts), TOKENIZE_CHUNK):
        batch = list(texts[lo : lo + TOKENIZE_CHUNK])
        ids.extend(tokenizer(batch, add_special_tokens=True, truncation=False)["input_ids"])
    truncated = np.array([len(x) > max_length for x in ids], dtype=bool)
    long = np.flatnonzero(truncated)
    if len(long):
        redo = tokenizer([texts[i] for i in long], add_special_tokens=True, truncation=True, max_length=max_length)
        for i, row in zip(long, redo["input_ids"]):
            ids[i] = row
    for i, row in enumerate(ids):
        if not row:
            raise NeurostoreError(f"sentence {i}: the tokenizer produced no tokens for {texts[i][:40]!r}")
    return ids, truncated


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
