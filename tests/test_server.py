"""The OpenAI-compatible server, driven through the official `openai` client and raw HTTP.

A real uvicorn server runs in a thread on a free loopback port with a small random model; every
answer is checked against `Engine.generate` run alone on the same checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch
from conftest import rewrite_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamascope import Engine
from llamascope.cache import KVCache, SlotKVCache
from llamascope.config import DEFAULT_MAX_NEW_TOKENS, ContextLengthError

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llamascope.server import ServerSettings, create_app  # noqa: E402
from llamascope.server.app import SERVER_DEFAULTS  # noqa: E402
from llamascope.server.scheduler import AdditivePenalties  # noqa: E402

MODEL = "tiny-server"
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PROMPTS = ["Once upon a time", "My name is Mariama, my favorite", "def forward(self, x):", "The quick brown fox"]
EOS = 2


@pytest.fixture(scope="module")
def model_dir(model_factory, tmp_path_factory):
    """The test model with a long context and a ChatML chat template (a copy of its own)."""
    folder = tmp_path_factory.mktemp("server") / "model"
    shutil.copytree(model_factory("server", max_position_embeddings=4096), folder)
    rewrite_json(folder / "tokenizer_config.json", chat_template=CHATML)
    return folder


@pytest.fixture(scope="module")
def engine(model_dir):
    """A second copy of the model, for reference answers computed alone."""
    return Engine.load(model_dir)


@contextmanager
def running(model_dir, **settings):
    """A real server on a free loopback port; yields its base URL and the app."""
    app = create_app(Engine.load(model_dir), ServerSettings(model_name=MODEL, **settings))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def server(model_dir):
    with running(model_dir, max_batch=8, max_queue=64) as (url, app):
        yield url, app


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def finish(reason: str) -> str:
    return {"eos": "stop", "length": "length", "stop": "stop"}[reason]


# ---- the per-slot cache: batched decode equals each sequence alone ---------------------------


def test_slot_cache_batch_decode_matches_each_sequence_alone(engine):
    """Slots of different lengths, in a row order that is not a plain slice, decode together
    (one token, then three) and give each sequence the logits it gets alone with a KVCache."""
    model = engine.model
    prompts = [engine.encode(p) for p in PROMPTS[:3]]
    steps = [[[5]], [[7, 8, 9]]]  # the tokens each sequence is fed after its prompt
    slots = SlotKVCache.for_model(model, num_slots=4, slot_capacity=64)
    alone = []
    with torch.inference_mode():
        for ids in prompts:
            cache = KVCache.for_model(model, 1, 64)
            model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, None, last_only=True)
            outs = []
            for tokens in steps:
                positions = torch.arange(cache.length, cache.length + len(tokens[0]))[None]
                outs.append(model(torch.tensor(tokens), positions, cache, None)[0])  # [T, V]
            alone.append(outs)
        order = [2, 0, 1]
        for slot in range(3):
            assert slots.allocate() == slot
        for ids, slot in zip(prompts, order):
            cache = KVCache.for_model(model, 1, len(ids) + 4)  # a prefill, copied into the slot
            model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, None, last_only=True)
            slots.load(slot, cache)
        for i, tokens in enumerate(steps):
            T = len(tokens[0])
            batch = slots.batch(order, T)
            logits = model(torch.tensor(tokens * 3), batch.positions(T), batch, batch.mask(T))  # [3, T, V]
            for row in range(3):
                torch.testing.assert_close(logits[row], alone[row][i], rtol=1e-5, atol=1e-5)
        assert [slots.lengths[s] for s in order] == [len(ids) + 4 for ids in prompts]
        assert 0 < slots.nbytes() <= slots.max_bytes()
        slots.move(2, 3)  # slot 2's sequence moves to the free slot 3
        assert slots.in_use == [True, True, False, True] and slots.lengths[3] == len(prompts[0]) + 4
        for slot in (0, 1, 3):
            slots.free(slot)


def test_each_sequence_context_is_chosen_said_and_checked(engine, caplog):
    """Positions per sequence: the model's context where the KV budget holds max_batch of them, else
    what the budget allows; an explicit context is used, or refused at start-up when the model or the
    budget cannot hold it. The choice is logged."""
    from llamascope.errors import LlamascopeError
    from llamascope.server.app import slot_capacity_for

    c = engine.config
    per_position = SlotKVCache.token_bytes(c.num_hidden_layers, engine.model.kv_heads, c.head_dim, engine.model.dtype)
    settings = ServerSettings(model_name=MODEL, max_batch=8)
    with caplog.at_level(logging.INFO, logger="llamascope"):
        assert slot_capacity_for(engine, settings) == 4096
        assert "each of 8 sequences may use 4096 positions (the model's)" in caplog.text
        small = ServerSettings(model_name=MODEL, max_batch=8, kv_budget_bytes=8 * 100 * per_position)
        assert slot_capacity_for(engine, small) == 100
        assert "may use 100 positions (--kv-budget-mb" in caplog.text
        assert slot_capacity_for(engine, ServerSettings(model_name=MODEL, context=64)) == 64
        assert "may use 64 positions (as asked)" in caplog.text
    with pytest.raises(LlamascopeError, match="--context 5000: the model's context is 4096"):
        slot_capacity_for(engine, ServerSettings(model_name=MODEL, context=5000))
    with pytest.raises(LlamascopeError, match=r"--context 200 does not fit .* 100 positions each"):
        slot_capacity_for(
            engine, ServerSettings(model_name=MODEL, max_batch=8, kv_budget_bytes=small.kv_budget_bytes, context=200)
        )


def test_additive_penalties_are_openai_formula():
    scores = torch.zeros(1, 6)
    ids = torch.tensor([[4, 4, 1, 2, 2, 2, 5]])  # prompt [4, 4], generated [1, 2, 2, 2, 5]
    out = AdditivePenalties(presence=0.5, frequency=0.25, prompt_length=2)(ids, scores)
    counts = torch.tensor([0, 1, 3, 0, 0, 1.0])
    torch.testing.assert_close(out[0], -(0.25 * counts + 0.5 * (counts > 0).float()))


# ---- answers equal Engine.generate -----------------------------------------------------------


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    state = health(server[0])
    assert state["status"] == "ok" and state["max_batch"] == 8


@pytest.mark.parametrize("max_tokens", [1, 7, 40])
def test_completion_equals_engine_greedy(client, engine, max_tokens):
    for prompt in PROMPTS:
        expected = engine.generate(prompt, max_new_tokens=max_tokens, do_sample=False)
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
        assert r.choices[0].text == expected.text
        assert r.choices[0].finish_reason == finish(expected.finish_reason)
        assert r.usage.prompt_tokens == len(expected.prompt_ids)
        assert r.usage.completion_tokens == len(expected.output_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_of_token_ids_and_several_prompts(client, engine):
    ids = engine.encode(PROMPTS[0])
    expected = [engine.generate(p, max_new_tokens=9, do_sample=False).text for p in PROMPTS[:2]]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=9, temperature=0)
    assert r.choices[0].text == expected[0]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=9, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [expected[0], expected[0], expected[1], expected[1]]


def test_chat_equals_engine_with_chat_template(client, engine):
    for prompt in PROMPTS[:3]:
        expected = engine.generate(prompt, chat=True, max_new_tokens=12, do_sample=False)
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0
        )
        assert r.object == "chat.completion"
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == expected.text
        assert r.usage.prompt_tokens == len(expected.prompt_ids) == len(engine.encode(prompt, chat=True))
        assert r.usage.completion_tokens == len(expected.output_ids)


def test_streaming_equals_non_streaming(client):
    for prompt in PROMPTS[:2]:
        whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=25, temperature=0)
        chunks = list(
            client.completions.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=25,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
        whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
        chunks = list(
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True)
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_raw_stream_is_openai_sse(server):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1


def test_seeded_sampling_equals_engine_and_repeats(client, engine):
    settings = dict(temperature=0.8, top_p=0.9)
    for seed in (0, 7):
        expected = [
            engine.generate(
                PROMPTS[1], max_new_tokens=15, do_sample=True, top_k=SERVER_DEFAULTS["top_k"], seed=seed + i, **settings
            ).text
            for i in range(2)
        ]
        r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=15, seed=seed, n=2, **settings)
        assert [c.text for c in r.choices] == expected
    assert expected[0] != expected[1]


def _metric(text: str, name: str, absent: float | None = None) -> float:
    """The value of the sample `name` (with its labels as written) in Prometheus text; `absent`
    where there is none yet (a labelled counter appears when first counted)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    assert absent is not None, f"no sample {name} in /metrics"
    return absent


def test_metrics_count_requests_tokens_latencies_and_statuses(server, client):
    """GET /metrics (Prometheus text): requests by outcome, prompt and completion tokens, time to
    first token and inter-token latency histograms, HTTP responses by status, and the scheduler's
    queue, running sequences and KV cache read when scraped."""
    url = server[0]
    before = httpx.get(url + "/metrics", timeout=10).text
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=10).status_code == 404
    response = httpx.get(url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = response.text

    def grew(name: str) -> float:
        return _metric(after, name) - _metric(before, name, absent=0.0)

    assert grew('llamascope_requests_total{outcome="finished"}') == 1
    assert grew("llamascope_prompt_tokens_total") == r.usage.prompt_tokens
    assert grew("llamascope_completion_tokens_total") == 6
    assert grew("llamascope_time_to_first_token_seconds_count") == 1
    assert grew("llamascope_inter_token_latency_seconds_count") == 5  # six tokens, five gaps
    assert grew('llamascope_http_responses_total{status="404"}') == 1
    assert grew('llamascope_http_responses_total{status="200"}') >= 2  # the completion and the first scrape
    for gauge in ("llamascope_queue_sequences", "llamascope_running_sequences", "llamascope_kv_cache_budget_bytes"):
        assert _metric(after, gauge) >= 0
    assert _metric(after, "llamascope_kv_cache_budget_bytes") > 0


def test_a_request_without_sampling_fields_gets_the_server_defaults(client, engine):
    """Where the model's files set no sampling, a request that sets none samples at temperature 0.8,
    top-k 40, top-p 0.95 (llama-server's), not at temperature 1 over the whole vocabulary."""
    assert SERVER_DEFAULTS == {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.95}
    config = engine.local_generation_config(False, SERVER_DEFAULTS)
    assert {k: getattr(config, k) for k in SERVER_DEFAULTS} == SERVER_DEFAULTS  # (the test model sets none)
    expected = engine.generate(PROMPTS[3], max_new_tokens=10, seed=11, **SERVER_DEFAULTS).text
    r = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=10, seed=11)
    assert r.choices[0].text == expected


def test_vllm_and_llama_server_fields_equal_engine_settings(client, engine):
    """top_k, min_p, repetition_penalty, min_tokens and ignore_eos (fields vLLM and llama-server take
    beside OpenAI's) are the engine's generation settings of those names."""
    fields = dict(top_k=5, min_p=0.05, repetition_penalty=1.3)
    expected = engine.generate(PROMPTS[2], max_new_tokens=12, do_sample=True, temperature=0.9, seed=3, **fields).text
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0.9, seed=3, extra_body=fields
    )
    assert r.choices[0].text == expected
    eos_first = {"logit_bias": {str(EOS): 100}}  # eos is every step's choice
    stopped = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body=eos_first
    )
    assert (stopped.choices[0].finish_reason, stopped.usage.completion_tokens) == ("stop", 1)
    ignored = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body={**eos_first, "ignore_eos": True}
    )
    assert (ignored.choices[0].finish_reason, ignored.usage.completion_tokens) == ("length", 12)
    late = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body={**eos_first, "min_tokens": 5}
    )
    assert (late.choices[0].finish_reason, late.usage.completion_tokens) == ("stop", 6)  # eos banned for 5


def test_prompt_lookup_is_a_request_field_that_changes_no_token(client, engine):
    """prompt_lookup_num_tokens (and max_matching_ngram_size), greedy and seeded, streamed or not:
    the text the request gets without it; a bad value is a 400 naming the field."""
    prompt = "one two three four five one two three four five one two three"
    for sampling in (dict(temperature=0), dict(temperature=0.9, seed=5)):
        settings = dict(do_sample=False) if sampling["temperature"] == 0 else dict(do_sample=True, **sampling)
        expected = engine.generate(prompt, max_new_tokens=20, **settings).text
        lookup = {"prompt_lookup_num_tokens": 4, "max_matching_ngram_size": 3}
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, extra_body=lookup, **sampling)
        assert r.choices[0].text == expected
        chunks = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=20, extra_body=lookup, stream=True, **sampling
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    with pytest.raises(openai.BadRequestError, match="prompt_lookup_num_tokens"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, extra_body={"prompt_lookup_num_tokens": 0})


def test_stop_strings_cut_the_text(client, engine):
    full = engine.generate(PROMPTS[0], max_new_tokens=30, do_sample=False).text
    stop = full[10:13]
    cut = full[: full.index(stop)]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop, "§§"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    chunks = list(
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(client, engine):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) <= 3
        assert value >= max(top.values()) - 1e-5  # greedy: the chosen token is the most likely
    assert "".join(lp.tokens) == r.choices[0].text or "\ufffd" in "".join(lp.tokens)

    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPTS[2]}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)


def test_logit_bias_and_penalties(client, engine):
    token = engine.tokenizer.encode("fox", add_special_tokens=False)[0]
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logit_bias={str(token): 100}
    )
    assert r.choices[0].text == engine.tokenizer.decode([token] * 5)
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=40, temperature=0)
    penalised = client.completions.create(
        model=MODEL, prompt=PROMPTS[3], max_tokens=40, temperature=0, frequency_penalty=2.0, presence_penalty=2.0
    )
    assert penalised.usage.completion_tokens >= 1
    assert penalised.choices[0].text != plain.choices[0].text or plain.choices[0].finish_reason == "stop"


def test_concurrent_streams_each_get_their_own_tokens(server, engine):
    """Requests with different prompts, lengths and settings run in one batch, joining and leaving
    at different steps; each gets exactly what it gets alone."""
    cases = []
    for i, prompt in enumerate(PROMPTS * 2):
        if i % 2:
            cases.append((prompt, 5 + 7 * i, dict(temperature=0.7, top_p=0.95, seed=100 + i)))
        else:
            cases.append((prompt, 5 + 7 * i, dict(temperature=0)))
    expected = []
    for prompt, max_tokens, s in cases:
        if s["temperature"] == 0:
            expected.append(engine.generate(prompt, max_new_tokens=max_tokens, do_sample=False).text)
        else:
            expected.append(
                engine.generate(
                    prompt,
                    max_new_tokens=max_tokens,
                    do_sample=True,
                    top_k=SERVER_DEFAULTS["top_k"],
                    temperature=s["temperature"],
                    top_p=s["top_p"],
                    seed=s["seed"],
                ).text
            )

    server[1].state.scheduler.peak_batch = 0

    async def one(client, prompt, max_tokens, s, delay):
        await asyncio.sleep(delay)
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True, **s)
        return "".join([c.choices[0].text async for c in stream])

    async def main():
        async with openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0, timeout=60) as client:
            jobs = [one(client, p, m, s, 0.01 * i) for i, (p, m, s) in enumerate(cases)]
            return await asyncio.wait_for(asyncio.gather(*jobs), 60)

    assert asyncio.run(main()) == expected
    assert server[1].state.scheduler.peak_batch > 1  # they really decoded together


# ---- bad input: a 4xx naming the field, and the server goes on -------------------------------


def _error(response: httpx.Response, status: int, param=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    return error


def test_bad_requests_get_openai_errors(server, engine):
    url = server[0]
    post = lambda path, **kw: httpx.post(url + path, timeout=10, **kw)  # noqa: E731
    ok = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    headers = {"content-type": "application/json"}

    assert _error(post("/v1/completions", content=b'{"model": ', headers=headers), 400)["code"] == "invalid_json"
    _error(post("/v1/completions", content=b"[1, 2]", headers=headers), 400)
    _error(post("/v1/completions", content=b"", headers=headers), 400)
    _error(post("/v1/completions", json={"prompt": "hi"}), 400, "model")
    _error(post("/v1/completions", json={**ok, "max_tokens": "5"}), 400, "max_tokens")
    _error(post("/v1/completions", json={**ok, "max_tokens": 0}), 400, "max_tokens")
    _error(post("/v1/completions", json={**ok, "max_tokens": True}), 400, "max_tokens")
    _error(post("/v1/completions", json={**ok, "temperature": "hot"}), 400, "temperature")
    _error(post("/v1/completions", json={**ok, "temperature": 7}), 400, "temperature")
    _error(post("/v1/completions", json={**ok, "top_p": 0}), 400, "top_p")
    _error(post("/v1/completions", json={**ok, "prompt": 5}), 400, "prompt")
    _error(post("/v1/completions", json={**ok, "prompt": []}), 400, "prompt")
    _error(post("/v1/completions", json={**ok, "prompt": [1, 2, 99999]}), 400, "prompt")
    _error(post("/v1/completions", json={**ok, "stop": [1]}), 400, "stop")
    _error(post("/v1/completions", json={**ok, "n": 100000}), 400, "n")
    _error(post("/v1/completions", json={**ok, "n": 128}), 400, "n")  # more than the server could ever run
    _error(post("/v1/completions", json={**ok, "logprobs": 9}), 400, "logprobs")
    _error(post("/v1/completions", json={**ok, "presence_penalty": 3}), 400, "presence_penalty")
    _error(post("/v1/completions", json={**ok, "logit_bias": {"x": 1}}), 400, "logit_bias")
    _error(post("/v1/completions", json={**ok, "logit_bias": {"5": 1000}}), 400, "logit_bias")
    _error(post("/v1/completions", json={**ok, "seed": 1.5}), 400, "seed")
    for key in ("²", "٣", "1" * 30):  # digits that int() takes or refuses, but no token id
        _error(post("/v1/completions", json={**ok, "logit_bias": {key: 5}}), 400, "logit_bias")
    for escaped in ('"\\ud800"', '"ok \\udfff"', '["fine", "\\udc80"]'):  # lone surrogates, as JSON escapes
        body = f'{{"model": "{MODEL}", "max_tokens": 2, "prompt": {escaped}}}'.encode()
        reply = post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert "lone surrogate" in _error(reply, 400, "prompt" if escaped[0] == '"' else "prompt[1]")["message"]
    chat_body = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "\\ud83d"}}]}}'.encode()
    reply = post("/v1/chat/completions", content=chat_body, headers={"content-type": "application/json"})
    assert "lone surrogate" in _error(reply, 400, "messages")["message"]
    assert _error(post("/v1/completions", json={**ok, "model": "gpt-9"}), 404, "model")["code"] == "model_not_found"
    long_prompt = list(range(3, 300)) * 14  # 4158 tokens > 4096 positions
    assert (
        _error(post("/v1/completions", json={**ok, "prompt": long_prompt}), 400, "prompt")["code"]
        == "context_length_exceeded"
    )
    _error(post("/v1/completions", json={**ok, "max_tokens": 5000}), 400, "max_tokens")
    _error(post("/v1/chat/completions", json={**chat, "messages": "hi"}), 400, "messages")
    _error(post("/v1/chat/completions", json={**chat, "messages": []}), 400, "messages")
    _error(
        post("/v1/chat/completions", json={**chat, "messages": [{"role": "wizard", "content": "x"}]}),
        400,
        "messages[0].role",
    )
    _error(
        post("/v1/chat/completions", json={**chat, "messages": [{"role": "user", "content": 3}]}),
        400,
        "messages[0].content",
    )
    _error(post("/v1/chat/completions", json={**chat, "top_logprobs": 2}), 400, "top_logprobs")
    _error(
        post("/v1/chat/completions", json={**chat, "messages": [{"role": "user", "content": "x " * 5000}]}),
        400,
        "messages",
    )
    _error(httpx.get(url + "/v1/nowhere", timeout=10), 404)
    _error(httpx.get(url + "/v1/completions", timeout=10), 405)

    # nothing above harmed the server
    r = post("/v1/completions", json={**ok, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == engine.generate("hi", max_new_tokens=2, do_sample=False).text
    assert health(url)["active"] == 0


def test_api_key(model_dir):
    with running(model_dir, max_batch=2, api_key="sekret") as (url, _):
        with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
            with pytest.raises(openai.AuthenticationError):
                bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        _error(httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=10), 401)
        # the key is checked before the body, so a malformed body without a key is a 401 too
        _error(httpx.post(url + "/v1/completions", content=b"{", timeout=10), 401)
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        # two Authorization headers, the right key in either: refused, whichever a proxy would pass on
        for keys in (["wrong", "sekret"], ["sekret", "wrong"], ["sekret", "sekret"]):
            headers = [("Authorization", f"Bearer {key}") for key in keys]
            reply = httpx.get(url + "/v1/models", headers=headers, timeout=10)
            assert "2 Authorization headers" in _error(reply, 401)["message"]
        with openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0) as good:
            assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


ANY_JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.integers(-3, 40),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=6),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
COMPLETION_FIELDS = [
    "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed", "presence_penalty",
    "frequency_penalty", "logit_bias", "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
    "logprobs", "echo", "best_of", "suffix", "stream_options", "user", "prompt_lookup_num_tokens",
]  # fmt: skip
CHAT_FIELDS = ["messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "response_format",
               "tools", "n", "stream", "stop", "temperature", "seed"]  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chat=st.booleans(),
    data=st.data(),
)
def test_any_request_gets_an_answer_or_a_4xx_with_a_json_body(server, chat, data):
    """Request bodies with any fields of any JSON type: the server answers 200, or a 4xx whose
    JSON body says what is wrong; never a 5xx, and it stays healthy."""
    url = server[0]
    names = CHAT_FIELDS if chat else COMPLETION_FIELDS
    body = {"model": MODEL, "max_tokens": 2, "prompt": "hi"} if not chat else {"model": MODEL, "max_tokens": 2}
    if chat:
        body["messages"] = [{"role": "user", "content": "hi"}]
    body |= data.draw(st.dictionaries(st.sampled_from(names), ANY_JSON, max_size=3))
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
        body["max_tokens"] = 8  # (quick; the size rules have their own tests)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    reply = httpx.post(url + path, json=body, timeout=60)
    assert reply.status_code < 500, (body, reply.text)
    if reply.status_code >= 400:
        assert reply.json()["error"]["message"], (body, reply.text)
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_a_request_body_over_the_limit_gets_413_before_it_is_read(model_dir):
    """By its Content-Length, or, sent in chunks without one, once what came passes the limit; the
    server stays healthy and takes the next request."""
    with running(model_dir, max_batch=2, max_body_bytes=4096) as (url, _):
        big = {"model": MODEL, "prompt": "word " * 2000, "max_tokens": 2}
        error = _error(httpx.post(url + "/v1/completions", json=big, timeout=10), 413)
        assert "at most 4096" in error["message"]

        def chunks():
            for _ in range(100):
                yield b"x" * 1000

        reply = httpx.post(url + "/v1/completions", content=chunks(), timeout=10)
        assert reply.status_code == 413 and "at most 4096" in reply.json()["error"]["message"]
        small = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=small, timeout=30).status_code == 200
        assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_sigterm_lets_streams_run_for_the_grace_period_then_ends_them_with_an_error_event(model_dir, tmp_path):
    """`llamascope serve` on SIGTERM: no new connection is taken, a running stream goes on (tokens
    still come after the signal) until --shutdown-grace runs out, then ends with an error event
    rather than being cut mid-chunk, and the process ends after a clean shutdown."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "llamascope"), "serve", "--model", str(model_dir)]
    command += ["--port", str(port), "--shutdown-grace", "1", "--max-batch", "2", "--served-model-name", MODEL]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _up(url), what="the server to start", timeout=120)
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 4000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as reply:
            lines = (line for line in reply.iter_lines() if line.startswith("data: "))
            assert '"text"' in next(lines)
            proc.send_signal(signal.SIGTERM)
            after = list(lines)
        # (uvicorn raises the signal again once it has shut down, so that the parent sees why it ended)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log_path.read_text()
        assert "Application shutdown complete" in log_path.read_text()
    finally:
        proc.kill()
    tokens_after = [line for line in after if '"text"' in line]
    assert tokens_after, "the stream stopped at the signal"
    last = json.loads(after[-1].removeprefix("data: "))
    assert "the server is shutting down" in last["error"]["message"], after[-3:]
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=5)


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_api_key_is_refused_at_start_up(engine, key):
    """An empty key would turn authentication off without a word: refused by name instead."""
    from llamascope.errors import LlamascopeError

    with pytest.raises(LlamascopeError, match="--api-key is empty"):
        create_app(engine, ServerSettings(model_name=MODEL, api_key=key))


def test_a_failing_request_does_not_harm_the_others(server, engine, monkeypatch):
    """A request whose token choice raises gets a 500 (or an error event in its stream); a request
    running beside it finishes with exactly its own tokens."""
    original = AdditivePenalties.__call__

    def broken(self, input_ids, scores):
        if self.presence == 1.25 and input_ids.shape[1] - self.prompt_length >= 3:
            raise RuntimeError("injected failure")
        return original(self, input_ids, scores)

    monkeypatch.setattr(AdditivePenalties, "__call__", broken)
    expected = engine.generate(PROMPTS[1], max_new_tokens=60, do_sample=False).text

    async def main():
        async with openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0, timeout=60) as client:

            async def good():
                stream = await client.completions.create(
                    model=MODEL, prompt=PROMPTS[1], max_tokens=60, temperature=0, stream=True
                )
                return "".join([c.choices[0].text async for c in stream])

            async def bad(stream: bool):
                await asyncio.sleep(0.01)
                r = await client.completions.create(
                    model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0, presence_penalty=1.25, stream=stream
                )
                if stream:
                    return "".join([c.choices[0].text async for c in r])
                return r

            return await asyncio.gather(good(), bad(False), bad(True), return_exceptions=True)

    good, bad_plain, bad_stream = asyncio.run(main())
    assert good == expected
    assert isinstance(bad_plain, openai.InternalServerError) and "injected failure" in str(bad_plain)
    assert isinstance(bad_stream, openai.APIError) and "injected failure" in str(bad_stream)
    state = wait_for(lambda: (s := health(server[0]))["active"] == 0 and s, what="idle")
    assert state["failed"] >= 2


# ---- queueing, disconnects, load -------------------------------------------------------------


def _no_eos() -> dict:
    return {str(EOS): -100}


def test_full_queue_gets_429_and_disconnect_frees_the_slot(model_dir, caplog):
    caplog.set_level(logging.INFO, logger="llamascope")
    with running(model_dir, max_batch=1, max_queue=1) as (url, app):
        body = {
            "model": MODEL,
            "prompt": PROMPTS[0],
            "max_tokens": 3000,
            "temperature": 0,
            "stream": True,
            "logit_bias": _no_eos(),
        }
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", url + "/v1/completions", json=body) as long_stream:
                lines = long_stream.iter_lines()
                assert next(lines).startswith("data: ")  # generating: it holds the only slot
                waiter = {}
                thread = threading.Thread(
                    target=lambda: waiter.setdefault(
                        "r",
                        httpx.post(
                            url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}, timeout=30
                        ),
                    )
                )
                thread.start()
                wait_for(lambda: health(url)["waiting"] == 1, what="a waiting request")
                full = http.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3})
                assert _error(full, 429)["code"] == "queue_full"
                assert full.headers["retry-after"] == "1"
                for _ in range(3):
                    next(lines)
            # the client closed the long stream: its slot goes to the waiting request at once
            thread.join(10)
            assert waiter["r"].status_code == 200
        state = wait_for(lambda: (s := health(url))["active"] == 0 and s["cancelled"] == 1 and s, what="slot freed")
        assert state["completed"] == 1
        assert state["kv_bytes"] == state["kv_budget_bytes"]  # the storage allocated at start-up, kept
    cancelled = [r.getMessage() for r in caplog.records if "cancelled" in r.getMessage()]
    assert len(cancelled) == 1
    assert int(cancelled[0].split(" out,")[0].split()[-1]) < 3000  # it stopped long before max_tokens


def test_non_streaming_client_disconnect_cancels(server):
    url = server[0]
    before = health(url)["cancelled"]
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 4000, "temperature": 0, "logit_bias": _no_eos()}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.3))
    wait_for(lambda: health(url)["cancelled"] == before + 1 and health(url)["active"] == 0, what="cancel")


def test_load_16_concurrent_clients(server, engine):
    """16 clients x 3 requests (completions and chat, streamed or not) against 8 slots: every
    response complete and equal to the answer alone, nothing lost, no error."""
    lengths = (6, 17)
    expected = {
        (p, m, chat): engine.generate(p, chat=chat, max_new_tokens=m, do_sample=False).text
        for p in PROMPTS
        for m in lengths
        for chat in (False, True)
    }

    async def client_task(client, k):
        results = []
        for j in range(3):
            prompt, max_tokens = PROMPTS[(k + j) % 4], lengths[(k + j) % 2]
            chat, stream = (k + j) % 3 == 0, (k * 3 + j) % 2 == 0
            if chat:
                kwargs = dict(
                    model=MODEL,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=stream,
                )
                r = await client.chat.completions.create(**kwargs)
                if stream:
                    text = "".join([c.choices[0].delta.content or "" async for c in r])
                else:
                    text = r.choices[0].message.content
            else:
                r = await client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=stream
                )
                text = "".join([c.choices[0].text async for c in r]) if stream else r.choices[0].text
            results.append(text == expected[(prompt, max_tokens, chat)])
        return results

    async def main():
        async with openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0, timeout=60) as client:
            return await asyncio.wait_for(asyncio.gather(*(client_task(client, k) for k in range(16))), 80)

    before = health(server[0])
    server[1].state.scheduler.peak_batch = 0
    start = time.monotonic()
    results = asyncio.run(main())
    assert all(all(r) for r in results) and sum(map(len, results)) == 48
    assert time.monotonic() - start < 80
    state = wait_for(lambda: (s := health(server[0]))["active"] == 0 and s, what="idle")
    assert state["completed"] - before["completed"] == 48 and state["waiting"] == 0
    assert state["failed"] == before["failed"] and state["cancelled"] == before["cancelled"]
    assert server[1].state.scheduler.peak_batch == 8


def test_one_log_line_per_request(client, caplog):
    caplog.set_level(logging.INFO, logger="llamascope")
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    wait_for(lambda: any(r.id in rec.getMessage() for rec in caplog.records), what="log line")
    lines = [rec.getMessage() for rec in caplog.records if r.id in rec.getMessage()]
    assert len(lines) == 1
    assert f"{r.usage.prompt_tokens} tokens in, {r.usage.completion_tokens} out, first token" in lines[0]
    assert "tokens/s" in lines[0]


# ---- one rule each, the same as the Python API's ------------------------------------------------

END = 2  # "</s>": the end of a turn in TURN_TEMPLATE
TURN_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.3}


@pytest.fixture(scope="module")
def short_context(model_factory):
    """A model of 24 positions."""
    return model_factory("short-context", max_position_embeddings=24)


@pytest.fixture(scope="module")
def turn_model(model_dir, tmp_path_factory):
    """A model whose chat template ends each turn with </s> (id 2) while its eos id is 0, and whose
    greedy replies reach </s>: its lm_head row is that of a token often chosen, a little larger."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("turns") / "model"
    shutil.copytree(model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"][END] = weights["lm_head.weight"][187] * 1.05
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    rewrite_json(folder / "tokenizer_config.json", chat_template=TURN_TEMPLATE)
    rewrite_json(folder / "generation_config.json", eos_token_id=0)
    rewrite_json(folder / "config.json", eos_token_id=0)
    return folder


def test_context_limit_is_the_apis(short_context, caplog):
    """config.room_for_new_tokens for both: a prompt of context - 1 tokens gets its new token; one of
    context or context + 1 tokens is refused by Engine and server alike. More new tokens than the
    room: the API warns and goes on, the server refuses a max_tokens it was given and clips its default."""
    engine = Engine.load(short_context)
    context = engine.config.max_position_embeddings
    tokens = list(range(3, 3 + context + 1))
    with running(short_context, max_batch=2) as (url, _):

        def complete(ids, **extra):
            body = {"model": MODEL, "prompt": ids, "temperature": 0, **extra}
            return httpx.post(url + "/v1/completions", json=body, timeout=30)

        assert health(url)["slot_capacity"] == context
        alone = engine.generate_ids(tokens[: context - 1], max_new_tokens=1).output_ids[0]
        r = complete(tokens[: context - 1], max_tokens=1)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == len(alone) == 1
        assert r.json()["choices"][0]["text"] == engine.tokenizer.decode(alone, skip_special_tokens=True)
        for length in (context, context + 1):
            with pytest.raises(ContextLengthError, match=f"prompt of {length} tokens"):
                engine.generate_ids(tokens[:length], max_new_tokens=1)
            assert _error(complete(tokens[:length], max_tokens=1), 400, "prompt")["code"] == "context_length_exceeded"

        assert (
            _error(complete(tokens[: context - 1], max_tokens=2), 400, "max_tokens")["code"]
            == "context_length_exceeded"
        )
        clipped = complete(tokens[: context - 3]).json()  # the default of 16, clipped to the room of 3
        alone = engine.generate_ids(tokens[: context - 3], max_new_tokens=3, do_sample=False)
        assert clipped["usage"]["completion_tokens"] == len(alone.output_ids[0])
        assert clipped["choices"][0]["finish_reason"] == finish(alone.finish_reasons[0])
    with caplog.at_level(logging.WARNING, logger="llamascope"):
        past = engine.generate_ids(tokens[: context - 1], max_new_tokens=3, eos_token_id=[])
    assert len(past.output_ids[0]) == 3 and "past the model's context of 24 positions" in caplog.text


def test_completion_default_length_is_the_table(client, engine):
    expected = engine.generate(PROMPTS[2], max_new_tokens=DEFAULT_MAX_NEW_TOKENS["server_completion"], do_sample=False)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[2], temperature=0)
    assert r.choices[0].text == expected.text and r.usage.completion_tokens == len(expected.output_ids)


def test_server_stops_on_the_stop_strings_generate_stops_on(client, engine):
    """One stop rule (stopping.py): a choice ends at the token where generate() ends, for a stop
    string across two generated tokens and for one that begins in the prompt; the server's text
    leaves the stop string out, streamed or not."""
    prompt = PROMPTS[0]
    free = engine.generate(prompt, max_new_tokens=30, do_sample=False)
    pieces = [engine.tokenizer.decode([t]) for t in free.output_ids]
    across = next(
        a[-1] + b[0]
        for i, (a, b) in enumerate(zip(pieces[3:], pieces[4:]), start=3)
        if a
        and b
        and (a[-1] + b[0]).isprintable()
        and "\ufffd" not in a + b
        and a[-1] + b[0] not in b
        and a[-1] + b[0] not in prompt + "".join(pieces[: i + 1])
    )
    from_prompt = prompt[-1] + pieces[0][0]
    for stop in (across, from_prompt):
        alone = engine.generate(prompt, max_new_tokens=30, do_sample=False, stop_strings=[stop])
        assert alone.finish_reason == "stop" and alone.output_ids == free.output_ids[: len(alone.output_ids)]
        text = alone.text[: alone.text.find(stop)] if stop in alone.text else ""
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=stop)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (text, "stop")
        assert r.usage.completion_tokens == len(alone.output_ids)
        chunks = list(
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True)
        )
        assert "".join(c.choices[0].text for c in chunks) == text
    assert len(engine.generate(prompt, max_new_tokens=30, do_sample=False, stop_strings=[from_prompt]).output_ids) == 1


def test_server_chat_ends_at_the_end_of_turn_ids_of_engine_chat(turn_model):
    engine = Engine.load(turn_model)
    assert engine.generation_config().eos_token_id == [0]
    assert engine.end_of_turn_ids() == [END] and engine.generation_config(chat=True).eos_token_id == [0, END]
    ended = 0
    with (
        running(turn_model, max_batch=2) as (url, _),
        openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60) as client,
    ):
        for prompt in PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            free = engine.generate_ids(
                engine.tokenizer.encode_chat(messages), max_new_tokens=20, do_sample=False
            ).output_ids[0]  # eos 0 alone: past the end of turn
            reply = "".join(engine.chat(messages, max_new_tokens=20, do_sample=False))
            completion = engine.generate(prompt, chat=True, max_new_tokens=20, do_sample=False)
            r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
            length = free.index(END) + 1 if END in free else len(free)
            assert r.choices[0].message.content == reply == completion.text
            assert r.usage.completion_tokens == len(completion.output_ids) == length
            assert completion.output_ids == free[:length]
            assert r.choices[0].finish_reason == ("stop" if END in free[:20] else "length")
            ended += END in free
    assert ended >= 2  # the rule was put to the test


@pytest.mark.parametrize("where", ["generation_config.json", "config.json"])
def test_server_resolves_settings_like_the_api(model_dir, tmp_path, where):
    """Sampling settings in the model's files count for the server as for Engine.generate (through
    GenerationConfig.resolve): the same choices for the same seed, with and without request settings."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    if where == "config.json":  # transformers reads them there when there is no generation_config.json
        (folder / "generation_config.json").unlink()
        rewrite_json(folder / "config.json", **SAMPLING)
    else:
        rewrite_json(folder / "generation_config.json", **SAMPLING)
    engine = Engine.load(folder)
    config = engine.generation_config()
    assert {k: getattr(config, k) for k in SAMPLING} == SAMPLING and config.sources["top_k"] == where
    with (
        running(folder, max_batch=2) as (url, _),
        openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60) as client,
    ):
        for seed, request in ((3, {}), (4, {"top_p": 0.5}), (5, {"temperature": 1.2}), (6, {"temperature": 0})):
            call = {"do_sample": False} if request.get("temperature") == 0 else request
            expected = engine.generate(PROMPTS[1], max_new_tokens=12, seed=seed, **call).text
            r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, seed=seed, **request)
            assert r.choices[0].text == expected, (seed, request)


# ---- the command line --------------------------------------------------------------------------


def test_llamascope_serve_command(tiny_model):
    """`llamascope serve` in its own process: API key, KV budget, and a model without a chat template."""
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "llamascope",
        "serve",
        "--model",
        str(tiny_model),
        "--port",
        str(port),
        "--max-batch",
        "2",
        "--kv-budget-mb",
        "0.125",
        "--api-key",
        "k",
        "--served-model-name",
        "m",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:

        def up():
            assert process.poll() is None, process.stdout.read()
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=60, what="llamascope serve")
        with openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=30) as client:
            # 0.125 MiB for 2 slots of 512 bytes per position (2 layers, 2 kv heads of 16, float32): 128 positions
            assert client.models.list().data[0].model_extra["max_model_len"] == 128
            r = client.completions.create(model="m", prompt="Once upon a time", max_tokens=5, temperature=0)
            assert r.choices[0].text == Engine.load(tiny_model).generate("Once upon a time", max_new_tokens=5).text
            with pytest.raises(openai.BadRequestError, match="context"):
                client.completions.create(model="m", prompt="Once upon a time", max_tokens=200)
            with pytest.raises(openai.BadRequestError, match="chat template"):
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        _error(httpx.get(url + "/v1/models", timeout=5), 401)
    finally:
        process.terminate()
        try:
            output = process.communicate(timeout=15)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0]
    assert "tokens in, 5 out, first token" in output  # the per-request log line, on by default


def test_a_scheduler_failure_during_a_prefill_leaves_nothing_behind(engine, monkeypatch):
    """A step of the scheduler fails (a bug, injected) while one sequence decodes and a long prompt
    is half prefilled: both requests fail once, the unfinished prefill is dropped, every admitted
    sequence is let go exactly once, and the next request gets exactly its tokens alone."""
    from llamascope.server.scheduler import Delta, Done, Failed, Request, Scheduler, SequenceSpec

    original, raised = Scheduler._decode_step, []

    def broken(self):
        if self._prefilling and not raised:
            raised.append(True)
            raise RuntimeError("injected failure")
        return original(self)

    monkeypatch.setattr(Scheduler, "_decode_step", broken)
    scheduler = Scheduler(engine.model, engine.tokenizer, max_batch=4, slot_capacity=2048, prefix_cache_bytes=1 << 24)
    config = engine.local_generation_config(max_new_tokens=40, do_sample=False)
    beside = engine.encode(PROMPTS[1])

    async def last_event(request: Request):
        while isinstance(event := await asyncio.wait_for(request.events.get(), 60), Delta):
            pass
        return event

    async def main():
        loop = asyncio.get_running_loop()
        running = Request("beside", [SequenceSpec(beside, config)], loop)
        scheduler.submit(running)
        assert isinstance(await asyncio.wait_for(running.events.get(), 60), Delta)
        doomed = Request("long", [SequenceSpec([3 + i % 200 for i in range(700)], config)], loop)
        scheduler.submit(doomed)
        ended = [await last_event(running), await last_event(doomed)]
        wait_for(lambda: scheduler.stats()["active"] == 0, what="every sequence let go")
        again = Request("again", [SequenceSpec(beside, config)], loop)
        scheduler.submit(again)
        tokens = []
        while not isinstance(event := await asyncio.wait_for(again.events.get(), 60), Done):
            tokens += event.token_ids
        return ended, tokens

    scheduler.start()
    try:
        ended, tokens = asyncio.run(main())
        assert raised and all(isinstance(e, Failed) and "injected failure" in e.message for e in ended)
        assert tokens == engine.generate_ids(beside, max_new_tokens=40, do_sample=False).output_ids[0]
        state = wait_for(lambda: (s := scheduler.stats())["active"] == 0 and s, what="idle")
        assert (state["waiting"], state["failed"], state["completed"]) == (0, 2, 1)
        assert scheduler.runner.prefills == {}
    finally:
        assert scheduler.stop()


# ---- constrained output ---------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


def test_response_format_json_schema_gives_json_that_validates(client, engine):
    """Chat completions with response_format json_schema, streamed and not: the content parses and
    validates, and is what Engine.generate gives under the same schema."""
    import jsonschema

    messages = [{"role": "user", "content": "A person as JSON."}]
    form = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=400, temperature=0, response_format=form
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    assert r.choices[0].finish_reason == "stop"
    expected = engine.generate("A person as JSON.", chat=True, json_schema=PERSON, max_new_tokens=400, do_sample=False)
    assert r.choices[0].message.content == expected.text
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=400, temperature=0, response_format=form, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text


def test_the_openai_clients_parse_with_a_pydantic_model(client):
    import pydantic

    class Pet(pydantic.BaseModel):
        kind: str = pydantic.Field(max_length=6)
        legs: int

    r = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "A pet."}],
        response_format=Pet,
        max_tokens=400,
        temperature=0,
    )
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet) and isinstance(pet.legs, int)


def test_vllm_and_llama_cpp_constraint_fields(client):
    """guided_choice, guided_regex, guided_json (vLLM), grammar and json_schema (llama.cpp) on completions."""
    prompt = PROMPTS[0]
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=0, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert r.choices[0].text in ("yes", "no")
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=0.9, seed=1, extra_body={"guided_regex": "[ab]{3}"}
    )
    assert r.choices[0].text in {a + b + c for a in "ab" for b in "ab" for c in "ab"}
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=0, extra_body={"grammar": 'root ::= "x" [0-9]'}
    )
    assert len(r.choices[0].text) == 2 and r.choices[0].text[0] == "x"
    for field in ("guided_json", "json_schema"):
        r = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=400, temperature=0, extra_body={field: PERSON}
        )
        assert set(json.loads(r.choices[0].text)) == {"name", "age", "pet"}


@pytest.mark.parametrize(
    "extra,param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strange"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"guided_choice": ["a"], "ignore_eos": True}, "guided_choice"),
    ],
)
def test_bad_constraints_get_a_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, extra_body=extra)
    assert caught.value.body["param"] == param


# ---- tool calls ---------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Dakar"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}},
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_a_required_tool_call_comes_back_as_tool_calls_that_validate(client, stream):
    """tool_choice "required" or a named function: the reply is constrained to one call whose
    arguments validate against the function's parameters; finish_reason "tool_calls"."""
    import jsonschema

    messages = [{"role": "user", "content": "Weather in Paris for three days?"}]
    for choice, names in (
        ("required", {"get_weather", "get_time"}),
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ):
        common = dict(
            model=MODEL, messages=messages, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=400, temperature=0
        )
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **common))
            calls = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            r = client.chat.completions.create(**common)
            calls, finish = r.choices[0].message.tool_calls, [r.choices[0].finish_reason]
        assert finish == ["tool_calls"] and len(calls) == 1 and calls[0].function.name in names
        spec = {"get_weather": WEATHER, "get_time": TIME}[calls[0].function.name]
        jsonschema.validate(json.loads(calls[0].function.arguments), spec["function"]["parameters"])
        assert calls[0].id.startswith("call_")


def test_the_openai_clients_tool_loop_runs_unchanged(client):
    """Call, answer with a role "tool" message, and the next turn goes through (the calls and the
    result rendered into the template: this one takes no tools, so as blocks and a user message)."""
    messages = [{"role": "user", "content": "Weather in Dakar?"}]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=400, temperature=0
    )
    call = first.choices[0].message.tool_calls[0]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny", "celsius": 31})})
    second = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], max_tokens=8, temperature=0
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")


def test_tool_calls_in_text_are_parsed_only_when_they_are_calls():
    """auto: a block naming a given function with arguments that validate is a call; anything else
    stays text."""
    from llamascope.server.tools import parse_calls, parse_tools

    functions = parse_tools([WEATHER])
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
    content, calls = parse_calls("Let me look. " + good, functions)
    assert content == "Let me look." and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 2}
    for bad in (good.replace("Paris", "Rome"), good.replace("get_weather", "get_time"), "<tool_call>{oops</tool_call>"):
        assert parse_calls(bad, functions) == (bad, [])


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_bad_tools_get_a_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, **extra)
    assert caught.value.body["param"] == param


def test_a_template_that_takes_tools_renders_them_itself():
    """A chat template that reads `tools` (as Qwen2.5's and LLaMA 3.1's do) gets them, and earlier
    calls with their arguments as objects; one that does not gets them in a system message."""
    from llamascope.server.tools import parse_tools, render

    functions = parse_tools([WEATHER])
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
    }
    messages = [
        {"role": "user", "content": "Weather?", "tool_calls": None, "tool_call_id": None},
        {"role": "assistant", "content": "", "tool_calls": [call], "tool_call_id": None},
        {"role": "tool", "content": "sunny", "tool_calls": None, "tool_call_id": "call_1"},
    ]
    native, extra = render(messages, functions, "{% for tool in tools %}{{ tool | tojson }}{% endfor %}")
    assert extra == {"tools": [functions[0].to_json()]}
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "days": 1}
    assert native[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    generic, extra = render(messages, functions, CHATML)
    assert extra == {} and generic[0]["role"] == "system" and '"name": "get_weather"' in generic[0]["content"]
    assert "<tool_call>" in generic[2]["content"] and generic[3] == {
        "role": "user",
        "content": "<tool_response>\nsunny\n</tool_response>",
    }
