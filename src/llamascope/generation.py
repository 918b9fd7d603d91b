"""The generation loop: prefill, decode, stop; as a finished result or a stream.

It follows transformers' generate() for the same settings: prompts are left-padded, positions
are `attention_mask.cumsum(-1) - 1`, the first step runs the whole prompt (prefill) and later
steps feed one token per sequence with the KV cache (or the whole sequence again with
`use_cache=False`), logits of the last position go through the processors in transformers'
order, and a sequence stops at an eos id or when `max_length = prompt length + max_new_tokens`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .cache import KVCache
from .config import GenerationConfig
from .errors import LlamascopeError
from .sampling import apply_processors, build_processors, select_next

log = logging.getLogger("llamascope")


@dataclass
class Step:
    """What one forward pass of the loop took in and gave out (for tracing and logging)."""

    index: int
    input_ids: torch.Tensor  # [B, T] the tokens fed this step
    position_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, S] 1 = real token, 0 = padding, over all columns so far
    cache_length: int | None  # positions held by the cache before this step (None: no cache)
    logits: torch.Tensor  # [B, vocab] float32, last position, before processing
    scores: torch.Tensor  # [B, vocab] float32, after processing
    next_tokens: torch.Tensor  # [B]
    capture: dict | None = None  # activations, when the caller asked for them


@dataclass
class GenerationResult:
    prompt_ids: list[list[int]]
    output_ids: list[list[int]]  # the new tokens of each sequence (eos included when hit)
    finish_reasons: list[str]  # "eos", "length", "stop", "time"
    steps: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    logprobs: list[list[dict]] | None = None


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids [B, T], attention_mask [B, T] with prompts aligned to the right."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LlamascopeError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, T - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, T - len(prompt):] = 1
    return input_ids, attention_mask


def attention_mask_4d(attention_mask: torch.Tensor, T: int) -> torch.Tensor | None:
    """[B, S] padding mask -> [B, 1, T, S] bool for the last T columns (None when nothing is padded).

    A query may see keys that are real tokens at or before its column. Each column may always
    see itself, so padded query rows stay finite (their outputs are never used).
    """
    if bool(attention_mask.all()):
        return None
    B, S = attention_mask.shape
    q_cols = torch.arange(S - T, S)[:, None]  # [T, 1]
    k_cols = torch.arange(S)[None, :]  # [1, S]
    causal = k_cols <= q_cols  # [T, S]
    mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, T, S]
    return mask | (k_cols == q_cols)[None, None]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """transformers' rule: position = number of real tokens before; padding gets 1."""
    positions = attention_mask.cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def generate_steps(
    model: torch.nn.Module,
    prompts: list[list[int]],
    config: GenerationConfig,
    capture: Callable[[int], dict | None] | None = None,
) -> Iterator[Step]:
    """Run the loop, yielding each step. The caller decides when to stop by its own rules too;
    the loop itself stops at max_length and when every sequence has hit an eos id."""
    if config.num_beams > 1:
        raise LlamascopeError("beam search goes through llamascope.beam, not generate_steps")
    pad_id = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or [0])[0]
    input_ids, attention_mask = left_pad(prompts, pad_id)  # [B, T0]
    B, T0 = input_ids.shape
    max_length = config.max_length_for(T0)
    context = model.config.max_position_embeddings
    if T0 > context and model.config.rope_type != "dynamic":
        raise LlamascopeError(f"prompt of {T0} tokens is longer than the model's context ({context} positions)")
    processors = build_processors(config, T0)
    generator = None
    if config.do_sample:
        generator = torch.Generator().manual_seed(config.seed if config.seed is not None else torch.seed())
    eos = torch.tensor(config.eos_token_id or [-1], dtype=torch.long)
    unfinished = torch.ones(B, dtype=torch.bool)
    cache = KVCache.for_model(model, B, max_length) if config.use_cache else None

    sequences = input_ids  # [B, S] all tokens so far, padding included
    positions = positions_from_mask(attention_mask)  # [B, S]
    step = 0
    with torch.inference_mode():
        while sequences.shape[1] < max_length:
            if cache is None or step == 0:
                tokens, step_positions = sequences, positions  # [B, S]
            else:
                tokens, step_positions = sequences[:, -1:], positions[:, -1:]  # [B, 1]
            cache_length = cache.length if cache is not None else None
            mask = attention_mask_4d(attention_mask, tokens.shape[1])
            acts = capture(step) if capture is not None else None
            logits = model(tokens, step_positions, cache, mask, capture=acts, last_only=True)  # [B, 1, V]
            logits = logits[:, -1].float()  # [B, V]
            scores = apply_processors(processors, sequences, logits)
            next_tokens = select_next(scores, config, generator)  # [B]
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_id))
            yield Step(step, tokens, step_positions, attention_mask, cache_length, logits, scores, next_tokens, acts)
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones(B, 1, dtype=attention_mask.dtype)], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            unfinished &= ~torch.isin(next_tokens, eos)
            step += 1
            if not bool(unfinished.any()):
                break


def generate(
    model: torch.nn.Module,
    prompts: list[list[int]] | list[int],
    config: GenerationConfig | None = None,
    tokenizer=None,
    on_step: Callable[[Step], None] | None = None,
    capture: Callable[[int], dict | None] | None = None,
    **settings,
) -> GenerationResult:
    """Generate for one prompt (a list of ids) or a batch (a list of lists).

    `config` is a resolved GenerationConfig; keyword settings build one with defaults
    (GenerationConfig.resolve(model.config, None, **settings)) when it is not given.
    """
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]  # type: ignore[list-item]
    prompts = [list(map(int, p)) for p in prompts]  # type: ignore[union-attr]
    if config is None:
        config = GenerationConfig.resolve(model.config, None, **settings)
    elif settings:
        raise LlamascopeError("pass either a GenerationConfig or keyword settings, not both")
    if config.num_beams > 1:
        from .beam import beam_search

        return beam_search(model, prompts, config)
    B = len(prompts)
    outputs: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    done = [False] * B
    eos = set(config.eos_token_id or [])
    start = time.perf_counter()
    prefill_seconds = 0.0
    steps = 0
    for step in generate_steps(model, prompts, config, capture):
        if step.index == 0:
            prefill_seconds = time.perf_counter() - start
        steps += 1
        if on_step is not None:
            on_step(step)
        for row, token in enumerate(step.next_tokens.tolist()):
            if done[row]:
                continue
            outputs[row].append(token)
            if token in eos:
                done[row], reasons[row] = True, "eos"
        if config.max_time is not None and time.perf_counter() - start > config.max_time:
            reasons = [r if d else "time" for r, d in zip(reasons, done)]
            break
        if all(done):
            break
    total = time.perf_counter() - start
    result = GenerationResult(prompts, outputs, reasons, steps, prefill_seconds, total - prefill_seconds)
    if steps > 1:
        log.info("generated %d tokens: prefill %.3f s, decode %.1f tokens/s", sum(map(len, outputs)),
                 prefill_seconds, (steps - 1) / max(total - prefill_seconds, 1e-9))
    return result


def stream(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: list[int],
    config: GenerationConfig,
    skip_special_tokens: bool = True,
) -> Iterator[tuple[int, str]]:
    """Yield (token id, text delta) for one prompt as each token is chosen."""
    decoder = tokenizer.stream_decoder(prompt_ids, skip_special_tokens=skip_special_tokens)
    eos = set(config.eos_token_id or [])
    start = time.perf_counter()
    for step in generate_steps(model, [prompt_ids], config):
        token = int(step.next_tokens[0])
        if token in eos:
            yield token, decoder.flush()
            return
        yield token, decoder.push(token)
        if config.max_time is not None and time.perf_counter() - start > config.max_time:
            break
    tail = decoder.flush()
    if tail:
        yield -1, tail
