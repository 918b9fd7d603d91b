"""Speculative decoding: draft the next tokens cheaply, check the whole draft in one pass of the
model, keep what greedy search would have chosen. Two drafters, with transformers' settings:

- prompt lookup (`prompt_lookup_num_tokens`): the tokens that followed an earlier occurrence of the
  sequence's last few tokens;
- an assistant model (`assistant_model`, `num_assistant_tokens`): a second, cheaper model of the
  same vocabulary (the same model at a lower precision, or a smaller one) runs greedy search ahead.

Greedy search gives the tokens it gives without drafts, to the bit:

    prefill the prompt; choose the first token as greedy search does
    each round (ids: the prompt and the tokens so far; the cache holds all but the newest):
        draft = drafter.draft(ids)                     up to K tokens (none: a plain step)
        logits = verify([newest] + draft)              T = 1 + len(draft) positions, one pass
        for t in 0..T-1:  token_t = greedy(processors(ids, logits[t])); ids += token_t
                          go on while t < len(draft) and token_t == draft[t]
        the cache keeps the columns of the kept tokens but the newest (the rest are rolled back:
        the next round writes over them)

Sampling keeps the target model's distribution. Prompt lookup's drafts are checked as transformers
checks them: each position's token is drawn from the model's processed distribution, one draw a
position in order, and the round goes on while it is the drafted one; with a seed that gives the
very tokens of sampling without drafts. An assistant samples its draft from its own processed
distribution q, and each drafted token x is kept with probability min(1, p(x) / q(x)), p being the
model's; the first one refused is replaced by a draw from max(0, p - q), normalised (the standard
rejection rule of speculative sampling), and a draft kept whole is followed by a draw from p.

A pass over T positions reads the weights once instead of T times. On the native backend it is one
decode step over T rows of one sequence (`DecodeStep.verify`), whose rows get the numbers of T
one-token steps (a draft longer than the step's 8 rows goes in several such calls). Where that does
not apply (another backend), the positions go through the model one at a time, as without drafts:
the same tokens, no gain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .batch import Speculation, Step, check_finite, prepare_batch
from .cache import KVCache
from .config import GenerationConfig
from .decode_step import DecodeStep
from .errors import LlamascopeError
from .layers import KERNEL_MAX_ROWS
from .sampling import apply_processors, build_processors, make_generator, select_next
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


class PromptLookup:
    """Drafts from the sequence itself: `lookup` with transformers' n-gram rule, sized by a DraftBudget."""

    source = "prompt lookup"
    proposals: list[torch.Tensor] = []  # (its drafts are not drawn from a distribution)

    def __init__(self, config: GenerationConfig):
        self.budget = DraftBudget(config.prompt_lookup_num_tokens)
        self.ngram = config.max_matching_ngram_size or DEFAULT_NGRAM
        self.eos_ids = config.eos_token_id

    def prepare(self, prompt: list[int]) -> None:
        """(Nothing to do before the first token.)"""

    def draft(self, sequence: list[int], most: int) -> list[int]:
        size = min(self.budget.next(), most)
        return lookup(sequence, size, self.ngram, self.eos_ids) if size > 0 else []

    def kept(self, drafted: int, kept: int) -> None:
        self.budget.kept(drafted, kept)


class AssistantDraft:
    """Drafts with an assistant model's greedy search, as transformers' AssistedCandidateGenerator:
    up to `num_assistant_tokens` tokens, ending after an eos id or after a token the assistant gave
    less than `assistant_confidence_threshold` of its probability; the "heuristic" schedules add 2
    to the next draft's size after a draft kept whole and take 1 off after one cut short.

    The assistant keeps its own KV cache: each round it rolls back to the longest beginning it
    shares with the sequence (the kept drafts), feeds the rest (the target's own next token, and the
    last draft token when all were kept), then drafts one token a step. Its scores go through the
    target's processors when the two vocabularies have one size (they only steer the draft)."""

    source = "assistant"

    def __init__(
        self,
        assistant: torch.nn.Module,
        config: GenerationConfig,
        capacity: int,
        processors: list,
        generator: torch.Generator | None,
    ):
        self.model = assistant
        self.sampling, self.generator = config.do_sample, generator
        self.proposals: list[torch.Tensor] = []  # sampling: the distribution [V] each draft token came from
        self.cache = KVCache.for_model(assistant, 1, capacity)
        self.held: list[int] = []  # the tokens whose keys and values the cache holds, in order
        self.size = config.num_assistant_tokens
        self.adapts = config.num_assistant_tokens_schedule != "constant"
        self.threshold = config.assistant_confidence_threshold
        self.eos_ids = set(config.eos_token_id)
        self.processors = processors

    def prepare(self, prompt: list[int]) -> None:
        """Prefill the prompt, before the model's first token as transformers does it: the first
        draft then feeds only that token."""
        self._feed(prompt, 0)

    def draft(self, sequence: list[int], most: int) -> list[int]:
        size = min(self.size, most)
        self.proposals = []
        if size <= 0:
            return []
        scores = self._feed(sequence, self._shared(sequence))  # [V]
        drafted: list[int] = []
        while True:
            if self.processors:
                ids = torch.tensor([sequence + drafted], device=self.model.device)  # [1, S]
                scores = apply_processors(self.processors, ids, scores[None])[0]
            probs = torch.softmax(scores, -1)  # [V]
            if self.sampling:
                token = int(torch.multinomial(probs, 1, generator=self.generator))
                self.proposals.append(probs)
            else:
                token = int(torch.argmax(scores))
            drafted.append(token)
            confidence = float(probs[token])
            if len(drafted) == size or token in self.eos_ids or confidence < self.threshold:
                return drafted
            scores = self._feed(sequence + drafted, len(self.held))

    def kept(self, drafted: int, kept: int) -> None:
        if drafted and self.adapts:
            self.size = self.size + 2 if kept == drafted else max(1, self.size - 1)

    def _shared(self, sequence: list[int]) -> int:
        """How many of the cached tokens begin `sequence` (at most all but its last)."""
        n = 0
        for a, b in zip(self.held, sequence[:-1]):
            if a != b:
                break
            n += 1
        return n

    def _feed(self, sequence: list[int], keep: int) -> torch.Tensor:
        """Roll the cache back to its first `keep` columns, feed sequence[keep:]; the last one's
        scores [V] float32."""
        self.cache.length, self.held = keep, self.held[:keep]
        new = sequence[keep:]
        tokens = torch.tensor([new], device=self.model.device)  # [1, T]
        if keep == 0:  # the prompt: a prefill
            positions = torch.arange(len(new), device=tokens.device)[None]  # [1, T]
            logits = self.model(tokens, positions, self.cache, None, None, True)  # [1, 1, V]
        else:  # a token or two: rows of one native step
            logits = verify(self.model, tokens, self.cache)  # [T, V]
        self.held += new
        return logits.reshape(-1, logits.shape[-1])[-1].float()  # [V]


def drafter_for(
    model: torch.nn.Module,
    config: GenerationConfig,
    capacity: int,
    processors: list,
    assistant: torch.nn.Module | None,
    generator: torch.Generator | None,
):
    """The drafter these settings ask for: an assistant model's, or prompt lookup's."""
    if assistant is None:
        return PromptLookup(config)
    same_vocab = assistant.config.vocab_size == model.config.vocab_size
    return AssistantDraft(assistant, config, capacity, processors if same_vocab else [], generator)


def choose(
    scores: torch.Tensor,
    draft: list[int],
    t: int,
    proposals: list[torch.Tensor],
    config: GenerationConfig,
    generator: torch.Generator | None,
) -> int:
    """The token at position t of a round from the model's processed scores [1, V]: greedy search's;
    a draw from them (sampling, draft not sampled: prompt lookup); or, where draft[t] was drawn from
    proposals[t] (an assistant's sampling), the rejection rule: draft[t] kept with probability
    min(1, p / q), else a draw from max(0, p - q) normalised."""
    if not config.do_sample or t >= len(proposals):
        return int(select_next(scores, config, generator)[0])
    p = torch.softmax(scores[0], -1)  # [V]
    q = _over(proposals[t], p.shape[0])  # [V]
    x = draft[t]
    p_x, q_x = (float(p[x]), float(q[x])) if x < p.shape[0] else (0.0, 1.0)
    if float(torch.rand((), generator=generator, device=p.device)) * q_x < p_x:
        return x
    residual = (p - q).clamp_min(0)  # [V]; zero at x, which was refused
    if float(residual.sum()) <= 0:
        residual = p
    return int(torch.multinomial(residual, 1, generator=generator))


def _over(q: torch.Tensor, V: int) -> torch.Tensor:
    """An assistant's distribution over the model's V ids (its extra ids cut off, missing ones 0)."""
    return q[:V] if q.shape[0] >= V else torch.cat([q, q.new_zeros(V - q.shape[0])])


def speculative_steps(
    model: torch.nn.Module,
    prompt: list[int],
    config: GenerationConfig,
    tokenizer=None,
    assistant: torch.nn.Module | None = None,
    capture: Callable[[int], dict | None] | None = None,
) -> Iterator[Step]:
    """Greedy search or sampling on one prompt with drafts (prompt lookup, or `assistant`'s): one
    Step per new token (its input_ids are what its round fed, its `speculation` the round's draft),
    ending at the first stop. `capture` (as in generate_steps): each pass's activations, the
    prompt's and each round's (then the round goes through the model's layers, not the native
    verification step), shared by the round's Steps."""
    if assistant is None and config.prompt_lookup_num_tokens is None:
        raise LlamascopeError("speculative decoding needs prompt_lookup_num_tokens or an assistant model")
    if config.num_beams != 1 or config.num_return_sequences != 1 or not config.use_cache:
        raise LlamascopeError(
            "speculative decoding runs greedy search or sampling with the KV cache, one sequence of one "
            "prompt (num_beams=1, num_return_sequences=1, use_cache=True); beams are not speculative here yet"
        )
    if model.config.rope_varies_with_length:
        raise LlamascopeError(
            f"speculative decoding: not with rope_type {model.config.rope_type!r}, whose angles depend on the "
            "sequence's length (generate recomputes the sequence where they change)"
        )
    device = model.device
    _, input_ids, _, max_length = prepare_batch(model, [prompt], config)
    T0 = input_ids.shape[1]
    rules = StopRules(config, tokenizer, max_length - T0)
    padding = torch.zeros(1, dtype=torch.long, device=device)
    processors = build_processors(config, T0, padding, vocab_size=model.config.vocab_size, tokenizer=tokenizer)
    cache = KVCache.for_model(model, 1, max_length)
    generator = make_generator(config, device) if config.do_sample else None
    drafter = drafter_for(model, config, max_length, processors, assistant, generator)
    sequence = list(prompt)
    step = 0
    with torch.inference_mode():
        fed = input_ids  # [1, T0]: the prompt first
        acts = capture(0) if capture is not None else None
        logits = model(fed, torch.arange(T0, device=device)[None], cache, None, acts, True)[0].float()  # [1, V]
        drafter.prepare(prompt)
        draft: list[int] = []
        proposals: list[torch.Tensor] = []  # what draft's tokens were drawn from (an assistant's sampling)
        while True:
            cached = cache.length - fed.shape[1]  # the cache's columns before this round
            positions = torch.arange(cached, cached + fed.shape[1], device=device)[None]  # [1, T]: what was fed
            check_finite(model, logits, lambda row: sequence, step)
            for t in range(len(draft) + 1):
                logits_t = scores = logits[t : t + 1]  # [1, V]
                if processors:
                    scores = apply_processors(processors, torch.tensor([sequence], device=device), scores)
                token = choose(scores, draft, t, proposals, config, generator)
                sequence.append(token)
                reason = rules.reason(sequence, len(sequence) - T0, rules.out_of_time())
                mask = torch.ones(1, len(sequence) - 1, dtype=torch.long, device=device)  # [1, S]
                next_tokens = torch.tensor([token], device=device)
                q = float(proposals[t][draft[t]]) if t < len(proposals) else None
                checked = Speculation(drafter.source, draft, t, q)
                yield Step(step, fed, positions, mask, cached, logits_t, scores, next_tokens, acts, [reason], checked)
                step += 1
                if reason is not None:
                    return
                if t == len(draft) or token != draft[t]:
                    break
            drafter.kept(len(draft), t)  # (t: the draft tokens kept, the last choice being new)
            cache.length = len(sequence) - 1  # the kept tokens' columns but the newest's
            draft = drafter.draft(sequence, max(0, max_length - len(sequence) - 1))  # (a round adds 1 + draft)
            proposals = drafter.proposals
            fed = torch.tensor([sequence[-1:] + draft], device=device)  # [1, T]
            acts = capture(step) if capture is not None else None
            if acts is None:
                logits = verify(model, fed, cache)  # [T, V]
            else:  # through the layers, which record
                at = torch.arange(cache.length, cache.length + fed.shape[1], device=device)[None]  # [1, T]
                logits = model(fed, at, cache, None, acts)[0].float()  # [T, V]
