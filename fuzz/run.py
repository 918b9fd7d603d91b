"""Coverage-guided fuzzing of what llamascope reads from files it did not make, with atheris.

    .venv/bin/python fuzz/run.py gguf --seconds 600              # one target for ten minutes
    .venv/bin/python fuzz/run.py all --runs 300 --seed 1         # every target, briefly (make test does this)
    .venv/bin/python fuzz/run.py safetensors --seconds 60 -- -max_len=4096   # libFuzzer flags after --

Targets (fuzz/targets.py): gguf, safetensors, config, tokenizer, template. Each starts from small
valid files written here (a two-layer GGUF, a safetensors file, a config.json, a tokenizer.json,
a chat template), which libFuzzer mutates. The rule each input is held to: it is read, or it is
refused with a LlamascopeError. Any other exception, an input that takes over --timeout seconds,
or memory past --rss-mb is a finding: libFuzzer writes the input to fuzz/findings/ and this
command exits non-zero. Replay one with `fuzz/run.py TARGET --replay FILE`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("gguf", "safetensors", "config", "tokenizer", "template")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=TARGETS + ("all",))
    parser.add_argument("--seconds", type=int, default=None, help="stop after this long (per target)")
    parser.add_argument("--runs", type=int, default=None, help="stop after this many inputs (per target)")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed (default 1)")
    parser.add_argument("--timeout", type=int, default=20, help="seconds one input may take (default 20)")
    parser.add_argument("--rss-mb", type=int, default=4096, help="memory the process may reach (default 4096)")
    parser.add_argument("--replay", type=Path, default=None, help="run one saved input and report what it does")
    parser.add_argument("libfuzzer", nargs="*", help="more libFuzzer flags, after --")
    args = parser.parse_args()
    if args.seconds is None and args.runs is None and args.replay is None:
        parser.error("give --seconds or --runs (or --replay)")
    targets = TARGETS if args.target == "all" else (args.target,)
    failed = [target for target in targets if _run(target, args) != 0]
    if failed:
        print(f"fuzz: findings in {', '.join(failed)} (inputs in {HERE / 'findings'})", file=sys.stderr)
    return 1 if failed else 0


def _run(target: str, args) -> int:
    """One target in a process of its own (atheris ends the process when it is done)."""
    findings = HERE / "findings" / target
    findings.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"llamascope-fuzz-{target}-") as work:
        corpus = Path(work) / "corpus"
        command = [sys.executable, str(HERE / "targets.py"), target, str(corpus)]
        if args.replay is not None:
            command += [str(args.replay)]
        else:
            command += [
                f"-seed={args.seed}",
                f"-timeout={args.timeout}",
                f"-rss_limit_mb={args.rss_mb}",
                f"-artifact_prefix={findings}/",
                "-print_final_stats=1",
            ]
            command += [f"-max_total_time={args.seconds}"] if args.seconds is not None else []
            command += [f"-runs={args.runs}"] if args.runs is not None else []
        command += args.libfuzzer
        print(f"fuzz {target}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
        env = dict(os.environ, LLAMASCOPE_FUZZ_WORK=work)
        return subprocess.run(command, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
