"""The generation loop: prefill, decode, stop; as a finished result or a stream.

It follows transformers' generate() for the same settings: prompts are left-padded, positions
are `attention_mask.cumsum(-1) - 1`, the first step runs the whole prompt (prefill) and later
steps feed one token per sequence with the KV cache (or the whole sequence again with
`use_cache=False`), logits of the last position go through the processors in transformers'
order, and a sequence stops at an eos id or when `max_length = prompt length + max_new_tokens`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .cache import KVCache
from .config import GenerationConfig
from .errors import LlamascopeError
from .model import check_token_ids
from .sampling import apply_processors, build_processors, make_generator, select_next, token_logprobs

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
    """One row per returned sequence: with num_return_sequences = n, rows i*n .. i*n + n - 1 belong
    to prompt i (as in transformers), and `prompt_ids` repeats each prompt n times."""

    prompt_ids: list[list[int]]
    output_ids: list[list[int]]  # the new tokens of each sequence (eos included when hit)
    finish_reasons: list[str]  # "eos", "length", "stop" (a stop string), "time" (max_time)
    steps: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    # With output_logprobs=N: per sequence, per new token {"token", "id", "logprob", "top": [{"token",
    # "id", "logprob"}, ...N]}, from log_softmax of the processed scores ("token" is None without a tokenizer).
    logprobs: list[list[dict]] | None = None
    sequence_scores: list[float] | None = None  # beam search: transformers' sequences_scores


class StopStrings:
    """Finds a stop string that ends in the newest token of a sequence, also when its characters
    come from several tokens. As in transformers, the match must take at least one character of
    the newest token (text seen before does not stop again), and the prompt's end counts."""

    def __init__(self, stop_strings: list[str], tokenizer):
        if tokenizer is None:
            raise LlamascopeError("stop_strings need the tokenizer: pass generate(..., tokenizer=...)")
        self.strings = list(stop_strings)
        self.tokenizer = tokenizer
        # A token holds at least one byte and a character at most four: this many tokens hold the
        # longest stop string with room to spare.
        self.window = 4 * max(len(s) for s in self.strings) + 4

    def match(self, ids: list[int]) -> str | None:
        """The stop string that the last token of `ids` completes, or None."""
        tail = list(ids[-self.window:])
        if not tail:
            return None
        before = self.tokenizer.decode(tail[:-1], skip_special_tokens=False)
        after = self.tokenizer.decode(tail, skip_special_tokens=False)
        settled = len(os.path.commonprefix([before, after]))  # characters that were there before
        for text in self.strings:
            if text in after[max(0, settled - len(text) + 1):]:
                return text
        return None


def add_token_text(logprobs: list[list[dict]], tokenizer) -> None:
    """Fill each logprob entry's "token" (and its alternatives') with the token's text."""
    if tokenizer is None:
        return
    cache: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id], skip_special_tokens=False)
        return cache[token_id]

    for sequence in logprobs:
        for entry in sequence:
            entry["token"] = text(entry["id"])
            for alt in entry["top"]:
                alt["token"] = text(alt["id"])


def logprob_entry(raw: dict) -> dict:
    """One token's entry of GenerationResult.logprobs from sampling.token_logprobs' row ("token" filled later)."""
    return {"token": None, "id": raw["id"], "logprob": raw["logprob"],
            "top": [{"token": None, "id": alt["id"], "logprob": alt["logprob"]} for alt in raw["top"]]}


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
    q_cols = torch.arange(S - T, S, device=attention_mask.device)[:, None]  # [T, 1]
    k_cols = torch.arange(S, device=attention_mask.device)[None, :]  # [1, S]
    causal = k_cols <= q_cols  # [T, S]
    mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, T, S]
    return mask | (k_cols == q_cols)[None, None]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """transformers' rule: position = number of real tokens before; padding gets 1."""
    positions = attention_mask.cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def _log_stage(stage: str, step: int, message: str, *args) -> None:
    """One DEBUG record per stage of a step; `record.stage` and `record.step` say which."""
    log.debug("step %d %s: " + message, step, stage, *args, extra={"stage": stage, "step": step})


def prepare_batch(model: torch.nn.Module, prompts: list[list[int]], config: GenerationConfig):
    """-> (pad id, input_ids [B, T0], attention_mask [B, T0], max_length), prompts left-padded;
    refuses a prompt longer than the context."""
    for row, prompt in enumerate(prompts):
        check_token_ids(prompt, model.config.vocab_size, f"prompt {row}: ")
    pad_id = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or [0])[0]
    input_ids, attention_mask = left_pad(prompts, pad_id)  # [B, T0]
    T0 = input_ids.shape[1]
    context = model.config.max_position_embeddings
    if T0 > context and model.config.rope_type != "dynamic":
        raise LlamascopeError(f"prompt of {T0} tokens is longer than the model's context ({context} positions)")
    return pad_id, input_ids, attention_mask, config.max_length_for(T0, context)


def generate_steps(
    model: torch.nn.Module,
    prompts: list[list[int]],
    config: GenerationConfig,
    capture: Callable[[int], dict | None] | None = None,
) -> Iterator[Step]:
    """Run the loop, yielding each step. The caller decides when to stop by its own rules too;
    the loop itself stops at max_length and when every sequence has hit an eos id.

    The ids, positions and mask of every column up to max_length live in buffers made once (on
    the model's device); each step sees views of the columns so far, which later steps never
    write, so a yielded Step stays valid. A decode step then costs a handful of tensor ops
    around the forward pass.
    """
    if config.num_beams > 1:
        raise LlamascopeError("beam search goes through llamascope.beam, not generate_steps")
    device = model.device
    pad_id, input_ids, attention_mask, max_length = prepare_batch(model, prompts, config)
    B, T0 = input_ids.shape
    padding_lengths = (attention_mask == 0).sum(dim=1)  # [B] left padding of each row
    processors = build_processors(config, T0, padding_lengths.to(device), vocab_size=model.config.vocab_size)
    generator = make_generator(config, device) if config.do_sample else None
    eos = set(config.eos_token_id or [])
    unfinished = [True] * B
    padded = bool(padding_lengths.any())
    cache = KVCache.for_model(model, B, max_length) if config.use_cache else None

    columns = max(max_length, T0)
    ids_buffer = torch.full((B, columns), pad_id, dtype=torch.long, device=device)  # [B, columns]
    ids_buffer[:, :T0] = input_ids
    mask_buffer = torch.ones((B, columns), dtype=torch.long, device=device)  # [B, columns]
    mask_buffer[:, :T0] = attention_mask
    prompt_positions = positions_from_mask(attention_mask)  # [B, T0]
    positions_buffer = torch.empty((B, columns), dtype=torch.long, device=device)  # [B, columns]
    positions_buffer[:, :T0] = prompt_positions
    # each new token's position is one more than its row's last
    positions_buffer[:, T0:] = prompt_positions[:, -1:] + torch.arange(1, columns - T0 + 1)[None, :]

    S, step = T0, 0  # columns so far, steps so far
    with torch.inference_mode():
        while S < max_length:
            if cache is None or step == 0:
                tokens, step_positions = ids_buffer[:, :S], positions_buffer[:, :S]  # [B, S]
            else:
                tokens, step_positions = ids_buffer[:, S - 1:S], positions_buffer[:, S - 1:S]  # [B, 1]
            attention_mask = mask_buffer[:, :S]  # [B, S]
            cache_length = cache.length if cache is not None else None
            mask = attention_mask_4d(attention_mask, tokens.shape[1]) if padded else None
            debug = log.isEnabledFor(logging.DEBUG)
            if debug:
                _log_stage("inputs", step, "input_ids %s position_ids %s attention_mask %s, cache %s, use_cache=%s",
                           list(tokens.shape), list(step_positions.shape), list(attention_mask.shape),
                           "off" if cache is None else f"holding {cache_length} positions", cache is not None)
            acts = capture(step) if capture is not None else None
            logits = model(tokens, step_positions, cache, mask, capture=acts, last_only=True)  # [B, 1, V]
            logits = logits[:, -1].float()  # [B, V]
            if debug:
                _log_stage("forward", step, "next-token logits %s", list(logits.shape))
            scores = apply_processors(processors, ids_buffer[:, :S], logits) if processors else logits
            next_tokens = select_next(scores, config, generator)  # [B]
            chosen = next_tokens.tolist()
            if not all(unfinished):  # finished rows get padding
                chosen = [token if going else pad_id for token, going in zip(chosen, unfinished)]
                next_tokens = torch.tensor(chosen, dtype=torch.long, device=next_tokens.device)
            if debug:
                _log_stage("choice", step, "%s chose %s", "sampling" if config.do_sample else "argmax", chosen)
            yield Step(step, tokens, step_positions, attention_mask, cache_length, logits, scores, next_tokens, acts)
            ids_buffer[:, S] = next_tokens
            S += 1
            step += 1
            unfinished = [going and token not in eos for token, going in zip(chosen, unfinished)]
            if not any(unfinished):
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

        return beam_search(model, prompts, config, tokenizer=tokenizer, on_step=on_step)
    if config.num_return_sequences > 1:  # sampling n sequences per prompt: rows i*n .. i*n + n - 1
        prompts = [p for p in prompts for _ in range(config.num_return_sequences)]
    stops = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
    B = len(prompts)
    outputs: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    done = [False] * B
    logprobs: list[list[dict]] | None = [[] for _ in range(B)] if config.output_logprobs is not None else None
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
        if logprobs is not None:
            entries = token_logprobs(step.scores, step.next_tokens, config.output_logprobs)
        for row, token in enumerate(step.next_tokens.tolist()):
            if done[row]:
                continue
            outputs[row].append(token)
            if logprobs is not None:
                logprobs[row].append(logprob_entry(entries[row]))
            if token in eos:
                done[row], reasons[row] = True, "eos"
            elif stops is not None and stops.match(prompts[row] + outputs[row]) is not None:
                done[row], reasons[row] = True, "stop"
        if config.max_time is not None and time.perf_counter() - start > config.max_time:
            reasons = [r if d else "time" for r, d in zip(reasons, done)]
            break
        if all(done):
            break
    total = time.perf_counter() - start
    if logprobs is not None:
        add_token_text(logprobs, tokenizer)
    result = GenerationResult(prompts, outputs, reasons, steps, prefill_seconds, total - prefill_seconds, logprobs)
    if steps > 1:
        log.info("generated %d tokens: prefill %.3f s, decode %.1f tokens/s", sum(map(len, outputs)),
                 prefill_seconds, (steps - 1) / max(total - prefill_seconds, 1e-9))
    return result


def _log_speed(steps: Iterator[Step]) -> Iterator[Step]:
    """Pass the steps through; when they end (or the consumer stops) log the speed once at INFO."""
    start = time.perf_counter()
    prefill_seconds, count = 0.0, 0
    try:
        for step in steps:
            if count == 0:
                prefill_seconds = time.perf_counter() - start
            count += 1
            yield step
    finally:
        if count > 1:
            decode_seconds = max(time.perf_counter() - start - prefill_seconds, 1e-9)
            log.info("generated %d tokens: prefill %.3f s, decode %.1f tokens/s", count, prefill_seconds,
                     (count - 1) / decode_seconds)


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
    stops = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
    ids = list(prompt_ids)
    start = time.perf_counter()
    for step in _log_speed(generate_steps(model, [prompt_ids], config)):
        token = int(step.next_tokens[0])
        if token in eos:
            yield token, decoder.flush()
            return
        ids.append(token)
        if stops is not None and stops.match(ids) is not None:
            yield token, decoder.push(token) + decoder.flush()
            return
        yield token, decoder.push(token)
        if config.max_time is not None and time.perf_counter() - start > config.max_time:
            break
    tail = decoder.flush()
    if tail:
        yield -1, tail
