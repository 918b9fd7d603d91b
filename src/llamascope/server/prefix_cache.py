"""Prefix caching: the keys and values of prompt beginnings, kept for later prompts that begin alike.

A prompt reaches the model in pieces (`prefill.prefill_spans`: cut at multiples of PREFILL_PIECE,
no last piece shorter than PREFILL_TAIL), and a row's arithmetic depends on its tokens, the cache
before it and the piece it is computed in. A later prompt that begins with the same tokens may take
those columns and resume after them, and must get, to the bit, what it gets alone:

- at a multiple of the piece size it always does: its own run cuts there too, and the pieces before
  are the same calls;
- at any other column its first piece is shorter than in its own run. Where the model's rows come
  out the same in any call of at least `resume_rows` rows (`prefill.resume_rows` measures it at
  start-up), it may resume at any block boundary whose first piece is that long, and the columns it
  takes must come from pieces at least that long too.

The cache holds blocks of `block` positions (a divisor of the piece size), each per layer its keys and
values [KVH, block, D], found by a digest of all the tokens from the start of the prompt to the
block's end (a chain: each block's digest covers its parent's); a block keeps its own tokens, which a
lookup compares too. Only blocks computed in pieces that a resume may rely on are kept. Blocks are
kept up to `max_bytes`, the least recently used leaving first; a lookup touches the blocks it uses
deepest first, so that a prefix's first blocks (shared by the most prompts) are the last to go. The
last position of a prompt is always computed (its logits choose the first token).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..cache import KVCache
from ..prefill import PREFILL_PIECE, PREFILL_TAIL, prefill_spans

PREFIX_BLOCK = 32  # positions a block: a prompt that resumes mid-piece does so to within this many


@dataclass
class Block:
    tokens: tuple[int, ...]  # its own `block` tokens
    keys: list[torch.Tensor]  # per layer [KVH, block, D]
    values: list[torch.Tensor]
    nbytes: int


def _chain(prompt: list[int], count: int, block: int) -> list[bytes]:
    """Digests of the first `count` blocks of `prompt`, each covering all tokens before its end."""
    digests, parent = [], b""
    for k in range(count):
        tokens = array("q", prompt[k * block : (k + 1) * block]).tobytes()
        parent = hashlib.blake2b(parent + tokens, digest_size=16).digest()
        digests.append(parent)
    return digests


class PrefixCache:
    def __init__(
        self,
        max_bytes: int,
        piece: int = PREFILL_PIECE,
        tail: int = PREFILL_TAIL,
        block: int = PREFIX_BLOCK,
        resume_rows: int | None = None,  # prefill.resume_rows of the model; None: whole pieces only
    ):
        if piece % block:
            raise ValueError(f"a prefix cache block ({block}) must divide the prefill piece ({piece})")
        self.max_bytes, self.piece, self.tail, self.block = max_bytes, piece, tail, block
        self.resume_rows = resume_rows
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.queried = self.hit = 0  # prompt positions looked up, and found

    def _trusted(self, start: int, stop: int) -> bool:
        """Whether the rows a piece [start, stop) computed are those of any run of a prompt that
        begins alike and takes them from here: a whole piece at a multiple, or one long enough."""
        whole = start % self.piece == 0 and stop - start == self.piece
        return whole or (self.resume_rows is not None and stop - start >= self.resume_rows)

    def resume_at(self, length: int, shared: int) -> int:
        """Where a prompt of `length` positions whose first `shared` may come from here resumes: the
        last block boundary at or before them (and before its last position) that is a cut of its own
        run, or after which its first piece has at least `resume_rows` rows; else 0."""
        cuts = {start for start, _ in prefill_spans(0, length, self.piece, self.tail)}
        column = min(shared, length - 1) // self.block * self.block
        while column > 0 and column not in cuts:
            start, stop = prefill_spans(column, length, self.piece, self.tail)[0]
            if self.resume_rows is not None and stop - start >= self.resume_rows:
                break
            column -= self.block
        return column

    def load(self, prompt: list[int], cache: KVCache) -> int:
        """Copy the cached beginning of `prompt` into row 0 of an empty `cache`, which then holds it
        -> how many positions that is."""
        self.queried += len(prompt)
        if self.max_bytes <= 0 or len(prompt) < 2:
            return 0
        found: list[tuple[bytes, Block]] = []
        for k, digest in enumerate(_chain(prompt, (len(prompt) - 1) // self.block, self.block)):
            block = self.blocks.get(digest)
            if block is None or block.tokens != tuple(prompt[k * self.block : (k + 1) * self.block]):
                break
            found.append((digest, block))
        positions = self.resume_at(len(prompt), len(found) * self.block)
        found = found[: positions // self.block]
        if found:
            for layer in range(len(cache.keys)):
                cache.keys[layer][0, :, :positions] = torch.cat([block.keys[layer] for _, block in found], dim=1)
                cache.values[layer][0, :, :positions] = torch.cat([block.values[layer] for _, block in found], dim=1)
        self._touch([digest for digest, _ in found])
        cache.length = positions
        self.hit += positions
        return positions

    def store(self, prompt: list[int], cache: KVCache, spans: list[tuple[int, int]]) -> None:
        """Keep the blocks of `prompt` that `cache` (row 0) computed in the pieces `spans` and that
        lie wholly inside a trusted one."""
        if self.max_bytes <= 0:
            return
        chain = _chain(prompt, min(len(prompt), cache.length) // self.block, self.block)
        for start, stop in spans:
            if not self._trusted(start, stop):
                continue
            for k in range(-(-start // self.block), min(stop // self.block, len(chain))):
                if chain[k] not in self.blocks and not self._keep(chain[k], prompt, cache, k):
                    return
        self._touch(chain)
        self._evict()

    def _keep(self, digest: bytes, prompt: list[int], cache: KVCache, k: int) -> bool:
        """Block k of `prompt` from `cache` into the prefix cache -> False where one block is over the bound."""
        columns = slice(k * self.block, (k + 1) * self.block)
        keys = [layer[0, :, columns].clone() for layer in cache.keys]  # [KVH, block, D] each
        values = [layer[0, :, columns].clone() for layer in cache.values]
        nbytes = sum(t.numel() * t.element_size() for t in keys + values)
        if nbytes > self.max_bytes:
            return False
        self.blocks[digest] = Block(tuple(prompt[columns]), keys, values, nbytes)
        self.nbytes += nbytes
        return True

    def _touch(self, chain: list[bytes]) -> None:
        """The blocks of one prompt become the most recently used, its first the most recent of all."""
        for digest in reversed(chain):
            if digest in self.blocks:
                self.blocks.move_to_end(digest)

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes:
            _, block = self.blocks.popitem(last=False)
            self.nbytes -= block.nbytes
