"""Constrained decoding: the output follows a JSON schema, a regular expression, a list of choices
or a grammar (GBNF or Lark), token by token. llguidance does the grammar work (docs/structured.md
says why it and not xgrammar or outlines-core); this module turns its token mask into one more
logits processor, so it composes with greedy search, sampling, beams, speculative decoding,
batches and the native decode step:

    constraint = {"type": "json_schema", "schema": {...}}      (or json_object, regex, choice, grammar)
    grammar = compile(tokenizer, constraint)                   checked once, cached per constraint
    each step, for each row:
        the matcher takes the row's new tokens since the last step (rolled back where a beam
        or a refused draft changed them), then gives the set of tokens that may come next;
        every other token's score becomes -inf (the eos ids are allowed once the value is
        complete, and then only they)
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from typing import Any

import llguidance
import torch

from .errors import LlamascopeError

COMPILED_KEPT = 64  # compiled grammars kept (least recently used leave first)
# How JSON is laid out: on one line, ", " between items and ": " after keys (as Python's json.dumps
# writes it). With free whitespace a model may spend its tokens on spaces and line breaks between
# the values (the default model did, 600 tokens of them, on one schema in 200).
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Numbers are written with at most this many decimals (a subset of what the schema allows, so
# every value still validates): without it a model may never stop a fraction ("1.00000...").
NUMBER_STEP = 1e-6
# Keys of a JSON schema whose values are subschemas, or maps or lists of them.
SUBSCHEMA_KEYS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
# llguidance's parser limits: a grammar that needs more is refused, never hung on.
LIMITS = dict(initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, max_grammar_size=500_000)


def constraint_from(
    response_format: dict | None = None,
    json_schema: dict | str | None = None,
    regex: str | None = None,
    choice: list[str] | None = None,
    grammar: str | None = None,
) -> dict | None:
    """One constraint from the ways callers give it: OpenAI's `response_format` ({"type": "text"},
    {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}}), or one of
    json_schema (a dict or its JSON text), regex, choice (a list of strings), grammar (GBNF or Lark
    text). None: unconstrained. Refuses two at once, by name."""
    given = {
        name: value
        for name, value in dict(
            response_format=response_format, json_schema=json_schema, regex=regex, choice=choice, grammar=grammar
        ).items()
        if value is not None
    }
    if len(given) > 1:
        raise LlamascopeError(f"give one output constraint, not {' and '.join(given)}")
    if not given:
        return None
    ((name, value),) = given.items()
    if name == "response_format":
        return _from_response_format(value)
    if name == "json_schema":
        return {"type": "json_schema", "schema": _schema(value, "json_schema")}
    if name == "regex":
        return {"type": "regex", "pattern": _text(value, "regex")}
    if name == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise LlamascopeError("choice: expected a non-empty list of non-empty strings")
        return {"type": "choice", "choices": list(value)}
    return {"type": "grammar", "grammar": _text(value, "grammar")}


def _from_response_format(value: Any) -> dict | None:
    if not isinstance(value, dict) or "type" not in value:
        raise LlamascopeError("response_format: expected an object with a 'type'")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise LlamascopeError("response_format.json_schema: expected an object with a 'schema'")
        return {"type": "json_schema", "schema": _schema(inner["schema"], "response_format.json_schema.schema")}
    raise LlamascopeError(f"response_format.type: {kind!r} is not one of text, json_object, json_schema")


def _schema(value: Any, where: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise LlamascopeError(f"{where}: not JSON ({e})") from None
    if not isinstance(value, (dict, bool)):
        raise LlamascopeError(f"{where}: a JSON schema is an object")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise LlamascopeError(f"{where}: expected a non-empty string")
    return value


def describe(constraint: dict) -> str:
    """A short name for logs and traces: 'JSON schema', 'regex ^a+$', ..."""
    kind = constraint["type"]
    if kind == "json_object":
        return "any JSON object"
    if kind == "json_schema":
        return "JSON schema"
    if kind == "regex":
        return f"regex {constraint['pattern']!r}"
    if kind == "choice":
        return "one of " + ", ".join(map(repr, constraint["choices"]))
    return "grammar"


# ---- compiling ---------------------------------------------------------------------------------


class Grammars:
    """The llguidance tokenizer of one tokenizer and eos set (built once: about a second for a
    50k vocabulary), and the grammars compiled for it, cached per constraint."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        if not eos_ids:
            raise LlamascopeError("constrained output needs an eos token id to end on (eos_token_id is empty)")
        text = tokenizer.backend.to_str()
        self.lltokenizer = llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=list(eos_ids))
        self.vocab_size, self.eos_ids = vocab_size, list(eos_ids)
        self._compiled: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()  # (the server compiles in its handlers' threads and its worker)

    def compile(self, constraint: dict) -> str:
        """The constraint as llguidance's grammar, checked: an unsupported feature or a grammar past
        the parser's limits is refused with llguidance's own words."""
        key = json.dumps(constraint, sort_keys=True)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        grammar = _grammar(constraint)
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0, limits=_limits())
        if matcher.is_error():
            raise LlamascopeError(f"{describe(constraint)}: {matcher.get_error()}")
        with self._lock:
            self._compiled[key] = grammar
            while len(self._compiled) > COMPILED_KEPT:
                self._compiled.popitem(last=False)
        return grammar

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0, limits=_limits())


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**LIMITS)


def _grammar(constraint: dict) -> str:
    kind = constraint["type"]
    try:
        if kind in ("json_object", "json_schema"):
            schema = finite_numbers(constraint["schema"]) if kind == "json_schema" else {"type": "object"}
            if isinstance(schema, dict) and "x-guidance" not in schema:
                schema = {**schema, "x-guidance": JSON_FORMAT}
            return llguidance.grammar_from("json_schema", json.dumps(schema))
        if kind == "regex":
            return llguidance.grammar_from("regex", constraint["pattern"])
        if kind == "choice":
            return llguidance.grammar_from("choice", json.dumps(constraint["choices"]))
        return llguidance.grammar_from("grammar", constraint["grammar"])
    except (ValueError, RuntimeError) as e:  # llguidance's words for what it does not support
        raise LlamascopeError(f"{describe(constraint)}: {str(e).strip().splitlines()[0]}") from None


def finite_numbers(schema: Any) -> Any:
    """The schema with every number subschema that sets no multipleOf taking NUMBER_STEP, so that a
    fraction ends (a copy; the caller's schema is left as it was)."""

    def bound(sub: dict) -> dict:
        kinds = sub.get("type")
        if (kinds == "number" or (isinstance(kinds, list) and "number" in kinds)) and "multipleOf" not in sub:
            sub["multipleOf"] = NUMBER_STEP
        return sub

    return map_subschemas(schema, bound)


def closed_objects(schema: Any) -> Any:
    """The schema with every object that lists properties and says nothing of others allowing no
    others (OpenAI's strict function calling; a copy)."""

    def close(sub: dict) -> dict:
        if "properties" in sub and "additionalProperties" not in sub:
            sub["additionalProperties"] = False
        return sub

    return map_subschemas(schema, close)


def map_subschemas(schema: Any, change) -> Any:
    """A copy of the schema with `change` (a copy of a dict -> that dict changed) applied to it and
    to every subschema under it."""
    if not isinstance(schema, dict):
        return schema
    out = change(dict(schema))
    for key in SUBSCHEMA_KEYS:
        if key in out:
            out[key] = map_subschemas(out[key], change)
    for key in SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: map_subschemas(sub, change) for name, sub in out[key].items()}
    for key in SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [map_subschemas(sub, change) for sub in out[key]]
    return out


# Each tokenizer's Grammars, per vocabulary size and eos set; they go when the tokenizer goes.
_GRAMMARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GRAMMARS_LOCK = threading.Lock()


def grammars_for(tokenizer, vocab_size: int, eos_ids: list[int]) -> Grammars:
    """The Grammars of a tokenizer (kept with it for later calls) and eos set."""
    key = (vocab_size, tuple(eos_ids))
    with _GRAMMARS_LOCK:
        kept = _GRAMMARS.setdefault(tokenizer, {})
        if key not in kept:
            kept[key] = Grammars(tokenizer, vocab_size, eos_ids)
        return kept[key]


# ---- the processor -----------------------------------------------------------------------------


class GrammarMask:
    """A logits processor: scores [B, V] -> the same with every token the constraint does not allow
    next at -inf. `prompt_length`: the columns before the first new token (a padded batch's
    prompt width). One matcher per row, synced each call with the row's new tokens."""

    def __init__(self, grammars: Grammars, constraint: dict, prompt_length: int):
        self.constraint = constraint
        self.grammars, self.grammar, self.prompt_length = grammars, grammars.compile(constraint), prompt_length
        self.matchers: list[llguidance.LLMatcher] = []
        self.fed: list[list[int]] = []  # the tokens each matcher has taken
        self.allowed: list[int] = []  # per row, how many tokens the last mask allowed (for trace)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B, V = scores.shape
        while len(self.matchers) < B:
            self.matchers.append(self.grammars.matcher(self.grammar))
            self.fed.append([])
        masks = torch.zeros(B, V, dtype=torch.bool)
        for row in range(B):
            masks[row] = self._allowed(row, input_ids[row, self.prompt_length :].tolist(), V)
        self.allowed = masks.sum(-1).tolist()
        return scores.masked_fill(~masks.to(scores.device), float("-inf"))

    def _allowed(self, row: int, tokens: list[int], V: int) -> torch.Tensor:
        matcher, fed = self.matchers[row], self.fed[row]
        same = 0
        while same < min(len(fed), len(tokens)) and fed[same] == tokens[same]:
            same += 1
        if same < len(fed):  # a beam or a refused draft changed the row's tokens
            matcher.rollback(len(fed) - same)
            del fed[same:]
        if not matcher.is_stopped():
            for token in tokens[same:]:
                matcher.consume_token(token)
                fed.append(token)
                if matcher.is_stopped():
                    break
        if matcher.is_error():
            raise LlamascopeError(f"constrained output: {matcher.get_error()}")
        if matcher.is_stopped():  # complete: only the end
            allowed = torch.zeros(V, dtype=torch.bool)
            allowed[[e for e in self.grammars.eos_ids if e < V]] = True
            return allowed
        bits = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.uint8)  # [ceil(V'/8)]
        unpacked = ((bits[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).view(-1).bool()
        allowed = torch.zeros(V, dtype=torch.bool)
        n = min(V, unpacked.shape[0])
        allowed[:n] = unpacked[:n]
        return allowed
