"""Hostile and careless input: each case ends in one line that names the file, key or setting and
the limit it broke, exit status 1, within seconds; no traceback, no signal, no runaway memory.

The cases are the kinds issue 28 found (a layer count of 2**31, settings that size memory beyond
the machine, values of the wrong type in config.json, JSON nested too deeply), each with values
of its own."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest
from conftest import rewrite_json
from gguf_fixtures import TinySpec, write_tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamascope.cli import main
from llamascope.config import GenerationConfig

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
@pytest.mark.parametrize("command", ["generate", "info", "trace", "convert"])
def test_a_gguf_claiming_more_layers_than_it_holds_is_refused(tmp_path, capsys, blocks, command):
    path = write_tiny_llama(tmp_path / "m.gguf", TinySpec(), metadata={"llama.block_count": blocks}).path
    args = {
        "generate": ["generate", "--model", str(path), "hi"],
        "info": ["info", "--model", str(path)],
        "trace": ["trace", "--model", str(path), "hi"],
        "convert": ["convert", str(path), str(tmp_path / "out")],
    }[command]
    err = refused(capsys, *args)
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


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_refused_before_loading(capsys, port):
    assert f"--port {port}: give 0 to 65535" in refused(capsys, "serve", "--port", port)


# ---- text that is not valid Unicode ------------------------------------------------------------


def test_a_prompt_argument_with_invalid_utf8_is_refused_by_name(tiny_model, capsys):
    """Invalid UTF-8 bytes in argv reach Python as lone surrogates (surrogateescape)."""
    bad = b"ab\xffcd".decode("utf-8", "surrogateescape")
    err = refused(capsys, "generate", "--model", str(tiny_model), bad)
    assert "the prompt argument: not valid text: character 2 is a lone surrogate" in err


def test_stdin_with_invalid_utf8_is_refused_by_name(tiny_model, capsys, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello \xc3\x28 world")))
    err = refused(capsys, "generate", "--model", str(tiny_model), "-")
    assert "stdin: not UTF-8 text (invalid continuation byte at byte 6)" in err


@pytest.mark.parametrize("text", ["\ud800", "ok \udfff", "\udcff"])
def test_the_python_api_refuses_lone_surrogates(tiny_model, text):
    from llamascope import Engine
    from llamascope.errors import LlamascopeError

    with pytest.raises(LlamascopeError, match="text to encode: not valid text: character .* is a lone surrogate"):
        Engine.load(tiny_model).encode(text)


# ---- chat templates: the model file's code ---------------------------------------------------


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ 'x' * 10000000000 }}", "repeats 1 items 10000000000 times"),
        ("{{ [1, 2] * 5000000 }}", "repeats 2 items 5000000 times"),
        ("{{ 10 ** 100000 }}", "raises a number to the power 100000"),
        ("{% for i in range(10000000000) %}{% endfor %}", "OverflowError"),
        ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "its output passes"),
        ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "rendering took over"),
        ("{{ messages.__class__.__mro__ }}", "access to attribute '__class__'"),
        ("{{ nothing() }}", "'nothing' is undefined"),
        ("{{ (messages | length) / 0 }}", "ZeroDivisionError"),
    ],
)
def test_a_hostile_chat_template_ends_in_one_error_within_seconds(tiny_model, monkeypatch, template, message):
    """Templates come with model files: what they may build, output and take is bounded, and any
    failure is one error naming the tokenizer's source."""
    from llamascope import Engine, tokenizer
    from llamascope.errors import LlamascopeError

    monkeypatch.setattr(tokenizer, "TEMPLATE_MAX_SECONDS", 1.0)
    tok = Engine.load(tiny_model).tokenizer
    tok.chat_template = template
    began = time.monotonic()
    with pytest.raises(LlamascopeError, match="chat template") as error:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert message in str(error.value) and time.monotonic() - began < SECONDS


# ---- weights that are not finite -----------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("mode", [[], ["--do-sample", "--seed", "3"], ["--num-beams", "2"]])
def test_weights_that_are_not_finite_stop_generation_naming_the_layer(tiny_model, tmp_path, capsys, value, mode):
    """Greedy search over NaN logits would pick token 0 forever and exit 0: instead the step, and
    the first activation that is not finite, are named."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_model, tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(state, folder / "model.safetensors")
    err = refused(capsys, "generate", "--model", str(folder), "--max-new-tokens", "3", *mode, "hi")
    assert "step 0: the logits of sequence 0 are not finite" in err
    assert "the first activation that is not: layers.1." in err


# ---- any settings: taken, or refused by name ---------------------------------------------------

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(-3, 2**70), max_size=3),
    st.lists(st.lists(st.integers(-3, 300), max_size=2), max_size=2),
)
SETTING_NAMES = sorted(f.name for f in dataclasses.fields(GenerationConfig) if f.name != "sources")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=st.dictionaries(st.sampled_from(SETTING_NAMES), ANY_VALUE, max_size=4))
def test_any_generation_settings_are_taken_or_refused_by_name(tiny_engine, chosen):
    """Generation settings of any type and size: resolving them is refused with an error naming one
    of them, or they are taken and a short generation runs (or is refused by name: memory)."""
    from llamascope.errors import LlamascopeError

    try:
        config = tiny_engine.generation_config(**chosen)
    except LlamascopeError as e:
        assert any(name in str(e) for name in chosen), (chosen, str(e))
        return
    small = (config.max_new_tokens or 0) <= 6 and config.num_beams <= 3 and config.num_return_sequences <= 3
    if small and (config.max_length or 0) <= 40 and (config.min_new_tokens or 0) <= 6:
        try:
            tiny_engine.generate_ids([1, 5, 6], **chosen)
        except LlamascopeError:
            pass


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    from llamascope import Engine

    return Engine.load(tiny_model)


def test_a_tokenizer_json_whose_unknown_token_is_missing_is_refused_by_file(tmp_path):
    """Found by fuzz/ (tokenizer target): the tokenizers library raised its own Exception at
    encode time for an unk_token the vocabulary lacks."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from llamascope.errors import LlamascopeError
    from llamascope.tokenizer import Tokenizer

    backend = Backend(models.BPE(vocab={"a": 0, "b": 1}, merges=[], unk_token="<missing>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tokenizer.json").write_text(backend.to_str())
    tokenizer = Tokenizer.from_hf_folder(tmp_path)
    assert tokenizer.encode("ab") == [0, 1]
    with pytest.raises(LlamascopeError, match=r"cannot encode the text \(Exception: Unk token `<missing>` not found"):
        tokenizer.encode("zz")


def test_a_tokenizer_json_that_makes_the_library_panic_is_refused_by_file(tmp_path):
    """Found by fuzz/ (tokenizer target): a merge of tokens the vocabulary lacks made the tokenizers
    library's Rust code panic, which Python sees as pyo3's PanicException, a BaseException that
    `except Exception` lets through."""
    from llamascope.errors import LlamascopeError
    from llamascope.tokenizer import Tokenizer

    vocab = {"▁": 3, "a": 4, "b": 5, "c": 6, "d": 7, "e": 8, "h": 9, "l": 6, "he": 17}
    merges = [["▁", "h"], ["▁", "w"], ["l", "l"], ["h", "e"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": merges}}))
    with pytest.raises(LlamascopeError, match=r"tokenizer\.json: not a readable tokenizer \(PanicException"):
        Tokenizer.from_hf_folder(tmp_path)


def test_a_weights_file_that_cannot_be_read_is_refused_by_file(tiny_model, tmp_path, capsys):
    """(A folder where the weights file should be stands in for one without read permission,
    which root, who may run these tests, would read anyway.)"""
    folder = shutil.copytree(tiny_model, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    (folder / "weights.safetensors").mkdir()  # found by the *.safetensors fallback
    err = refused(capsys, "generate", "--model", str(folder), "hi")
    assert "safetensors: cannot read it" in err


def test_json_output_is_strict_json_whatever_the_scores():
    """A beam that can only lose scores -inf; JSON has no Infinity or NaN: they are written as null."""
    from llamascope.cli import _json_text

    text = _json_text({"score": float("-inf"), "beams": [{"score": float("nan"), "ok": 1.5}]})
    assert json.loads(text) == {"score": None, "beams": [{"score": None, "ok": 1.5}]}
