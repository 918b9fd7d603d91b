"""Batch invariance of the server's scheduler, as a property: a request at temperature 0, or sampled
with a seed, gets exactly the tokens it gets alone (`generate` on its prompt), whatever else runs
beside it: any mix of prompt lengths, arriving together or one after another, more sequences than
slots, n > 1, long prompts prefilled piece by piece between other sequences' steps, prompts that
begin alike taken partly from the prefix cache (small enough here that blocks are evicted); on
float32, bfloat16 and GGUF block weights. Below them, the rule that makes it hold: a prompt's
pieces give the same numbers in one call or piece by piece."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
import torch
from conftest import PHI3_LONGROPE
from gguf_fixtures import TinySpec, write_tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamascope import Engine
from llamascope.cache import KVCache
from llamascope.generation import generate
from llamascope.prefill import PREFILL_PIECE, PREFILL_TAIL, PrefillRun, prefill_spans, resume_rows
from llamascope.server.prefix_cache import PrefixCache
from llamascope.server.scheduler import Delta, Done, Request, Scheduler, SequenceSpec

VOCAB = 250  # token ids drawn below this (both test models' vocabularies are larger)
EXAMPLES = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# (prompt ids, new tokens, seed: None for greedy, n choices, prompt lookup: None or K). Some prompts
# come from a few ids, so that their n-grams repeat and prompt lookup drafts.
one_request = st.tuples(
    st.one_of(
        st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=48),
        st.lists(st.integers(3, 9), min_size=2, max_size=48),
    ),
    st.integers(1, 10),
    st.one_of(st.none(), st.integers(0, 2**16)),
    st.integers(1, 2),
    st.one_of(st.none(), st.integers(1, 6)),
)
requests = st.lists(one_request, min_size=1, max_size=7)
# Long prompts that begin alike: (how much of a shared beginning, own ending, new tokens, seed)
one_long_request = st.tuples(
    st.integers(0, 2 * PREFILL_PIECE + 100),
    st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=30),
    st.integers(1, 6),
    st.one_of(st.none(), st.integers(0, 2**16)),
)
PREFIX_CACHE_BYTES = 48 << 20  # a few of the default model's blocks (12 MB each): some are evicted


# A relative with every decoder option that changes attention: Qwen3's per-head norms, and a
# sliding window of 16 on its second layer, shorter than most prompts here.
QWEN3_WINDOW = dict(architecture="qwen3", head_dim=24, use_sliding_window=True, sliding_window=16, max_window_layers=1)


# PHI3_LONGROPE (conftest): short prompts cross its trained context of 16 while they decode (each such
# sequence is recomputed at that step, as generate() does), longer ones start past it.


@pytest.fixture(
    scope="module", params=["default-model", "float32", "bfloat16", "gguf-blocks", "qwen3-window", "phi3-longrope"]
)
def served(request, model_factory, tmp_path_factory):
    """(engine, running scheduler): few slots, so that sequences queue and slots are reused; the
    float32 one has more slots than the decode step takes rows at once. The default model (a real
    one: close candidates, where any numeric difference shows) runs its Q4_1 GGUF as shipped."""
    if request.param == "default-model":
        engine = Engine.load()
    elif request.param == "qwen3-window":
        engine = Engine.load(model_factory("invariance-qwen3", max_position_embeddings=1024, **QWEN3_WINDOW))
    elif request.param == "phi3-longrope":
        engine = Engine.load(model_factory("invariance-phi3", max_position_embeddings=1024, **PHI3_LONGROPE))
    elif request.param == "gguf-blocks":  # Q8_0 / Q4_0 / Q4_1 / K-quant matrices
        spec = TinySpec(context=1024)
        engine = Engine.load(write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", spec).path)
    else:
        engine = Engine.load(model_factory("invariance", max_position_embeddings=1024), dtype=request.param)
    max_batch = 10 if request.param == "float32" else 4
    scheduler = Scheduler(
        engine.model,
        engine.tokenizer,
        max_batch=max_batch,
        max_queue=64,
        slot_capacity=1024,
        prefix_cache_bytes=PREFIX_CACHE_BYTES,
    )
    scheduler.start()
    yield engine, scheduler
    assert scheduler.stop() and scheduler.error is None


def _config(engine, new_tokens: int, seed: int | None, lookup: int | None = None):
    sampling = {} if seed is None else dict(do_sample=True, seed=seed, temperature=0.8, top_k=20)
    if engine.config.rope_varies_with_length:  # (the server refuses prompt lookup there)
        lookup = None
    settings = {"do_sample": False, "prompt_lookup_num_tokens": lookup} | sampling
    return engine.local_generation_config(max_new_tokens=new_tokens, **settings)


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
    for prompt, new_tokens, seed, n, lookup in cases:  # (prompt lookup's drafts change no token)
        spec = SequenceSpec(prompt, _config(engine, new_tokens, seed, lookup), logprobs=1)
        specs.append([spec] * (1 if seed is not None else n))
    got = asyncio.run(_serve(scheduler, specs, staggered))
    for (prompt, new_tokens, seed, *_), choices in zip(cases, got):
        # the same tokens with the same log-probabilities to the last bit: the same numbers
        assert choices == [_alone(engine, prompt, new_tokens, seed)] * len(choices), (prompt, new_tokens, seed)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), cases=st.lists(one_long_request, min_size=2, max_size=4), staggered=st.booleans())
def test_long_prompts_that_begin_alike_get_their_tokens_alone(served, seed, cases, staggered):
    """Prompts of up to several hundred tokens sharing beginnings of any length: pieces run between
    the decode steps of the requests sent before (staggered), whole pieces come from the prefix
    cache; each request's tokens and log-probabilities are still those of its prompt alone."""
    engine, scheduler = served
    shared = [random.Random(seed).randrange(3, VOCAB) for _ in range(2 * PREFILL_PIECE + 100)]
    prompts = [shared[:length] + ending for length, ending, _, _ in cases]
    specs = [
        [SequenceSpec(prompt, _config(engine, new_tokens, sample_seed), logprobs=1)]
        for prompt, (_, _, new_tokens, sample_seed) in zip(prompts, cases)
    ]
    got = asyncio.run(_serve(scheduler, specs, staggered))
    for prompt, (_, _, new_tokens, sample_seed), choices in zip(prompts, cases, got):
        assert choices == [_alone(engine, prompt, new_tokens, sample_seed)], (len(prompt), new_tokens, sample_seed)


def test_prompt_lookup_drafts_are_checked_in_one_pass_and_change_no_token(served, monkeypatch):
    """A request with prompt_lookup_num_tokens beside two plain ones: its drafts (a prompt that
    repeats itself) go through the runner's verification pass, several positions at a time, and
    every request, greedy or seeded, gets its tokens alone."""
    engine, scheduler = served
    if engine.config.rope_varies_with_length:
        pytest.skip("prompt lookup is refused where RoPE depends on the sequence's length")
    fed = []
    verify = scheduler.runner.verify
    monkeypatch.setattr(
        scheduler.runner, "verify", lambda slot, tokens, start: fed.append(len(tokens)) or verify(slot, tokens, start)
    )
    loop = [5, 6, 7, 8, 9, 10, 11, 12] * 4
    cases = [(loop, 60, None, 5), (loop[3:], 16, 11, 3), (list(range(20, 40)), 12, None, None)]
    specs = [[SequenceSpec(p, _config(engine, n, seed, k), logprobs=1)] for p, n, seed, k in cases]
    got = asyncio.run(_serve(scheduler, specs, staggered=False))
    for (prompt, new_tokens, seed, _), choices in zip(cases, got):
        assert choices == [_alone(engine, prompt, new_tokens, seed)]
    assert max(fed) > 2  # drafts were checked


def test_a_shared_beginning_comes_from_the_prefix_cache(served):
    """The second of two prompts sharing 600 positions takes 576 of them from the prefix cache (18
    blocks of 32) where the model's rows were found the same in calls of 26 rows or more
    (`resume_rows`), 544 from 58, else the two whole pieces of 256 among them; either way it gets
    its tokens alone. Where RoPE depends on each prompt's length
    (longrope, dynamic) nothing is shared: the prefix cache is off."""
    engine, scheduler = served
    shared = [random.Random(7).randrange(3, VOCAB) for _ in range(600)]
    prefix_cache = scheduler.runner.prefix_cache
    for ending in ([5, 6, 7], [8, 9]):
        hits = prefix_cache.hit
        spec = SequenceSpec(shared + ending, _config(engine, 3, None), logprobs=1)
        got = asyncio.run(_serve(scheduler, [[spec]], staggered=False))
        assert got == [[_alone(engine, shared + ending, 3, None)]]
    if engine.config.rope_varies_with_length:
        assert prefix_cache.max_bytes == 0 and prefix_cache.hit - hits == 0
    else:
        # after 576 the rest (603 or 602 positions) is a first piece of 27 rows, after 544 of 59;
        # 512 is a cut of the prompt's own run
        rows = prefix_cache.resume_rows or 2 * PREFILL_PIECE
        assert prefix_cache.hit - hits == (576 if rows <= 26 else 544 if rows <= 58 else 2 * PREFILL_PIECE)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=st.integers(2, 2 * PREFILL_PIECE + 40), data=st.data())
def test_a_prompt_resumed_from_the_prefix_cache_gets_the_numbers_of_its_own_run(served, length, data):
    """The rule under prefix caching: a prompt that shares any beginning with an earlier one (which
    ran from a cached beginning of its own) and takes from the prefix cache what the cache allows,
    then prefills the rest, has the keys, values and last logits of its own run from position 0,
    to the bit."""
    engine, scheduler = served
    model, rows = engine.model, scheduler.runner.prefix_cache.resume_rows
    if scheduler.runner.prefix_cache.max_bytes == 0:
        pytest.skip("no prefix cache where RoPE depends on each prompt's length")
    draw = data.draw
    prompt = draw(st.lists(st.integers(3, VOCAB - 1), min_size=length, max_size=length))
    shared = draw(st.integers(0, length))
    earlier = prompt[:shared] + draw(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=300))
    first = earlier[: draw(st.integers(0, len(earlier) - 1))]  # a still earlier prompt, its beginning
    prefix_cache = PrefixCache(1 << 30, resume_rows=rows)
    with torch.inference_mode():
        for p in (first + [3], earlier):
            _prefill(model, p, prefix_cache)
        own_logits, own = _prefill(model, prompt, PrefixCache(0))
        logits, resumed = _prefill(model, prompt, prefix_cache)
    assert torch.equal(logits, own_logits)
    for layer in range(len(own.keys)):
        assert torch.equal(resumed.keys[layer], own.keys[layer])
        assert torch.equal(resumed.values[layer], own.values[layer])


def _prefill(model, prompt: list[int], prefix_cache: PrefixCache) -> tuple[torch.Tensor, KVCache]:
    """`prompt` prefilled as the server's runner does it: its cached beginning loaded, the rest run,
    its blocks stored -> (the last position's logits [1, 1, V], the cache)."""
    cache = KVCache.for_model(model, 1, len(prompt))
    cached = prefix_cache.load(prompt, cache)
    tokens = torch.tensor([prompt[cached:]])
    run = PrefillRun(model, tokens, torch.arange(cached, len(prompt))[None], cache)
    run.advance()
    prefix_cache.store(prompt, cache, run.spans)
    return run.logits, cache


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=st.integers(1, 3 * PREFILL_PIECE + 10), start=st.integers(0, 2 * PREFILL_PIECE), data=st.data())
def test_a_prompt_gives_the_same_numbers_in_one_call_piece_by_piece_or_in_stages(served, length, start, data):
    """The rule under the server's invariance: with `start` positions cached, the rest of a prompt
    in one call (layer by layer over its pieces) gives the logits and keys/values of calling the
    model piece by piece at the boundaries of `prefill_spans`, and of a `PrefillRun` advanced a few
    stages at a time with another sequence's decode steps in between (as the server spreads it), to
    the bit."""
    engine, _ = served
    model = engine.model
    tokens = torch.tensor(
        [data.draw(st.lists(st.integers(3, VOCAB - 1), min_size=start + length, max_size=start + length))]
    )
    positions = torch.arange(start + length)[None]
    steps = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=200))  # stages between decode steps
    caches, logits = [], []
    with torch.inference_mode():
        for way in ("one call", "pieces", "stages"):
            cache = KVCache.for_model(model, 1, start + length)
            if start:
                model(tokens[:, :start], positions[:, :start], cache)
            if way == "stages":
                out = _in_stages(model, tokens[:, start:], positions[:, start:], cache, steps)
            else:
                spans = prefill_spans(start, start + length) if way == "pieces" else [(start, start + length)]
                for a, b in spans:
                    out = model(tokens[:, a:b], positions[:, a:b], cache, last_only=True)
            caches.append(cache)
            logits.append(out)
    for other in (1, 2):
        assert torch.equal(logits[0], logits[other])
        assert caches[other].length == start + length
        for layer in range(len(caches[0].keys)):
            assert torch.equal(caches[0].keys[layer], caches[other].keys[layer])
            assert torch.equal(caches[0].values[layer], caches[other].values[layer])


def _in_stages(model, tokens, positions, cache, steps: list[int]) -> torch.Tensor:
    """A PrefillRun advanced by steps[0], steps[1], ... stages (the last repeated), another sequence
    decoding one token between -> its logits [1, 1, V]."""
    other = KVCache.for_model(model, 1, 64)
    model(torch.tensor([[5, 6, 7]]), torch.arange(3)[None], other)
    run = PrefillRun(model, tokens, positions, cache)
    for k in itertools.count():
        if run.advance(steps[min(k, len(steps) - 1)]):
            return run.logits
        if other.length < 64:
            model(torch.tensor([[k % 200 + 3]]), torch.tensor([[other.length]]), other)


@given(start=st.integers(0, 3 * PREFILL_PIECE), length=st.integers(1, 3 * PREFILL_PIECE))
def test_prompt_pieces_are_cut_at_multiples_and_never_end_in_a_short_tail(start, length):
    """The cut rule itself: contiguous pieces over [start, stop), inner cuts at multiples of the
    piece size, and a last piece (of several) of at least PREFILL_TAIL positions."""
    stop = start + length
    spans = prefill_spans(start, stop)
    assert spans[0][0] == start and spans[-1][1] == stop
    assert all(a < b for a, b in spans) and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    assert all(b % PREFILL_PIECE == 0 for _, b in spans[:-1])
    assert all(b - a <= PREFILL_PIECE for a, b in spans[:-1])
    assert len(spans) == 1 or spans[-1][1] - spans[-1][0] >= PREFILL_TAIL


def test_resume_rows_finds_products_whose_rows_depend_on_the_call(model_factory):
    """The measurement under prefix caching finds a product that gives a row other bits in a call of
    fewer rows (a matrix library's small-call kernel, imitated by nudging the first layer's down
    projection below 40 or 256 rows), and refuses PyTorch's attention outright (bfloat16)."""
    folder = model_factory("invariance", max_position_embeddings=1024)
    engine = Engine.load(folder)
    assert resume_rows(engine.model) is not None  # (float32, fused projections: the native attention)
    down = engine.model.model.layers[0].mlp.down_proj
    product = down.forward
    for below, expected in ((40, 48), (256, None)):
        down.forward = lambda x, below=below: product(x) * (1 + 2**-20 * (x.shape[-2] < below))
        assert resume_rows(engine.model) == expected
    assert resume_rows(Engine.load(folder, dtype="bfloat16").model) is None


def test_resume_rows_measures_every_kind_of_layer(model_factory):
    """A layer whose products take another path (here layer 1's down projection as PyTorch's own
    Linear, nudged below 40 rows) is measured too, not taken to be like layer 0."""
    engine = Engine.load(model_factory("invariance", max_position_embeddings=1024))
    layers = engine.model.model.layers
    assert len(layers) > 1 and resume_rows(engine.model) is not None
    mlp = layers[1].mlp
    plain = torch.nn.Linear(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=False)
    plain.weight = mlp.down_proj.weight
    product = plain.forward
    plain.forward = lambda x: product(x) * (1 + 2**-20 * (x.shape[-2] < 40))
    mlp.down_proj = plain
    assert resume_rows(engine.model) == 48
