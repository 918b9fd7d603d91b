"""Constrained output (JSON schemas, regular expressions, choices, grammars) as one more logits
processor: what comes out parses and validates (jsonschema, re), on the default model; it composes
with sampling, beams, batches and prompt lookup; bad constraints are refused by name."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamascope import Engine
from llamascope.constraints import constraint_from, grammars_for
from llamascope.errors import LlamascopeError


@pytest.fixture(scope="module")
def engine():
    return Engine.load()


# ---- generated schemas -------------------------------------------------------------------------

NAMES = ["name", "age", "city", "tags", "score", "active", "id", "kind", "items", "note"]
leaf = st.one_of(
    st.just({"type": "string", "maxLength": 24}),
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-50, 50),
        st.integers(0, 100),
    ),
    st.builds(lambda lo: {"type": "number", "minimum": lo, "maximum": lo + 10}, st.integers(-5, 5)),
    st.just({"type": "boolean"}),
    st.builds(
        lambda words: {"enum": words},
        st.lists(st.sampled_from(["red", "green", "blue", "cat", "dog"]), min_size=1, max_size=3, unique=True),
    ),
)


def _object(children):
    return st.builds(
        lambda props, required: {
            "type": "object",
            "properties": props,
            "required": sorted(set(required) & set(props)),
            "additionalProperties": False,
        },
        st.dictionaries(st.sampled_from(NAMES), children, min_size=1, max_size=4),
        st.lists(st.sampled_from(NAMES), max_size=4),
    )


schemas = st.recursive(
    leaf,
    lambda children: st.one_of(
        _object(children),
        st.builds(lambda item: {"type": "array", "items": item, "maxItems": 3}, children),
        st.builds(lambda a, b: {"anyOf": [a, b]}, children, children),
    ),
    max_leaves=6,
).map(
    lambda s: (
        s
        if s.get("type") == "object"
        else {"type": "object", "properties": {"value": s}, "required": ["value"], "additionalProperties": False}
    )
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=schemas, sample=st.booleans())
def test_output_under_a_generated_schema_parses_and_validates(engine, schema, sample):
    """Nested objects, arrays, enums, bounded numbers, required and optional fields, anyOf, greedy
    and sampled: the reply is JSON that validates, ended by eos once the value is complete."""
    extra = dict(do_sample=True, seed=1, temperature=0.8) if sample else {}
    prompt = "Reply with a JSON value for this schema: " + json.dumps(schema)
    reply = engine.generate(prompt, chat=True, json_schema=schema, max_new_tokens=400, **extra)
    assert reply.finish_reason == "eos", reply.text
    jsonschema.validate(json.loads(reply.text), schema)


# ---- other kinds ------------------------------------------------------------------------------------


def test_regex_choice_and_grammar_outputs_match(engine):
    date = engine.generate("Give me a date.", chat=True, regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}", max_new_tokens=20)
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", date.text) and date.finish_reason == "eos"
    colour = engine.generate("Name a colour.", chat=True, choice=["red", "green", "blue"], max_new_tokens=8)
    assert colour.text in ("red", "green", "blue")
    gbnf = 'root ::= answer " because " reason\nanswer ::= "yes" | "no"\nreason ::= [a-z ]{1,30}'
    why = engine.generate("Is the sky blue?", chat=True, grammar=gbnf, max_new_tokens=40)
    assert re.fullmatch(r"(yes|no) because [a-z ]{1,30}", why.text), why.text
    anything = engine.generate(
        "Describe a cat.", chat=True, response_format={"type": "json_object"}, max_new_tokens=200
    )
    assert isinstance(json.loads(anything.text), dict)


def test_the_mask_composes_with_beams_batches_and_prompt_lookup(engine):
    """A constraint is one more processor: each row of a batch and each beam keep it, and prompt
    lookup's drafts (rolled back in the matcher where refused) give the tokens of decoding without
    them."""
    schema = {
        "type": "object",
        "properties": {"animal": {"enum": ["cat", "dog", "owl"]}, "legs": {"type": "integer"}},
        "required": ["animal", "legs"],
        "additionalProperties": False,
    }
    prompts = ["Describe a cat as JSON.", "Describe an owl as JSON, then describe it again."]
    for reply in engine.generate(prompts, chat=True, json_schema=schema, max_new_tokens=60):
        jsonschema.validate(json.loads(reply.text), schema)
    loose = {**schema, "additionalProperties": True}  # (long replies: drafts get refused and kept)
    for prompt in prompts:
        alone = engine.generate(prompt, chat=True, json_schema=loose, max_new_tokens=60)
        drafted = engine.generate(prompt, chat=True, json_schema=loose, max_new_tokens=60, prompt_lookup_num_tokens=4)
        assert drafted.output_ids == alone.output_ids
    beams = engine.generate(prompts[0], chat=True, json_schema=schema, max_new_tokens=60, num_beams=3)
    jsonschema.validate(json.loads(beams.text), schema)


def test_a_constraint_changes_the_choice_only_where_it_must(engine):
    """Where the model's own greedy reply follows the constraint, the constraint keeps every token
    of it (the mask only removes; it never reorders what it allows)."""
    prompt = "Name three animals that live in the sea."
    free = engine.generate(prompt, chat=True, max_new_tokens=12)
    held = engine.generate(prompt, chat=True, choice=[free.text, "whales, sharks and eels"], max_new_tokens=12)
    assert held.output_ids == free.output_ids


# ---- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given,message",
    [
        (dict(json_schema={"type": "object", "properties": {"a": {"type": "strange"}}}), "JSON schema:.*strange"),
        (dict(json_schema="{not json"), "json_schema: not JSON"),
        (dict(regex="(unclosed"), "regex"),
        (dict(choice=[]), "choice: expected a non-empty list"),
        (dict(grammar="root ::= undefined_rule"), "grammar: .*undefined_rule"),
        (dict(response_format={"type": "xml"}), "response_format.type: 'xml'"),
        (dict(regex="a", choice=["b"]), "give one output constraint, not regex and choice"),
    ],
)
def test_bad_constraints_are_refused_by_name(engine, given, message):
    with pytest.raises(LlamascopeError, match=message):
        engine.generate("hello", max_new_tokens=2, **given)


def test_compiled_grammars_are_cached_per_constraint(engine):
    grammars = grammars_for(engine.tokenizer, engine.config.vocab_size, [2])
    constraint = constraint_from(json_schema={"type": "object", "properties": {"n": {"type": "integer"}}})
    assert grammars.compile(constraint) is grammars.compile(dict(constraint))


def test_numbers_end_within_six_decimals_and_the_callers_schema_is_untouched(engine):
    """A number without multipleOf is written with at most 6 decimals (a subset of the schema, so
    the value still validates); the schema given is not changed."""
    schema = {
        "type": "object",
        "properties": {"x": {"anyOf": [{"type": "number"}, {"type": "null"}]}},
        "required": ["x"],
    }
    before = json.dumps(schema, sort_keys=True)
    grammars = grammars_for(engine.tokenizer, engine.config.vocab_size, [2])
    matcher = grammars.matcher(grammars.compile(constraint_from(json_schema=schema)))
    ids = engine.tokenizer.encode('{"x": 1.0000001}', add_special_tokens=False)
    assert matcher.validate_tokens(ids) < len(ids)  # the seventh decimal is refused
    assert json.dumps(schema, sort_keys=True) == before
    reply = engine.generate("Give x as JSON.", chat=True, json_schema=schema, max_new_tokens=60)
    jsonschema.validate(json.loads(reply.text), schema)


def test_trace_shows_what_the_mask_allowed_and_whether_it_changed_the_choice(engine):
    from llamascope.trace import trace

    choices = ["red", "green", "blue"]
    traced = trace(engine, "What colour is the sky? Answer in a sentence.", chat=True, choice=choices, max_new_tokens=4)
    first = traced.steps[0].constrained  # (the three words and their first letters or syllables)
    assert 3 <= first["allowed"] < 100 and traced.to_json()["steps"][0]["constrained"] == first
    own = first["model_choice"]["text"]
    assert first["changed"] == (own != traced.steps[0].chosen.text)
    assert any(s.constrained["changed"] for s in traced.steps)  # (the model would begin a sentence)
    assert "GrammarMask(one of 'red', 'green', 'blue')" in traced.processors


def test_a_schema_past_the_parsers_limits_is_refused_not_hung_on(engine):
    """llguidance's limits bound the work a grammar may take: an enum of 200,000 long strings is
    refused with its words, in a few seconds, rather than compiled for as long as it takes."""
    schema = {"enum": [f"value number {i} of the long list" for i in range(200_000)]}
    with pytest.raises(LlamascopeError, match="JSON schema: .*too big"):
        grammars_for(engine.tokenizer, engine.config.vocab_size, [2]).compile(constraint_from(json_schema=schema))
