"""Logits processors in transformers' order, and the choice of the next token.

`build_processors(config, prompt_length)` gives the list that `generate()` applies to the
last position's float32 scores [B, V] each step; `select_next(scores, config, generator)` picks
the next token (argmax for greedy search, a draw from softmax for sampling).
"""

from __future__ import annotations

import torch

from .config import GenerationConfig


class TemperatureWarper:
    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopKWarper:
    def __init__(self, top_k: int, min_tokens_to_keep: int = 1):
        self.top_k = max(top_k, min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]  # [B, 1]
        return scores.masked_fill(scores < kth, float("-inf"))


class TopPWarper:
    def __init__(self, top_p: float, min_tokens_to_keep: int = 1):
        self.top_p, self.min_tokens_to_keep = top_p, min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, sorted_idx = torch.sort(scores, descending=False)  # [B, V]
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - self.top_p)
        remove[..., -self.min_tokens_to_keep:] = False
        remove = remove.scatter(1, sorted_idx, remove)
        return scores.masked_fill(remove, float("-inf"))


def build_processors(config: GenerationConfig, prompt_length: int) -> list:
    """The processors transformers would apply for these settings, in its order."""
    processors: list = []
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPWarper(config.top_p))
    return processors


def apply_processors(processors: list, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores


def select_next(scores: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """scores [B, V] float32 after processing -> next token ids [B]."""
    if config.do_sample:
        probs = scores.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return scores.argmax(-1)
