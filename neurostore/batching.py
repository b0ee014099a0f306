"""Tokenise once, then cut the corpus into length-sorted batches under a token budget.

Shared by extraction and intervention so that both see the model through the same batches,
truncation and padding (right padding, attention mask 0 on padding).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .errors import NeurostoreError

TOKENIZE_CHUNK = 4096


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


def default_batch_tokens(device: torch.device) -> int:
    """Padded tokens per batch when none is given.

    On CPU small batches are fastest (benchmarks/README.md: 512 tokens ran 1.7-3.4x faster than
    8192 for MiniLM and an XLM-R-base-sized model); a GPU wants large ones.
    """
    return 32768 if device.type == "cuda" else 512


def plan_batches(lengths: np.ndarray, max_batch_tokens: int, indices: np.ndarray | None = None) -> list[np.ndarray]:
    """Batches of sentence indices, longest first, each with ``len(batch) * max_len <= budget``.

    Longest first: if the budget does not fit in memory, the first batch says so at once. The sort
    is stable, so the plan is a pure function of the lengths (resume relies on that).
    """
    if indices is None:
        indices = np.arange(len(lengths))
    order = indices[np.argsort(-lengths[indices], kind="stable")]
    batches, start = [], 0
    while start < len(order):
        longest = int(lengths[order[start]])
        size = max(1, max_batch_tokens // max(longest, 1))
        batches.append(order[start : start + size])
        start += size
    return batches


def pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` on the device."""
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    if device.type == "cuda":
        if pin:
            ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
        return ids_t.to(device, non_blocking=pin), mask_t.to(device, non_blocking=pin)
    return ids_t, mask_t
