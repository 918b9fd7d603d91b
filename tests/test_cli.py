"""The command line: generate (streamed and --json), tokenize, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from llamascope.cli import main

BIN = Path(sys.executable).parent / "llamascope"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_matches_transformers(tiny_model, capsys):
    code, out, _ = run_cli(capsys, "generate", "--model", str(tiny_model), "--max-new-tokens", "10", "--json",
                           "Once upon a time", "My name is")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Once upon a time", "My name is"]
    ref_tok = AutoTokenizer.from_pretrained(tiny_model)
    hf = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    for row in rows:
        ids = ref_tok(row["prompt"], return_tensors="pt")
        assert row["prompt_ids"] == ids.input_ids[0].tolist()
        expected = hf.generate(**ids, max_new_tokens=10, do_sample=False)[0, ids.input_ids.shape[1]:].tolist()
        assert row["output_ids"] == expected
        assert row["text"] == ref_tok.decode(expected, skip_special_tokens=True)


def test_generate_streams_the_same_text(tiny_model, capsys):
    _, out_json, _ = run_cli(capsys, "generate", "--model", str(tiny_model), "--max-new-tokens", "12", "--json", "Hello")
    _, out_stream, _ = run_cli(capsys, "generate", "--model", str(tiny_model), "--max-new-tokens", "12", "Hello")
    assert out_stream == "Hello" + json.loads(out_json)["text"] + "\n"


def test_no_cache_gives_same_tokens(tiny_model, capsys):
    _, a, _ = run_cli(capsys, "generate", "--model", str(tiny_model), "--json", "Hello there")
    _, b, _ = run_cli(capsys, "generate", "--model", str(tiny_model), "--json", "--no-cache", "Hello there")
    assert json.loads(a)["output_ids"] == json.loads(b)["output_ids"]


def test_tokenize_json(tiny_model, capsys):
    code, out, _ = run_cli(capsys, "tokenize", "--model", str(tiny_model), "--json", "My name is Mariama")
    ref = AutoTokenizer.from_pretrained(tiny_model)
    data = json.loads(out)
    assert data["ids"] == ref("My name is Mariama").input_ids
    assert data["tokens"] == ref.convert_ids_to_tokens(data["ids"])
    code, out, _ = run_cli(capsys, "tokenize", "--tokenizer", str(tiny_model / "tokenizer.json"), "--json", "My name")
    assert json.loads(out)["ids"] == ref("My name").input_ids


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/dir", "hi"], "no such file or folder"),
    (["tokenize", "--tokenizer", "/no/such/tokenizer.json", "hi"], "no such file or folder"),
])
def test_errors_are_one_line(capsys, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code == 1
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_prompt_longer_than_context(model_factory, capsys):
    folder = model_factory("short_context", max_position_embeddings=16)
    code, _, err = run_cli(capsys, "generate", "--model", str(folder), "word " * 40)
    assert code == 1 and "does not fit the model's context of 16 positions" in err


def test_console_script_error_has_no_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    proc = subprocess.run([str(BIN), "generate", "--model", str(tmp_path), "hi"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("llamascope: error:") and "config.json: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_stream_decoder_never_garbles(tiny_model):
    """Multi-byte characters split over several byte-level tokens, and leading spaces, come out whole."""
    from llamascope.loading import load_model

    tokenizer = load_model(tiny_model).tokenizer
    text = "Größe 東京 🙂 naïve café, spaces  and\nnewlines"
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt, rest = ids[:3], ids[3:]
    decoder = tokenizer.stream_decoder(prompt)
    pieces = [decoder.push(i) for i in rest] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert tokenizer.decode(prompt) + "".join(pieces) == text
