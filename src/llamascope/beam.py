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
from typing import Callable

import torch

from .cache import KVCache
from .config import GenerationConfig
from .generation import (
    GenerationResult,
    Step,
    StopStrings,
    add_token_text,
    attention_mask_4d,
    logprob_entry,
    positions_from_mask,
    prepare_batch,
)
from .sampling import apply_processors, build_processors, make_generator, token_logprobs

IMPOSSIBLE = -1.0e9  # transformers' score for "cannot be chosen"

# Why a candidate stopped (several rules may hold; the first in this order is reported).
EOS, STOP, LENGTH, TIME = 0, 1, 2, 3
REASONS = ("eos", "stop", "length", "time")


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
    num_beams, n_return = config.num_beams, config.num_return_sequences
    pad_id, input_ids, attention_mask, max_length = prepare_batch(model, prompts, config)
    B, T0 = input_ids.shape
    stops = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
    expanded_prompts = [p for p in prompts for _ in range(n_return)]
    if max_length <= T0:  # nothing to generate
        return GenerationResult(expanded_prompts, [[] for _ in expanded_prompts], ["length"] * len(expanded_prompts),
                                logprobs=[[] for _ in expanded_prompts] if config.output_logprobs is not None else None,
                                sequence_scores=[0.0] * len(expanded_prompts))

    device = model.device
    eos = torch.tensor(config.eos_token_id or [], dtype=torch.long, device=device)
    n_keep = max(2, 1 + len(config.eos_token_id or [])) * num_beams  # candidates looked at per prompt
    in_first_beams = torch.arange(n_keep, device=device) < num_beams  # [n_keep]
    early_stopping, length_penalty = config.early_stopping, config.length_penalty
    BK = B * num_beams

    # Every beam of a prompt starts as the prompt; rows b*num_beams .. b*num_beams + num_beams - 1.
    rows_mask = attention_mask.repeat_interleave(num_beams, dim=0).to(device)  # [BK, T0]
    padding_lengths = (rows_mask == 0).sum(dim=1)  # [BK]
    processors = build_processors(config, T0, padding_lengths, num_beams=num_beams,
                                  vocab_size=model.config.vocab_size)
    generator = make_generator(config, device) if config.do_sample else None
    fill = pad_id
    running = torch.full((B, num_beams, max_length), fill, dtype=torch.long, device=device)  # [B, K, L]
    running[:, :, :T0] = input_ids.to(device)[:, None, :]
    finished = running.clone()  # [B, K, L] best finished hypotheses
    running_scores = torch.zeros(B, num_beams, device=device)  # [B, K]
    running_scores[:, 1:] = IMPOSSIBLE  # only the first beam may extend at the first step
    finished_scores = torch.full((B, num_beams), IMPOSSIBLE, device=device)  # [B, K]
    finished_flags = torch.zeros(B, num_beams, dtype=torch.bool, device=device)  # [B, K]
    finished_lengths = torch.zeros(B, num_beams, dtype=torch.long, device=device)  # [B, K] new tokens
    finished_reasons = torch.full((B, num_beams), LENGTH, dtype=torch.long, device=device)  # [B, K]
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)  # [B, 1]
    want_logprobs = config.output_logprobs is not None
    running_logprobs: list[list[dict]] = [[] for _ in range(BK)]  # per running row, its tokens' entries
    finished_logprobs: list[list[list[dict]]] = [[[] for _ in range(num_beams)] for _ in range(B)]

    cache = KVCache.for_model(model, BK, max_length) if config.use_cache else None
    positions = positions_from_mask(rows_mask)  # [BK, T0]
    start = time.perf_counter()
    prefill_seconds = 0.0
    cur_len, step = T0, 0
    with torch.inference_mode():
        while True:
            sequences = running.view(BK, max_length)[:, :cur_len]  # [BK, S]
            if cache is None or step == 0:
                tokens, step_positions = sequences, positions  # [BK, S]
            else:
                tokens, step_positions = sequences[:, -1:], positions[:, -1:]  # [BK, 1]
            cache_length = cache.length if cache is not None else None
            mask = attention_mask_4d(rows_mask, tokens.shape[1])
            logits = model(tokens, step_positions, cache, mask, last_only=True)[:, -1].float()  # [BK, V]
            V = logits.shape[-1]
            scores = apply_processors(processors, sequences, logits.log_softmax(-1))  # [BK, V]
            totals = (scores.view(B, num_beams, V) + running_scores[:, :, None]).view(B, num_beams * V)

            # the best n_keep continuations over all beams of each prompt
            if config.do_sample:
                picked = torch.multinomial(totals.softmax(-1), n_keep, generator=generator)  # [B, n_keep]
                cand_scores = totals.gather(1, picked)
            else:
                cand_scores, picked = torch.topk(totals, n_keep)  # [B, n_keep]
            parents = torch.div(picked, V, rounding_mode="floor")  # [B, n_keep] beam within the prompt
            new_tokens = picked % V  # [B, n_keep]
            candidates = _take(running, parents)  # [B, n_keep, L]
            candidates[:, :, cur_len] = new_tokens
            parent_rows = parents + torch.arange(B, device=device)[:, None] * num_beams  # [B, n_keep] flat rows

            # which candidates stop, and why (the first rule in EOS, STOP, LENGTH, TIME order)
            reason = torch.full((B, n_keep), -1, dtype=torch.long, device=device)
            if config.max_time is not None and time.perf_counter() - start > config.max_time:
                reason.fill_(TIME)
            if cur_len + 1 >= max_length:
                reason.fill_(LENGTH)
            if stops is not None:
                for b in range(B):
                    unpadded = int(T0 - padding_lengths[b * num_beams])
                    for c in range(n_keep):
                        if stops.match(candidates[b, c, T0 - unpadded:cur_len + 1].tolist()) is not None:
                            reason[b, c] = STOP
            if eos.numel():
                reason = torch.where(torch.isin(new_tokens, eos), EOS, reason)
            stopped = reason >= 0  # [B, n_keep]

            if want_logprobs:
                entries = token_logprobs(scores, new_tokens.new_zeros(BK), config.output_logprobs)
                chosen = scores.float().log_softmax(-1)  # [BK, V]
                flat_parents, flat_tokens = parent_rows.view(-1).tolist(), new_tokens.view(-1).tolist()
                cand_logprobs = []
                for parent, token in zip(flat_parents, flat_tokens):
                    entry = logprob_entry(entries[parent])
                    entry["id"], entry["logprob"] = token, float(chosen[parent, token])
                    cand_logprobs.append(running_logprobs[parent] + [entry])

            # the best num_beams candidates that did not stop run on
            open_scores = cand_scores + stopped.to(torch.float32) * IMPOSSIBLE
            keep = torch.topk(open_scores, num_beams)[1]  # [B, K]
            running = _take(candidates, keep)
            running_scores = _take(open_scores, keep)
            next_parent_rows = _take(parent_rows, keep)  # [B, K]

            # candidates among the first num_beams that stopped may join the finished hypotheses
            just_finished = stopped & in_first_beams[None, :]  # [B, n_keep]
            normalized = cand_scores / ((cur_len + 1 - T0) ** length_penalty)
            batch_full = finished_flags.all(dim=-1, keepdim=True) & (early_stopping is True)
            normalized += batch_full.to(torch.float32) * IMPOSSIBLE
            normalized += (~can_improve).to(torch.float32) * IMPOSSIBLE
            normalized += (~just_finished) * IMPOSSIBLE
            merged_scores = torch.cat((finished_scores, normalized), dim=1)  # [B, K + n_keep]
            best = torch.topk(merged_scores, num_beams)[1]  # [B, K]
            finished = _take(torch.cat((finished, candidates), dim=1), best)
            finished_scores = _take(merged_scores, best)
            finished_flags = _take(torch.cat((finished_flags, just_finished), dim=1), best)
            new_lengths = torch.full((B, n_keep), cur_len + 1 - T0, dtype=torch.long, device=device)
            finished_lengths = _take(torch.cat((finished_lengths, new_lengths), dim=1), best)
            finished_reasons = _take(torch.cat((finished_reasons, reason.clamp(min=0)), dim=1), best)
            if want_logprobs:
                merged = [finished_logprobs[b] + cand_logprobs[b * n_keep:(b + 1) * n_keep] for b in range(B)]
                finished_logprobs = [[merged[b][i] for i in best[b].tolist()] for b in range(B)]
                running_logprobs = [cand_logprobs[b * n_keep + i] for b in range(B) for i in keep[b].tolist()]

            if on_step is not None:
                on_step(Step(step, tokens, step_positions, rows_mask, cache_length, logits, scores,
                             running[:, :, cur_len].reshape(BK)))
            if step == 0:
                prefill_seconds = time.perf_counter() - start
            # each running beam continues from its parent's keys and values
            if cache is not None:
                cache.reorder(next_parent_rows.reshape(BK))
            rows_mask = torch.cat([rows_mask, rows_mask.new_ones(BK, 1)], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            cur_len += 1
            step += 1

            # can the best running beam still beat the worst finished hypothesis?
            if early_stopping == "never" and length_penalty > 0.0:
                best_length = max_length - T0
            else:
                best_length = cur_len - T0
            best_running = running_scores[:, :1] / (best_length ** length_penalty)  # [B, 1]
            worst_finished = torch.where(finished_flags, finished_scores.min(dim=1, keepdim=True)[0], IMPOSSIBLE)
            can_improve = can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)

            all_full = bool(finished_flags.all()) and early_stopping is True
            if not bool(can_improve.any()) or all_full or bool(stopped.all()):
                break

    total = time.perf_counter() - start
    outputs, reasons, scores_out, logprobs_out = [], [], [], []
    for b in range(B):
        for i in range(n_return):
            length = int(finished_lengths[b, i])
            outputs.append(finished[b, i, T0:T0 + length].tolist())
            reasons.append(REASONS[int(finished_reasons[b, i])])
            scores_out.append(float(finished_scores[b, i]))
            if want_logprobs:
                logprobs_out.append(finished_logprobs[b][i])
    if want_logprobs:
        add_token_text(logprobs_out, tokenizer)
    return GenerationResult(expanded_prompts, outputs, reasons, step, prefill_seconds, total - prefill_seconds,
                            logprobs_out if want_logprobs else None, scores_out)
