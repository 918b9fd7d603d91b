"""Logits processors, greedy search with penalties, and sampling, against transformers 5.23.

Each processor is compared with its transformers class on random scores and random sequences
(-inf placement included); the whole list is compared with the one `generate()` builds; greedy
search with penalties and seeded sampling must give transformers' tokens; and the statistics of
many draws must follow the processed distribution (a chi-square test that is shown to reject a
wrong distribution)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hf_reference import hf_generate
from transformers import AutoTokenizer, LlamaForCausalLM
from transformers import GenerationConfig as HFGenerationConfig
from transformers.generation import logits_process as hf

from llamascope import sampling
from llamascope.cli import main as cli_main
from llamascope.config import GenerationConfig
from llamascope.errors import LlamascopeError
from llamascope.generation import generate
from llamascope.loading import load_model

V = 64  # vocabulary of the random cases
PROMPTS = ["My name is Mariama, my favorite", "Once upon a time", "def forward(self, x): return 42"]


def random_case(seed: int, rows: int = 5, length: int = 14, token_range: int = 12):
    """Scores [rows, V] with a wide range and a few exact ties; sequences [rows, length] drawn from
    few tokens so that repeats, n-grams and bad-word prefixes occur."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, V, generator=g) * 3
    scores[:, 10] = scores[:, 11]  # ties
    scores[0, :5] = -scores[0, :5].abs()  # some negative scores for the repetition penalty
    ids = torch.randint(0, token_range, (rows, length), generator=g)
    ids[1, -2:] = torch.tensor([7, 8])  # bad word prefix [7, 8] completes with 9
    ids[2, -1] = 7  # bad word prefix [7] completes with 3
    return ids, scores


def assert_same_scores(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(ours), torch.isneginf(ref)), "-inf in different places"
    assert torch.equal(torch.isposinf(ours), torch.isposinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)


PROCESSOR_CASES = {
    "repetition_penalty>1": (lambda: sampling.RepetitionPenalty(1.3), lambda: hf.RepetitionPenaltyLogitsProcessor(1.3)),
    "repetition_penalty<1": (lambda: sampling.RepetitionPenalty(0.6), lambda: hf.RepetitionPenaltyLogitsProcessor(0.6)),
    "repetition_penalty_padding": (
        lambda: sampling.RepetitionPenalty(1.5, torch.tensor([0, 3, 0, 6, 1])),
        lambda: hf.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.tensor([0, 3, 0, 6, 1])),
    ),
    "no_repeat_ngram_1": (lambda: sampling.NoRepeatNGram(1), lambda: hf.NoRepeatNGramLogitsProcessor(1)),
    "no_repeat_ngram_2": (lambda: sampling.NoRepeatNGram(2), lambda: hf.NoRepeatNGramLogitsProcessor(2)),
    "no_repeat_ngram_3": (lambda: sampling.NoRepeatNGram(3), lambda: hf.NoRepeatNGramLogitsProcessor(3)),
    "no_repeat_ngram_longer_than_sequence": (
        lambda: sampling.NoRepeatNGram(20),
        lambda: hf.NoRepeatNGramLogitsProcessor(20),
    ),
    "bad_words": (
        lambda: sampling.NoBadWords([[5], [7, 3], [7, 8, 9], [2], [1, 1, 1, 1, 1]], [2, 40]),
        lambda: hf.NoBadWordsLogitsProcessor([[5], [7, 3], [7, 8, 9], [2], [1, 1, 1, 1, 1]], [2, 40]),
    ),
    "min_length_active": (lambda: sampling.MinLength(20, [2, 3]), lambda: hf.MinLengthLogitsProcessor(20, [2, 3])),
    "min_length_reached": (lambda: sampling.MinLength(14, [2, 3]), lambda: hf.MinLengthLogitsProcessor(14, [2, 3])),
    "min_new_tokens_active": (
        lambda: sampling.MinNewTokens(8, 7, [2]),
        lambda: hf.MinNewTokensLengthLogitsProcessor(8, 7, [2]),
    ),
    "min_new_tokens_reached": (
        lambda: sampling.MinNewTokens(8, 6, [2]),
        lambda: hf.MinNewTokensLengthLogitsProcessor(8, 6, [2]),
    ),
    "suppress_tokens": (
        lambda: sampling.SuppressTokens([1, 4, 9, 63]),
        lambda: hf.SuppressTokensLogitsProcessor([1, 4, 9, 63]),
    ),
    "temperature": (lambda: sampling.Temperature(0.7), lambda: hf.TemperatureLogitsWarper(0.7)),
    "top_k": (lambda: sampling.TopK(5), lambda: hf.TopKLogitsWarper(5)),
    "top_k_tie_at_k": (lambda: sampling.TopK(1), lambda: hf.TopKLogitsWarper(1)),
    "top_k_min_keep": (lambda: sampling.TopK(1, 3), lambda: hf.TopKLogitsWarper(1, min_tokens_to_keep=3)),
    "top_k_above_vocab": (lambda: sampling.TopK(1000), lambda: hf.TopKLogitsWarper(1000)),
    "top_p": (lambda: sampling.TopP(0.8), lambda: hf.TopPLogitsWarper(0.8)),
    "top_p_small_min_keep": (lambda: sampling.TopP(0.05, 3), lambda: hf.TopPLogitsWarper(0.05, min_tokens_to_keep=3)),
    "min_p": (lambda: sampling.MinP(0.1), lambda: hf.MinPLogitsWarper(0.1)),
    "min_p_min_keep": (lambda: sampling.MinP(0.9, 4), lambda: hf.MinPLogitsWarper(0.9, min_tokens_to_keep=4)),
    "typical_p": (lambda: sampling.Typical(0.9), lambda: hf.TypicalLogitsWarper(0.9)),
    "typical_p_min_keep": (lambda: sampling.Typical(0.2, 3), lambda: hf.TypicalLogitsWarper(0.2, min_tokens_to_keep=3)),
}


@pytest.mark.parametrize("name", list(PROCESSOR_CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processor_matches_transformers(name, seed):
    make_ours, make_ref = PROCESSOR_CASES[name]
    ids, scores = random_case(seed)
    # processors already applied upstream leave -inf behind: the next one must handle them
    scores_with_inf = scores.clone()
    scores_with_inf[3, ::7] = float("-inf")
    for s in (scores, scores_with_inf):
        expected = make_ref()(ids.clone(), s.clone())
        found = make_ours()(ids.clone(), s.clone())
        assert_same_scores(found, expected)


@pytest.fixture(scope="module")
def models(tiny_model):
    return load_model(tiny_model), LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def hf_processor_list(hf_model, settings: dict, ids: torch.Tensor, mask: torch.Tensor | None):
    """The LogitsProcessorList transformers' generate() builds for `settings` (same preparation
    steps as generate: special tokens, min/max length from the prompt length, expanded mask)."""
    gc = HFGenerationConfig(**settings)
    hf_model._prepare_special_tokens(gc, kwargs_has_attention_mask=mask is not None, device="cpu")
    if gc.min_new_tokens is not None:
        gc.min_length = gc.min_new_tokens + ids.shape[1]
    return hf_model._get_logits_processor(
        generation_config=gc,
        input_ids_seq_length=ids.shape[1],
        encoder_input_ids=ids,
        logits_processor=hf.LogitsProcessorList(),
        device="cpu",
        model_kwargs={"attention_mask": mask} if mask is not None else {},
    )


FULL_SETTINGS = [
    dict(
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
        bad_words_ids=[[5], [7, 3]],
        min_new_tokens=3,
        suppress_tokens=[9],
        eos_token_id=[2, 3],
    ),
    dict(
        do_sample=True,
        temperature=0.7,
        top_k=10,
        top_p=0.9,
        min_p=0.05,
        typical_p=0.9,
        repetition_penalty=0.8,
        no_repeat_ngram_size=3,
        bad_words_ids=[[1, 2]],
        min_length=30,
        suppress_tokens=[4],
        eos_token_id=[2],
    ),
    dict(do_sample=True, temperature=1.5, top_k=0, top_p=0.5, eos_token_id=[2]),
    dict(do_sample=True, num_beams=3, top_k=2, top_p=0.3, min_p=0.9, typical_p=0.1, eos_token_id=[2, 3, 4]),
    dict(do_sample=True, num_beams=2, top_k=1, eos_token_id=None),
]


@pytest.mark.parametrize("index", range(len(FULL_SETTINGS)))
def test_processor_list_matches_transformers_order(index, models):
    settings = FULL_SETTINGS[index]
    _, hf_model = models
    ids, scores = random_case(10 + index, length=16)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding of row 1
    reference = hf_processor_list(hf_model, dict(settings), ids, mask)
    config = GenerationConfig.resolve(None, None, **{k: v for k, v in settings.items() if v is not None})
    ours = sampling.build_processors(config, ids.shape[1], (mask == 0).sum(1), num_beams=settings.get("num_beams", 1))
    assert len(ours) == len(reference), ([type(p).__name__ for p in ours], [type(p).__name__ for p in reference])
    assert_same_scores(sampling.apply_processors(ours, ids, scores), reference(ids, scores.clone()))


# ---- greedy search with penalties, against transformers' generate() ------------------------------

GREEDY_CASES = {
    "repetition_penalty": dict(repetition_penalty=1.4),
    "repetition_reward": dict(repetition_penalty=0.7),
    "no_repeat_ngram": dict(no_repeat_ngram_size=2),
    "penalty_and_ngram": dict(repetition_penalty=1.2, no_repeat_ngram_size=3),
    "bad_words_suppress": dict(bad_words_ids=[[181], [275, 63]], suppress_tokens=[215, 305]),
    "min_new_tokens": dict(min_new_tokens=10, eos_token_id=[75, 221]),
}


@pytest.mark.parametrize("name", list(GREEDY_CASES))
def test_greedy_with_processors_matches_transformers(name, models):
    ours, hf_model = models
    settings = dict(GREEDY_CASES[name])
    eos = settings.pop("eos_token_id", [])
    for text in PROMPTS[:2]:
        ids = ours.tokenizer.encode(text)
        expected = hf_generate(hf_model, ids, max_new_tokens=24, do_sample=False, eos_token_id=eos or None, **settings)
        expected = expected[0, len(ids) :].tolist()
        found = generate(ours.model, ids, max_new_tokens=24, eos_token_id=eos, pad_token_id=0, **settings)
        assert found.output_ids[0] == expected[: len(found.output_ids[0])]
        assert all(t == 0 for t in expected[len(found.output_ids[0]) :])


def test_greedy_changes_with_penalties(models):
    """The cases above are not vacuous: each setting changes the greedy tokens."""
    ours, _ = models
    ids = ours.tokenizer.encode(PROMPTS[0])
    plain = generate(ours.model, ids, max_new_tokens=24, eos_token_id=[]).output_ids[0]
    for name in ("repetition_penalty", "no_repeat_ngram", "bad_words_suppress"):
        changed = generate(ours.model, ids, max_new_tokens=24, eos_token_id=[], **GREEDY_CASES[name]).output_ids[0]
        assert changed != plain, name
    settings = dict(GREEDY_CASES["min_new_tokens"])
    eos = settings.pop("eos_token_id")
    assert len(generate(ours.model, ids, max_new_tokens=24, eos_token_id=eos).output_ids[0]) < 10
    assert len(generate(ours.model, ids, max_new_tokens=24, eos_token_id=eos, **settings).output_ids[0]) >= 10


def test_left_padded_batch_repetition_penalty_matches_transformers(models, tiny_model):
    """transformers leaves left padding out of the repetition penalty; so must we."""
    ours, hf_model = models
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token, tok.padding_side = "</s>", "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    settings = dict(repetition_penalty=1.5, no_repeat_ngram_size=2, max_new_tokens=16)
    with torch.no_grad():
        expected = hf_model.generate(**enc, do_sample=False, eos_token_id=None, pad_token_id=2, **settings)
    found = generate(
        ours.model, [ours.tokenizer.encode(p) for p in PROMPTS], eos_token_id=[], pad_token_id=2, **settings
    )
    assert found.output_ids == expected[:, enc.input_ids.shape[1] :].tolist()


# ---- sampling ----------------------------------------------------------------------------------

SAMPLING = dict(
    do_sample=True, temperature=0.7, top_k=30, top_p=0.9, min_p=0.02, typical_p=0.95, repetition_penalty=1.2
)


def test_seeded_sampling_is_reproducible(models):
    ours, _ = models
    ids = ours.tokenizer.encode(PROMPTS[1])
    runs = [
        generate(ours.model, ids, max_new_tokens=24, eos_token_id=[], seed=seed, **SAMPLING).output_ids[0]
        for seed in (7, 7, 8)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    # a batch of several sequences per prompt, reproducible too
    a = generate(ours.model, ids, max_new_tokens=12, eos_token_id=[], seed=3, num_return_sequences=4, **SAMPLING)
    b = generate(ours.model, ids, max_new_tokens=12, eos_token_id=[], seed=3, num_return_sequences=4, **SAMPLING)
    assert a.output_ids == b.output_ids and len(a.output_ids) == 4 and len(set(map(tuple, a.output_ids))) > 1


@pytest.mark.parametrize("seed", [0, 1])
def test_seeded_sampling_draws_like_transformers(models, seed):
    """Same seed, same processed distribution, same torch draws: transformers' exact tokens."""
    ours, hf_model = models
    ids = ours.tokenizer.encode(PROMPTS[1])
    torch.manual_seed(seed)
    expected = hf_generate(hf_model, ids, max_new_tokens=20, eos_token_id=None, num_return_sequences=3, **SAMPLING)
    found = generate(ours.model, ids, max_new_tokens=20, eos_token_id=[], seed=seed, num_return_sequences=3, **SAMPLING)
    assert found.output_ids == expected[:, len(ids) :].tolist()


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; categories with expected count < 5 are pooled."""
    n = counts.sum()
    expected = probs.double() * n
    counts = counts.double()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    wanted = torch.cat([expected[big], expected[~big].sum()[None]])
    if wanted[-1] < 5:  # fold a small pooled bin into the largest one
        observed[0] += observed[-1]
        wanted[0] += wanted[-1]
        observed, wanted = observed[:-1], wanted[:-1]
    impossible = (wanted == 0) & (observed > 0)
    if bool(impossible.any()):
        return 0.0
    keep = wanted > 0
    chi2 = ((observed[keep] - wanted[keep]) ** 2 / wanted[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), chi2 / 2))


@pytest.fixture(scope="module")
def one_step_draws(models):
    """8000 first tokens drawn for the same prompt (one batched forward pass), with the raw logits."""
    ours, _ = models
    ids = ours.tokenizer.encode(PROMPTS[0])
    settings = dict(do_sample=True, temperature=0.6, top_k=40, top_p=0.97, seed=1234)
    seen = []
    result = generate(ours.model, [ids] * 8000, max_new_tokens=1, eos_token_id=[], on_step=seen.append, **settings)
    tokens = torch.tensor([out[0] for out in result.output_ids])
    counts = torch.bincount(tokens, minlength=ours.config.vocab_size)
    return counts, seen[0].logits[0], settings


def reference_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution transformers samples from, built with its own warpers."""
    scores = logits[None].clone()
    for warper in (hf.TemperatureLogitsWarper(temperature), hf.TopKLogitsWarper(top_k), hf.TopPLogitsWarper(top_p)):
        scores = warper(None, scores)
    return scores.softmax(-1)[0]


def test_sample_frequencies_follow_processed_distribution(one_step_draws):
    counts, logits, s = one_step_draws
    probs = reference_distribution(logits, s["temperature"], s["top_k"], s["top_p"])
    assert int(counts[probs == 0].sum()) == 0  # filtered tokens are never drawn
    assert chi_square_p_value(counts, probs) > 1e-3
    total_variation = 0.5 * (counts / counts.sum() - probs).abs().sum()
    assert total_variation < 0.05


def test_frequency_test_rejects_a_wrong_distribution(one_step_draws):
    """The same draws against the distribution without temperature, or without top-k/top-p, fail."""
    counts, logits, s = one_step_draws
    without_temperature = reference_distribution(logits, 1.0, s["top_k"], s["top_p"])
    assert chi_square_p_value(counts, without_temperature) < 1e-3
    unfiltered = (logits / s["temperature"]).softmax(-1)
    assert chi_square_p_value(counts, unfiltered) < 1e-3


# ---- log-probabilities -------------------------------------------------------------------------


def test_logprobs_are_log_softmax_of_processed_scores(models):
    ours, _ = models
    ids = ours.tokenizer.encode(PROMPTS[0])
    steps = []
    result = generate(
        ours.model,
        ids,
        max_new_tokens=6,
        eos_token_id=[],
        output_logprobs=3,
        do_sample=True,
        temperature=0.8,
        top_k=5,
        seed=0,
        tokenizer=ours.tokenizer,
        on_step=steps.append,
    )
    entries = result.logprobs[0]
    assert [e["id"] for e in entries] == result.output_ids[0]
    for entry, step in zip(entries, steps):
        logp = step.scores[0].log_softmax(-1)
        assert entry["logprob"] == pytest.approx(float(logp[entry["id"]]), abs=1e-6)
        assert [alt["id"] for alt in entry["top"]] == torch.topk(logp, 3).indices.tolist()
        assert entry["token"] == ours.tokenizer.decode([entry["id"]])
        assert all(alt["logprob"] <= 0 and alt["token"] is not None for alt in entry["top"])
    # top_k=5 leaves 5 possible tokens: asking for more lists only those (no -inf entries)
    wide = generate(
        ours.model,
        ids,
        max_new_tokens=2,
        eos_token_id=[],
        output_logprobs=10,
        do_sample=True,
        temperature=0.8,
        top_k=5,
        seed=0,
    )
    assert all(len(e["top"]) == 5 and e["token"] is None for e in wide.logprobs[0])


def test_cli_generate_json_has_logprobs(tiny_model, capsys):
    code = cli_main(
        [
            "generate",
            "--model",
            str(tiny_model),
            "--json",
            "--max-new-tokens",
            "4",
            "--logprobs",
            "2",
            "--repetition-penalty",
            "1.3",
            "--no-repeat-ngram-size",
            "2",
            "Once upon a time",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["logprobs"]) == len(out["output_ids"]) == 4
    for entry, token_id in zip(out["logprobs"], out["output_ids"]):
        assert entry["id"] == token_id and set(entry) == {"token", "id", "logprob", "top"}
        assert len(entry["top"]) == 2 and set(entry["top"][0]) == {"token", "id", "logprob"}


def test_cli_sampling_settings_reach_the_engine(tiny_model, capsys):
    args = [
        "generate",
        "--model",
        str(tiny_model),
        "--json",
        "--max-new-tokens",
        "6",
        "--do-sample",
        "--seed",
        "5",
        "--temperature",
        "0.9",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--min-p",
        "0.01",
        "--typical-p",
        "0.99",
        "--min-new-tokens",
        "6",
        "--num-return-sequences",
        "2",
        "Once upon a time",
    ]
    assert cli_main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli_main(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first == second and len(first["sequences"]) == 2
    ours = load_model(tiny_model)
    expected = generate(
        ours.model,
        first["prompt_ids"],
        max_new_tokens=6,
        do_sample=True,
        seed=5,
        temperature=0.9,
        top_k=20,
        top_p=0.9,
        min_p=0.01,
        typical_p=0.99,
        min_new_tokens=6,
        num_return_sequences=2,
        eos_token_id=[2],
        bos_token_id=1,
    )
    assert [s["output_ids"] for s in first["sequences"]] == expected.output_ids


# ---- settings: validation and precedence -------------------------------------------------------

BAD_SETTINGS = [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_k=-1), "top_k"),
    (dict(do_sample=True, min_p=2.0), "min_p"),
    (dict(do_sample=True, typical_p=0.0), "typical_p"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_beams=2, do_sample=True, num_return_sequences=3), "num_return_sequences"),
    (dict(num_beams=0), "num_beams"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(bad_words_ids=[[]]), "bad_words_ids"),
    (dict(bad_words_ids=[1, 2]), "bad_words_ids"),
    (dict(suppress_tokens=[-1]), "suppress_tokens"),
    (dict(stop_strings=[""]), "stop_strings"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(max_time=-1.0), "max_time"),
    (dict(output_logprobs=-1), "output_logprobs"),
]


@pytest.mark.parametrize("settings,name", BAD_SETTINGS)
def test_bad_settings_are_refused(settings, name):
    with pytest.raises(LlamascopeError, match=name):
        GenerationConfig.resolve(None, None, **settings)


def test_bad_settings_are_refused_before_compute(models):
    ours, _ = models
    calls = []
    hook = ours.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(LlamascopeError, match="temperature"):
            generate(ours.model, [1, 5, 6], do_sample=True, temperature=0.0)
        with pytest.raises(LlamascopeError, match="bad_words_ids"):
            generate(ours.model, [1, 5, 6], bad_words_ids=[[10_000]])
        with pytest.raises(LlamascopeError, match="stop_strings"):
            generate(ours.model, [1, 5, 6], stop_strings=["x"])  # no tokenizer
    finally:
        hook.remove()
    assert calls == []


def test_sampling_settings_are_ignored_with_a_warning_when_greedy(models, caplog):
    ours, _ = models
    ids = ours.tokenizer.encode(PROMPTS[0])
    with caplog.at_level(logging.WARNING, logger="llamascope"):
        result = generate(ours.model, ids, max_new_tokens=8, eos_token_id=[], temperature=-3.0, top_p=7.0)
    assert "temperature" in caplog.text and "top_p" in caplog.text
    assert result.output_ids == generate(ours.model, ids, max_new_tokens=8, eos_token_id=[]).output_ids
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llamascope"):
        GenerationConfig.resolve(None, {"temperature": 0.6, "top_p": 0.9}, do_sample=False)  # the call chose greedy
    assert caplog.text == ""


def test_generation_config_precedence(models, tiny_model):
    ours, _ = models
    config = ours.config
    with_file = GenerationConfig.resolve(
        config, {"temperature": 0.6, "eos_token_id": [7, 8], "do_sample": True}, top_p=0.5
    )
    assert (with_file.temperature, with_file.eos_token_id, with_file.top_p) == (0.6, [7, 8], 0.5)
    assert with_file.sources["temperature"] == "generation_config.json" and with_file.sources["top_p"] == "call"
    # without generation_config.json, generation keys of config.json count (transformers' fallback)
    config.extra["temperature"], config.extra["max_length"] = 0.3, 40
    try:
        fallback = GenerationConfig.resolve(config, None)
        assert (fallback.temperature, fallback.max_length, fallback.eos_token_id) == (0.3, 40, [2])
        assert fallback.sources["temperature"] == "config.json"
        assert GenerationConfig.resolve(config, {}).temperature == 1.0  # a generation_config.json hides them
        assert GenerationConfig.resolve(config, None, temperature=0.9).temperature == 0.9
    finally:
        del config.extra["temperature"], config.extra["max_length"]


def test_entry_point_defaults_rank_below_the_model_files():
    """resolve's `defaults` (the server's OpenAI ones): below config.json and generation_config.json,
    above transformers' defaults; recorded as "default" and never warned about."""
    openai = {"do_sample": True, "top_k": 0}
    plain = GenerationConfig.resolve(None, {}, defaults=openai)
    assert (plain.do_sample, plain.top_k, plain.sources["top_k"]) == (True, 0, "default")
    files = GenerationConfig.resolve(None, {"top_k": 5, "do_sample": False}, defaults=openai)
    assert (files.do_sample, files.top_k) == (False, 5)
    assert GenerationConfig.resolve(None, {"top_k": 5}, defaults=openai, top_k=7).top_k == 7
    with pytest.raises(LlamascopeError, match="unknown generation setting 'topk'"):
        GenerationConfig.resolve(None, None, defaults={"topk": 1})


def test_greedy_with_a_default_top_k_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="llamascope"):
        GenerationConfig.resolve(None, {"do_sample": False}, defaults={"do_sample": True, "top_k": 0})
    assert caplog.text == ""


def test_validation_rules_are_checked_in_order_and_name_the_setting():
    """GenerationConfig.validate walks its tables: the first broken rule is the one reported."""
    with pytest.raises(LlamascopeError, match=r"max_new_tokens=-1: must be an integer >= 0"):
        GenerationConfig.resolve(None, None, max_new_tokens=-1, num_beams=0)
    with pytest.raises(LlamascopeError, match=r"num_return_sequences=3: cannot exceed num_beams=2"):
        GenerationConfig.resolve(None, None, num_beams=2, num_return_sequences=3)
    with pytest.raises(LlamascopeError, match=r"num_return_sequences=2: greedy search returns one sequence"):
        GenerationConfig.resolve(None, None, num_return_sequences=2)
    with pytest.raises(LlamascopeError, match=r"top_p=0: must be in \(0, 1\]"):
        GenerationConfig.resolve(None, None, do_sample=True, top_p=0)
    GenerationConfig.resolve(None, None, do_sample=False, top_p=0)  # ignored when not sampling


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")
def test_default_length_is_twenty_new_tokens_capped_at_context(models):
    """transformers 5: with neither max_new_tokens nor max_length, 20 new tokens (within the context)."""
    ours, hf_model = models
    ids = ours.tokenizer.encode(PROMPTS[0])
    expected = hf_generate(hf_model, ids, do_sample=False, eos_token_id=None)
    found = generate(ours.model, ids, eos_token_id=[])
    assert len(found.output_ids[0]) == 20 and found.output_ids[0] == expected[0, len(ids) :].tolist()
    assert GenerationConfig().max_length_for(250, context=256) == 256
    assert GenerationConfig(max_length=30).max_length_for(10, context=256) == 30


@pytest.mark.parametrize("cols", [1, 5, 16, 17, 300, 49152])
def test_native_argmax_follows_torch_rules(cols):
    """The greedy pick's native kernel against torch.argmax: random rows, ties (the first index
    wins, also across vector lanes), NaN (the first NaN wins), rows of -inf, partial vectors."""
    from llamascope import kernels
    from llamascope.sampling import argmax

    if kernels.load() is None:
        pytest.skip("native kernels unavailable on this machine")
    gen = torch.Generator().manual_seed(cols)
    rows = torch.randn(8, cols, generator=gen)
    rows[1] = torch.randint(0, 3, (cols,), generator=gen).float()  # many ties
    rows[2] = float("-inf")
    rows[3, cols // 2 :] = float("nan")
    rows[4] = 7.0  # all equal: column 0
    rows[5, -1] = 100.0  # the last column, in the partial vector
    rows[6] = float("-inf")
    rows[6, cols - 1] = -1e30
    rows[7, ::3] = float("inf")
    got = argmax(rows)
    assert got.dtype == torch.long and torch.equal(got, rows.argmax(-1))
