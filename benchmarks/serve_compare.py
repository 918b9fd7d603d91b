"""`llamascope serve` beside llama.cpp's `llama-server` on the same GGUF file, under the same clients.

    .venv/bin/python benchmarks/serve_compare.py                            # default model, all scenarios
    .venv/bin/python benchmarks/serve_compare.py --clients 1,8 --scenarios throughput
    .venv/bin/python benchmarks/serve_compare.py --systems llamascope --model model.gguf

Each server runs alone in its own process, in turn, on loopback; the clients are tasks of this
process using the official `openai` client. llama-server is built from the llama.cpp sources in
the `llama-cpp-python` sdist (benchmarks/llama_server.py) and started with `-t 2 -np 8 -cb`
(and 64 HTTP threads, so that 32 streaming clients each have one);
llamascope with `--max-batch 8`. Scenarios:

- throughput: for each client count, every client sends --requests-per-client streamed
  completions of --max-tokens tokens back to back, at temperature 0 with the end-of-text ids
  suppressed by logit_bias (so every request is the same length). Aggregate completion tokens/s,
  time to first token and the gaps between tokens (p50 and p95 over all requests).
- long-prompt: four streams decode; once each has 16 tokens a 2,000-token prompt arrives. The
  streams' longest gap between tokens over their median gap (chunked prefill keeps it small), and
  the long prompt's time to first token.
- prefix: a 1,000-token beginning (as a long system prompt) with one ending, then with another:
  the second request's time to first token against the first's (prefix caching).

Run it on a quiet machine: on two cores any other process upsets the timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
sys.path.insert(0, str(HERE))

import llama_server  # noqa: E402

from llamascope.config import GenerationConfig  # noqa: E402
from llamascope.loading import open_checkpoint  # noqa: E402
from llamascope.loading.checkpoint import default_model_path  # noqa: E402

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue in simple words.",
    "List five uses of a paperclip.",
    "What makes a good cup of tea?",
    "Describe a walk through a forest in autumn.",
    "How do bees make honey?",
    "Give three tips for learning a new language.",
    "What is the difference between weather and climate?",
]
WORDS = "the river runs past old stone walls while children count boats and birds over the quiet town".split()
SLOTS = 8  # llama-server's -np, llamascope's --max-batch
HTTP_THREADS = 64  # llama-server's --threads-http: more than the most clients


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the servers -------------------------------------------------------------------------------


def server_command(system: str, model: Path, port: int, threads: int) -> list[str]:
    if system == "llama-server":
        return [
            str(llama_server.build()),
            *("-m", str(model), "--host", "127.0.0.1", "--port", str(port)),
            *("-t", str(threads), "-np", str(SLOTS), "-cb", "-c", str(SLOTS * 4096), "--no-webui"),
            # a streaming connection holds an HTTP thread: with its default (one a core) the
            # connections past them were dropped at 32 clients
            *("--threads-http", str(HTTP_THREADS)),
        ]
    return [
        sys.executable,
        *("-m", "llamascope", "serve", "--model", str(model), "--port", str(port)),
        *("--threads", str(threads), "--max-batch", str(SLOTS), "--max-queue", "256", "--served-model-name", "bench"),
    ]


class Server:
    """One server process on loopback, up until closed."""

    def __init__(self, system: str, model: Path, threads: int):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        command = server_command(system, model, self.port, threads)
        # its log goes to a file: a pipe nobody reads would stall the server once full
        self.log = WORK / f"{system}.log"
        WORK.mkdir(exist_ok=True)
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"{system} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"{system} did not start within 300 s")
            time.sleep(0.2)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


# ---- the clients -------------------------------------------------------------------------------


@dataclass
class Stream:
    """One streamed completion, as its client saw it."""

    tokens: int = 0
    first: float = float("nan")  # seconds from sending to the first text
    arrivals: list[float] = field(default_factory=list)  # perf_counter of each chunk with text

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


async def complete(client, prompt: str, max_tokens: int, no_eos: dict, started: asyncio.Event | None = None) -> Stream:
    out, start = Stream(), time.perf_counter()
    stream = await client.completions.create(
        model="bench",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        logit_bias=no_eos,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            now = time.perf_counter()
            if not out.arrivals:
                out.first = now - start
            out.arrivals.append(now)
            if started is not None and len(out.arrivals) == 16:
                started.set()
        if chunk.usage is not None:
            out.tokens = chunk.usage.completion_tokens
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def throughput(client, clients: int, args, no_eos: dict) -> dict:
    async def worker(k: int) -> list[Stream]:
        prompts = [PROMPTS[(k + j) % len(PROMPTS)] for j in range(args.requests_per_client)]
        return [await complete(client, prompt, args.max_tokens, no_eos) for prompt in prompts]

    start = time.perf_counter()
    streams = [s for ss in await asyncio.gather(*(worker(k) for k in range(clients))) for s in ss]
    seconds = time.perf_counter() - start
    gaps = [g for s in streams for g in s.gaps()]
    firsts = [s.first for s in streams]
    return {
        "clients": clients,
        "tokens": sum(s.tokens for s in streams),
        "tokens_per_s": sum(s.tokens for s in streams) / seconds,
        "ttft_p50": percentile(firsts, 0.5),
        "ttft_p95": percentile(firsts, 0.95),
        "gap_p50": percentile(gaps, 0.5),
        "gap_p95": percentile(gaps, 0.95),
        "short": sum(s.tokens != args.max_tokens for s in streams),
    }


def long_text(tokenizer, tokens: int, seed: int) -> str:
    """Plain words that come to about `tokens` tokens."""
    rng, words = random.Random(seed), []
    while len(tokenizer.encode(" ".join(words))) < tokens:
        words += rng.sample(WORDS, 8)
    return " ".join(words)


async def long_prompt(client, tokenizer, no_eos: dict) -> dict:
    text = long_text(tokenizer, 2000, seed=1)  # (before the streams: making it blocks this event loop)
    started = [asyncio.Event() for _ in range(4)]
    streams = [asyncio.create_task(complete(client, PROMPTS[k], 160, no_eos, started[k])) for k in range(4)]
    await asyncio.gather(*(e.wait() for e in started))
    long = await complete(client, text, 8, no_eos)
    done = await asyncio.gather(*streams)
    ratios = [max(s.gaps()) / statistics.median(s.gaps()) for s in done]
    return {"max_gap_over_median": max(ratios), "long_ttft": long.first, "max_gap": max(max(s.gaps()) for s in done)}


async def prefix(client, tokenizer, no_eos: dict) -> dict:
    system = long_text(tokenizer, 1000, seed=2)
    first = await complete(client, system + "\n\nQuestion: what runs past the walls?\nAnswer:", 8, no_eos)
    second = await complete(client, system + "\n\nQuestion: who counts the boats?\nAnswer:", 8, no_eos)
    return {"cold_ttft": first.first, "warm_ttft": second.first, "speedup": first.first / second.first}


async def run_system(system: str, args, model: Path, tokenizer, no_eos: dict) -> dict:
    import openai

    print(f"{system}: starting", file=sys.stderr)
    server = Server(system, model, args.threads)
    results: dict = {"system": system}
    try:
        # a new connection for each request: llama-server closes a kept-alive connection after a few
        # requests, and a client that reuses one it has just closed fails (both servers alike)
        limits = type(openai.DEFAULT_CONNECTION_LIMITS)(max_connections=None, max_keepalive_connections=0)
        http = openai.DefaultAsyncHttpxClient(limits=limits)  # (the openai client's own httpx, whichever it is)
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="bench", max_retries=0, timeout=900, http_client=http
        ) as client:
            await complete(client, PROMPTS[0], 8, no_eos)  # warm-up
            if "throughput" in args.scenarios:
                results["throughput"] = []
                for clients in args.clients:
                    row = await throughput(client, clients, args, no_eos)
                    print(f"{system}: {clients} clients: {row['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
                    results["throughput"].append(row)
            if "long-prompt" in args.scenarios:
                results["long_prompt"] = await long_prompt(client, tokenizer, no_eos)
            if "prefix" in args.scenarios:
                results["prefix"] = await prefix(client, tokenizer, no_eos)
    finally:
        server.close()
    return results


# ---- the tables --------------------------------------------------------------------------------


def print_tables(runs: list[dict], args, model: Path) -> None:
    print(
        f"\nmodel: {model.name}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared by "
        f"server and clients; {args.threads} threads; {SLOTS} slots; {args.requests_per_client} streamed "
        f"completions of {args.max_tokens} tokens per client, greedy, end of text suppressed\n"
    )
    systems = [r["system"] for r in runs]
    if all("throughput" in r for r in runs):
        head = " | ".join(f"{s} tokens/s" for s in systems)
        extra = f" | {systems[0]} / {systems[1]}" if len(systems) == 2 else ""  # (in the order given)
        print(
            f"| clients | {head}{extra} | "
            + " | ".join(f"{s} TTFT p50 / p95 (s) | {s} gap p50 / p95 (ms)" for s in systems)
            + " |"
        )
        print("|---:" * (1 + len(systems) + (len(systems) == 2) + 2 * len(systems)) + "|")
        for i, clients in enumerate(args.clients):
            rows = [r["throughput"][i] for r in runs]
            cells = [
                f"{row['tokens_per_s']:.1f}" + (f" ({row['short']} short)" if row["short"] else "") for row in rows
            ]
            if len(rows) == 2:
                cells.append(f"{rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x")
            for row in rows:
                cells.append(f"{row['ttft_p50']:.3f} / {row['ttft_p95']:.3f}")
                cells.append(f"{1000 * row['gap_p50']:.1f} / {1000 * row['gap_p95']:.1f}")
            print(f"| {clients} | " + " | ".join(cells) + " |")
    _scenario_table(
        runs,
        "long_prompt",
        "a 2,000-token prompt beside 4 streams",
        (
            ("max_gap_over_median", "streams' longest gap / median gap", "{:.1f}x"),
            ("max_gap", "streams' longest gap (s)", "{:.3f}"),
            ("long_ttft", "long prompt's time to first token (s)", "{:.2f}"),
        ),
    )
    _scenario_table(
        runs,
        "prefix",
        "a 1,000-token shared beginning",
        (
            ("cold_ttft", "first request's time to first token (s)", "{:.3f}"),
            ("warm_ttft", "second request's (s)", "{:.3f}"),
            ("speedup", "ratio", "{:.1f}x"),
        ),
    )


def _scenario_table(runs: list[dict], scenario: str, title: str, rows: tuple) -> None:
    """One column per system, one row per (key, text, format) of `rows`, where every run has the scenario."""
    if not all(scenario in r for r in runs):
        return
    print(f"\n| {title} | " + " | ".join(r["system"] for r in runs) + " |")
    print("|---" + "|---:" * len(runs) + "|")
    for key, text, unit in rows:
        print(f"| {text} | " + " | ".join(unit.format(r[scenario][key]) for r in runs) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--systems", nargs="+", default=["llamascope", "llama-server"])
    parser.add_argument("--scenarios", nargs="+", default=["throughput", "long-prompt", "prefix"])
    parser.add_argument("--clients", default="1,2,4,8,16,32", help="client counts (default 1,2,4,8,16,32)")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    model = args.model or default_model_path()

    checkpoint = open_checkpoint(str(model))  # metadata and tokenizer only: the weights load in the servers
    tokenizer = checkpoint.tokenizer_factory()
    settings = GenerationConfig.resolve(checkpoint.config, checkpoint.generation_json)
    no_eos = {str(t): -100 for t in set(settings.eos_token_id or []) | {tokenizer.eos_id} if t is not None}
    runs = [asyncio.run(run_system(system, args, model, tokenizer, no_eos)) for system in args.systems]
    print_tables(runs, args, model)
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "cpu": platform.processor(), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
