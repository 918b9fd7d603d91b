"""Loading speed: llamascope's load (in its process, from a warm page cache) and time to ready
(`llamascope serve` until /health answers), beside llama.cpp's `llama-server` time to ready, on
the same files.

    .venv/bin/python benchmarks/load.py                      # the 1.1B shape's GGUF files and folder
    .venv/bin/python benchmarks/load.py --files random-1.1b-F32.gguf --repeats 5

Each file is read once first (warm page cache), then each measurement runs in a fresh process, the
systems alternating within each repeat; medians. Load GB/s is the file's bytes over llamascope's
load time (what `llamascope bench` reports). Run it on a quiet machine; the files are made by
benchmarks/compare.py under benchmarks/.work/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from serve_compare import WORK, Server

FILES = [
    "random-1.1b-F32.gguf",
    "random-1.1b-BF16.gguf",
    "random-1.1b-Q8_0.gguf",
    "random-1.1b-Q4_0.gguf",
    "random-1.1b-hf",
]
LOAD = (
    "import sys, time; from llamascope import Engine; "
    "t = time.perf_counter(); Engine.load(sys.argv[1]); print(time.perf_counter() - t)"
)


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size


def warm(path: Path) -> None:
    for part in path.iterdir() if path.is_dir() else [path]:
        with part.open("rb") as f:
            while f.read(64 << 20):
                pass


def llamascope_load(path: Path, threads: int) -> float:
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1", OMP_NUM_THREADS=str(threads))  # (as the llamascope command runs)
    out = subprocess.run([sys.executable, "-c", LOAD, str(path)], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def time_to_ready(system: str, path: Path, threads: int) -> float:
    start = time.monotonic()
    server = Server(system, path, threads)
    ready = time.monotonic() - start
    server.close()
    return ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", default=FILES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"medians of {args.repeats}, {args.threads} threads, warm page cache", file=sys.stderr)
    print("| file | GB | llamascope load (s) | GB/s | llamascope ready (s) | llama-server ready (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.files:
        path = WORK / name
        warm(path)
        loads, ready, theirs = [], [], []
        for _ in range(args.repeats):
            loads.append(llamascope_load(path, args.threads))
            if path.suffix == ".gguf":  # (a server needs a tokenizer: the random folders have none)
                ready.append(time_to_ready("llamascope", path, args.threads))
                theirs.append(time_to_ready("llama-server", path, args.threads))
        size = file_bytes(path) / 1e9
        load = statistics.median(loads)
        ours, other = (f"{statistics.median(t):.2f}" if t else "-" for t in (ready, theirs))
        print(f"| {name} | {size:.2f} | {load:.2f} | {size / load:.2f} | {ours} | {other} |", flush=True)


if __name__ == "__main__":
    main()
