"""Hostile and careless input: each case ends in one line that names the file, key or setting and
the limit it broke, exit status 1, within seconds; no traceback, no signal, no runaway memory.

The cases are the kinds issue 28 found (a layer count of 2**31, settings that size memory beyond
the machine, values of the wrong type in config.json, JSON nested too deeply), each with values
of its own."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from conftest import rewrite_json
from gguf_fixtures import TinySpec, write_tiny_llama

from llamascope.cli import main

SECONDS = 20  # "within seconds", with room for a slow shared machine


def refused(capsys, *args: str) -> str:
    """Run the CLI, expect one error line and exit status 1 within SECONDS -> that line."""
    began = time.monotonic()
    code = main(list(args))
    out, err = capsys.readouterr()
    assert time.monotonic() - began < SECONDS
    assert code == 1 and out == "", (code, out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threads", "0"], "--threads 0: give 1 to "),
        (["--threads", "-3"], "--threads -3: give 1 to "),
        (["--threads", "100000"], "--threads 100000: give 1 to "),
        (["--seed", str(2**70)], f"seed={2**70}: must be an integer from -2**63 to 2**64 - 1"),
        (["--min-new-tokens", "5", "--max-new-tokens", "2"], "min_new_tokens=5: cannot exceed max_new_tokens=2"),
        (["--max-new-tokens", str(10**12)], "positions need"),
        (["--max-new-tokens", str(2**70)], "lower max_new_tokens"),
        (["--num-beams", str(10**8), "--max-new-tokens", "4"], "lower num_beams or the number of sequences"),
        (["--do-sample", "--num-return-sequences", str(10**8)], "lower num_beams or the number of sequences"),
    ],
)
def test_settings_beyond_the_machine_are_refused_by_name(tiny_model, capsys, args, message):
    assert message in refused(capsys, "generate", "--model", str(tiny_model), *args, "hi")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_hidden_layers": 2**31}, "num_hidden_layers = 2147483648, but the weights hold only"),
        ({"num_hidden_layers": 10**6}, "at most 2 layers"),
        ({"rms_norm_eps": "x"}, "'rms_norm_eps' must be a positive finite number, found 'x'"),
        ({"rope_theta": 0}, "'rope_theta' must be a positive finite number, found 0"),
        ({"max_position_embeddings": -5}, "'max_position_embeddings' must be a positive integer"),
        ({"tie_word_embeddings": "yes"}, "'tie_word_embeddings' must be true or false"),
        ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling 'factor' must be a positive finite"),
        ({"rope_scaling": [1, 2]}, "'rope_scaling' must be an object or null"),
    ],
)
def test_a_config_json_with_impossible_values_is_refused_by_key(tiny_model, tmp_path, capsys, changes, message):
    folder = shutil.copytree(tiny_model, tmp_path / "m")
    rewrite_json(folder / "config.json", **changes)
    err = refused(capsys, "generate", "--model", str(folder), "hi")
    assert "config.json" in err and message in err


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_json_nested_too_deeply_is_refused_by_file(tiny_model, tmp_path, capsys, name):
    folder = shutil.copytree(tiny_model, tmp_path / "m")
    (folder / name).write_text("[" * 100_000 + "]" * 100_000)
    assert f"{name}: JSON nested too deeply" in refused(capsys, "generate", "--model", str(folder), "hi")


@pytest.mark.parametrize("blocks", [2**31, 2**32 - 1, 1000])
@pytest.mark.parametrize("command", [["generate"], ["info"]])
def test_a_gguf_claiming_more_layers_than_it_holds_is_refused(tmp_path, capsys, blocks, command):
    path = write_tiny_llama(tmp_path / "m.gguf", TinySpec(), metadata={"llama.block_count": blocks}).path
    err = refused(capsys, *command, "--model", str(path), *(["hi"] if command == ["generate"] else []))
    assert f"llama.block_count = {blocks}, but the weights hold only" in err


def test_a_safetensors_header_nested_too_deeply_is_refused(tiny_model, tmp_path, capsys):
    folder = shutil.copytree(tiny_model, tmp_path / "m")
    head = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    (folder / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head)
    err = refused(capsys, "generate", "--model", str(folder), "hi")
    assert "model.safetensors: not a safetensors file (header JSON nested too deeply)" in err


def test_a_json_file_that_cannot_be_read_is_refused_by_name(tmp_path):
    """A folder where the file should be (as good as unreadable here, where tests may run as
    root and permissions do not stop a read)."""
    from llamascope.config import read_json
    from llamascope.errors import LlamascopeError

    (tmp_path / "config.json").mkdir()
    with pytest.raises(LlamascopeError, match=r"config\.json: cannot read it"):
        read_json(tmp_path / "config.json")


def test_config_values_the_checks_accept_still_load(tiny_model, tmp_path, capsys):
    """The checks refuse only what is wrong: an integer rope_theta and a float eps still load."""
    folder = shutil.copytree(tiny_model, tmp_path / "m")
    rewrite_json(folder / "config.json", rope_theta=500000, rms_norm_eps=1e-5)
    code = main(["generate", "--model", str(folder), "--max-new-tokens", "2", "--json", "hi"])
    out, err = capsys.readouterr()
    assert code == 0 and len(json.loads(out)["output_ids"]) == 2, err
