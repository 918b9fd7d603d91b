"""Perplexity over a text with a sliding window, to show what a quantisation costs in quality.

Windows of `window` tokens advance by `stride`; each token is scored once, in the first window
that holds it with at least `window - stride` tokens of context before it (except at the start),
as in Hugging Face's perplexity guide.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import LlamascopeError


def perplexity(
    model: torch.nn.Module,
    ids: list[int],
    window: int = 512,
    stride: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, int]:
    """-> (perplexity, number of tokens scored)."""
    if len(ids) < 2:
        raise LlamascopeError("perplexity needs a text of at least 2 tokens")
    window = min(window, model.config.max_position_embeddings)
    stride = min(stride, window)
    tokens = torch.tensor(ids, dtype=torch.long, device=model.device)
    nll, scored, previous_end = 0.0, 0, 0
    starts = list(range(0, max(len(ids) - 1, 1), stride))
    with torch.inference_mode():
        for k, start in enumerate(starts):
            end = min(start + window, len(ids))
            chunk = tokens[start:end][None]  # [1, T]
            positions = torch.arange(end - start, device=model.device)[None]  # [1, T]
            logits = model(chunk, positions).float()  # [1, T, V]
            first_new = max(previous_end, start + 1)  # index of the first token not yet scored
            targets = tokens[first_new:end]  # predicted by positions first_new-1 .. end-2
            predictions = logits[0, first_new - 1 - start : end - 1 - start]  # [n, V]
            nll += F.cross_entropy(predictions, targets, reduction="sum").item()
            scored += len(targets)
            previous_end = end
            if progress is not None:
                progress(k + 1, len(starts))
            if end == len(ids):
                break
    return math.exp(nll / scored), scored
