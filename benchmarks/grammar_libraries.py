"""Three grammar libraries on the default model's 49,152-token vocabulary: llguidance (what
llamascope uses), xgrammar and outlines-core. For each: building its view of the vocabulary, the
compile time of a few JSON schemas (median of --repeats, nothing cached), and the time per token of
computing the mask and advancing, over the tokens of a compact JSON value that fits the schema.

    pip install llguidance outlines-core jsonschema
    pip install --no-deps xgrammar apache-tvm-ffi      # (its wheel would pull torch, transformers and triton)
    .venv/bin/python benchmarks/grammar_libraries.py

Run it on a quiet machine; one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMAS = {
    "flat object": (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
            "required": ["name", "age", "ok"],
            "additionalProperties": False,
        },
        {"name": "Mariama", "age": 31, "ok": True},
    ),
    "enum and array": (
        {
            "type": "object",
            "properties": {
                "colour": {"enum": ["red", "green", "blue"]},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            },
            "required": ["colour", "tags"],
            "additionalProperties": False,
        },
        {"colour": "green", "tags": ["leaf", "grass", "frog"]},
    ),
    "nested, bounded numbers": (
        {
            "type": "object",
            "properties": {
                "point": {
                    "type": "object",
                    "properties": {"x": {"type": "number", "minimum": 0, "maximum": 10}, "y": {"type": "integer"}},
                    "required": ["x", "y"],
                    "additionalProperties": False,
                },
                "label": {"type": "string", "maxLength": 20},
            },
            "required": ["point", "label"],
            "additionalProperties": False,
        },
        {"point": {"x": 3.5, "y": -2}, "label": "origin nearby"},
    ),
    "anyOf": (
        {
            "type": "object",
            "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "string"}]}},
            "required": ["value"],
            "additionalProperties": False,
        },
        {"value": "forty-two"},
    ),
}


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


# ---- the libraries ---------------------------------------------------------------------------------


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int, eos: int):
        import llguidance

        self.lib = llguidance
        self.tok = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)

    def compile(self, schema: dict):
        grammar = self.lib.grammar_from("json_schema", json.dumps(schema))
        matcher = self.lib.LLMatcher(self.tok, grammar, log_level=0)
        matcher.compute_bitmask()  # (llguidance compiles lazily: the first mask finishes the work)
        return grammar

    def walk(self, grammar, tokens: list[int]) -> None:
        matcher = self.lib.LLMatcher(self.tok, grammar, log_level=0)
        for token in tokens:
            matcher.compute_bitmask()
            assert matcher.consume_token(token), "token refused"


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, eos: int):
        import xgrammar

        self.lib = xgrammar
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        encoded = [""] * vocab_size
        for piece, i in vocab.items():
            encoded[i] = piece
        info = xgrammar.TokenizerInfo(
            encoded, xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab_size, stop_token_ids=[eos]
        )
        self.info, self.vocab_size = info, vocab_size

    def compile(self, schema: dict):
        compiler = self.lib.GrammarCompiler(self.info, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema))

    def walk(self, compiled, tokens: list[int]) -> None:
        matcher = self.lib.GrammarMatcher(compiled)
        bitmask = self.lib.allocate_token_bitmask(1, self.vocab_size)
        for token in tokens:
            matcher.fill_next_token_bitmask(bitmask)
            assert matcher.accept_token(token), "token refused"


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab_size: int, eos: int):
        import outlines_core
        from tokenizers import decoders

        self.lib = outlines_core
        decoder = decoders.ByteLevel()
        pieces: dict[bytes, list[int]] = {}
        for piece, i in tokenizer.backend.get_vocab(with_added_tokens=True).items():
            if i == eos:
                continue
            text = decoder.decode([piece]).encode("utf-8", "surrogatepass")
            pieces.setdefault(text, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, pieces)

    def compile(self, schema: dict):
        regex = self.lib.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.lib.Index(regex, self.vocabulary)

    def walk(self, index, tokens: list[int]) -> None:
        guide = self.lib.Guide(index)
        for token in tokens:
            guide.get_tokens()
            guide.advance(token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from llamascope import Engine

    engine = Engine.load()
    tokenizer, vocab_size, eos = engine.tokenizer, engine.config.vocab_size, 2
    print("| library | vocabulary (s) | schema | compile (ms) | mask + advance per token (us) |")
    print("|---|---:|---|---:|---:|")
    for kind in (LLGuidance, XGrammar, OutlinesCore):
        try:
            setup, library = timed(lambda kind=kind: kind(tokenizer, vocab_size, eos), 1)
        except ImportError as e:
            print(f"| {kind.name} | not installed ({e}) | | | |")
            continue
        for name, (schema, value) in SCHEMAS.items():
            tokens = tokenizer.encode(json.dumps(value, separators=(",", ":")), add_special_tokens=False)
            try:
                compile_s, compiled = timed(lambda lib=library, s=schema: lib.compile(s), args.repeats)
                walk_s, _ = timed(lambda lib=library, c=compiled, t=tokens: lib.walk(c, t), args.repeats)
                cells = f"{1e3 * compile_s:.1f} | {1e6 * walk_s / len(tokens):.0f}"
            except Exception as e:  # noqa: BLE001 - a library's refusal is a finding
                cells = f"fails: {type(e).__name__}: {str(e)[:60]} |"
            print(f"| {kind.name} | {setup:.2f} | {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
