"""Aggregate decode throughput of `llamascope serve` with 1, 4 and 8 concurrent clients.

Starts the real server (`llamascope serve` in its own process, loopback only) on the default model
(or --model), then for each client count runs that many streaming clients at once, each sending the
same fixed number of streamed chat requests (completions when the model has no chat template), and
prints a markdown table. Every request generates exactly --max-tokens tokens (the eos ids get
logit_bias -100), so rows are comparable.

    .venv/bin/python benchmarks/serve_throughput.py                 # default model
    .venv/bin/python benchmarks/serve_throughput.py --model DIR --clients 1,4,8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx

from llamascope.config import GenerationConfig
from llamascope.loading import open_checkpoint

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, str, float]:
    """`llamascope serve` in its own process, as it is deployed: the clients here do not share its
    interpreter. -> (process, base URL, seconds until /health answered)."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llamascope",
        "serve",
        "--port",
        str(port),
        "--dtype",
        args.dtype,
        "--served-model-name",
        "bench",
        "--max-batch",
        str(max_batch),
        "--max-queue",
        str(4 * max_batch),
    ]
    if args.model:
        command += ["--model", args.model]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process, f"http://127.0.0.1:{port}/v1", time.perf_counter() - start
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit("the server did not start within 120 s")
        time.sleep(0.1)


async def one_request(
    client, model: str, prompt: str, max_tokens: int, no_eos: dict, chat: bool
) -> tuple[int, float, float]:
    """-> (completion tokens, seconds to the first content, seconds in all)."""
    start = time.perf_counter()
    first = None
    tokens = 0
    common = dict(
        model=model,
        max_tokens=max_tokens,
        temperature=0,
        logit_bias=no_eos,
        stream=True,
        stream_options={"include_usage": True},
    )
    if chat:
        stream = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
    else:
        stream = await client.completions.create(prompt=prompt, **common)
    async for chunk in stream:
        text = (chunk.choices[0].delta.content if chat else chunk.choices[0].text) if chunk.choices else None
        if text and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, first if first is not None else float("nan"), time.perf_counter() - start


async def run_level(
    base_url: str, model: str, clients: int, per_client: int, max_tokens: int, no_eos: dict, timeout: float, chat: bool
) -> dict:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=timeout) as client:

        async def worker(k: int):
            return [
                await one_request(client, model, PROMPTS[(k + j) % len(PROMPTS)], max_tokens, no_eos, chat)
                for j in range(per_client)
            ]

        start = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(worker(k) for k in range(clients))), timeout)
        seconds = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    tokens = sum(r[0] for r in flat)
    return {
        "clients": clients,
        "requests": len(flat),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ttft": statistics.mean(r[1] for r in flat),
        "per_request_tps": statistics.mean(r[0] / r[2] for r in flat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="folder or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--clients", default="1,4,8", help="comma-separated client counts (default 1,4,8)")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per level")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    checkpoint = open_checkpoint(args.model)  # metadata and tokenizer only: the weights load in the server
    tokenizer = checkpoint.tokenizer_factory()
    settings = GenerationConfig.resolve(checkpoint.config, checkpoint.generation_json)
    eos = set(settings.eos_token_id or []) | {tokenizer.eos_id}
    no_eos = {str(t): -100 for t in eos if t is not None}
    chat = bool(tokenizer.chat_template)  # chat requests when the model has a template
    process, base_url, start_s = start_server(args, max(levels))
    name = "bench"
    try:
        asyncio.run(run_level(base_url, name, 1, 1, 8, no_eos, args.timeout, chat))  # warm-up
        rows = [
            asyncio.run(
                run_level(base_url, name, c, args.requests_per_client, args.max_tokens, no_eos, args.timeout, chat)
            )
            for c in levels
        ]
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()

    base = rows[0]["tokens_per_s"]
    print(
        f"\nmodel: {args.model or 'SmolLM2-135M-Instruct (default)'} (dtype {args.dtype}; "
        f"server up in {start_s:.1f} s); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared by server and clients; "
        f"{args.requests_per_client} {'chat' if chat else 'completion'} requests per client, "
        f"{args.max_tokens} tokens each, greedy\n"
    )
    print(
        "| clients | requests | tokens | seconds | aggregate tokens/s | per-request tokens/s "
        "| mean TTFT (s) | vs 1 client |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['per_request_tps']:.1f} | {r['ttft']:.3f} | {r['tokens_per_s'] / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
