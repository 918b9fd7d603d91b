"""The prefix cache's bookkeeping on a small cache (pieces of 4 positions): what it finds, what it
keeps, its bound, least-recently-used eviction, and that a block is found only by the tokens that
made it. (Exactness of the served tokens is in test_batch_invariance.py.)"""

from __future__ import annotations

import torch

from llamascope.cache import KVCache
from llamascope.prefill import prefill_spans
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


def _store(prefix_cache: PrefixCache, prompt: list[int], start: int = 0) -> None:
    """What the server stores after prefilling `prompt` from column `start` on."""
    spans = prefill_spans(start, len(prompt), prefix_cache.piece, prefix_cache.tail)
    prefix_cache.store(prompt, _computed(prompt), spans)


def _load(prefix_cache: PrefixCache, prompt: list[int]) -> tuple[int, KVCache]:
    cache = KVCache(LAYERS, 1, 1, 2, len(prompt), torch.float32)
    return prefix_cache.load(prompt, cache), cache


def test_whole_pieces_before_the_last_position_are_found_with_their_keys_and_values():
    prefix_cache = PrefixCache(100 * _block_bytes(), piece=PIECE, block=PIECE, tail=1)
    first = list(range(10, 21))  # 11 positions: two whole pieces, then 3
    _store(prefix_cache, first, start=0)
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
    prefix_cache = PrefixCache(100 * _block_bytes(), piece=PIECE, block=PIECE, tail=1)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    _store(prefix_cache, prompt, start=0)
    assert _load(prefix_cache, [0, 2, 3, 4, 5, 6, 7, 8, 9])[0] == 0


def test_it_keeps_to_its_bound_and_evicts_the_least_recently_used_deepest_first():
    prefix_cache = PrefixCache(3 * _block_bytes(), piece=PIECE, block=PIECE, tail=1)
    a = [1] * 8 + [0]  # two pieces
    b = [2] * 8 + [0]
    _store(prefix_cache, a, start=0)
    _store(prefix_cache, b, start=0)  # four blocks for three: a's deeper piece goes
    assert prefix_cache.nbytes <= prefix_cache.max_bytes and len(prefix_cache.blocks) == 3
    assert _load(prefix_cache, a)[0] == 4  # a's first piece is left (and now the most recent)
    assert _load(prefix_cache, b)[0] == 8
    c = [3] * 4 + [0]
    _store(prefix_cache, c, start=0)  # one more: a's piece, used before b's, goes
    assert _load(prefix_cache, c)[0] == 4 and _load(prefix_cache, b)[0] == 8 and _load(prefix_cache, a)[0] == 0


def test_pieces_loaded_from_it_are_not_stored_again_and_zero_bytes_turn_it_off():
    prefix_cache = PrefixCache(100 * _block_bytes(), piece=PIECE, block=PIECE, tail=1)
    prompt = list(range(1, 14))
    _store(prefix_cache, prompt, start=0)
    before = dict(prefix_cache.blocks)
    _store(prefix_cache, prompt, start=8)
    assert prefix_cache.blocks == before
    off = PrefixCache(0, piece=PIECE, block=PIECE, tail=1)
    _store(off, prompt, start=0)
    assert off.blocks == {} and _load(off, prompt)[0] == 0


def test_a_piece_that_ran_on_past_a_multiple_is_not_kept_nor_split_by_a_lookup():
    """With a tail of 3: a 10-position prompt is cut [0, 4) [4, 10) (two positions after 8 are too
    few), so only [0, 4) is kept, and a lookup of a 10-position prompt takes only that piece, as
    its own prefill would cut it."""
    prefix_cache = PrefixCache(100 * _block_bytes(), piece=PIECE, block=PIECE, tail=3)
    prompt = list(range(1, 11))
    _store(prefix_cache, prompt, start=0)
    assert [len(b.tokens) for b in prefix_cache.blocks.values()] == [4]
    longer = list(range(1, 14))  # cut [0, 4) [4, 8) [8, 13)
    _store(prefix_cache, longer, start=0)
    assert _load(prefix_cache, prompt)[0] == 4 and _load(prefix_cache, longer)[0] == 8


def test_with_resume_rows_a_prompt_resumes_mid_piece_after_a_long_enough_first_piece():
    """Pieces of 8, blocks of 2, rows found the same from 3 on: a 20-position prompt is cut [0, 8)
    [8, 16) [16, 20) and all its whole blocks are kept; a prompt sharing 13 positions resumes at 12
    (its first piece [12, 16) has 4 rows), one sharing 15 of 16 also at 12 ([14, 16) would have 2),
    and without resume_rows both resume at the cut at 8."""
    prefix_cache = PrefixCache(100 * _block_bytes(), piece=8, block=2, tail=1, resume_rows=3)
    a = list(range(30, 50))
    _store(prefix_cache, a)
    assert len(prefix_cache.blocks) == 10
    b, c = a[:13] + [99, 98, 97, 96], a[:15] + [99]
    found, cache = _load(prefix_cache, b)
    assert found == 12 and cache.keys[1][0, 0, :12, 0].tolist() == [t + 1 for t in a[:12]]
    assert _load(prefix_cache, c)[0] == 12
    whole = PrefixCache(100 * _block_bytes(), piece=8, block=2, tail=1)
    _store(whole, a)
    assert len(whole.blocks) == 8  # [16, 20) is not a whole piece
    assert _load(whole, b)[0] == 8 and _load(whole, c)[0] == 8


def test_blocks_of_a_piece_shorter_than_resume_rows_are_not_kept():
    """A 10-position prompt is cut [0, 8) [8, 10): the 2 rows of the last piece may have other bits
    than in a longer call, so its block is not kept; a prompt resumed after a cached beginning
    keeps the blocks of its own first piece when that is long enough."""
    prefix_cache = PrefixCache(100 * _block_bytes(), piece=8, block=2, tail=1, resume_rows=3)
    _store(prefix_cache, list(range(1, 11)))
    assert sorted(len(b.tokens) for b in prefix_cache.blocks.values()) == [2] * 4
    longer = list(range(1, 16))  # resumes at 8 (a cut), computes [8, 15): blocks [8, 14) kept
    assert _load(prefix_cache, longer)[0] == 8
    _store(prefix_cache, longer, start=8)
    # a 16-position prompt sharing all 14: [14, 16) would be 2 rows, so it resumes at 12
    assert len(prefix_cache.blocks) == 7 and _load(prefix_cache, longer + [0])[0] == 12
