"""Stopping rules of the generation loop: several eos ids, stop strings (also across token
boundaries, as transformers' StopStringCriteria), max_time; in generate(), stream(), the Engine
and the CLI."""

from __future__ import annotations

import json
import time

import pytest
import torch
from hf_reference import hf_generate
from transformers import AutoTokenizer, LlamaForCausalLM

from llamascope.cli import main as cli_main
from llamascope.config import ContextLengthError, ModelConfig, room_for_new_tokens
from llamascope.engine import Engine
from llamascope.generation import generate, stream
from llamascope.loading import load_model
from llamascope.stopping import StopStrings

PROMPTS = ["My name is Mariama, my favorite", "Once upon a time", "def forward(self, x): return 42"]


@pytest.fixture(scope="module")
def models(tiny_model):
    return load_model(tiny_model), LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def free_run(ours, text: str, n: int = 24) -> tuple[list[int], list[int]]:
    ids = ours.tokenizer.encode(text)
    return ids, generate(ours.model, ids, max_new_tokens=n, eos_token_id=[]).output_ids[0]


def straddling_stop(tokenizer, prompt: list[int], out: list[int], start: int = 3) -> tuple[str, int]:
    """A stop string made of the last character of one generated token and the first of the next,
    not found earlier in the text; -> (string, index of the token that completes it)."""
    for i in range(start, len(out) - 1):
        a, b = tokenizer.decode([out[i]]), tokenizer.decode([out[i + 1]])
        # whole printable characters on both sides (not a byte of a multi-byte character)
        if not (a and b and (a[-1] + b[0]).isprintable() and "\ufffd" not in a[-1] + b[0]):
            continue
        candidate = a[-1] + b[0]
        # the pair must not be one token's text, and must not occur before it straddles
        if candidate not in tokenizer.decode(prompt + out[: i + 1]) and candidate not in b:
            return candidate, i + 1
    raise AssertionError("no token boundary to straddle")


def test_stop_string_across_token_boundary(models, tiny_model):
    ours, hf_model = models
    reference_tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for text in PROMPTS:
        ids, free = free_run(ours, text)
        stop, last = straddling_stop(ours.tokenizer, ids, free)
        # the string is in neither token alone: it straddles tokens `last - 1` and `last`
        assert stop not in ours.tokenizer.decode([free[last - 1]]) and stop not in ours.tokenizer.decode([free[last]])
        result = generate(
            ours.model, ids, max_new_tokens=24, eos_token_id=[], stop_strings=[stop], tokenizer=ours.tokenizer
        )
        assert result.output_ids[0] == free[: last + 1]
        assert result.finish_reasons == ["stop"]
        expected = hf_generate(
            hf_model,
            ids,
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            stop_strings=[stop],
            tokenizer=reference_tokenizer,
        )
        assert result.output_ids[0] == expected[0, len(ids) :].tolist()


def test_stop_string_inside_one_token_and_several_strings(models):
    ours, _ = models
    ids, free = free_run(ours, PROMPTS[1])
    pieces = [ours.tokenizer.decode([t]) for t in free]
    i = next(
        i
        for i in range(2, len(free))
        if len(pieces[i].strip()) >= 2 and pieces[i].strip() not in ours.tokenizer.decode(ids + free[:i])
    )
    inside = pieces[i].strip()
    never = "\u2603 not generated"
    result = generate(
        ours.model, ids, max_new_tokens=24, eos_token_id=[], stop_strings=[never, inside], tokenizer=ours.tokenizer
    )
    assert result.output_ids[0] == free[: i + 1] and result.finish_reasons == ["stop"]


def test_stop_string_seen_only_in_the_prompt_does_not_stop(models):
    ours, _ = models
    ids, free = free_run(ours, PROMPTS[0], n=12)
    result = generate(
        ours.model, ids, max_new_tokens=12, eos_token_id=[], stop_strings=["Mariama"], tokenizer=ours.tokenizer
    )
    assert result.output_ids[0] == free and result.finish_reasons == ["length"]


def test_stop_strings_in_a_batch_stop_each_row(models):
    ours, _ = models
    prompts = [ours.tokenizer.encode(p) for p in PROMPTS]
    free = generate(ours.model, prompts, max_new_tokens=20, eos_token_id=[], pad_token_id=2).output_ids
    stop, last = straddling_stop(ours.tokenizer, prompts[1], free[1])
    result = generate(
        ours.model,
        prompts,
        max_new_tokens=20,
        eos_token_id=[],
        pad_token_id=2,
        stop_strings=[stop],
        tokenizer=ours.tokenizer,
    )
    assert result.output_ids[1] == free[1][: last + 1] and result.finish_reasons[1] == "stop"
    for row in (0, 2):  # the other rows run on (or stop where the string appears in them)
        cut = len(result.output_ids[row])
        assert result.output_ids[row] == free[row][:cut]
        assert (result.finish_reasons[row] == "stop") == (cut < 20)


def test_stop_string_matcher_unit(models):
    """The matcher fires once, on the token that completes the string, whatever the split."""
    ours, _ = models
    tok = ours.tokenizer
    ids = tok.encode("Once upon a time there was a little robot", add_special_tokens=False)
    text = tok.decode(ids)
    matcher = StopStrings(["a little"], tok)
    fired = [k for k in range(1, len(ids) + 1) if matcher.match(ids[:k])]
    assert len(fired) == 1
    k = fired[0]
    assert "a little" in tok.decode(ids[:k]) and "a little" not in tok.decode(ids[: k - 1])
    assert "a little" in text


def test_streaming_stops_at_stop_string(models):
    ours, _ = models
    ids, free = free_run(ours, PROMPTS[2])
    stop, last = straddling_stop(ours.tokenizer, ids, free)
    config = Engine(ours).generation_config(max_new_tokens=24, eos_token_id=[], stop_strings=[stop])
    pieces = list(stream(ours.model, ours.tokenizer, ids, config))
    assert [token for token, _ in pieces] == free[: last + 1]
    streamed = "".join(delta for _, delta in pieces)
    assert streamed == ours.tokenizer.decode(free[: last + 1], skip_special_tokens=True)
    assert stop in streamed


def test_several_eos_ids(models, tiny_model):
    ours, hf_model = models
    ids, free = free_run(ours, PROMPTS[0])
    # the earliest of several eos ids ends generation, whichever it is
    eos = [free[9], free[4], 319]
    first = min(free.index(e) for e in eos if e in free)
    result = generate(ours.model, ids, max_new_tokens=24, eos_token_id=eos)
    assert result.output_ids[0] == free[: first + 1] and result.finish_reasons == ["eos"]
    expected = hf_generate(hf_model, ids, max_new_tokens=24, do_sample=False, eos_token_id=eos)
    assert result.output_ids[0] == expected[0, len(ids) :].tolist()


def test_several_eos_ids_in_a_batch_match_transformers(models, tiny_model):
    ours, hf_model = models
    prompts = [ours.tokenizer.encode(p) for p in PROMPTS]
    free = generate(ours.model, prompts, max_new_tokens=16, eos_token_id=[], pad_token_id=2).output_ids
    eos = [free[0][5], free[2][2]]  # each row meets a different one
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token, tok.padding_side = "</s>", "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = hf_model.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=2)
    result = generate(ours.model, prompts, max_new_tokens=16, eos_token_id=eos, pad_token_id=2)
    T = enc.input_ids.shape[1]
    for row in range(3):
        want = expected[row, T:].tolist()
        got = result.output_ids[row]
        assert want[: len(got)] == got and all(t == 2 for t in want[len(got) :])
        assert (result.finish_reasons[row] == "eos") == (got[-1] in eos)
    assert result.finish_reasons[0] == result.finish_reasons[2] == "eos"


def test_eos_ids_from_generation_config_json(models, tiny_model):
    """generation_config.json may list several eos ids; they all stop generation."""
    ours, _ = models
    engine = Engine(ours)
    ids, free = free_run(ours, PROMPTS[1])
    eos = [free[6], free[3]]
    engine.generation_json = dict(engine.generation_json or {}, eos_token_id=eos)
    first = min(free.index(e) for e in eos)
    result = engine.generate_ids(ids, max_new_tokens=24)
    assert result.output_ids[0] == free[: first + 1] and result.finish_reasons == ["eos"]


def test_max_time(models):
    ours, _ = models
    ids = ours.tokenizer.encode(PROMPTS[0])
    start = time.perf_counter()
    result = generate(
        ours.model, ids, max_new_tokens=200, eos_token_id=[], max_time=0.15, on_step=lambda step: time.sleep(0.05)
    )
    elapsed = time.perf_counter() - start
    assert result.finish_reasons == ["time"]
    assert 1 <= len(result.output_ids[0]) <= 5 and elapsed < 2.0
    # in beam search too
    beams = generate(
        ours.model,
        ids,
        max_new_tokens=200,
        eos_token_id=[],
        max_time=0.15,
        num_beams=2,
        on_step=lambda step: time.sleep(0.05),
    )
    assert beams.finish_reasons == ["time"] and 1 <= len(beams.output_ids[0]) <= 5
    # a generous limit changes nothing
    assert generate(ours.model, ids, max_new_tokens=8, eos_token_id=[], max_time=60.0).finish_reasons == ["length"]


def test_engine_and_cli_stop_strings(models, tiny_model, capsys):
    ours, _ = models
    ids, free = free_run(ours, PROMPTS[1])
    stop, last = straddling_stop(ours.tokenizer, ids, free)
    completion = Engine(ours).generate(PROMPTS[1], max_new_tokens=24, eos_token_id=[], stop_strings=stop)
    assert completion.output_ids == free[: last + 1] and completion.finish_reason == "stop"
    assert stop in PROMPTS[1] + completion.text
    assert (
        cli_main(
            [
                "generate",
                "--model",
                str(tiny_model),
                "--json",
                "--max-new-tokens",
                "24",
                "--stop",
                stop,
                "--stop",
                "\u2603",
                PROMPTS[1],
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["finish_reason"] in ("stop", "eos")
    assert out["finish_reason"] == "eos" or out["output_ids"] == free[: last + 1]


# ---- the context: one limit, the same everywhere (config.room_for_new_tokens) ---------------------


@pytest.fixture(scope="module")
def short(model_factory):
    """A model of 24 positions, ours and transformers'."""
    folder = model_factory("short-context", max_position_embeddings=24)
    return folder, load_model(folder), LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_a_prompt_must_leave_room_for_one_new_token(short, capsys):
    """context - 1 prompt tokens: one new token; context or context + 1: refused, by generate(),
    beam search, stream(), the Engine and the CLI alike (generate() allowed exactly context before)."""
    folder, ours, _ = short
    engine = Engine(ours)
    tokens = list(range(3, 3 + 25))
    assert len(generate(ours.model, tokens[:23], max_new_tokens=1, eos_token_id=[]).output_ids[0]) == 1
    assert len(engine.generate_ids(tokens[:23], max_new_tokens=1, num_beams=2).output_ids[0]) == 1
    for length in (24, 25):
        prompt = tokens[:length]
        with pytest.raises(ContextLengthError, match=f"prompt of {length} tokens .* context of 24 positions"):
            generate(ours.model, prompt, max_new_tokens=1)
        with pytest.raises(ContextLengthError):
            generate(ours.model, prompt, max_new_tokens=1, num_beams=2)
        with pytest.raises(ContextLengthError):
            list(stream(ours.model, ours.tokenizer, prompt, engine.generation_config(max_new_tokens=1)))
        with pytest.raises(ContextLengthError):
            list(engine.stream(prompt, max_new_tokens=1))
    long_text = "Once upon a time " * 8
    assert len(ours.tokenizer.encode(long_text)) >= 24
    assert cli_main(["generate", "--model", str(folder), "--max-new-tokens", "1", long_text]) != 0
    assert "context of 24 positions" in capsys.readouterr().err


def test_past_the_context_generation_goes_on_as_in_transformers(short, caplog):
    """More new tokens than the context has room for: a warning, then transformers' tokens; without
    a length the default stops at the context (transformers' cap)."""
    _, ours, hf_model = short
    prompt = list(range(3, 3 + 20))
    with caplog.at_level("WARNING", logger="llamascope"):
        found = generate(ours.model, prompt, max_new_tokens=8, eos_token_id=[])
    assert "past the model's context of 24 positions" in caplog.text
    with torch.no_grad():
        expected = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, 20, dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert found.output_ids[0] == expected[0, 20:].tolist() and len(found.output_ids[0]) == 8
    caplog.clear()
    with caplog.at_level("WARNING", logger="llamascope"):
        assert len(generate(ours.model, prompt, eos_token_id=[]).output_ids[0]) == 4
    assert "context" not in caplog.text


def test_context_rule_unit():
    assert room_for_new_tokens(23, 24) == 1 and room_for_new_tokens(1, 24) == 23
    for length in (24, 25):
        with pytest.raises(ContextLengthError):
            room_for_new_tokens(length, 24)
    assert room_for_new_tokens(10**6, None) is None  # no limit
    base = dict(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        max_position_embeddings=24,
        model_type="llama",
    )
    assert ModelConfig.from_dict(base).context_limit == 24
    dynamic = ModelConfig.from_dict(dict(base, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert dynamic.context_limit is None  # dynamic NTK scaling stretches RoPE to any length
