"""Structured output through the server: generated JSON schemas (nested objects, arrays, enums,
numbers with bounds, required and optional fields, anyOf) sent to `llamascope serve` on the default
model as chat completions with response_format json_schema; counts the replies that parse and
validate (jsonschema), and those cut short by max_tokens.

    .venv/bin/python benchmarks/structured.py                  # 200 schemas
    .venv/bin/python benchmarks/structured.py --schemas 20 --seed 3
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import jsonschema
import openai
from serve_compare import Server

WORDS = ["red", "green", "blue", "cat", "dog", "owl", "north", "south"]
NAMES = ["name", "age", "city", "tags", "score", "active", "id", "kind", "items", "note", "size", "level"]


def leaf(rng: random.Random) -> dict:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum"])
    if kind == "string":
        return {"type": "string", "maxLength": rng.choice([8, 16, 32])}
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        low = rng.randint(-10, 10)
        return {"type": "number", "minimum": low, "maximum": low + rng.randint(1, 100)}
    if kind == "boolean":
        return {"type": "boolean"}
    return {"enum": rng.sample(WORDS, rng.randint(1, 4))}


def schema(rng: random.Random, depth: int = 0) -> dict:
    roll = rng.random()
    if depth >= 2 or roll < 0.45:
        return leaf(rng)
    if roll < 0.65:
        return {"type": "array", "items": schema(rng, depth + 1), "maxItems": rng.randint(1, 4)}
    if roll < 0.75:
        return {"anyOf": [schema(rng, depth + 1), schema(rng, depth + 1)]}
    return an_object(rng, depth + 1)


def an_object(rng: random.Random, depth: int = 0) -> dict:
    names = rng.sample(NAMES, rng.randint(1, 5))
    return {
        "type": "object",
        "properties": {n: schema(rng, depth) for n in names},
        "required": [n for n in names if rng.random() < 0.7],
        "additionalProperties": False,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemas", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=600)
    args = parser.parse_args()
    from llamascope.loading import default_model_path

    rng = random.Random(args.seed)
    server = Server("llamascope", default_model_path(), 2)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
    valid = cut = failed = 0
    start = time.perf_counter()
    try:
        for i in range(args.schemas):
            s = an_object(rng)
            reply = client.chat.completions.create(
                model="bench",
                messages=[{"role": "user", "content": "Reply with JSON for this schema: " + json.dumps(s)}],
                response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": s, "strict": True}},
                max_tokens=args.max_tokens,
                temperature=0,
            )
            choice = reply.choices[0]
            if choice.finish_reason == "length":
                cut += 1
                print(
                    f"schema {i}: cut short: {json.dumps(s)[:300]} ... {choice.message.content[-300:]!r}",
                    file=sys.stderr,
                )
                continue
            try:
                jsonschema.validate(json.loads(choice.message.content), s)
                valid += 1
            except (json.JSONDecodeError, jsonschema.ValidationError) as e:
                failed += 1
                print(f"schema {i}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
    finally:
        server.close()
    seconds = time.perf_counter() - start
    print(
        f"{args.schemas} schemas (seed {args.seed}): {valid} parse and validate, {failed} do not, "
        f"{cut} cut short by max_tokens={args.max_tokens}; {seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
