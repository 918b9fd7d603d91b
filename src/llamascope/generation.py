"""The generation loop: prefill, decode, stop; as a finished result or a stream.

It follows transformers' generate() for the same settings: prompts are left-padded, positions
are `attention_mask.cumsum(-1) - 1`, the first step runs the whole prompt (prefill) and later
steps feed one token per sequence with the KV cache (or the whole sequence again with
`use_cache=False`), logits of the last position go through the processors in transformers'
order, and each sequence stops by `stopping.StopRules`: an eos id, a stop string,
`max_length = prompt length + max_new_tokens`, or max_time. `generate` hands beam search
(num_beams > 1) to beam.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from .batch import (
    GenerationResult,
    Step,
    add_token_text,
    attention_mask_4d,
    check_finite,
    check_memory_fits,
    logprob_entry,
    positions_from_mask,
    prepare_batch,
)
from .beam import beam_search
from .cache import KVCache
from .config import GenerationConfig
from .errors import LlamascopeError
from .interventions import Intervention, check_interventions, check_search, pass_capture
from .sampling import apply_processors, build_processors, make_generator, select_next, token_logprobs
from .speculative import speculative_steps
from .stopping import StopRules

log = logging.getLogger("llamascope")

__all__ = ["GenerationResult", "Step", "generate", "generate_steps", "stream"]


def _log_stage(stage: str, step: int, message: str, *args) -> None:
    """One DEBUG record per stage of a step; `record.stage` and `record.step` say which."""
    log.debug("step %d %s: " + message, step, stage, *args, extra={"stage": stage, "step": step})


class _Columns:
    """The ids, padding mask and positions of every column up to max_length, in buffers made once
    on the model's device. Each step sees views of the columns so far, which later steps never
    write, so a yielded Step stays valid."""

    def __init__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_length: int, pad_id: int, device: torch.device
    ):
        B, T0 = input_ids.shape
        columns = max(max_length, T0)
        self.ids = torch.full((B, columns), pad_id, dtype=torch.long, device=device)  # [B, columns]
        self.ids[:, :T0] = input_ids
        self.mask = torch.ones((B, columns), dtype=torch.long, device=device)  # [B, columns]
        self.mask[:, :T0] = attention_mask
        prompt_positions = positions_from_mask(attention_mask)  # [B, T0]
        self.positions = torch.empty((B, columns), dtype=torch.long, device=device)  # [B, columns]
        self.positions[:, :T0] = prompt_positions
        # each new token's position is one more than its row's last
        self.positions[:, T0:] = prompt_positions[:, -1:] + torch.arange(1, columns - T0 + 1)[None, :]

    def step_inputs(self, S: int, whole: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> tokens and positions to feed ([B, S] when `whole`, else the last column [B, 1]),
        and the padding mask of the S columns so far [B, S]."""
        first = 0 if whole else S - 1
        return self.ids[:, first:S], self.positions[:, first:S], self.mask[:, :S]


def _stop_reasons(
    rules: StopRules, sequences: list[list[int]], chosen: list[int], running: list[bool], new_tokens: int
) -> list[str | None]:
    """Append each running row's chosen token to its sequence; -> why each row stops at it (None:
    it goes on, or it had stopped before)."""
    out_of_time = rules.out_of_time()
    reasons: list[str | None] = []
    for row, token in enumerate(chosen):
        if not running[row]:
            reasons.append(None)
            continue
        sequences[row].append(token)
        reasons.append(rules.reason(sequences[row], new_tokens, out_of_time))
    return reasons


def _log_inputs(step: int, tokens, positions, mask_2d, cache: KVCache | None) -> None:
    _log_stage(
        "inputs",
        step,
        "input_ids %s position_ids %s attention_mask %s, cache %s, use_cache=%s",
        list(tokens.shape),
        list(positions.shape),
        list(mask_2d.shape),
        "off" if cache is None else f"holding {cache.length} positions",
        cache is not None,
    )


def _padded(chosen: list[int], running: list[bool], pad_id: int, device) -> tuple[list[int], torch.Tensor]:
    """The step's choices with padding for the rows that stopped before it (as transformers feeds them)."""
    chosen = [token if going else pad_id for token, going in zip(chosen, running)]
    return chosen, torch.tensor(chosen, dtype=torch.long, device=device)


def _check_loop(model, prompts, config: GenerationConfig, capture, interventions: Sequence[Intervention]) -> None:
    """Refuse what generate_steps does not run: beams (beam.py), and interventions beside a capture
    or that do not fit the model and prompts."""
    if config.num_beams > 1:
        raise LlamascopeError("beam search goes through llamascope.beam, not generate_steps")
    if interventions:
        if capture is not None:
            raise LlamascopeError("interventions and capture together are not supported yet; pass one of them")
        check_interventions(interventions, model.config, prompts)


def _pass_inputs(
    model, columns: _Columns, cache: KVCache | None, S: int, step: int, padded: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A pass's tokens and positions ([B, S] at the first step, without a cache, or where longrope
    recomputes the sequence and the cache is cleared; else the newest column [B, 1]), the padding
    mask of the S columns so far [B, S], and the 4-D mask over the columns the cache holds (None
    without padding). A windowed cache makes room for the pass first."""
    restart = cache is not None and step > 0 and model.config.longrope_restarts(S, cache.length)
    if restart:
        cache.clear()
    tokens, positions, mask_2d = columns.step_inputs(S, whole=cache is None or step == 0 or restart)
    if cache is not None:
        cache.make_room(tokens.shape[1])  # (a windowed cache may drop columns no query sees)
    held = mask_2d if cache is None else mask_2d[:, cache.dropped :]  # [B, columns held + T]
    mask = attention_mask_4d(held, tokens.shape[1]) if padded else None
    return tokens, positions, mask_2d, mask


def generate_steps(
    model: torch.nn.Module,
    prompts: list[list[int]],
    config: GenerationConfig,
    capture: Callable[[int], dict | None] | None = None,
    tokenizer=None,
    interventions: Sequence[Intervention] = (),
) -> Iterator[Step]:
    """Run the loop, yielding each step. Each row stops by `StopRules` (stop strings need the
    `tokenizer`); `Step.stopped` says which rows stop at that step and why. A row that has
    stopped is fed padding, as in transformers, and the loop ends when every row has stopped.
    A decode step costs a handful of tensor ops around the forward pass. `interventions`
    (interventions.py) edit every pass's activations at its positions; not beside `capture`.
    """
    _check_loop(model, prompts, config, capture, interventions)
    device = model.device
    pad_id, input_ids, attention_mask, max_length = prepare_batch(model, prompts, config, windowed=True)
    B, T0 = input_ids.shape
    rules = StopRules(config, tokenizer, max_length - T0)
    padding_lengths = (attention_mask == 0).sum(dim=1)  # [B] left padding of each row
    processors = build_processors(
        config, T0, padding_lengths.to(device), vocab_size=model.config.vocab_size, tokenizer=tokenizer
    )
    generator = make_generator(config, device) if config.do_sample else None
    padded = bool(padding_lengths.any())
    cache = KVCache.for_model(model, B, max_length, first_pass=T0) if config.use_cache else None
    columns = _Columns(input_ids, attention_mask, max_length, pad_id, device)
    sequences = [list(p) for p in prompts]  # each row's tokens without padding, for the stop rules
    running = [True] * B

    S, step = T0, 0  # columns so far, steps so far
    with torch.inference_mode():
        while S < max_length and any(running):
            tokens, step_positions, mask_2d, mask = _pass_inputs(model, columns, cache, S, step, padded)
            cache_length = cache.length if cache is not None else None
            debug = log.isEnabledFor(logging.DEBUG)
            if debug:
                _log_inputs(step, tokens, step_positions, mask_2d, cache)
            acts = capture(step) if capture is not None else None
            if interventions:
                acts = pass_capture(interventions, step_positions)  # (the native decode step is off)
            logits = model(tokens, step_positions, cache, mask, capture=acts, last_only=True)  # [B, 1, V]
            logits = logits[:, -1].float()  # [B, V]
            check_finite(model, logits, lambda row: sequences[row], step)
            if debug:
                _log_stage("forward", step, "next-token logits %s", list(logits.shape))
            scores = apply_processors(processors, columns.ids[:, :S], logits) if processors else logits
            next_tokens = select_next(scores, config, generator)  # [B]
            chosen = next_tokens.tolist()
            if not all(running):  # rows that stopped get padding
                chosen, next_tokens = _padded(chosen, running, pad_id, next_tokens.device)
            if debug:
                _log_stage("choice", step, "%s chose %s", "sampling" if config.do_sample else "argmax", chosen)
            stopped = _stop_reasons(rules, sequences, chosen, running, step + 1)
            yield Step(step, tokens, step_positions, mask_2d, cache_length, logits, scores, next_tokens, acts, stopped)
            columns.ids[:, S] = next_tokens
            S += 1
            step += 1
            running = [going and reason is None for going, reason in zip(running, stopped)]


def generate(
    model: torch.nn.Module,
    prompts: list[list[int]] | list[int],
    config: GenerationConfig | None = None,
    tokenizer=None,
    on_step: Callable[[Step], None] | None = None,
    capture: Callable[[int], dict | None] | None = None,
    assistant: torch.nn.Module | None = None,
    interventions: Sequence[Intervention] = (),
    **settings,
) -> GenerationResult:
    """Generate for one prompt (a list of ids) or a batch (a list of lists).

    `config` is a resolved GenerationConfig; keyword settings build one with defaults
    (GenerationConfig.resolve(model.config, None, **settings)) when it is not given. `assistant`:
    a model of the same vocabulary that drafts tokens for speculative decoding (speculative.py).
    `interventions` (interventions.py): edits of the activations in every pass (greedy search or
    sampling without drafts).
    """
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]  # type: ignore[list-item]
    prompts = [list(map(int, p)) for p in prompts]  # type: ignore[union-attr]
    if config is None:
        config = GenerationConfig.resolve(model.config, None, **settings)
    elif settings:
        raise LlamascopeError("pass either a GenerationConfig or keyword settings, not both")
    if interventions:
        check_search(config, assistant is not None)
    if config.prompt_lookup_num_tokens is not None or assistant is not None:
        # One prompt at a time: a batch gives each prompt the tokens it gets alone, and so do drafts.
        parts = [
            _collect(
                speculative_steps(model, p, config, tokenizer, assistant, capture), [p], config, tokenizer, on_step
            )
            for p in prompts
        ]
        return GenerationResult.concatenate(parts)
    if config.num_beams > 1:
        return beam_search(model, prompts, config, tokenizer=tokenizer, on_step=on_step)
    if config.num_return_sequences > 1:  # sampling n sequences per prompt: rows i*n .. i*n + n - 1
        check_memory_fits(model, len(prompts) * config.num_return_sequences, 1 + max(map(len, prompts), default=0))
        prompts = [p for p in prompts for _ in range(config.num_return_sequences)]
    steps = generate_steps(model, prompts, config, capture, tokenizer, interventions)
    return _collect(steps, prompts, config, tokenizer, on_step)


def _collect(
    steps: Iterator[Step],
    prompts: list[list[int]],
    config: GenerationConfig,
    tokenizer,
    on_step: Callable[[Step], None] | None,
) -> GenerationResult:
    """Each row's new tokens (and log-probabilities) up to the step where it stopped, and why."""
    B = len(prompts)
    outputs: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B  # where no step ran (max_new_tokens=0)
    done = [False] * B
    logprobs: list[list[dict]] | None = [[] for _ in range(B)] if config.output_logprobs is not None else None
    start = time.perf_counter()
    prefill_seconds, count = 0.0, 0
    for step in steps:
        if step.index == 0:
            prefill_seconds = time.perf_counter() - start
        count += 1
        if on_step is not None:
            on_step(step)
        entries = None if logprobs is None else token_logprobs(step.scores, step.next_tokens, config.output_logprobs)
        for row, token in enumerate(step.next_tokens.tolist()):
            if done[row]:
                continue
            outputs[row].append(token)
            if entries is not None:
                logprobs[row].append(logprob_entry(entries[row]))  # type: ignore[index]
            if step.stopped[row] is not None:  # type: ignore[index]
                done[row], reasons[row] = True, step.stopped[row]  # type: ignore[index]
    total = time.perf_counter() - start
    if logprobs is not None:
        add_token_text(logprobs, tokenizer)
    result = GenerationResult(prompts, outputs, reasons, count, prefill_seconds, total - prefill_seconds, logprobs)
    if count > 1:
        log.info(
            "generated %d tokens: prefill %.3f s, decode %.1f tokens/s",
            sum(map(len, outputs)),
            prefill_seconds,
            (count - 1) / max(total - prefill_seconds, 1e-9),
        )
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
            log.info(
                "generated %d tokens: prefill %.3f s, decode %.1f tokens/s",
                count,
                prefill_seconds,
                (count - 1) / decode_seconds,
            )


def stream(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: list[int],
    config: GenerationConfig,
    skip_special_tokens: bool = True,
    assistant: torch.nn.Module | None = None,
    interventions: Sequence[Intervention] = (),
) -> Iterator[tuple[int, str]]:
    """Yield (token id, text delta) for one prompt as each token is chosen; an eos token's text
    is left out, and text held back at the end (an unfinished character) comes as (-1, text).
    `assistant`, `interventions`: as in `generate`."""
    if interventions:
        check_search(config, assistant is not None)
    decoder = tokenizer.stream_decoder(prompt_ids, skip_special_tokens=skip_special_tokens)
    if config.prompt_lookup_num_tokens is not None or assistant is not None:
        steps = speculative_steps(model, prompt_ids, config, tokenizer, assistant)
    else:
        steps = generate_steps(model, [prompt_ids], config, tokenizer=tokenizer, interventions=interventions)
    for step in _log_speed(steps):
        token, reason = int(step.next_tokens[0]), step.stopped[0]  # type: ignore[index]
        if reason == "eos":
            yield token, decoder.flush()
            return
        text = decoder.push(token)
        if reason == "stop":
            yield token, text + decoder.flush()
            return
        yield token, text
    tail = decoder.flush()
    if tail:
        yield -1, tail
