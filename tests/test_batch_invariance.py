"""Batch invariance of the server's scheduler, as a property: a request at temperature 0, or sampled
with a seed, gets exactly the tokens it gets alone (`generate` on its prompt), whatever else runs
beside it: any mix of prompt lengths, arriving together or one after another, more sequences than
slots, n > 1; on float32, bfloat16 and GGUF block weights."""

from __future__ import annotations

import asyncio

import pytest
from gguf_fixtures import write_tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamascope import Engine
from llamascope.generation import generate
from llamascope.server.scheduler import Delta, Done, Request, Scheduler, SequenceSpec

VOCAB = 250  # token ids drawn below this (both test models' vocabularies are larger)
EXAMPLES = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# (prompt ids, new tokens, seed: None for greedy, n choices)
one_request = st.tuples(
    st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=48),
    st.integers(1, 10),
    st.one_of(st.none(), st.integers(0, 2**16)),
    st.integers(1, 2),
)
requests = st.lists(one_request, min_size=1, max_size=7)


@pytest.fixture(scope="module", params=["default-model", "float32", "bfloat16", "gguf-blocks"])
def served(request, model_factory, tmp_path_factory):
    """(engine, running scheduler): few slots, so that sequences queue and slots are reused; the
    float32 one has more slots than the decode step takes rows at once. The default model (a real
    one: close candidates, where any numeric difference shows) runs its Q4_1 GGUF as shipped."""
    if request.param == "default-model":
        engine = Engine.load()
    elif request.param == "gguf-blocks":  # Q8_0 / Q4_0 / Q4_1 / K-quant matrices
        engine = Engine.load(write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf").path)
    else:
        engine = Engine.load(model_factory("invariance", max_position_embeddings=512), dtype=request.param)
    max_batch = 10 if request.param == "float32" else 4
    scheduler = Scheduler(engine.model, engine.tokenizer, max_batch=max_batch, max_queue=64, slot_capacity=128)
    scheduler.start()
    yield engine, scheduler
    assert scheduler.stop() and scheduler.error is None


def _config(engine, new_tokens: int, seed: int | None):
    sampling = {} if seed is None else dict(do_sample=True, seed=seed, temperature=0.8, top_k=20)
    return engine.local_generation_config(max_new_tokens=new_tokens, **({"do_sample": False} | sampling))


def _alone(engine, prompt: list[int], new_tokens: int, seed: int | None) -> list[tuple[int, float]]:
    """(token, its log-probability) of each new token, the prompt generated alone."""
    config = _config(engine, new_tokens, seed)
    config.output_logprobs = 1
    result = generate(engine.model, prompt, config, tokenizer=engine.tokenizer)
    return [(entry["id"], entry["logprob"]) for entry in result.logprobs[0]]


async def _serve(scheduler: Scheduler, specs: list[list[SequenceSpec]], staggered: bool) -> list[list[list]]:
    """Each request's (token, log-probability) pairs per choice; staggered: each request is sent
    once the one before has its first token, else all at once."""
    loop = asyncio.get_running_loop()
    out: list[list[list]] = [[[] for _ in choices] for choices in specs]
    sent = []
    for i, choices in enumerate(specs):
        sent.append(Request(f"r{i}", choices, loop))
        scheduler.submit(sent[-1])
        if staggered:
            first = await asyncio.wait_for(sent[-1].events.get(), 60)
            assert isinstance(first, Delta), first
            out[i][first.index] += _pairs(first)
    for i, request in enumerate(sent):
        while not isinstance(event := await asyncio.wait_for(request.events.get(), 60), Done):
            assert isinstance(event, Delta), event
            out[i][event.index] += _pairs(event)
    return out


def _pairs(delta: Delta) -> list[tuple[int, float]]:
    assert [entry["id"] for entry in delta.logprobs] == delta.token_ids
    return [(entry["id"], entry["logprob"]) for entry in delta.logprobs]


@EXAMPLES
@given(cases=requests, staggered=st.booleans())
def test_each_request_gets_its_tokens_alone(served, cases, staggered):
    engine, scheduler = served
    specs = []
    for prompt, new_tokens, seed, n in cases:
        spec = SequenceSpec(prompt, _config(engine, new_tokens, seed), logprobs=1)
        specs.append([spec] * (1 if seed is not None else n))
    got = asyncio.run(_serve(scheduler, specs, staggered))
    for (prompt, new_tokens, seed, _), choices in zip(cases, got):
        # the same tokens with the same log-probabilities to the last bit: the same numbers
        assert choices == [_alone(engine, prompt, new_tokens, seed)] * len(choices), (prompt, new_tokens, seed)
