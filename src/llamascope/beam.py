"""Beam search (and beam sampling) with transformers 5.23's rules.

Each prompt keeps `num_beams` running hypotheses, scored by the sum of their tokens'
log-probabilities. Each step:

1. the model gives logits for every running beam; scores = processors(log_softmax(logits)) (the
   processors see log-probabilities in beam search, as in transformers), plus the beam's score;
2. over all beams x vocabulary of a prompt, the best K = max(2, 1 + number of eos ids) * num_beams
   candidates are taken (drawn without replacement from softmax of the scores with do_sample);
3. a candidate hits a stopping rule when its new token is an eos id, it completes a stop string,
   it reaches max_length or max_time has passed. The best `num_beams` candidates that did not
   stop run on; among the first `num_beams` candidates, those that stopped become finished
   hypotheses scored sum / (generated length ** length_penalty), and the `num_beams` best finished
   ones are kept;
4. the search of a prompt ends by `early_stopping`: True - as soon as `num_beams` hypotheses are
   finished; False - when the best running beam, scored at its current length, cannot beat the
   worst finished one; "never" - the same, but scored at max_length when length_penalty > 0.

Returned: the `num_return_sequences` best finished hypotheses of each prompt, with their scores
(transformers' `sequences_scores`). Scores that mean "impossible" are -1e9, as in transformers,
and all comparisons are the same tensor operations in the same order, so ties break the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .batch import (
    GenerationResult,
    Step,
    add_token_text,
    attention_mask_4d,
    check_finite,
    logprob_entry,
    positions_from_mask,
    prepare_batch,
)
from .cache import KVCache
from .config import GenerationConfig
from .sampling import apply_processors, build_processors, make_generator, token_logprobs
from .stopping import REASONS, StopRules

IMPOSSIBLE = -1.0e9  # transformers' score for "cannot be chosen"

# Why a candidate stopped, as an index into stopping.REASONS (its order is the priority order).
LENGTH = REASONS.index("length")


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor [B, N, ...], index [B, M] -> tensor[b, index[b, m], ...] as [B, M, ...]."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def beam_search(
    model: torch.nn.Module,
    prompts: list[list[int]],
    config: GenerationConfig,
    tokenizer=None,
    on_step: Callable[[Step], None] | None = None,
) -> GenerationResult:
    """Beam search for each prompt; rows i*n .. i*n + n - 1 of the result (n = num_return_sequences)
    are prompt i's best hypotheses, best first."""
    return _BeamSearch(model, prompts, config, tokenizer).run(on_step)


class _Candidates:
    """The n_keep continuations of each prompt looked at in one step (see `_BeamSearch.candidates`)."""

    def __init__(self, scores: torch.Tensor, sequences: torch.Tensor, tokens: torch.Tensor, parent_rows: torch.Tensor):
        self.scores = scores  # [B, n_keep] the beam's score plus the token's
        self.sequences = sequences  # [B, n_keep, L] the parent beam with the new token
        self.tokens = tokens  # [B, n_keep] the new token
        self.parent_rows = parent_rows  # [B, n_keep] the parent's row in the flat [B * num_beams] batch
        self.reasons: torch.Tensor | None = None  # [B, n_keep] index into REASONS, -1: runs on
        self.logprobs: list[list[dict]] | None = None  # per candidate (flat), its tokens' entries


class _BeamSearch:
    """One beam search: its settings, its running beams and finished hypotheses, and one method per
    stage of a step (see the module's docstring for the rules)."""

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], config: GenerationConfig, tokenizer):
        self.model, self.prompts, self.config, self.tokenizer = model, prompts, config, tokenizer
        self.num_beams, self.n_return = config.num_beams, config.num_return_sequences
        self.pad_id, self.input_ids, attention_mask, self.max_length = prepare_batch(model, prompts, config)
        self.B, self.T0 = self.input_ids.shape
        self.device = model.device
        self.rules = StopRules(config, tokenizer, self.max_length - self.T0)
        self.n_keep = max(2, 1 + len(config.eos_token_id or [])) * self.num_beams  # candidates per prompt
        self.in_first_beams = torch.arange(self.n_keep, device=self.device) < self.num_beams  # [n_keep]
        self.want_logprobs = config.output_logprobs is not None
        # Every beam of a prompt starts as the prompt; rows b*num_beams .. b*num_beams + num_beams - 1.
        self.rows_mask = attention_mask.repeat_interleave(self.num_beams, dim=0).to(self.device)  # [BK, T0]
        self.padding = [self.T0 - len(p) for p in prompts]  # per prompt: its left padding

    # ---- the whole search ---------------------------------------------------------------------
    def run(self, on_step: Callable[[Step], None] | None) -> GenerationResult:
        if self.max_length <= self.T0:  # nothing to generate
            return self.empty_result()
        self.start_beams()
        start = time.perf_counter()
        prefill_seconds = 0.0
        cur_len, step = self.T0, 0
        with torch.inference_mode():
            while True:
                fed = self.forward(cur_len, step)
                candidates = self.candidates(fed.scores, cur_len)
                candidates.reasons = self.stop_reasons(candidates, cur_len)
                if self.want_logprobs:
                    candidates.logprobs = self.candidate_logprobs(fed.scores, candidates)
                next_parent_rows = self.run_on(candidates)
                self.finish(candidates, cur_len)
                if on_step is not None:
                    fed.next_tokens = self.running[:, :, cur_len].reshape(-1)
                    on_step(fed)
                if step == 0:
                    prefill_seconds = time.perf_counter() - start
                self.advance(next_parent_rows)
                cur_len += 1
                step += 1
                if self.done(cur_len, candidates):
                    break
        total = time.perf_counter() - start
        return self.result(step, prefill_seconds, total - prefill_seconds)

    def empty_result(self) -> GenerationResult:
        """The result when max_length leaves no room for a new token."""
        rows = [p for p in self.prompts for _ in range(self.n_return)]
        return GenerationResult(
            rows,
            [[] for _ in rows],
            ["length"] * len(rows),
            logprobs=[[] for _ in rows] if self.want_logprobs else None,
            sequence_scores=[0.0] * len(rows),
        )

    # ---- the stages of a step -----------------------------------------------------------------
    def start_beams(self) -> None:
        """The running beams (each prompt's first beam alone may extend), no finished hypotheses,
        the KV cache and the positions."""
        B, K, L, T0, device = self.B, self.num_beams, self.max_length, self.T0, self.device
        self.padding_lengths = (self.rows_mask == 0).sum(dim=1)  # [BK]
        self.processors = build_processors(
            self.config,
            T0,
            self.padding_lengths,
            num_beams=K,
            vocab_size=self.model.config.vocab_size,
            tokenizer=self.tokenizer,
        )
        self.generator = make_generator(self.config, device) if self.config.do_sample else None
        self.running = torch.full((B, K, L), self.pad_id, dtype=torch.long, device=device)  # [B, K, L]
        self.running[:, :, :T0] = self.input_ids.to(device)[:, None, :]
        self.finished = self.running.clone()  # [B, K, L] best finished hypotheses
        self.running_scores = torch.zeros(B, K, device=device)  # [B, K]
        self.running_scores[:, 1:] = IMPOSSIBLE  # only the first beam may extend at the first step
        self.finished_scores = torch.full((B, K), IMPOSSIBLE, device=device)  # [B, K]
        self.finished_flags = torch.zeros(B, K, dtype=torch.bool, device=device)  # [B, K]
        self.finished_lengths = torch.zeros(B, K, dtype=torch.long, device=device)  # [B, K] new tokens
        self.finished_reasons = torch.full((B, K), LENGTH, dtype=torch.long, device=device)  # [B, K]
        self.can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)  # [B, 1]
        self.running_logprobs: list[list[dict]] = [[] for _ in range(B * K)]  # per running row
        self.finished_logprobs: list[list[list[dict]]] = [[[] for _ in range(K)] for _ in range(B)]
        self.cache = KVCache.for_model(self.model, B * K, L) if self.config.use_cache else None
        self.positions = positions_from_mask(self.rows_mask)  # [BK, T0]

    def forward(self, cur_len: int, step: int) -> Step:
        """One forward pass over every running beam -> a Step whose scores are the processed
        log-probabilities [BK, V] (its next_tokens are filled once the beams are chosen)."""
        sequences = self.running.view(self.B * self.num_beams, self.max_length)[:, :cur_len]  # [BK, S]
        # Phi-3's longrope: the first step past the trained context recomputes every column
        cache = self.cache
        restart = cache is not None and step > 0 and self.model.config.longrope_restarts(cur_len, cache.length)
        if restart:
            cache.clear()
        if cache is None or step == 0 or restart:
            tokens, step_positions = sequences, self.positions  # [BK, S]
        else:
            tokens, step_positions = sequences[:, -1:], self.positions[:, -1:]  # [BK, 1]
        cache_length = self.cache.length if self.cache is not None else None
        mask = attention_mask_4d(self.rows_mask, tokens.shape[1])
        logits = self.model(tokens, step_positions, self.cache, mask, last_only=True)[:, -1].float()  # [BK, V]
        check_finite(self.model, logits, lambda row: sequences[row, int(self.padding_lengths[row]) :].tolist(), step)
        scores = apply_processors(self.processors, sequences, logits.log_softmax(-1))  # [BK, V]
        return Step(step, tokens, step_positions, self.rows_mask, cache_length, logits, scores, None)

    def candidates(self, scores: torch.Tensor, cur_len: int) -> _Candidates:
        """The best n_keep continuations over all beams of each prompt (drawn without replacement
        from softmax of the totals when sampling)."""
        B, K = self.B, self.num_beams
        V = scores.shape[-1]
        totals = (scores.view(B, K, V) + self.running_scores[:, :, None]).view(B, K * V)
        if self.config.do_sample:
            picked = torch.multinomial(totals.softmax(-1), self.n_keep, generator=self.generator)  # [B, n_keep]
            cand_scores = totals.gather(1, picked)
        else:
            cand_scores, picked = torch.topk(totals, self.n_keep)  # [B, n_keep]
        parents = torch.div(picked, V, rounding_mode="floor")  # [B, n_keep] beam within the prompt
        new_tokens = picked % V  # [B, n_keep]
        sequences = _take(self.running, parents)  # [B, n_keep, L]
        sequences[:, :, cur_len] = new_tokens
        parent_rows = parents + torch.arange(B, device=self.device)[:, None] * K  # [B, n_keep]
        return _Candidates(cand_scores, sequences, new_tokens, parent_rows)

    def stop_reasons(self, candidates: _Candidates, cur_len: int) -> torch.Tensor:
        """Why each candidate stops, by the StopRules: [B, n_keep] index into REASONS, -1: runs on."""
        out_of_time = self.rules.out_of_time()
        first = max(0, cur_len + 1 - self.rules.tail)  # the columns the rules look at
        window = candidates.sequences[:, :, first : cur_len + 1].tolist()
        new_tokens = cur_len + 1 - self.T0
        codes = []
        for b in range(self.B):
            start = max(0, self.padding[b] - first)
            reasons = [self.rules.reason(ids[start:], new_tokens, out_of_time) for ids in window[b]]
            codes.append([-1 if r is None else REASONS.index(r) for r in reasons])
        return torch.tensor(codes, dtype=torch.long, device=self.device)

    def candidate_logprobs(self, scores: torch.Tensor, candidates: _Candidates) -> list[list[dict]]:
        """Each candidate's entries: its parent's, then its new token's."""
        entries = token_logprobs(scores, candidates.tokens.new_zeros(scores.shape[0]), self.config.output_logprobs)
        chosen = scores.float().log_softmax(-1)  # [BK, V]
        out = []
        for parent, token in zip(candidates.parent_rows.view(-1).tolist(), candidates.tokens.view(-1).tolist()):
            entry = logprob_entry(entries[parent])
            entry["id"], entry["logprob"] = token, float(chosen[parent, token])
            out.append(self.running_logprobs[parent] + [entry])
        return out

    def run_on(self, candidates: _Candidates) -> torch.Tensor:
        """The best num_beams candidates that did not stop become the running beams; -> each new
        beam's parent row [B, K]."""
        stopped = candidates.reasons >= 0  # [B, n_keep]
        open_scores = candidates.scores + stopped.to(torch.float32) * IMPOSSIBLE
        keep = torch.topk(open_scores, self.num_beams)[1]  # [B, K]
        self.running = _take(candidates.sequences, keep)
        self.running_scores = _take(open_scores, keep)
        if self.want_logprobs:
            n_keep = self.n_keep
            self.running_logprobs = [
                candidates.logprobs[b * n_keep + i] for b in range(self.B) for i in keep[b].tolist()
            ]
        return _take(candidates.parent_rows, keep)

    def finish(self, candidates: _Candidates, cur_len: int) -> None:
        """Candidates among the first num_beams that stopped join the finished hypotheses, scored
        sum / (generated length ** length_penalty); the num_beams best finished ones are kept."""
        B, T0, n_keep = self.B, self.T0, self.n_keep
        early_stopping, length_penalty = self.config.early_stopping, self.config.length_penalty
        just_finished = (candidates.reasons >= 0) & self.in_first_beams[None, :]  # [B, n_keep]
        normalized = candidates.scores / ((cur_len + 1 - T0) ** length_penalty)
        batch_full = self.finished_flags.all(dim=-1, keepdim=True) & (early_stopping is True)
        normalized += batch_full.to(torch.float32) * IMPOSSIBLE
        normalized += (~self.can_improve).to(torch.float32) * IMPOSSIBLE
        normalized += (~just_finished) * IMPOSSIBLE
        merged_scores = torch.cat((self.finished_scores, normalized), dim=1)  # [B, K + n_keep]
        best = torch.topk(merged_scores, self.num_beams)[1]  # [B, K]
        self.finished = _take(torch.cat((self.finished, candidates.sequences), dim=1), best)
        self.finished_scores = _take(merged_scores, best)
        self.finished_flags = _take(torch.cat((self.finished_flags, just_finished), dim=1), best)
        new_lengths = torch.full((B, n_keep), cur_len + 1 - T0, dtype=torch.long, device=self.device)
        self.finished_lengths = _take(torch.cat((self.finished_lengths, new_lengths), dim=1), best)
        self.finished_reasons = _take(torch.cat((self.finished_reasons, candidates.reasons.clamp(min=0)), dim=1), best)
        if self.want_logprobs:
            merged = [self.finished_logprobs[b] + candidates.logprobs[b * n_keep : (b + 1) * n_keep] for b in range(B)]
            self.finished_logprobs = [[merged[b][i] for i in best[b].tolist()] for b in range(B)]

    def advance(self, next_parent_rows: torch.Tensor) -> None:
        """Each running beam continues from its parent's keys and values, one column longer."""
        BK = self.B * self.num_beams
        if self.cache is not None:
            self.cache.reorder(next_parent_rows.reshape(BK))
        self.rows_mask = torch.cat([self.rows_mask, self.rows_mask.new_ones(BK, 1)], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)

    def done(self, cur_len: int, candidates: _Candidates) -> bool:
        """Whether the search ends, by `early_stopping`: can the best running beam of some prompt
        still beat its worst finished hypothesis?"""
        length_penalty = self.config.length_penalty
        if self.config.early_stopping == "never" and length_penalty > 0.0:
            best_length = self.max_length - self.T0
        else:
            best_length = cur_len - self.T0
        best_running = self.running_scores[:, :1] / (best_length**length_penalty)  # [B, 1]
        worst_finished = torch.where(self.finished_flags, self.finished_scores.min(dim=1, keepdim=True)[0], IMPOSSIBLE)
        self.can_improve = self.can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)
        all_full = bool(self.finished_flags.all()) and self.config.early_stopping is True
        return not bool(self.can_improve.any()) or all_full or bool((candidates.reasons >= 0).all())

    def result(self, steps: int, prefill_seconds: float, decode_seconds: float) -> GenerationResult:
        """The n_return best finished hypotheses of each prompt, best first, with their scores."""
        outputs, reasons, scores, logprobs = [], [], [], []
        for b in range(self.B):
            for i in range(self.n_return):
                length = int(self.finished_lengths[b, i])
                outputs.append(self.finished[b, i, self.T0 : self.T0 + length].tolist())
                reasons.append(REASONS[int(self.finished_reasons[b, i])])
                scores.append(float(self.finished_scores[b, i]))
                if self.want_logprobs:
                    logprobs.append(self.finished_logprobs[b][i])
        if self.want_logprobs:
            add_token_text(logprobs, self.tokenizer)
        rows = [p for p in self.prompts for _ in range(self.n_return)]
        return GenerationResult(
            rows,
            outputs,
            reasons,
            steps,
            prefill_seconds,
            decode_seconds,
            logprobs if self.want_logprobs else None,
            scores,
        )
