"""Beam search against transformers 5.23's generate(): the same sequences, token for token, and the
same sequence scores (within 1e-4), for several num_beams, length_penalty and early_stopping values,
with num_return_sequences > 1, left-padded batches, penalties, no KV cache and beam sampling."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from llamascope.cli import main as cli_main
from llamascope.config import GenerationConfig
from llamascope.errors import LlamascopeError
from llamascope.generation import generate
from llamascope.loading import load_model

# Prompts with eos ids that the random model often produces, so hypotheses finish at different
# lengths and early_stopping matters (checked by test_early_stopping_changes_the_result).
CASES = [("Once upon a time", [179, 208, 31]), ("My name is Mariama, my favorite", [221, 56, 303])]
EARLY_STOPPING = (True, False, "never")
# every num_beams x length_penalty x early_stopping for the first case, one slice for the second
GRID = [(0, *combo) for combo in itertools.product((2, 4), (0.5, 1.0, 2.0), EARLY_STOPPING)]
GRID += [(1, 4, 1.0, early_stopping) for early_stopping in EARLY_STOPPING]
NEW_TOKENS = 14


@pytest.fixture(scope="module")
def models(tiny_model):
    return load_model(tiny_model), LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def hf_beam(hf_model, input_ids, attention_mask, **settings):
    with torch.no_grad():
        out = hf_model.generate(
            input_ids, attention_mask=attention_mask, return_dict_in_generate=True, output_scores=True, **settings
        )
    return out.sequences[:, input_ids.shape[1] :].tolist(), out.sequences_scores.tolist()


def assert_same_sequences(expected: list[list[int]], scores: list[float], result) -> None:
    """transformers pads shorter hypotheses to the longest one with one filler id; ours are unpadded."""
    assert len(result.output_ids) == len(expected)
    for row, (want, got) in enumerate(zip(expected, result.output_ids)):
        assert got == want[: len(got)], f"sequence {row}"
        assert len(set(want[len(got) :])) <= 1, f"sequence {row} is cut short"
    assert result.sequence_scores == pytest.approx(scores, abs=1e-4)


@pytest.mark.parametrize("case,num_beams,length_penalty,early_stopping", GRID)
def test_beam_search_matches_transformers(models, case, num_beams, length_penalty, early_stopping):
    ours, hf_model = models
    text, eos = CASES[case]
    ids = ours.tokenizer.encode(text)
    settings = dict(
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=num_beams,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=eos,
        pad_token_id=0,
    )
    x = torch.tensor([ids])
    expected, scores = hf_beam(hf_model, x, torch.ones_like(x), do_sample=False, **settings)
    result = generate(ours.model, ids, **settings)
    assert_same_sequences(expected, scores, result)
    assert set(result.finish_reasons) <= {"eos", "length"}
    for out, reason in zip(result.output_ids, result.finish_reasons):
        assert (reason == "eos") == (out[-1] in eos)


def test_early_stopping_changes_the_result(models):
    """The grid above is not vacuous: early_stopping changes the returned hypotheses or scores."""
    ours, _ = models
    differing = 0
    for case, num_beams, length_penalty in sorted({combo[:3] for combo in GRID}):
        text, eos = CASES[case]
        ids = ours.tokenizer.encode(text)
        found = set()
        for early_stopping in EARLY_STOPPING:
            r = generate(
                ours.model,
                ids,
                num_beams=num_beams,
                length_penalty=length_penalty,
                early_stopping=early_stopping,
                num_return_sequences=num_beams,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=eos,
            )
            found.add((tuple(map(tuple, r.output_ids)), tuple(round(s, 5) for s in r.sequence_scores)))
        differing += len(found) > 1
    assert differing >= 3


def test_best_sequence_only(models):
    """num_return_sequences=1 returns transformers' best hypothesis, and the length penalty matters."""
    ours, hf_model = models
    text, eos = CASES[0]
    ids = ours.tokenizer.encode(text)
    x = torch.tensor([ids])
    outputs = []
    for length_penalty in (-1.0, 0.0, 3.0):
        settings = dict(
            num_beams=4, length_penalty=length_penalty, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0
        )
        expected, scores = hf_beam(hf_model, x, torch.ones_like(x), **settings)
        result = generate(ours.model, ids, **settings)
        assert_same_sequences(expected, scores, result)
        outputs.append(result.output_ids[0])
    assert len(set(map(tuple, outputs))) > 1


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_with_penalties_matches_transformers(models, tiny_model, use_cache):
    ours, hf_model = models
    prompts = ["My name is Mariama, my favorite", "Once upon a time", "def forward(self, x): return 42"]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token, tok.padding_side = "</s>", "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    settings = dict(
        num_beams=3,
        num_return_sequences=2,
        max_new_tokens=12,
        eos_token_id=[179, 208, 31],
        pad_token_id=2,
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
        use_cache=use_cache,
    )
    expected, scores = hf_beam(hf_model, enc.input_ids, enc.attention_mask, do_sample=False, **settings)
    result = generate(ours.model, [ours.tokenizer.encode(p) for p in prompts], **settings)
    assert_same_sequences(expected, scores, result)
    assert result.prompt_ids[0] == result.prompt_ids[1] == ours.tokenizer.encode(prompts[0])


@pytest.mark.parametrize("seed", [0, 1])
def test_seeded_beam_sampling_matches_transformers(models, seed):
    ours, hf_model = models
    text, eos = CASES[0]
    ids = ours.tokenizer.encode(text)
    settings = dict(
        num_beams=3,
        do_sample=True,
        temperature=0.8,
        top_k=20,
        num_return_sequences=2,
        max_new_tokens=12,
        eos_token_id=eos,
        pad_token_id=0,
    )
    x = torch.tensor([ids])
    torch.manual_seed(seed)
    expected, scores = hf_beam(hf_model, x, torch.ones_like(x), **settings)
    result = generate(ours.model, ids, seed=seed, **settings)
    assert_same_sequences(expected, scores, result)
    again = generate(ours.model, ids, seed=seed, **settings)
    assert again.output_ids == result.output_ids


def test_beam_stop_strings_match_transformers(models, tiny_model):
    ours, hf_model = models
    ids = ours.tokenizer.encode("Once upon a time")
    settings = dict(num_beams=2, num_return_sequences=2, max_new_tokens=12, eos_token_id=[179], pad_token_id=0)
    free = generate(ours.model, ids, **settings)
    longest = max(free.output_ids, key=len)
    pieces = [ours.tokenizer.decode([t]) for t in longest]
    # two characters straddling the boundary between two tokens in the middle of a hypothesis
    middle = len(pieces) // 2
    stop = pieces[middle - 1][-1] + pieces[middle][0]
    settings["stop_strings"] = [stop]
    x = torch.tensor([ids])
    expected, scores = hf_beam(
        hf_model, x, torch.ones_like(x), tokenizer=AutoTokenizer.from_pretrained(tiny_model), **settings
    )
    result = generate(ours.model, ids, tokenizer=ours.tokenizer, **settings)
    assert_same_sequences(expected, scores, result)
    assert "stop" in result.finish_reasons
    for out, reason in zip(result.output_ids, result.finish_reasons):
        if reason == "stop":
            assert stop in ours.tokenizer.decode(ids + out)


def test_beam_logprobs_add_up_to_the_score(models):
    """Without processors a hypothesis' score is the sum of its tokens' log-probabilities / length ** lp."""
    ours, _ = models
    text, eos = CASES[0]
    ids = ours.tokenizer.encode(text)
    result = generate(
        ours.model,
        ids,
        num_beams=4,
        num_return_sequences=4,
        length_penalty=1.5,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=eos,
        output_logprobs=2,
        tokenizer=ours.tokenizer,
    )
    for out, entries, score in zip(result.output_ids, result.logprobs, result.sequence_scores):
        assert [e["id"] for e in entries] == out
        total = sum(e["logprob"] for e in entries)
        assert total / len(out) ** 1.5 == pytest.approx(score, abs=1e-4)
        assert all(len(e["top"]) == 2 and e["token"] is not None for e in entries)


def test_num_return_sequences_above_num_beams_is_refused(models):
    ours, _ = models
    with pytest.raises(LlamascopeError, match="num_return_sequences"):
        generate(ours.model, [1, 5, 6], num_beams=2, num_return_sequences=3)
    with pytest.raises(LlamascopeError, match="early_stopping"):
        GenerationConfig.resolve(None, None, num_beams=2, early_stopping="soon")


def test_cli_beam_search(tiny_model, capsys):
    args = [
        "generate",
        "--model",
        str(tiny_model),
        "--json",
        "--max-new-tokens",
        "8",
        "--num-beams",
        "3",
        "--num-return-sequences",
        "2",
        "--length-penalty",
        "0.5",
        "--early-stopping",
        "never",
        "Once upon a time",
    ]
    assert cli_main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ours = load_model(tiny_model)
    expected = generate(
        ours.model,
        out["prompt_ids"],
        max_new_tokens=8,
        num_beams=3,
        num_return_sequences=2,
        length_penalty=0.5,
        early_stopping="never",
        eos_token_id=[2],
        bos_token_id=1,
    )
    assert [s["output_ids"] for s in out["sequences"]] == expected.output_ids
    assert [s["score"] for s in out["sequences"]] == pytest.approx(expected.sequence_scores)
    assert out["output_ids"] == expected.output_ids[0]
    # streamed (non-JSON) output: beam search prints the text at the end
    assert cli_main(args[:3] + args[4:]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")
