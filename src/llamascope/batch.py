"""What the decoding loops share: the left-padded batch, its positions and masks, the context
check, and the records they return.

The greedy / sampling loop (generation.py) and beam search (beam.py) both start from
`prepare_batch` and report through `Step` and `GenerationResult`; generation.py hands beam search
its calls, so neither imports the other's internals.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .activations import Capture
from .cache import KVCache, SlotKVCache
from .config import GenerationConfig, room_for_new_tokens
from .errors import LlamascopeError
from .memory import available_bytes
from .model import check_token_ids

log = logging.getLogger("llamascope")
# Copies of a step's float32 scores [rows, vocab] that generation holds at once (logits, processed
# scores, their log-softmax): what `check_memory_fits` counts beside the KV cache.
LOGITS_COPIES = 3


@dataclass
class Speculation:
    """Where a step of speculative decoding stands in its round: the round's draft (from
    `source`), and which of its tokens this step's choice was checked against; `index ==
    len(draft)`: none, the token after a draft kept whole (or a round without a draft)."""

    source: str
    draft: list[int]
    index: int
    # an assistant's sampling: the probability it drew draft[index] with (the rejection rule's q)
    draft_prob: float | None = None

    @property
    def checked(self) -> bool:
        return self.index < len(self.draft)

    def accepts(self, token: int) -> bool:
        """The step's chosen `token` is the draft token it was checked against."""
        return self.checked and self.draft[self.index] == token


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
    capture: Capture | None = None  # activations, when the caller asked for them
    # Per row, why it stops at this step's token ("eos", "stop", "length", "time"; see stopping.py),
    # or None when it goes on or stopped before. None in beam search, where candidates stop instead.
    stopped: list[str | None] | None = None
    # Speculative decoding (speculative.py): the round's draft and which token this step checked.
    speculation: Speculation | None = None


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

    @classmethod
    def concatenate(cls, parts: list[GenerationResult]) -> GenerationResult:
        """The rows of several results (of one prompt each, say) as one result, in order."""
        logprobs = None if parts[0].logprobs is None else [row for p in parts for row in p.logprobs]
        return cls(
            [row for p in parts for row in p.prompt_ids],
            [row for p in parts for row in p.output_ids],
            [reason for p in parts for reason in p.finish_reasons],
            sum(p.steps for p in parts),
            sum(p.prefill_seconds for p in parts),
            sum(p.decode_seconds for p in parts),
            logprobs,
        )


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
    return {
        "token": None,
        "id": raw["id"],
        "logprob": raw["logprob"],
        "top": [{"token": None, "id": alt["id"], "logprob": alt["logprob"]} for alt in raw["top"]],
    }


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids [B, T], attention_mask [B, T] with prompts aligned to the right."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LlamascopeError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, T - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, T - len(prompt) :] = 1
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


def prepare_batch(model: torch.nn.Module, prompts: list[list[int]], config: GenerationConfig, windowed: bool = False):
    """-> (pad id, input_ids [B, T0], attention_mask [B, T0], max_length), prompts left-padded.

    Refuses a prompt that leaves no room for a new token in the context (`room_for_new_tokens`),
    and warns when max_length goes past the context (generation goes on, as in transformers).
    Refuses a run whose KV cache (bounded by the window where `windowed`: generate's) and logits
    do not fit in free memory.
    """
    for row, prompt in enumerate(prompts):
        check_token_ids(prompt, model.config.vocab_size, f"prompt {row}: ")
    own = config.pad_token_id  # (-1, as LLaMA-1 files have it: none)
    pad_id = own if own is not None and own >= 0 else (config.eos_token_id or [0])[0]
    vocab = model.config.vocab_size
    for name, ids in (("pad_token_id", [pad_id]), ("eos_token_id", config.eos_token_id)):
        outside = [t for t in ids if t >= vocab]
        if outside:
            raise LlamascopeError(f"generation setting {name}={outside[0]}: not in the vocabulary (0..{vocab - 1})")
    input_ids, attention_mask = left_pad(prompts, pad_id)  # [B, T0]
    T0 = input_ids.shape[1]
    context = model.config.context_limit
    room = room_for_new_tokens(T0, context)
    max_length = config.max_length_for(T0, model.config.max_position_embeddings)
    if room is not None and max_length - T0 > room:
        log.warning(
            "up to %d new tokens after a prompt of %d go past the model's context of %d positions; "
            "generation goes on (as in transformers), but positions from %d on were not trained",
            max_length - T0,
            T0,
            context,
            context,
        )
    # the columns the caller's cache will hold (a windowed cache: fewer)
    columns = KVCache.columns_for(model, max_length, T0 if windowed else None)[0] if config.use_cache else 0
    check_memory_fits(model, input_ids.shape[0] * config.num_beams, columns)
    return pad_id, input_ids, attention_mask, max_length


def check_finite(model: torch.nn.Module, logits: torch.Tensor, row_ids: Callable[[int], list[int]], step: int) -> None:
    """Stop, with a message, at a step whose logits [B, V] hold NaN or infinity (else greedy search
    would pick token 0 forever and exit as if all were well): the step, the first such row, and the
    first activation of that row that is not finite, found by running its tokens (`row_ids(row)`)
    again, whole, with the activations captured. A sum per step is all it costs otherwise."""
    if math.isfinite(float(logits.sum())):
        return
    finite = torch.isfinite(logits).all(dim=-1)  # [B]
    if bool(finite.all()):
        return  # (large finite logits whose sum overflowed)
    row = int((~finite).nonzero()[0])
    ids = row_ids(row)
    capture = Capture()
    tokens = torch.tensor([ids], device=model.device)  # [1, L]
    with torch.inference_mode():
        model(tokens, torch.arange(len(ids), device=model.device)[None], capture=capture)
    first = next((name for name, value in capture.items() if not bool(torch.isfinite(value).all())), None)
    where = f"; the first activation that is not: {first}" if first else ""
    raise LlamascopeError(
        f"step {step}: the logits of sequence {row} are not finite (NaN or infinite){where}. The weights or the "
        f"config (rope_theta, rms_norm_eps, rope_scaling) are damaged, or the dtype overflows"
    )


def check_memory_fits(model: torch.nn.Module, rows: int, positions: int) -> None:
    """Refuse, before allocating anything, a run of `rows` sequences x `positions` whose KV cache
    and logits the device's free memory cannot hold (max_new_tokens, num_beams and the number of
    sequences size them), saying what would fit."""
    c = model.config
    per_position = SlotKVCache.token_bytes(c.num_hidden_layers, model.kv_heads, c.head_dim, model.dtype)
    logits = LOGITS_COPIES * rows * c.vocab_size * 4  # float32 scores, processed and normalised
    available = available_bytes(model.device)
    if available is None or logits + rows * positions * per_position <= available:
        return
    need = (logits + rows * positions * per_position) / 2**30
    fit = max(0, (available - logits) // (rows * per_position))
    raise LlamascopeError(
        f"{rows} sequence(s) x {positions} positions need {need:.3g} GiB for the KV cache and logits, and "
        f"{available / 2**30:.3g} GiB of memory is free: "
        + (
            f"at most {fit} positions per sequence fit (lower max_new_tokens)"
            if fit
            else "lower num_beams or the number of sequences"
        )
    )
