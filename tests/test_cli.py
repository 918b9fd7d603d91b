"""The command line: generate (streamed and --json), tokenize, and one-line errors; and the same
face on every command: --help shows the defaults really used, --json is a flag printing JSON, a
prompt comes from an argument, stdin (-) or --file, nothing reaches stdout before an error, and
piped output is not wrapped."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rewrite_json
from transformers import AutoTokenizer, LlamaForCausalLM

from llamascope.cli import main

BIN = Path(sys.executable).parent / "llamascope"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_matches_transformers(tiny_model, capsys):
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_model),
        "--max-new-tokens",
        "10",
        "--json",
        "Once upon a time",
        "My name is",
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Once upon a time", "My name is"]
    ref_tok = AutoTokenizer.from_pretrained(tiny_model)
    hf = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    for row in rows:
        ids = ref_tok(row["prompt"], return_tensors="pt")
        assert row["prompt_ids"] == ids.input_ids[0].tolist()
        expected = hf.generate(**ids, max_new_tokens=10, do_sample=False)[0, ids.input_ids.shape[1] :].tolist()
        assert row["output_ids"] == expected
        assert row["text"] == ref_tok.decode(expected, skip_special_tokens=True)


def test_generate_streams_the_same_text(tiny_model, capsys):
    _, out_json, _ = run_cli(
        capsys, "generate", "--model", str(tiny_model), "--max-new-tokens", "12", "--json", "Hello"
    )
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


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "/no/such/dir", "hi"], "no such file or folder"),
        (["tokenize", "--tokenizer", "/no/such/tokenizer.json", "hi"], "no such file or folder"),
    ],
)
def test_errors_are_one_line(capsys, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code == 1
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_prompt_longer_than_context(model_factory, capsys):
    """Refused with one line, and nothing on stdout (the prompt is not echoed before the check)."""
    folder = model_factory("short_context", max_position_embeddings=16)
    code, out, err = run_cli(capsys, "generate", "--model", str(folder), "word " * 40)
    assert code == 1 and out == "" and "the model's context of 16 positions" in err.splitlines()[-1]


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


# ---- one consistent face: defaults, --json, prompts, errors, output ------------------------------

COMMANDS = ["generate", "chat", "trace", "tokenize", "info", "serve", "bench", "perplexity", "convert"]
POSITIONALS = {"perplexity": ["text.txt"], "convert": ["model.gguf", "out"]}
NOT_OPTIONS = {"func", "command", "default_new_tokens", "verbose", "parallel_group", "file", "gguf_file", "out_dir"}


def help_text(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def option_help(text: str, option: str) -> str | None:
    """The help of `option` in argparse's help `text`, on one line (None: not listed)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.split()[:1] == [option] or line.split(",")[0].strip() == option:
            block = [line]
            for following in lines[i + 1 :]:
                if not following.strip() or len(following) - len(following.lstrip()) <= 2:
                    break
                block.append(following)
            return " ".join(" ".join(block).split())
    return None


def new_tokens_default(capsys, command: str) -> int:
    match = re.search(r"\(default (\d+)\)", option_help(help_text(capsys, command), "--max-new-tokens"))
    return int(match.group(1))


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_the_default_each_option_takes(capsys, command):
    """Every option with a default prints that default, the one the parser really gives it."""
    from llamascope.cli import build_parser

    text = help_text(capsys, command)
    args = build_parser().parse_args([command] + POSITIONALS.get(command, []))
    checked = 0
    for dest, value in vars(args).items():
        if dest in NOT_OPTIONS or value is None or value is False or value == []:
            continue
        shown = option_help(text, "--" + dest.replace("_", "-"))
        assert shown is not None, f"{command} --help does not list {dest}"
        assert f"default {value}" in shown, f"{command} --help: {shown!r} does not show the default {value!r}"
        checked += 1
    assert checked or command in ("tokenize", "info")  # these two have no option with a default


@pytest.mark.parametrize("command", ["generate", "chat", "trace", "serve", "bench", "perplexity"])
def test_every_command_that_loads_a_model_takes_every_load_option(command):
    """The load options (LoadOptions' fields, --threads, --model) are the same on each command."""
    from dataclasses import fields

    from llamascope.cli import build_parser
    from llamascope.loading import LoadOptions

    args = vars(build_parser().parse_args([command] + POSITIONALS.get(command, [])))
    wanted = {f.name for f in fields(LoadOptions)} | {"threads", "model"}
    assert wanted <= set(args), f"{command} lacks {sorted(wanted - set(args))}"


def test_new_token_defaults_are_the_ones_used(tiny_model, capsys, monkeypatch):
    """generate and trace: 32 new tokens (config.DEFAULT_MAX_NEW_TOKENS["cli"]), chat 256, as --help says;
    the trace names the CLI's default as its source, not the call."""
    from llamascope.config import DEFAULT_MAX_NEW_TOKENS
    from llamascope.engine import Engine

    shown = {command: new_tokens_default(capsys, command) for command in ("generate", "trace", "chat")}
    assert (
        shown
        == {
            "generate": DEFAULT_MAX_NEW_TOKENS["cli"],
            "trace": DEFAULT_MAX_NEW_TOKENS["cli"],
            "chat": DEFAULT_MAX_NEW_TOKENS["chat"],
        }
        == {"generate": 32, "trace": 32, "chat": 256}
    )

    code, out, _ = run_cli(capsys, "generate", "--model", str(tiny_model), "--json", "Once upon a time")
    row = json.loads(out)
    assert code == 0 and row["finish_reason"] == "length" and len(row["output_ids"]) == shown["generate"]

    code, out, _ = run_cli(capsys, "trace", "--model", str(tiny_model), "--json", "Once upon a time")
    data = json.loads(out)
    setting = next(s for s in data["settings"] if s["name"] == "max_new_tokens")
    assert setting == {"name": "max_new_tokens", "value": shown["trace"], "source": "default (CLI)"}
    assert "(default (CLI))" in data["max_length_rule"] and len(data["output_ids"]) == shown["trace"]
    _, out, _ = run_cli(capsys, "trace", "--model", str(tiny_model), "--json", "--max-new-tokens", "2", "Hi")
    assert {"name": "max_new_tokens", "value": 2, "source": "call"} in json.loads(out)["settings"]

    seen = []

    def chat(self, messages, **settings):
        seen.append(settings["max_new_tokens"])
        yield "fine"

    monkeypatch.setattr(Engine, "chat", chat)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    code, out, _ = run_cli(capsys, "chat", "--model", str(tiny_model))
    assert code == 0 and out == "fine\n" and seen == [shown["chat"]]


def write_gguf(tmp_path) -> Path:
    from gguf_fixtures import write_tiny_llama

    return write_tiny_llama(tmp_path / "tiny.gguf").path


@pytest.mark.parametrize("command", ["generate", "tokenize", "trace", "info", "perplexity", "bench", "convert"])
def test_json_is_a_flag_printing_json_on_stdout(tiny_model, tmp_path, capsys, command):
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little robot who liked to count. " * 4)
    args = {
        "generate": ["--max-new-tokens", "2", "Hello"],
        "tokenize": ["Hello"],
        "trace": ["--max-new-tokens", "2", "Hello"],
        "info": [],
        "perplexity": ["--window", "16", "--stride", "8", str(text)],
        "bench": ["--new-tokens", "2", "--prompt-tokens", "4", "--prefill-tokens", "8", "--repeats", "1"],
        "convert": [str(write_gguf(tmp_path)), str(tmp_path / "hf")],
    }[command]
    model = [] if command == "convert" else ["--model", str(tiny_model)]
    assert option_help(help_text(capsys, command), "--json").startswith("--json ")  # takes no value
    code, out, _ = run_cli(capsys, command, *model, "--json", *args)
    assert code == 0
    assert isinstance(json.loads(out), dict)


@pytest.mark.parametrize("command", ["generate", "trace", "tokenize"])
def test_prompt_from_stdin_and_from_a_file(tiny_model, tmp_path, capsys, monkeypatch, command):
    prompt = "My name is Mariama"
    extra = [] if command == "tokenize" else ["--max-new-tokens", "2"]
    base = [command, "--model", str(tiny_model), "--json", *extra]
    _, direct, _ = run_cli(capsys, *base, prompt)
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt + "\n"))  # the newline echo leaves is dropped
    _, piped, _ = run_cli(capsys, *base, "-")
    path = tmp_path / "prompt.txt"
    path.write_text(prompt + "\n", encoding="utf-8")
    _, from_file, _ = run_cli(capsys, *base, "--file", str(path))
    assert json.loads(piped) == json.loads(from_file) == json.loads(direct)
    if command != "tokenize":
        assert json.loads(piped)["prompt"] == prompt


@pytest.mark.parametrize(
    "args, message",
    [
        (["--file", "/no/such/prompt.txt"], "/no/such/prompt.txt: no such file"),
        (["--file", "PROMPT_FILE", "and an argument"], "not both"),
        ([], "no prompt"),
        (["-", "-"], "can be given once"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "trace", "tokenize"])
def test_prompt_errors_name_the_problem(tiny_model, tmp_path, capsys, command, args, message):
    path = tmp_path / "prompt.txt"
    path.write_text("Hi", encoding="utf-8")
    args = [str(path) if a == "PROMPT_FILE" else a for a in args]
    if command != "generate" and args == ["-", "-"]:
        return  # one prompt only: argparse refuses the second
    code, out, err = run_cli(capsys, command, "--model", str(tiny_model), *args)
    assert code == 1 and out == "" and message in err and err.count("\n") == 1


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"llamascope {version('llamascope')}\n"


def test_convert_refuses_what_is_not_a_gguf_file(tiny_model, tmp_path, capsys):
    for source, message in (
        (tiny_model, "is a folder; convert takes a .gguf file"),
        (tiny_model / "config.json", "not a .gguf file"),
        (tmp_path / "missing.gguf", "no such file"),
    ):
        code, out, err = run_cli(capsys, "convert", str(source), str(tmp_path / "out"))
        assert code == 1 and out == "" and f"{source}: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--do-sample", "--top-p", "2", "Hi"],
        ["generate", "--do-sample", "--top-p", "2", "--num-return-sequences", "2", "Hi"],
        ["generate", "--do-sample", "--top-p", "2", "--logprobs", "1", "Hi"],
        ["generate", "--json", "--do-sample", "--top-p", "2", "Hi"],
        ["trace", "--do-sample", "--top-p", "2", "Hi"],
        ["trace", "--num-beams", "2", "Hi"],
    ],
)
def test_nothing_on_stdout_before_an_error(tiny_model, capsys, args):
    code, out, err = run_cli(capsys, args[0], "--model", str(tiny_model), *args[1:])
    assert code == 1 and out == "" and err.startswith("llamascope: error:")


def test_chat_errors_before_the_reply_starts(tiny_model, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "chat"
    shutil.copytree(tiny_model, folder)
    rewrite_json(folder / "tokenizer_config.json", chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    code, out, err = run_cli(capsys, "chat", "--model", str(folder), "--do-sample", "--top-p", "2")
    assert code == 1 and out == "" and "top_p=2.0" in err


def test_logprobs_are_shown_as_a_table(tiny_model, capsys):
    args = ["generate", "--model", str(tiny_model), "--max-new-tokens", "4", "--logprobs", "2", "Once upon a time"]
    _, out, _ = run_cli(capsys, *args[:1], "--json", *args[1:])
    row = json.loads(out)
    code, text, _ = run_cli(capsys, *args)
    assert code == 0 and text.startswith("Once upon a time" + row["text"] + "\n")
    lines = text.splitlines()
    for step, entry in enumerate(row["logprobs"]):
        line = next(line for line in lines if re.match(rf"\W*{step} .*{entry['id']} ", line))
        assert f"{entry['logprob']:.4f}" in line and repr(entry["token"]) in line
        for alternative in entry["top"]:
            assert f"{alternative['token']!r} {alternative['logprob']:.4f}" in line


@pytest.mark.parametrize("command", ["trace", "chat"])
def test_logprobs_are_refused_where_they_are_not_shown(tiny_model, capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--model", str(tiny_model), "--logprobs", "2", "Hi"])
    assert exit_.value.code == 2 and "--logprobs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "settings",
    [
        ["--num-beams", "3", "--num-return-sequences", "2"],
        ["--do-sample", "--seed", "3", "--num-return-sequences", "3"],
    ],
)
def test_several_sequences_print_each_with_its_score(tiny_model, capsys, settings):
    args = ["--model", str(tiny_model), "--max-new-tokens", "6", *settings, "Once upon a time"]
    _, out, _ = run_cli(capsys, "generate", "--json", "--logprobs", "0", *args)
    sequences = json.loads(out)["sequences"]
    code, text, _ = run_cli(capsys, "generate", *args)
    assert code == 0
    expected = []
    for k, s in enumerate(sequences, 1):
        score = (
            f"score {s['score']:.4f}"
            if "score" in s
            else f"log-probability {sum(e['logprob'] for e in s['logprobs']):.4f}"
        )
        expected += ["Once upon a time" + s["text"], f"--- sequence {k} of {len(sequences)}, {score} ---"]
    assert text.splitlines() == expected


def test_piped_output_is_not_wrapped(tiny_model, capsys):
    prompt = "My name is Mariama, my favorite color is blue and my friends call me Mari. " * 2
    code, out, _ = run_cli(capsys, "trace", "--model", str(tiny_model), "--max-new-tokens", "1", prompt)
    lines = out.splitlines()
    assert code == 0 and f"prompt: {prompt!r}" in lines and len(f"prompt: {prompt!r}") > 80
    assert any(line.startswith("input_ids      = tensor([[") and line.endswith("int64") for line in lines)
    assert max(len(line) for line in lines if "2. generation settings" in line) <= 100  # rules stay short
    code, out, _ = run_cli(capsys, "info", "--model", str(tiny_model))
    path_line = next(line for line in out.splitlines() if "format safetensors" in line)
    assert path_line == f"{tiny_model}  format safetensors"
    assert any(str(tiny_model / "model.safetensors") in line for line in out.splitlines())
