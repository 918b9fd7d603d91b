"""openmp.py on the process's own OpenMP runtime: a thread's workers end when it releases its pool,
and a serial thread runs PyTorch's parallel operations without starting any (observed as the
process's OS threads in /proc)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from llamascope import Engine, openmp

pytestmark = pytest.mark.skipif(
    openmp.runtime() is None or torch.get_num_threads() < 2, reason="needs PyTorch's libgomp and two threads"
)


def _threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _in_a_thread(work) -> None:
    errors = []

    def run():
        try:
            work()
        except BaseException as e:  # (re-raised on the test's thread)
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def test_a_thread_that_releases_its_pool_ends_its_workers():
    big = torch.randn(1 << 20)

    def work():
        before = _threads()
        big.add(1.0)  # a parallel region: this thread's team starts its workers
        started = _threads() - before
        assert started  # (PyTorch runs this on every thread it has)
        assert openmp.release_pool()
        assert not (_threads() & started)
        big.add(1.0)  # a later region starts a new team
        assert _threads() - before

    _in_a_thread(work)


def test_a_serial_thread_starts_no_workers_and_leaves_other_threads_parallel():
    big = torch.randn(1 << 20)
    expected = big + 1.0

    def work():
        openmp.serial_thread()
        before = _threads()
        assert torch.equal(big + 1.0, expected) and big.sum().isfinite()
        assert _threads() == before
        assert torch.get_num_threads() == 1

    _in_a_thread(work)
    assert torch.get_num_threads() >= 2


def test_a_model_loaded_on_one_thread_leaves_no_workers_for_another_to_compete_with(tiny_model):
    """Engine.load ends its thread's OpenMP workers, so that a model loaded on one thread and run
    from another (a server, an application's worker thread) has one team."""
    loaded = {}

    def load():
        before = _threads()
        torch.randn(1 << 20).add(1.0)  # this thread's team, as the loader's products make one
        assert _threads() - before
        loaded["engine"] = Engine.load(tiny_model)
        assert _threads() == before

    _in_a_thread(load)
    assert loaded["engine"].generate("Hello", max_new_tokens=2) is not None
