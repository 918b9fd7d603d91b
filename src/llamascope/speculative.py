"""Prompt lookup decoding: draft the next tokens from an earlier occurrence of the sequence's last
few tokens, and check the whole draft in one pass (transformers' `prompt_lookup_num_tokens`).
Greedy search gives the tokens it gives without drafts, to the bit:

    prefill the prompt; choose the first token as greedy search does
    each round (ids: the prompt and the tokens so far; the cache holds all but the newest):
        draft = lookup(ids)                            up to K tokens (none: a plain step)
        logits = verify([newest] + draft)              T = 1 + len(draft) positions, one pass
        for t in 0..T-1:  token_t = greedy(processors(ids, logits[t])); ids += token_t
                          go on while t < len(draft) and token_t == draft[t]
        the cache keeps the columns of the kept tokens but the newest

A pass over T positions reads the weights once instead of T times. On the native backend it is one
decode step over T rows of one sequence (`DecodeStep.verify`), whose rows get the numbers of T
one-token steps (a draft longer than the step's 8 rows goes in several such calls). Where that does
not apply (another backend), the positions go through the model one at a time, as without drafts:
the same tokens, no gain.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .batch import Step, check_finite, prepare_batch
from .cache import KVCache
from .config import GenerationConfig
from .decode_step import DecodeStep
from .errors import LlamascopeError
from .layers import KERNEL_MAX_ROWS
from .sampling import apply_processors, build_processors, select_next
from .stopping import StopRules

DEFAULT_NGRAM = 2  # transformers' max_matching_ngram_size
MAX_BACKOFF = 16  # rounds without drafts after drafts that keep missing, at most


class DraftBudget:
    """How many tokens to draft next: up to K, two more after a draft kept whole, one fewer after a
    draft cut short; after a draft of which nothing was kept, no drafts for a few rounds (1, 2, 4,
    ... up to MAX_BACKOFF while they keep missing). A draft costs a row of the step per token (on
    two cores two rows take 1.4 times one), so where the text stops following earlier text, drafting
    stops too. The tokens never depend on it, only the speed."""

    def __init__(self, most: int):
        self.most, self.size, self.wait, self.backoff = most, most, 0, 1

    def next(self) -> int:
        if self.wait:
            self.wait -= 1
            return 0
        return self.size

    def kept(self, drafted: int, kept: int) -> None:
        if not drafted:
            return
        if kept == drafted:
            self.size, self.backoff = min(self.most, self.size + 2), 1
            return
        self.size = max(1, self.size - 1)
        if kept == 0:
            self.wait, self.backoff = self.backoff, min(MAX_BACKOFF, 2 * self.backoff)
        else:
            self.backoff = 1


def lookup(ids: list[int], num_tokens: int, max_ngram: int, eos_ids: list[int] = ()) -> list[int]:
    """Up to `num_tokens` tokens that followed the first earlier occurrence of the last n tokens of
    `ids`, for n from `max_ngram` down to 1, cut before an eos id (transformers'
    PromptLookupCandidateGenerator: the first match, left to right, that has a continuation)."""
    length = len(ids)
    for n in range(min(max_ngram, length - 1), 0, -1):
        tail = ids[-n:]
        for start in range(length - n):
            if ids[start : start + n] == tail:
                follow = ids[start + n : min(start + n + num_tokens, length)]
                if follow:
                    stop = next((i for i, token in enumerate(follow) if token in eos_ids), len(follow))
                    return follow[:stop]
    return []


def verify(model: torch.nn.Module, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits [T, V] (float32) of T consecutive new positions [1, T] of one sequence after the
    cache's columns, as T one-token steps give them; the cache advances by T."""
    T = tokens.shape[1]
    positions = torch.arange(cache.length, cache.length + T, device=tokens.device)[None]  # [1, T]
    step = model.decode_step
    if isinstance(step, DecodeStep) and T > 1 and step.verifies(tokens[:, :1], cache):
        # KERNEL_MAX_ROWS positions a call: each call's rows see the columns the calls before wrote
        chunks = [slice(t, t + KERNEL_MAX_ROWS) for t in range(0, T, KERNEL_MAX_ROWS)]
        return torch.cat([step.verify(tokens[:, c], positions[:, c], cache)[0] for c in chunks]).float()  # [T, V]
    rows = [model(tokens[:, t : t + 1], positions[:, t : t + 1], cache, None, last_only=True)[0, -1] for t in range(T)]
    return torch.stack(rows).float()  # [T, V]


def speculative_steps(
    model: torch.nn.Module, prompt: list[int], config: GenerationConfig, tokenizer=None
) -> Iterator[Step]:
    """Greedy search on one prompt with prompt lookup drafts: one Step per new token (its input_ids
    are what its round fed), ending at the first stop."""
    if config.prompt_lookup_num_tokens is None or config.do_sample or config.num_beams != 1 or not config.use_cache:
        raise LlamascopeError("prompt lookup decoding runs greedy search with the KV cache on one prompt")
    device = model.device
    _, input_ids, _, max_length = prepare_batch(model, [prompt], config)
    T0 = input_ids.shape[1]
    rules = StopRules(config, tokenizer, max_length - T0)
    processors = build_processors(config, T0, torch.zeros(1, dtype=torch.long, device=device), model.config.vocab_size)
    cache = KVCache.for_model(model, 1, max_length)
    sequence = list(prompt)
    ngram = config.max_matching_ngram_size or DEFAULT_NGRAM
    budget = DraftBudget(config.prompt_lookup_num_tokens)
    step = 0
    with torch.inference_mode():
        fed = input_ids  # [1, T0]: the prompt first
        logits = model(fed, torch.arange(T0, device=device)[None], cache, None, last_only=True)[0].float()  # [1, V]
        draft: list[int] = []
        while True:
            cached = cache.length - fed.shape[1]  # the cache's columns before this round
            positions = torch.arange(cached, cached + fed.shape[1], device=device)[None]  # [1, T]: what was fed
            check_finite(model, logits, lambda row: sequence, step)
            for t in range(len(draft) + 1):
                scores = logits[t : t + 1]  # [1, V]
                if processors:
                    scores = apply_processors(processors, torch.tensor([sequence], device=device), scores)
                token = int(select_next(scores, config, None)[0])
                sequence.append(token)
                reason = rules.reason(sequence, len(sequence) - T0, rules.out_of_time())
                mask = torch.ones(1, len(sequence) - 1, dtype=torch.long, device=device)  # [1, S]
                next_tokens = torch.tensor([token], device=device)
                yield Step(step, fed, positions, mask, cached, logits[t : t + 1], scores, next_tokens, None, [reason])
                step += 1
                if reason is not None:
                    return
                if t == len(draft) or token != draft[t]:
                    break
            budget.kept(len(draft), t)  # (t: the draft tokens kept, the last choice being new)
            cache.length = len(sequence) - 1  # the kept tokens' columns but the newest's
            size = min(budget.next(), max(0, max_length - len(sequence) - 1))  # (a round adds size + 1 at most)
            draft = lookup(sequence, size, ngram, config.eos_token_id) if size else []
            fed = torch.tensor([sequence[-1:] + draft], device=device)  # [1, T]
            logits = verify(model, fed, cache)  # [T, V]
