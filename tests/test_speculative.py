"""Prompt lookup decoding against greedy search without drafts (token for token), against
transformers' own prompt lookup, and its draft lookup against transformers' candidate generator."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_generate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from llamascope import Engine
from llamascope.config import GenerationConfig
from llamascope.errors import LlamascopeError
from llamascope.generation import generate
from llamascope.loading import LoadOptions, load_model
from llamascope.speculative import lookup

SAMPLE = (
    "The lighthouse keeper counted the ships: one, two, three. The lighthouse keeper counted the "
    "ships again, and the ships were one, two, three, four."
)


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.integers(0, 5), min_size=1, max_size=40),
    num_tokens=st.integers(1, 8),
    ngram=st.integers(1, 4),
    eos=st.lists(st.integers(0, 5), max_size=1),
)
def test_drafts_are_transformers_prompt_lookup_candidates(ids, num_tokens, ngram, eos):
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    reference = PromptLookupCandidateGenerator(
        eos_token_id=torch.tensor(eos) if eos else None,
        num_output_tokens=num_tokens,
        max_matching_ngram_size=ngram,
        max_length=1000,
    )
    candidates, _ = reference.get_candidates(torch.tensor([ids]))
    assert lookup(ids, num_tokens, ngram, eos) == candidates[0, len(ids) :].tolist()


@pytest.mark.parametrize("num_tokens", [1, 3, 7, 10])
def test_the_default_model_gives_its_greedy_tokens_with_drafts(num_tokens):
    """On the real default model (Q4_1, native decode step; close candidates, where any numeric
    difference shows): a text to repeat, so drafts are long and mostly accepted; drafts past the
    step's 8 rows go in several calls."""
    engine = Engine.load()
    messages = [{"role": "user", "content": "Repeat this text exactly:\n\n" + SAMPLE * 2}]
    ids = engine.tokenizer.encode_chat(messages)
    plain = generate(engine.model, ids, max_new_tokens=80, eos_token_id=[], output_logprobs=2)
    drafted = generate(
        engine.model, ids, max_new_tokens=80, eos_token_id=[], output_logprobs=2, prompt_lookup_num_tokens=num_tokens
    )
    assert drafted.output_ids == plain.output_ids
    assert drafted.logprobs == plain.logprobs  # the numbers too, to the bit


@pytest.fixture(scope="module", params=[("native", "float32"), ("native", "bfloat16"), ("plain", "float32")])
def tiny(request, tiny_model):
    backend, dtype = request.param
    return load_model(tiny_model, LoadOptions(backend=backend, dtype=dtype)).model


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(st.integers(3, 40), min_size=2, max_size=30), num_tokens=st.integers(1, 9))
def test_drafts_never_change_a_token(tiny, prompt, num_tokens):
    """Random prompts over a small alphabet (so n-grams repeat), float32 and bfloat16, native and
    plain: the tokens and log-probabilities of greedy search without drafts, and eos stops it."""
    common = dict(max_new_tokens=20, eos_token_id=[2], output_logprobs=1)
    plain = generate(tiny, prompt, **common)
    drafted = generate(tiny, prompt, prompt_lookup_num_tokens=num_tokens, **common)
    assert drafted.output_ids == plain.output_ids and drafted.finish_reasons == plain.finish_reasons
    assert drafted.logprobs == plain.logprobs


def test_prompt_lookup_gives_transformers_prompt_lookup_tokens(tiny_model):
    ours = load_model(tiny_model)
    ids = ours.tokenizer.encode(SAMPLE)
    hf = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    expected = hf_generate(hf, ids, max_new_tokens=40, do_sample=False, eos_token_id=None, prompt_lookup_num_tokens=5)
    found = generate(ours.model, ids, max_new_tokens=40, eos_token_id=[], prompt_lookup_num_tokens=5)
    assert found.output_ids[0] == expected[0, len(ids) :].tolist()


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(do_sample=True, num_return_sequences=2), "one sequence of one prompt"),
        (dict(num_beams=2), "prompt_lookup_num_tokens.*num_beams=1"),
        (dict(use_cache=False), "prompt_lookup_num_tokens.*KV cache"),
        (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens.*must be an integer >= 1"),
        (dict(max_matching_ngram_size=0), "max_matching_ngram_size.*must be an integer >= 1"),
    ],
)
def test_settings_prompt_lookup_does_not_run_with_are_refused_by_name(tiny_model, settings, message):
    model = load_model(tiny_model).model
    with pytest.raises(LlamascopeError, match=message):
        generate(model, [1, 5, 6], max_new_tokens=4, **{"prompt_lookup_num_tokens": 3, **settings})


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.lists(st.integers(3, 12), min_size=1, max_size=20), min_size=2, max_size=4))
def test_a_batch_with_drafts_gives_each_prompt_its_tokens_alone(tiny, helpers, prompts):
    """Several prompts of different lengths: with prompt lookup or an assistant, each row's tokens,
    finish reason and log-probabilities are those of its prompt alone without drafts (not a
    left-padded batch's, whose other numeric paths may tip a near tie in bfloat16)."""
    common = dict(max_new_tokens=12, eos_token_id=[2], output_logprobs=1)
    alone = [generate(tiny, p, **common) for p in prompts]
    for drafts in (dict(prompt_lookup_num_tokens=3), dict(assistant=helpers["small"], num_assistant_tokens=3)):
        found = generate(tiny, prompts, **drafts, **common)
        assert found.output_ids == [a.output_ids[0] for a in alone]
        assert found.finish_reasons == [a.finish_reasons[0] for a in alone]
        assert found.logprobs == [a.logprobs[0] for a in alone] and found.prompt_ids == prompts


def test_a_model_whose_rope_depends_on_the_length_is_refused(model_factory):
    """Phi-3's longrope (and dynamic scaling): generate recomputes the sequence where the angles
    change, which a verification pass does not; refused by name rather than a different answer."""
    from conftest import PHI3_LONGROPE

    model = load_model(model_factory("speculative-phi3", **PHI3_LONGROPE)).model
    with pytest.raises(LlamascopeError, match="rope_type 'longrope'"):
        generate(model, [1, 5, 6], max_new_tokens=4, prompt_lookup_num_tokens=3)


def test_generate_command_takes_prompt_lookup_and_prints_the_same_text(tiny_model, capsys):
    from llamascope.cli import main

    command = ["generate", SAMPLE, "--model", str(tiny_model), "--max-new-tokens", "24"]
    assert main(command) == 0
    plain = capsys.readouterr().out
    assert main([*command, "--prompt-lookup-num-tokens", "4", "--max-matching-ngram-size", "3"]) == 0
    assert capsys.readouterr().out == plain


def test_the_draft_budget_grows_on_kept_drafts_and_stops_drafting_while_they_miss():
    from llamascope.speculative import MAX_BACKOFF, DraftBudget

    budget = DraftBudget(6)
    assert budget.next() == 6
    budget.kept(6, 2)  # cut short: one fewer
    assert budget.next() == 5
    budget.kept(5, 5)  # kept whole: two more, at most K
    assert budget.next() == 6
    waits = []
    for _ in range(6):  # nothing kept, again and again: rounds without drafts, doubling
        budget.kept(budget.size, 0)
        rounds = 0
        while budget.next() == 0:
            rounds += 1
        waits.append(rounds)
    assert waits == [1, 2, 4, 8, 16, MAX_BACKOFF] and budget.size == 1
    budget.kept(1, 1)  # a kept draft ends the waiting
    budget.kept(3, 0)
    assert budget.next() == 0 and budget.next() == 3 - 1


# ---- assisted decoding: a second model drafts --------------------------------------------------


@pytest.fixture(scope="module")
def helpers(model_factory):
    """Assistants of the tiny model's vocabulary: a smaller random model (its drafts mostly miss)."""
    small = model_factory("assistant-small", seed=7, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    return {"small": load_model(small).model}


def _speculation_counts(steps) -> tuple[int, int]:
    """(drafted, accepted) over Steps of speculative decoding."""
    drafted = sum(len(s.speculation.draft) for s in steps if s.speculation.index == 0)
    accepted = sum(s.speculation.accepts(int(s.next_tokens[0])) for s in steps)
    return drafted, accepted


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.lists(st.integers(3, 300), min_size=1, max_size=30),
    num_tokens=st.integers(1, 12),
    schedule=st.sampled_from(["constant", "heuristic"]),
    threshold=st.sampled_from([0.0, 0.4]),
    which=st.sampled_from(["small", "itself in bfloat16"]),
)
def test_an_assistant_never_changes_a_token(tiny, helpers, tiny_model, prompt, num_tokens, schedule, threshold, which):
    """Random prompts, float32 and bfloat16 targets, native and plain: greedy search's tokens and
    log-probabilities whatever the assistant drafts (a small random model, mostly wrong; the target
    itself in bfloat16, mostly right) and however many tokens it drafts a round."""
    if which not in helpers:
        helpers[which] = load_model(tiny_model, LoadOptions(dtype="bfloat16")).model
    common = dict(max_new_tokens=20, eos_token_id=[2], output_logprobs=1)
    plain = generate(tiny, prompt, **common)
    assisted = generate(
        tiny,
        prompt,
        assistant=helpers[which],
        num_assistant_tokens=num_tokens,
        num_assistant_tokens_schedule=schedule,
        assistant_confidence_threshold=threshold,
        **common,
    )
    assert assisted.output_ids == plain.output_ids and assisted.finish_reasons == plain.finish_reasons
    assert assisted.logprobs == plain.logprobs


@pytest.mark.parametrize("backend", ["native", "plain"])
def test_a_model_drafting_for_itself_has_every_draft_accepted(tiny_model, backend):
    """The assistant's cache follows the sequence (rolled back to the kept drafts, fed the target's
    token): a model drafting for itself, numbers equal, drafts every token the target then chooses."""
    model = load_model(tiny_model, LoadOptions(backend=backend)).model
    steps = []
    ids = [1, 40, 41, 42, 43]
    config = GenerationConfig.resolve(
        model.config, None, max_new_tokens=40, eos_token_id=[], num_assistant_tokens=5, assistant_confidence_threshold=0
    )
    result = generate(model, ids, config, on_step=steps.append, assistant=model)
    drafted, accepted = _speculation_counts(steps)
    assert result.output_ids == generate(model, ids, max_new_tokens=40, eos_token_id=[]).output_ids
    assert drafted >= 30 and accepted == drafted
    assert all(s.speculation.source == "assistant" for s in steps)


def test_assisted_decoding_gives_transformers_assisted_tokens(tiny_model, model_factory):
    small = model_factory("assistant-small", seed=7, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    ours, helper = load_model(tiny_model), load_model(small)
    ids = ours.tokenizer.encode(SAMPLE)
    hf = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    hf_helper = LlamaForCausalLM.from_pretrained(small, dtype=torch.float32).eval()
    expected = hf_generate(hf, ids, max_new_tokens=30, do_sample=False, eos_token_id=None, assistant_model=hf_helper)
    found = generate(ours.model, ids, max_new_tokens=30, eos_token_id=[], assistant=helper.model)
    assert found.output_ids[0] == expected[0, len(ids) :].tolist()


def test_the_heuristic_schedule_grows_the_draft_and_the_threshold_ends_it(tiny_model):
    """'heuristic': two more after a draft kept whole, one fewer after one cut short; a draft ends
    after a token the assistant gives less than the threshold."""
    model = load_model(tiny_model).model
    ids = [1, 40, 41, 42, 43]

    def draft_sizes(**settings) -> list[int]:
        steps = []
        config = GenerationConfig.resolve(model.config, None, max_new_tokens=30, eos_token_id=[], **settings)
        generate(model, ids, config, on_step=steps.append, assistant=model)
        return [len(s.speculation.draft) for s in steps if s.speculation.index == 0][1:]

    assert draft_sizes(num_assistant_tokens=2, assistant_confidence_threshold=0.0)[:3] == [2, 2, 2]
    grown = draft_sizes(
        num_assistant_tokens=2, num_assistant_tokens_schedule="heuristic", assistant_confidence_threshold=0.0
    )
    assert grown[:3] == [2, 4, 6]
    assert max(draft_sizes(num_assistant_tokens=8, assistant_confidence_threshold=1.0)) == 1


def test_an_assistant_of_another_vocabulary_is_refused_naming_both(tiny_model):
    engine = Engine.load(tiny_model)
    default = Engine.load()
    with pytest.raises(LlamascopeError, match=r"assistant model .*cannot draft for .*gqa.*vocabularies differ"):
        engine.generate("hello", max_new_tokens=2, assistant_model=default)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(do_sample=True, num_return_sequences=2), "one sequence of one prompt"),
        (dict(num_beams=2), "num_beams=1"),
        (dict(num_assistant_tokens=0), "num_assistant_tokens.*must be an integer >= 1"),
        (dict(num_assistant_tokens_schedule="fast"), "num_assistant_tokens_schedule.*constant, heuristic"),
        (dict(assistant_confidence_threshold=1.5), r"assistant_confidence_threshold.*\[0, 1\]"),
    ],
)
def test_settings_assisted_decoding_does_not_run_with_are_refused_by_name(tiny_model, settings, message):
    model = load_model(tiny_model).model
    with pytest.raises(LlamascopeError, match=message):
        generate(model, [1, 5, 6], max_new_tokens=4, assistant=model, **settings)


def test_generate_command_takes_an_assistant_model_and_prints_the_same_text(tiny_model, model_factory, capsys):
    from llamascope.cli import main

    small = model_factory("assistant-small", seed=7, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    command = ["generate", SAMPLE, "--model", str(tiny_model), "--max-new-tokens", "24"]
    assert main(command) == 0
    plain = capsys.readouterr().out
    assert main([*command, "--assistant-model", str(small), "--num-assistant-tokens", "3"]) == 0
    assert capsys.readouterr().out == plain


# ---- sampling ---------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.lists(st.integers(3, 40), min_size=2, max_size=30), num_tokens=st.integers(1, 9), seed=st.integers(0, 99)
)
def test_prompt_lookup_sampling_draws_the_tokens_of_sampling_without_drafts(tiny, prompt, num_tokens, seed):
    """Each position is drawn from the model's distribution, one draw a position in order: with a
    seed, the very tokens (and log-probabilities) of sampling without drafts."""
    common = dict(max_new_tokens=20, eos_token_id=[2], output_logprobs=1, do_sample=True, top_k=20, seed=seed)
    plain = generate(tiny, prompt, **common)
    drafted = generate(tiny, prompt, prompt_lookup_num_tokens=num_tokens, **common)
    assert drafted.output_ids == plain.output_ids and drafted.logprobs == plain.logprobs


def _distribution(model, ids: list[int], **sampling) -> torch.Tensor:
    """The processed distribution [V] the model samples the token after `ids` from."""
    steps = []
    generate(model, ids, max_new_tokens=1, eos_token_id=[], on_step=steps.append, seed=0, **sampling)
    return steps[0].scores[0].softmax(-1).double()


def test_assisted_sampling_follows_the_model_distribution(tiny_model):
    """The rejection rule on a draft from another model (the model with noise on its LM head: some
    drafts kept, most refused): the second new token, whose draft is checked, is distributed as the
    model's own sampling gives it, sum over x of p(x) p(y | x) (a chi-square test), and not as the
    assistant's would be."""
    from test_sampling import chi_square_p_value

    model, helper = load_model(tiny_model).model, load_model(tiny_model, LoadOptions(backend="plain")).model
    with torch.no_grad():
        weight = helper.lm_head.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    sampling = dict(do_sample=True, temperature=1.0, top_k=6)
    ids = [1, 40, 41, 42]
    counts = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    kept = drafted = 0
    for seed in range(2000):
        steps = []
        config = GenerationConfig.resolve(model.config, None, max_new_tokens=3, eos_token_id=[], seed=seed, **sampling)
        config.num_assistant_tokens, config.assistant_confidence_threshold = 1, 0.0
        generate(model, ids, config, on_step=steps.append, assistant=helper)
        second = steps[1]
        assert second.speculation.checked  # its token went through the rejection rule
        counts[int(second.next_tokens[0])] += 1
        drafted += 1
        kept += second.speculation.accepts(int(second.next_tokens[0]))
    first = _distribution(model, ids, **sampling)
    expected = sum(first[x] * _distribution(model, ids + [x], **sampling) for x in first.nonzero()[:, 0].tolist())
    assert chi_square_p_value(counts, expected) > 1e-3
    assert 0.05 < kept / drafted < 0.95  # drafts were both kept and refused
    assistant_first = _distribution(helper, ids, **sampling)
    theirs = sum(
        assistant_first[x] * _distribution(helper, ids + [x], **sampling)
        for x in assistant_first.nonzero()[:, 0].tolist()
    )
    assert chi_square_p_value(counts, theirs) < 1e-3  # (the test tells the two apart)
