"""Chat: the template as transformers renders it, no double BOS, multi-turn in the terminal,
and the default model answering a real question; GGUF -> HF conversion from the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import rewrite_json
from transformers import AutoTokenizer

from llamascope import Engine
from llamascope.cli import main

BIN = Path(sys.executable).parent / "llamascope"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat") / "m"
    shutil.copytree(tiny_model, folder)
    rewrite_json(folder / "tokenizer_config.json", chat_template=TEMPLATE)
    return folder


def test_chat_template_matches_transformers_without_double_bos(chat_model):
    engine = Engine.load(chat_model)
    reference = AutoTokenizer.from_pretrained(chat_model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    text = engine.tokenizer.apply_chat_template(messages)
    assert text == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = engine.tokenizer.encode_chat(messages)
    expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ids == list(expected)
    assert ids[0] == engine.tokenizer.bos_id and ids[1] != engine.tokenizer.bos_id


def test_chat_stops_at_end_of_turn(chat_model):
    engine = Engine.load(chat_model)
    messages = [{"role": "user", "content": "Hello there"}]
    free = engine.generate_ids(engine.tokenizer.encode_chat(messages), max_new_tokens=12, eos_token_id=[])
    end = engine.tokenizer.token_to_id("</s>")
    reply = "".join(engine.chat(messages, max_new_tokens=12))
    tokens = free.output_ids[0]
    expected = tokens[: tokens.index(end)] if end in tokens else tokens
    assert reply == engine.tokenizer.decode(expected, skip_special_tokens=True)


def test_every_chat_reply_ends_at_the_end_of_turn(chat_model):
    """One rule for chat replies (Engine.generation_config(chat=True)): Engine.chat, generate(chat=True)
    and stream(chat=True) all end at the template's end-of-turn token, also where it is not an eos id."""
    engine = Engine.load(chat_model)
    engine.generation_json = dict(engine.generation_json or {}, eos_token_id=[0])  # </s> ends turns only
    end = engine.tokenizer.token_to_id("</s>")
    assert engine.end_of_turn_ids() == [end]
    assert engine.generation_config().eos_token_id == [0]
    chat_config = engine.generation_config(chat=True)
    assert chat_config.eos_token_id == [0, end] and chat_config.sources["eos_token_id"].endswith("+ chat template")
    reply = "".join(engine.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=12))
    assert engine.generate("Hello there", chat=True, max_new_tokens=12).text == reply
    assert "".join(engine.stream("Hello there", chat=True, max_new_tokens=12)) == reply


def test_chat_command_is_multi_turn(chat_model):
    proc = subprocess.run(
        [str(BIN), "chat", "--model", str(chat_model), "--max-new-tokens", "5"],
        input="Hello there\nAnd again\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # The second turn sees the first: its prompt holds both user messages and the first reply.
    engine = Engine.load(chat_model)
    first = "".join(engine.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=5))
    history = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first.strip()},
        {"role": "user", "content": "And again"},
    ]
    second = "".join(engine.chat(history, max_new_tokens=5))
    assert second != "".join(engine.chat(history[2:], max_new_tokens=5))  # the history matters
    assert proc.stdout == first + "\n" + second + "\n"


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france():
    engine = Engine.load()
    reply = "".join(engine.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=40))
    assert "Paris" in reply


def test_convert_command(tmp_path, capsys):
    from gguf_fixtures import write_tiny_llama

    from llamascope.loading import load_model

    tiny = write_tiny_llama(tmp_path / "tiny.gguf")
    path = getattr(tiny, "path", tmp_path / "tiny.gguf")
    assert main(["convert", str(path), str(tmp_path / "hf")]) == 0
    assert "wrote" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama"
    folder, gguf_model = load_model(tmp_path / "hf", backend="plain"), load_model(path, quant="none", backend="plain")
    ids = [1, 5, 9, 3]
    from llamascope.generation import generate

    assert (
        generate(folder.model, ids, max_new_tokens=6, eos_token_id=[]).output_ids
        == generate(gguf_model.model, ids, max_new_tokens=6, eos_token_id=[]).output_ids
    )
