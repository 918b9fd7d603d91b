"""The decode step's thread count: the tuner's choices on made-up step times, and the rule that lets
it choose freely (any count gives the same numbers, on every weight format)."""

from __future__ import annotations

import pytest
import torch
from gguf_fixtures import write_tiny_llama

from llamascope.cache import KVCache, SlotKVCache
from llamascope.loading import load_model
from llamascope.thread_tuner import FIRST_PROBE, LONGEST_INTERVAL, PROBE_STEPS, ThreadTuner


def _run(tuner: ThreadTuner, most: int, seconds, steps: int, rows=lambda step: 1) -> list[int]:
    """`steps` steps where a step with n threads takes seconds(n, step); -> the counts used."""
    used = []
    for step in range(steps):
        n = tuner.threads(most)
        used.append(n)
        tuner.record(seconds(n, step), rows(step))
    return used


def test_all_threads_stay_where_they_are_fastest_and_probes_grow_rare():
    tuner = ThreadTuner()
    used = _run(tuner, 4, lambda n, step: 1.0 / n, 20_000)
    assert tuner.current == 4 and tuner.switches == 0
    assert used[:FIRST_PROBE] == [4] * FIRST_PROBE
    late = used[-5 * LONGEST_INTERVAL :]
    assert late.count(4) / len(late) > 0.99  # probes back off to one in LONGEST_INTERVAL steps
    assert set(used) == {4, 2, 1}  # every smaller count was tried


def test_fewer_threads_are_chosen_when_contention_makes_them_faster_and_all_again_when_it_ends():
    """Contended between steps 2,000 and 6,000: one thread is fastest there, all threads outside."""

    def seconds(n: int, step: int) -> float:
        contended = 2_000 <= step < 6_000
        return (0.004 if n == 1 else 0.010 * n) if contended else 0.010 / n

    tuner = ThreadTuner()
    used = _run(tuner, 2, seconds, 10_000)
    assert used[1_000:2_000].count(2) > 0.95 * 1_000
    assert used[2_300:5_900].count(1) > 0.95 * 3_600  # found within a few hundred steps
    assert used[-1_000:].count(2) > 0.95 * 1_000  # and left again once the contention ended


def test_a_changing_batch_size_starts_the_comparison_afresh():
    """Times of different row counts are not compared: with the rows changing every few steps no
    probe completes, so nothing switches even where the made-up times would favour it."""
    tuner = ThreadTuner()
    used = _run(tuner, 2, lambda n, step: 0.01 * n, 2_000, rows=lambda step: 1 + (step // (PROBE_STEPS + 1)) % 3)
    assert tuner.switches == 0 and used.count(2) == len(used) - used.count(1)
    assert tuner.current == 2


def test_a_new_thread_setting_starts_over():
    tuner = ThreadTuner()
    _run(tuner, 2, lambda n, step: 0.01 * n, 500)
    assert tuner.current == 1
    assert tuner.threads(8) == 8 and tuner.current == 8 and tuner.switches == 0


def _formats(tmp_path, model_factory):
    folder = model_factory("gqa")
    yield "float32", load_model(folder).model
    yield "bfloat16", load_model(folder, dtype="bfloat16").model
    yield "int8", load_model(folder, quant="int8").model
    yield "int4", load_model(folder, quant="int4").model
    yield "gguf blocks", load_model(write_tiny_llama(tmp_path / "tiny.gguf").path).model


@pytest.mark.parametrize("rows", [1, 3])
def test_the_decode_step_gives_the_same_numbers_with_any_thread_count(tmp_path, model_factory, rows):
    """Each output of the step's kernels is computed whole by one thread: 1, 2 and 3 threads give
    the same logits and cache to the bit, over a KVCache (one row) and the server's slots."""
    for name, model in _formats(tmp_path, model_factory):
        assert model.decode_step is not None, name
        results = []
        for threads in (1, 2, 3):
            model.decode_step.tuner.threads = lambda most, n=threads: n
            torch.manual_seed(0)
            prompt = torch.randint(3, 200, (1, 21))  # [1, 21]
            with torch.inference_mode():
                if rows == 1:
                    cache = KVCache.for_model(model, 1, 40)
                    model(prompt, torch.arange(21)[None], cache)
                    logits = [model(torch.tensor([[5 + i]]), torch.tensor([[21 + i]]), cache) for i in range(3)]
                    keys = cache.keys
                else:
                    slots = SlotKVCache.for_model(model, rows, 40)
                    for r in range(rows):
                        one = KVCache.for_model(model, 1, 21)
                        model(prompt[:, : 21 - 4 * r], torch.arange(21 - 4 * r)[None], one)
                        slots.load(slots.allocate(), one)
                    logits = []
                    for i in range(3):
                        batch = slots.batch(list(range(rows)), 1)
                        tokens = torch.tensor([[5 + i + r] for r in range(rows)])
                        logits.append(model(tokens, batch.positions(1), batch, batch.mask(1)))
                    keys = slots.keys
            results.append((torch.cat(logits), [k.clone() for k in keys]))
        del model.decode_step.tuner.threads
        for logits, keys in results[1:]:
            assert torch.equal(logits, results[0][0]), name
            assert all(torch.equal(a, b) for a, b in zip(keys, results[0][1])), name
