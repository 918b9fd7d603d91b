"""The prefix cache's bookkeeping on a small cache (pieces of 4 positions): what it finds, what it
keeps, its bound, least-recently-used eviction, and that a block is found only by the tokens that
made it. (Exactness of the served tokens is in test_batch_invariance.py.)"""

from __future__ import annotations

import torch

from llamascope.cache import KVCache
from llamascope.server.prefix_cache import PrefixCache

PIECE, LAYERS = 4, 2


def _computed(prompt: list[int]) -> KVCache:
    """A cache holding `prompt` as if prefilled: each column's keys and values are its token id
    (so that a loaded column shows which token made it)."""
    cache = KVCache(LAYERS, 1, 1, 2, len(prompt), torch.float32)
    for layer in range(LAYERS):
        column = torch.tensor(prompt, dtype=torch.float32)[None, None, :, None].expand(1, 1, -1, 2)
        cache.keys[layer][:] = column + layer
        cache.values[layer][:] = -column
    cache.length = len(prompt)
    return cache


def _block_bytes() -> int:
    return 2 * LAYERS * PIECE * 2 * 4  # keys and values, layers, positions, head_dim, float32


def _load(prefix_cache: PrefixCache, prompt: list[int]) -> tuple[int, KVCache]:
    cache = KVCache(LAYERS, 1, 1, 2, len(prompt), torch.float32)
    return prefix_cache.load(prompt, cache), cache


def test_whole_pieces_before_the_last_position_are_found_with_their_keys_and_values():
    prefix_cache = PrefixCache(100 * _block_bytes(), piece=PIECE, tail=1)
    first = list(range(10, 21))  # 11 positions: two whole pieces, then 3
    prefix_cache.store(first, _computed(first), start=0)
    assert len(prefix_cache.blocks) == 2 and prefix_cache.nbytes == 2 * _block_bytes()
    found, cache = _load(prefix_cache, first[:9] + [99, 98])  # shares 9: both pieces
    assert found == 8 and cache.length == 8
    assert cache.keys[1][0, 0, :8, 0].tolist() == [t + 1 for t in first[:8]]
    assert cache.values[0][0, 0, :8, 1].tolist() == [-t for t in first[:8]]
    assert _load(prefix_cache, first[:8])[0] == 4  # the last position is computed: one piece
    assert _load(prefix_cache, first[:6] + [0, 0, 0])[0] == 4  # differs inside the second piece
    assert _load(prefix_cache, [0] + first[1:])[0] == 0  # differs in the first
    assert prefix_cache.queried == 11 + 8 + 9 + 11 and prefix_cache.hit == 8 + 4 + 4


def test_a_piece_is_found_only_after_the_same_beginning():
    """The same four tokens after another beginning are another block (their keys differ)."""
    prefix_cache = PrefixCache(100 * _block_bytes(), piece=PIECE, tail=1)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    prefix_cache.store(prompt, _computed(prompt), start=0)
    assert _load(prefix_cache, [0, 2, 3, 4, 5, 6, 7, 8, 9])[0] == 0


def test_it_keeps_to_its_bound_and_evicts_the_least_recently_used_deepest_first():
    prefix_cache = PrefixCache(3 * _block_bytes(), piece=PIECE, tail=1)
    a = [1] * 8 + [0]  # two pieces
    b = [2] * 8 + [0]
    prefix_cache.store(a, _computed(a), start=0)
    prefix_cache.store(b, _computed(b), start=0)  # four blocks for three: a's deeper piece goes
    assert prefix_cache.nbytes <= prefix_cache.max_bytes and len(prefix_cache.blocks) == 3
    assert _load(prefix_cache, a)[0] == 4  # a's first piece is left (and now the most recent)
    assert _load(prefix_cache, b)[0] == 8
    c = [3] * 4 + [0]
    prefix_cache.store(c, _computed(c), start=0)  # one more: a's piece, used before b's, goes
    assert _load(prefix_cache, c)[0] == 4 and _load(prefix_cache, b)[0] == 8 and _load(prefix_cache, a)[0] == 0


def test_pieces_loaded_from_it_are_not_stored_again_and_zero_bytes_turn_it_off():
    prefix_cache = PrefixCache(100 * _block_bytes(), piece=PIECE, tail=1)
    prompt = list(range(1, 14))
    prefix_cache.store(prompt, _computed(prompt), start=0)
    before = dict(prefix_cache.blocks)
    prefix_cache.store(prompt, _computed(prompt), start=8)
    assert prefix_cache.blocks == before
    off = PrefixCache(0, piece=PIECE, tail=1)
    off.store(prompt, _computed(prompt), start=0)
    assert off.blocks == {} and _load(off, prompt)[0] == 0


def test_a_piece_that_ran_on_past_a_multiple_is_not_kept_nor_split_by_a_lookup():
    """With a tail of 3: a 10-position prompt is cut [0, 4) [4, 10) (two positions after 8 are too
    few), so only [0, 4) is kept, and a lookup of a 10-position prompt takes only that piece, as
    its own prefill would cut it."""
    prefix_cache = PrefixCache(100 * _block_bytes(), piece=PIECE, tail=3)
    prompt = list(range(1, 11))
    prefix_cache.store(prompt, _computed(prompt), start=0)
    assert [len(b.tokens) for b in prefix_cache.blocks.values()] == [4]
    longer = list(range(1, 14))  # cut [0, 4) [4, 8) [8, 13)
    prefix_cache.store(longer, _computed(longer), start=0)
    assert _load(prefix_cache, prompt)[0] == 4 and _load(prefix_cache, longer)[0] == 8
