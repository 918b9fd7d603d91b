"""Prefix caching: the keys and values of whole prompt pieces, kept for later prompts that begin alike.

A prompt reaches the model in pieces of PREFILL_PIECE positions cut at its multiples
(`prefill.prefill_spans`; a last piece of fewer than PREFILL_TAIL positions joins the one before, and
such a longer piece is not kept), and a piece's arithmetic depends only on its tokens and the cache before
it. So the keys and values of the whole pieces a prompt begins with are exactly those of any
other prompt that begins with the same tokens, up to the end of a whole piece: a later prompt
loads them and resumes at the first piece it does not share, and gets, to the bit, what it gets
alone.

A block is one whole piece of one prompt: per layer its keys and values [KVH, PIECE, D]. It is
found by a digest of all the tokens from the start of the prompt to its end (a chain: each
block's digest covers its parent's), and it keeps its own tokens, which a lookup compares too.
Blocks are kept up to `max_bytes`, the least recently used leaving first; a lookup touches the
blocks it uses deepest first, so that a prefix's first blocks (shared by the most prompts) are
the last to go. The last position of a prompt is always computed (its logits choose the first
token), so at most the whole pieces before it are taken from here.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..cache import KVCache
from ..prefill import PREFILL_PIECE, PREFILL_TAIL, prefill_spans


@dataclass
class Block:
    tokens: tuple[int, ...]  # its own PIECE tokens
    keys: list[torch.Tensor]  # per layer [KVH, PIECE, D]
    values: list[torch.Tensor]
    nbytes: int


def _chain(prompt: list[int], count: int, piece: int) -> list[bytes]:
    """Digests of the first `count` whole pieces of `prompt`, each covering all tokens before its end."""
    digests, parent = [], b""
    for k in range(count):
        tokens = array("q", prompt[k * piece : (k + 1) * piece]).tobytes()
        parent = hashlib.blake2b(parent + tokens, digest_size=16).digest()
        digests.append(parent)
    return digests


class PrefixCache:
    def __init__(self, max_bytes: int, piece: int = PREFILL_PIECE, tail: int = PREFILL_TAIL):
        self.max_bytes, self.piece, self.tail = max_bytes, piece, tail
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.queried = self.hit = 0  # prompt positions looked up, and found

    def _whole_pieces(self, prompt: list[int]) -> list[tuple[int, int]]:
        """The pieces `prefill_spans` cuts `prompt` into that end at a multiple of the piece size
        (all but a last one that runs past it): [(0, PIECE), (PIECE, 2 PIECE), ...]."""
        return [span for span in prefill_spans(0, len(prompt), self.piece, self.tail) if span[1] % self.piece == 0]

    def reusable(self, prompt: list[int]) -> int:
        """Whole pieces of `prompt` that may come from here: all those before its last position."""
        return sum(end < len(prompt) for _, end in self._whole_pieces(prompt)) if self.max_bytes > 0 else 0

    def load(self, prompt: list[int], cache: KVCache) -> int:
        """Copy the cached whole pieces `prompt` begins with into row 0 of an empty `cache`, which
        then holds them -> how many positions that is."""
        found: list[tuple[bytes, Block]] = []
        for k, digest in enumerate(_chain(prompt, self.reusable(prompt), self.piece)):
            block = self.blocks.get(digest)
            if block is None or block.tokens != tuple(prompt[k * self.piece : (k + 1) * self.piece]):
                break
            found.append((digest, block))
        for k, (_, block) in enumerate(found):
            columns = slice(k * self.piece, (k + 1) * self.piece)
            for layer, (keys, values) in enumerate(zip(block.keys, block.values)):
                cache.keys[layer][0, :, columns] = keys
                cache.values[layer][0, :, columns] = values
        self._touch([digest for digest, _ in found])
        positions = len(found) * self.piece
        cache.length = positions
        self.queried += len(prompt)
        self.hit += positions
        return positions

    def store(self, prompt: list[int], cache: KVCache, start: int) -> None:
        """Keep the whole pieces of `prompt` that `cache` computed from column `start` on (row 0)."""
        if self.max_bytes <= 0:
            return
        first = -(-start // self.piece)
        count = sum(end <= cache.length for _, end in self._whole_pieces(prompt))
        chain = _chain(prompt, count, self.piece)
        for k, digest in enumerate(chain):
            if k < first or digest in self.blocks:
                continue
            columns = slice(k * self.piece, (k + 1) * self.piece)
            keys = [layer[0, :, columns].clone() for layer in cache.keys]  # [KVH, PIECE, D] each
            values = [layer[0, :, columns].clone() for layer in cache.values]
            nbytes = sum(t.numel() * t.element_size() for t in keys + values)
            if nbytes > self.max_bytes:
                return
            self.blocks[digest] = Block(tuple(prompt[columns]), keys, values, nbytes)
            self.nbytes += nbytes
        self._touch(chain)
        self._evict()

    def _touch(self, chain: list[bytes]) -> None:
        """The blocks of one prompt become the most recently used, its first the most recent of all."""
        for digest in reversed(chain):
            if digest in self.blocks:
                self.blocks.move_to_end(digest)

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes:
            _, block = self.blocks.popitem(last=False)
            self.nbytes -= block.nbytes
