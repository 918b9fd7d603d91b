"""Tool calls on chat completions: OpenAI's `tools` and `tool_choice` in, `tool_calls` out.

tools rendered:   by the chat template where it takes `tools` (its own format), otherwise in
                  a system message (GENERIC_INSTRUCTIONS below: the tools' JSON and how to call)
the model calls:  <tool_call>
                  {"name": "get_weather", "arguments": {"city": "Paris"}}
                  </tool_call>             (one block per call; Hermes' and Qwen's format)
tool_choice:      "none"     no tools rendered, plain text back
                  "auto"     the model chooses; blocks whose JSON is a call of a given function
                             with arguments that validate come back as tool_calls
                  "required" the reply is constrained to one call of some given function
                  {"type": "function", "function": {"name": F}}: to one call of F
next turn:        an assistant message's tool_calls and role "tool" messages go back through
                  the template (or, where it takes no tools, as the blocks above and a user
                  message of <tool_response> blocks)
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

import jsonschema

from ..constraints import JSON_FORMAT, closed_objects, finite_numbers
from ..errors import LlamascopeError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
GENERIC_INSTRUCTIONS = (
    "You can call the tools below. To call one, reply with only a block like this one, a JSON object "
    "with the tool's name and its arguments:\n"
    + OPEN
    + '\n{"name": "<tool name>", "arguments": {...}}\n'
    + CLOSE
    + "\nTools (JSON):\n"
)


@dataclass
class Function:
    name: str
    description: str
    parameters: dict

    def to_json(self) -> dict:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def parse_tools(tools: list | None) -> list[Function]:
    """OpenAI's `tools`: a list of {"type": "function", "function": {"name", "description",
    "parameters"}}; a malformed one is refused naming its index."""
    functions = []
    for i, tool in enumerate(tools or []):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise LlamascopeError(f"{where}: expected {{'type': 'function', 'function': {{...}}}}")
        spec = tool["function"]
        name = spec.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise LlamascopeError(f"{where}.function.name: expected 1-64 letters, digits, '_', '.' or '-'")
        parameters = spec.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise LlamascopeError(f"{where}.function.parameters: expected a JSON schema object")
        try:
            jsonschema.Draft202012Validator.check_schema(parameters)
        except jsonschema.SchemaError as e:
            raise LlamascopeError(f"{where}.function.parameters: not a valid JSON schema ({e.message})") from None
        functions.append(Function(name, str(spec.get("description") or ""), parameters))
    if len({f.name for f in functions}) != len(functions):
        raise LlamascopeError("tools: two functions share a name")
    return functions


def chosen_functions(functions: list[Function], tool_choice: Any) -> tuple[str, list[Function]]:
    """(mode, the functions the reply may call): mode "none", "auto" or "required" (a named
    function is "required" with that one function)."""
    if tool_choice is None:
        tool_choice = "auto" if functions else "none"
    if tool_choice in ("none", "auto", "required"):
        if tool_choice != "none" and not functions:
            raise LlamascopeError(f"tool_choice {tool_choice!r} needs tools")
        return tool_choice, functions
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        named = [f for f in functions if f.name == name]
        if not named:
            raise LlamascopeError(f"tool_choice names {name!r}, which is not among the tools")
        return "required", named
    raise LlamascopeError(
        "tool_choice: expected 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


def call_constraint(functions: list[Function]) -> dict:
    """The constraint (a Lark grammar with a JSON schema inside) of one call block of one of
    `functions`, its arguments following the function's parameters."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, "arguments": finite_numbers(closed_objects(f.parameters))},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = {"anyOf": calls, "x-guidance": JSON_FORMAT}
    grammar = (
        f"start: {json.dumps(OPEN + chr(10))} call {json.dumps(chr(10) + CLOSE)}\ncall: %json {json.dumps(schema)}"
    )
    return {"type": "grammar", "grammar": grammar}


def render(messages: list[dict], functions: list[Function], template: str) -> tuple[list[dict], dict]:
    """The messages (and extra template variables) for the chat template: `tools` where the
    template takes them, else the tools in a system message and earlier calls and results as text."""
    if "tools" in template:
        tools = [f.to_json() for f in functions] or None
        return [_native(m) for m in messages], ({"tools": tools} if tools else {})
    out = []
    if functions:
        listing = GENERIC_INSTRUCTIONS + "\n".join(json.dumps(f.to_json()["function"]) for f in functions)
        if messages and messages[0]["role"] in ("system", "developer"):
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + listing})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": listing})
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool": True})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [_block(call) for call in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [m.get("content") or ""] + blocks))})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return [{k: v for k, v in m.items() if k != "_tool"} for m in out], {}


def _native(message: dict) -> dict:
    """A message as templates that take tools expect it (arguments as objects, not JSON text)."""
    if message["role"] == "assistant" and message.get("tool_calls"):
        calls = [
            {"type": "function", "function": {"name": c["function"]["name"], "arguments": _arguments(c)}}
            for c in message["tool_calls"]
        ]
        return {"role": "assistant", "content": message.get("content") or "", "tool_calls": calls}
    return {k: v for k, v in message.items() if v is not None}


def _arguments(call: dict) -> Any:
    arguments = call["function"].get("arguments") or "{}"
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        return arguments


def _block(call: dict) -> str:
    payload = {"name": call["function"]["name"], "arguments": _arguments(call)}
    return OPEN + "\n" + json.dumps(payload) + "\n" + CLOSE


def parse_calls(text: str, functions: list[Function]) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a reply: each call block whose JSON names a given function with
    arguments that validate becomes a tool call (OpenAI's shape, arguments as JSON text); the text
    outside them is the content (None when there is none). Blocks that are not such calls stay text."""
    by_name = {f.name: f for f in functions}
    calls, kept, last = [], [], 0
    for match in CALL_BLOCK.finditer(text):
        call = _valid_call(match.group(1), by_name)
        if call is None:
            continue
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(
            {
                "id": "call_" + secrets.token_hex(12),
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
            }
        )
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def _valid_call(payload: str, by_name: dict[str, Function]) -> dict | None:
    try:
        call = json.loads(payload)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or call.get("name") not in by_name or not isinstance(call.get("arguments"), dict):
        return None
    try:
        jsonschema.validate(call["arguments"], by_name[call["name"]].parameters)
    except jsonschema.ValidationError:
        return None
    return call
