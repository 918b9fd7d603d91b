"""Byte-flipped copies of a real model, each loaded and run as `llamascope generate` would: how many
are read, how many refused by name, and any other outcome (a traceback, a signal, a hang, memory
without bound), which is a finding.

    .venv/bin/python fuzz/byteflip.py --copies 1000                       # the default model's GGUF
    .venv/bin/python fuzz/byteflip.py --copies 300 --model FOLDER         # a Hugging Face folder: one of its files

Each copy changes 1 to 16 bytes: half of the copies within the first few megabytes (a GGUF's
header, metadata and vocabulary), half anywhere. Copies are written to a scratch folder and run
one after another in a worker process, which reports each outcome; a worker killed by a signal,
or silent for --timeout seconds, is a finding, and a new worker takes the next copy. The worker's
address space is capped (--memory-gb), so memory without bound shows as a MemoryError finding.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

HEAD_BYTES = 4 << 20  # "the header" for half the copies: metadata and vocabulary live there in a GGUF


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=1000)
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file or a model folder (default model)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one copy may take (default 60)")
    parser.add_argument("--memory-gb", type=float, default=8.0, help="the worker's address space (default 8)")
    parser.add_argument("--json", type=Path, default=None, help="also write every outcome here")
    args = parser.parse_args()
    from llamascope.loading.checkpoint import default_model_path

    source = args.model or default_model_path()
    rng = random.Random(args.seed)
    outcomes: Counter = Counter()
    findings: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="llamascope-byteflip-") as scratch:
        copy, targets = _scratch_copy(source, Path(scratch))
        jobs: mp.Queue = mp.Queue()
        results: mp.Queue = mp.Queue()
        worker = _start(jobs, results, args.memory_gb)
        began = time.monotonic()
        for k in range(args.copies):
            target = rng.choice(targets)
            original = target.read_bytes() if target.stat().st_size < HEAD_BYTES else None
            flips = _flip(target, rng, head=k % 2 == 0)
            jobs.put((k, str(copy)))
            try:
                kind, detail = results.get(timeout=args.timeout)
            except Exception:  # noqa: BLE001 - queue.Empty: the worker hangs or died
                kind = "signal" if not worker.is_alive() else "hang"
                detail = f"exit code {worker.exitcode}" if kind == "signal" else f"over {args.timeout:g} s"
                worker.kill()
                worker.join()
                worker = _start(jobs, results, args.memory_gb)
            outcomes[kind] += 1
            if kind not in ("read", "refused"):
                findings.append({"copy": k, "file": target.name, "flips": flips, "outcome": kind, "detail": detail})
                print(f"copy {k}: {kind} after flipping {target.name} at {flips}: {detail[-300:]}", file=sys.stderr)
            _unflip(target, flips, original)
            if (k + 1) % 50 == 0 or k + 1 == args.copies:
                rate = (k + 1) / (time.monotonic() - began)
                print(f"{k + 1}/{args.copies} copies ({rate:.1f}/s): {dict(outcomes)}", file=sys.stderr, flush=True)
        jobs.put(None)
        worker.join(10)
    print(json.dumps({"copies": args.copies, "outcomes": dict(outcomes), "findings": findings}, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"model": str(source), "outcomes": dict(outcomes), "findings": findings}))
    return 1 if findings else 0


def _scratch_copy(source: Path, scratch: Path) -> tuple[Path, list[Path]]:
    """The model copied once into the scratch folder, and the files flips may go into."""
    if source.is_dir():
        copy = shutil.copytree(source, scratch / source.name)
        return copy, sorted(p for p in copy.iterdir() if p.is_file())
    copy = scratch / source.name
    shutil.copyfile(source, copy)
    return copy, [copy]


def _flip(path: Path, rng: random.Random, head: bool) -> list[tuple[int, int]]:
    """Change 1 to 16 bytes in place -> [(offset, old byte)]."""
    size = path.stat().st_size
    span = min(size, HEAD_BYTES) if head else size
    flips = []
    with open(path, "r+b") as f:
        for _ in range(rng.randint(1, 16)):
            offset = rng.randrange(span)
            f.seek(offset)
            old = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([rng.choice([old ^ (1 << rng.randrange(8)), rng.randrange(256)])]))
            flips.append((offset, old))
    return flips


def _unflip(path: Path, flips: list[tuple[int, int]], original: bytes | None) -> None:
    if original is not None:
        path.write_bytes(original)
        return
    with open(path, "r+b") as f:
        for offset, old in reversed(flips):
            f.seek(offset)
            f.write(bytes([old]))


def _start(jobs: mp.Queue, results: mp.Queue, memory_gb: float) -> mp.Process:
    worker = mp.get_context("fork").Process(target=_work, args=(jobs, results, memory_gb), daemon=True)
    worker.start()
    return worker


def _work(jobs: mp.Queue, results: mp.Queue, memory_gb: float) -> None:
    """Load each copy and generate two tokens, as `llamascope generate` does; report the outcome."""
    limit = int(memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    from llamascope import Engine
    from llamascope.errors import LlamascopeError

    torch.set_num_threads(1)
    while (job := jobs.get()) is not None:
        _, path = job
        try:
            engine = Engine.load(path)
            engine.generate("The capital of France is", max_new_tokens=2, do_sample=False)
            results.put(("read", ""))
        except LlamascopeError as e:
            results.put(("refused", str(e)))
        except BaseException as e:  # noqa: BLE001 - the finding
            results.put(("traceback", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"))


if __name__ == "__main__":
    sys.exit(main())
