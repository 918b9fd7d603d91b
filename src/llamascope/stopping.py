"""When a sequence stops, and why: the one implementation of the stopping rules.

`StopRules` decides for one sequence after each new token, in transformers' terms:

    "eos"     the new token is one of the eos ids
    "stop"    the new token completes a stop string (`StopStrings`)
    "length"  the sequence holds max_new_tokens new tokens
    "time"    max_time seconds have passed since the rules were made

Several may hold at once; the first in this order is the reason. The greedy / sampling loop
(generation.py, and so generate, stream, trace and bench), beam search (beam.py) and the server's
scheduler (server/scheduler.py) all stop by it. `StopText` is the server's view of the same
stop strings on the text it sends: OpenAI leaves a stop string and what follows it out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from .config import GenerationConfig
from .errors import LlamascopeError

REASONS = ("eos", "stop", "length", "time")  # in the order they are checked


class StopStrings:
    """Finds a stop string that ends in the newest token of a sequence, also when its characters
    come from several tokens. As in transformers, the match must take at least one character of
    the newest token (text seen before does not stop again), and the prompt's end counts."""

    def __init__(self, stop_strings: list[str], tokenizer):
        if tokenizer is None:
            raise LlamascopeError("stop_strings need the tokenizer: pass generate(..., tokenizer=...)")
        self.strings = list(stop_strings)
        self.tokenizer = tokenizer
        # A token holds at least one byte and a character at most four: this many tokens hold the
        # longest stop string with room to spare.
        self.window = 4 * max(len(s) for s in self.strings) + 4

    def match(self, ids: Sequence[int]) -> str | None:
        """The stop string that the last token of `ids` completes, or None."""
        tail = list(ids[-self.window :])
        if not tail:
            return None
        before = self.tokenizer.decode(tail[:-1], skip_special_tokens=False)
        after = self.tokenizer.decode(tail, skip_special_tokens=False)
        settled = len(os.path.commonprefix([before, after]))  # characters that were there before
        for text in self.strings:
            if text in after[max(0, settled - len(text) + 1) :]:
                return text
        return None


class StopRules:
    """The stopping rules of one generation (see the module's docstring).

    `max_new_tokens`: the new tokens a sequence may hold (the loop's max_length minus the padded
    prompt's columns; the server's max_tokens). The clock for max_time starts here.
    """

    def __init__(self, config: GenerationConfig, tokenizer, max_new_tokens: int):
        self.eos = frozenset(config.eos_token_id or [])
        self.strings = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
        self.max_new_tokens = max_new_tokens
        self.max_time = config.max_time
        self.start = time.perf_counter()

    @property
    def tail(self) -> int:
        """How many of a sequence's last tokens `reason` looks at."""
        return self.strings.window if self.strings is not None else 1

    def out_of_time(self) -> bool:
        """Whether max_time has passed (asked once per step, so that a step's rows agree)."""
        return self.max_time is not None and time.perf_counter() - self.start > self.max_time

    def reason(self, ids: Sequence[int], new_tokens: int, out_of_time: bool = False) -> str | None:
        """Why the sequence `ids` (its prompt, unpadded, then its new tokens; at least the last
        `tail` of them) stops at its newest token, or None when it goes on. `new_tokens`: how many
        new tokens it holds; `out_of_time`: this step's answer of `out_of_time()`."""
        if ids[-1] in self.eos:
            return "eos"
        if self.strings is not None and self.strings.match(ids) is not None:
            return "stop"
        if new_tokens >= self.max_new_tokens:
            return "length"
        return "time" if out_of_time else None


class StopText:
    """A stream's text as OpenAI sends it: a stop string and everything after it are left out,
    and text that may be the beginning of a stop string waits until a later token shows it is not
    (or the sequence ends). Whether the sequence stops is `StopRules`' decision, not this one's."""

    def __init__(self, stop_strings: list[str] | None):
        self.strings = list(stop_strings or [])
        self.held = ""

    def push(self, text: str, reason: str | None) -> str:
        """The text that may be sent now, given the newest token's `text` and why the sequence
        stops at it (None: it goes on)."""
        pending, self.held = self.held + text, ""
        if reason == "stop":  # a stop string that began in the prompt leaves nothing to send
            return pending[: min((i for i in map(pending.find, self.strings) if i >= 0), default=0)]
        if reason is not None:
            return pending
        keep = max(
            (
                k
                for s in self.strings
                for k in range(1, min(len(s) - 1, len(pending)) + 1)
                if s.startswith(pending[-k:])
            ),
            default=0,
        )  # the longest end that begins a stop string
        self.held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]
