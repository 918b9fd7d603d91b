"""Logits processors in transformers' order, and the choice of the next token.

`build_processors(config, prompt_length, padding_lengths, num_beams)` gives the list that the
decoding loops apply to the last position's float32 scores [B, V] each step (greedy search and
sampling apply them to the raw logits, beam search to their log-softmax, as transformers does);
`select_next(scores, config, generator)` picks the next token (argmax for greedy search, one draw
from softmax(scores) for sampling).

The order and the conditions under which each processor is added are those of transformers 5.23
(`GenerationMixin._get_logits_processor`):

    repetition_penalty (!= 1)         RepetitionPenalty   (prompt included, left padding excluded)
    no_repeat_ngram_size (> 0)        NoRepeatNGram
    bad_words_ids                     NoBadWords          (a bad word that is just an eos id is dropped)
    min_length (> 0, eos ids)         MinLength           (min_new_tokens sets min_length = prompt + min_new_tokens)
    min_new_tokens (> 0, eos ids)     MinNewTokens
    suppress_tokens                   SuppressTokens
    (llamascope's own, before them all: constraint -> GrammarMask, the tokens an output constraint allows)
    -- with do_sample only: --
    temperature (!= 1)                Temperature
    top_k (!= 0)                      TopK
    top_p (< 1)                       TopP
    min_p (set)                       MinP
    typical_p (< 1)                   Typical

With sampling in beam search each warper keeps at least (number of eos ids + 1) tokens (2 when
there is no eos id), so a beam can always continue. Every processor returns new scores; removed
tokens get -inf.
"""

from __future__ import annotations

import math

import torch

from . import kernels
from .config import GenerationConfig
from .constraints import GrammarMask, grammars_for
from .errors import LlamascopeError

NEG_INF = float("-inf")


# ---- processors that apply in every decoding mode ----------------------------------------------


class RepetitionPenalty:
    """Each distinct token already in the sequence (prompt included) is penalised once:
    a negative score is multiplied by `penalty`, a positive one divided by it.

    `ignore_before` [B] (optional): per row, the number of leading columns to leave out (left padding).
    """

    def __init__(self, penalty: float, ignore_before: torch.Tensor | None = None):
        self.penalty = float(penalty)
        self.ignore_before = ignore_before

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B, V = scores.shape
        ids = input_ids.clamp(max=V)  # [B, S]; ids past the output vocabulary go to a spare column
        if self.ignore_before is not None:
            columns = torch.arange(ids.shape[1], device=ids.device)[None, :]  # [1, S]
            ids = ids.masked_fill(columns < self.ignore_before.to(ids.device)[:, None], V)
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=scores.device)
        seen.scatter_(1, ids, True)
        seen = seen[:, :V]  # [B, V]
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalised, scores)


class NoRepeatNGram:
    """Bans every token that would complete an n-gram already present in the sequence."""

    def __init__(self, ngram_size: int):
        self.n = int(ngram_size)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B, S = input_ids.shape
        if S < self.n:  # no complete n-gram in the sequence yet
            return scores
        V = scores.shape[-1]
        windows = input_ids.unfold(1, self.n, 1)  # [B, S - n + 1, n] every complete n-gram
        prefix = input_ids[:, S - (self.n - 1) :]  # [B, n - 1] what the next token would follow
        match = (windows[..., :-1] == prefix[:, None, :]).all(dim=-1)  # [B, S - n + 1]
        # A matching window bans its last token; the others point at a spare column past the vocabulary.
        followers = torch.where(match, windows[..., -1].clamp(max=V), V)
        banned = torch.zeros(B, V + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, followers, True)
        return scores.masked_fill(banned[:, :V], NEG_INF)


class NoBadWords:
    """Bans single-token bad words always, and the last token of a longer bad word when the
    sequence ends with the rest of it. A bad word that is exactly one eos id is not banned."""

    def __init__(self, bad_words_ids: list[list[int]], eos_token_ids: list[int] | None = None):
        eos = set(eos_token_ids or [])
        words = {tuple(int(t) for t in w) for w in bad_words_ids}
        words = {w for w in words if not (len(w) == 1 and w[0] in eos)}
        self.single = sorted(w[0] for w in words if len(w) == 1)
        self.multi = sorted(w for w in words if len(w) > 1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        banned = torch.zeros_like(scores, dtype=torch.bool)  # [B, V]
        if self.single:
            banned[:, self.single] = True
        S = input_ids.shape[1]
        for word in self.multi:
            prefix = word[:-1]
            if len(prefix) > S:
                continue
            tail = input_ids[:, S - len(prefix) :]  # [B, len(prefix)]
            rows = (tail == torch.tensor(prefix, device=input_ids.device)).all(dim=-1)  # [B]
            banned[rows, word[-1]] = True
        return scores.masked_fill(banned, NEG_INF)


class MinLength:
    """eos ids get -inf while the sequence (prompt and padding included) is shorter than min_length."""

    def __init__(self, min_length: int, eos_token_ids: list[int]):
        self.min_length, self.eos = int(min_length), list(eos_token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] >= self.min_length:
            return scores
        return _ban(scores, self.eos)


class MinNewTokens:
    """eos ids get -inf until `min_new_tokens` tokens follow the (padded) prompt."""

    def __init__(self, prompt_length: int, min_new_tokens: int, eos_token_ids: list[int]):
        self.prompt_length, self.min_new_tokens, self.eos = prompt_length, int(min_new_tokens), list(eos_token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] - self.prompt_length >= self.min_new_tokens:
            return scores
        return _ban(scores, self.eos)


class SuppressTokens:
    """The given token ids always get -inf."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = [int(t) for t in token_ids]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return _ban(scores, self.token_ids)


def _ban(scores: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """scores with -inf in the columns `token_ids` (ids outside the vocabulary are ignored)."""
    V = scores.shape[-1]
    mask = torch.zeros(V, dtype=torch.bool, device=scores.device)
    ids = [t for t in token_ids if 0 <= t < V]
    if ids:
        mask[ids] = True
    return scores.masked_fill(mask, NEG_INF)


# ---- warpers: sampling only --------------------------------------------------------------------


class Temperature:
    def __init__(self, temperature: float):
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    """Keeps the tokens scoring at least the k-th best score (ties at the k-th score all stay)."""

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1):
        self.top_k = max(int(top_k), min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[:, -1:]  # [B, 1]
        return scores.masked_fill(scores < kth, NEG_INF)


class TopP:
    """Nucleus: drops the least likely tokens whose probabilities add up to at most 1 - top_p."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1):
        self.top_p, self.min_tokens_to_keep = float(top_p), min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ascending, order = torch.sort(scores, descending=False)  # [B, V]
        cumulative = ascending.softmax(-1).cumsum(-1)  # [B, V] probability mass up to each token
        drop = cumulative <= (1 - self.top_p)
        drop[:, -self.min_tokens_to_keep :] = False  # the most likely tokens always stay
        drop = drop.scatter(1, order, drop)  # back to vocabulary order
        return scores.masked_fill(drop, NEG_INF)


class MinP:
    """Drops tokens less likely than min_p times the most likely token's probability."""

    def __init__(self, min_p: float, min_tokens_to_keep: int = 1):
        self.min_p, self.min_tokens_to_keep = float(min_p), min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(-1)  # [B, V]
        threshold = self.min_p * probs.amax(dim=-1, keepdim=True)  # [B, 1]
        drop = probs < threshold
        keep = torch.topk(probs, min(self.min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
        drop = drop.scatter(1, keep, False)
        return scores.masked_fill(drop, NEG_INF)


class Typical:
    """Locally typical sampling: keeps the tokens whose surprisal is closest to the entropy,
    until their probabilities add up to `mass`."""

    def __init__(self, mass: float, min_tokens_to_keep: int = 1):
        self.mass, self.min_tokens_to_keep = float(mass), min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = scores.log_softmax(-1)  # [B, V]
        entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)  # [B, 1]
        distance = ((-logp) - entropy).abs()  # [B, V] how far each surprisal is from the entropy
        distance_sorted, order = torch.sort(distance, descending=False)
        cumulative = scores.gather(-1, order).softmax(-1).cumsum(-1)  # [B, V]
        last = (cumulative < self.mass).sum(dim=1).clamp(max=scores.shape[-1] - 1)  # [B]
        drop = distance_sorted > distance_sorted.gather(1, last[:, None])
        drop[:, : self.min_tokens_to_keep] = False
        drop = drop.scatter(1, order, drop)
        return scores.masked_fill(drop, NEG_INF)


# ---- the list, in transformers' order ----------------------------------------------------------


def build_processors(
    config: GenerationConfig,
    prompt_length: int,
    padding_lengths: torch.Tensor | None = None,
    num_beams: int = 1,
    vocab_size: int | None = None,
    tokenizer=None,
) -> list:
    """The processors transformers would apply for these settings, in its order; first, where
    `config.constraint` is set, the mask of tokens it allows (constraints.GrammarMask, which needs
    the `tokenizer` and `vocab_size`), so that no warper keeps only tokens it forbids.

    prompt_length: columns of the (left-padded) prompt; padding_lengths [rows] (optional): the
    padding columns at the start of each row, which the repetition penalty leaves out (as
    transformers does when given an attention mask with padding). With `vocab_size`, bad words
    outside the vocabulary are refused here, before any compute.
    """
    if vocab_size is not None and config.bad_words_ids:
        outside = sorted({t for word in config.bad_words_ids for t in word if t >= vocab_size})
        if outside:
            raise LlamascopeError(
                f"generation setting bad_words_ids: token ids {outside} are outside the vocabulary ({vocab_size} ids)"
            )
    processors: list = []
    eos = list(config.eos_token_id or [])
    if config.constraint is not None:
        if tokenizer is None or vocab_size is None:
            raise LlamascopeError("constrained output needs the model's tokenizer")
        grammars = grammars_for(tokenizer, vocab_size, eos)
        processors.append(GrammarMask(grammars, config.constraint, prompt_length))
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        if padding_lengths is not None and not bool(padding_lengths.any()):
            padding_lengths = None
        processors.append(RepetitionPenalty(config.repetition_penalty, padding_lengths))
    if config.no_repeat_ngram_size is not None and config.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGram(config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        processors.append(NoBadWords(config.bad_words_ids, eos))
    min_length = config.min_length or 0
    if config.min_new_tokens is not None:
        min_length = config.min_new_tokens + prompt_length
    if eos and min_length > 0:
        processors.append(MinLength(min_length, eos))
    if eos and config.min_new_tokens is not None and config.min_new_tokens > 0:
        processors.append(MinNewTokens(prompt_length, config.min_new_tokens, eos))
    if config.suppress_tokens is not None:
        processors.append(SuppressTokens(config.suppress_tokens))
    if config.do_sample:
        keep = (len(eos) + 1 if eos else 2) if num_beams > 1 else 1
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(Temperature(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopK(config.top_k, keep))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopP(config.top_p, keep))
        if config.min_p is not None:
            processors.append(MinP(config.min_p, keep))
        if config.typical_p is not None and config.typical_p < 1.0:
            processors.append(Typical(config.typical_p, keep))
    return processors


def apply_processors(processors: list, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """input_ids [B, S] (all columns so far, padding included), scores [B, V] float32 -> [B, V]."""
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores


def make_generator(config: GenerationConfig, device: torch.device | str) -> torch.Generator | None:
    """A generator on `device` (the model's: draws are made where the scores are) seeded with
    `config.seed`; None (torch's global generator, as transformers uses) when no seed is given, so
    `torch.manual_seed(s)` before generating gives transformers' draws."""
    if config.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(config.seed))


def select_next(scores: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """scores [B, V] float32 after processing -> next token ids [B]."""
    if config.do_sample:
        probs = scores.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return argmax(scores)


def argmax(scores: torch.Tensor) -> torch.Tensor:
    """scores [B, V] -> [B] int64, as `scores.argmax(-1)` (first index on ties, NaN wins); float32
    rows on the CPU go through the native kernel, many times faster than torch's at batch 1."""
    lib = kernels.load()
    if (
        lib is None
        or scores.dim() != 2
        or scores.dtype != torch.float32
        or scores.device.type != "cpu"
        or not scores.is_contiguous()
        or scores.shape[1] == 0
    ):
        return scores.argmax(-1)
    out = torch.empty(scores.shape[0], dtype=torch.long)
    lib.argmax_rows_f32(scores.data_ptr(), scores.shape[0], scores.shape[1], out.data_ptr())
    return out


# ---- log-probabilities -------------------------------------------------------------------------


def token_logprobs(scores: torch.Tensor, chosen: torch.Tensor, top_n: int) -> list[dict]:
    """Per row: the chosen token's log-probability and the `top_n` most likely tokens.

    The distribution is log_softmax of the *processed* scores, i.e. the one the token was drawn
    from (as OpenAI's and vLLM's `logprobs`): temperature, top-k/top-p and penalties included,
    so tokens that could not be chosen are left out of `top`.
    scores [B, V] float32, chosen [B] -> [{"id", "logprob", "top": [{"id", "logprob"}, ...]}] * B.
    """
    logp = scores.float().log_softmax(-1)  # [B, V]
    chosen_lp = logp.gather(1, chosen[:, None].to(logp.device)).squeeze(1).tolist()
    n = min(top_n, logp.shape[-1])
    top_values, top_ids = torch.topk(logp, n, dim=-1) if n > 0 else (logp[:, :0], logp[:, :0].long())
    out = []
    for row, token in enumerate(chosen.tolist()):
        top = [
            {"id": int(i), "logprob": float(v)}
            for v, i in zip(top_values[row].tolist(), top_ids[row].tolist())
            if not math.isinf(v)
        ]
        out.append({"id": int(token), "logprob": float(chosen_lp[row]), "top": top})
    return out
