"""How many threads the native decode step uses, chosen from how fast its steps go.

A decode step is a hundred-odd short parallel regions (a few per layer), each ending in a barrier.
On a quiet machine every core helps. When something else wants a core (another process, the
server's HTTP handling, its clients on the same machine), a thread of the step gets preempted and
every barrier waits for it: on two cores beside one busy process, two threads decoded the default
model at a fraction of one thread's speed. No setting is right for both, so the tuner measures:

    run with `current` threads (at first all of torch.get_num_threads()) and keep the last few
    step times; now and then run a few steps with another count (a probe), and switch when the
    probe's median beats the current median by PROBE_MARGIN. After a probe that loses, wait twice
    as long before the next (up to LONGEST_INTERVAL steps); after a switch, or when the current
    median grows by half (something started competing), probe again soon.

Steps are compared only at the same number of rows (a batch that changes size starts afresh).
Changing the count never changes a number: each output of the decode step's kernels (a product's
row, an attention head) is computed whole by one thread, so the tokens are the same with any
count (tests/test_decode_step.py checks it on every weight format).
"""

from __future__ import annotations

import logging
import statistics
from collections import deque

log = logging.getLogger("llamascope")

PROBE_STEPS = 6  # steps per probe, and the current count's steps it is compared with
FIRST_PROBE = 16  # steps before the first probe
FIRST_INTERVAL = 64  # steps between probes after a switch; doubles after each losing probe
LONGEST_INTERVAL = 1024
PROBE_MARGIN = 0.95  # a probe wins when its median is below this share of the current median
SLOWDOWN = 1.5  # the current median grew by this factor since the last decision: probe now


def _candidates(most: int) -> list[int]:
    """All threads, then halvings down to one: 8 -> [8, 4, 2, 1]."""
    counts, n = [], most
    while n >= 1:
        counts.append(n)
        n //= 2
    return counts if counts[-1] == 1 else counts + [1]


class ThreadTuner:
    def __init__(self):
        self._start(0)

    def _start(self, most: int) -> None:
        self.most = most  # the thread count asked for (torch.get_num_threads()); 0: not yet known
        self.current = most
        self.probing: int | None = None  # the count a probe is trying
        self.probe_times: list[float] = []
        self.recent: deque[float] = deque(maxlen=PROBE_STEPS)  # step seconds at `current`
        self.rows = 0
        self.countdown = FIRST_PROBE  # steps at `current` before the next probe
        self.interval = FIRST_INTERVAL
        self.baseline: float | None = None  # the current median when last decided
        self.next_candidate = 0
        self.switches = 0

    def threads(self, most: int) -> int:
        """The count for the next step, of at most `most` (the user's setting; a new one starts afresh)."""
        if most != self.most:
            self._start(most)
        return self.probing if self.probing is not None else self.current

    def record(self, seconds: float, rows: int) -> None:
        """The step just run with threads() threads took `seconds` for `rows` sequences."""
        if rows != self.rows:  # another batch size: earlier times say nothing about this one
            self.rows, self.probing = rows, None
            self.recent.clear()
            self.probe_times.clear()
            self.baseline = None
            return
        if self.probing is not None:
            self.probe_times.append(seconds)
            if len(self.probe_times) == PROBE_STEPS:
                self._decide()
            return
        self.recent.append(seconds)
        self.countdown -= 1
        if len(self.recent) < PROBE_STEPS or self.most < 2:
            return
        median = statistics.median(self.recent)
        if self.baseline is None:
            self.baseline = median
        elif median > SLOWDOWN * self.baseline:
            self.countdown = 0
        if self.countdown <= 0:
            self.probing, self.probe_times = self._alternative(), []

    def _alternative(self) -> int:
        others = [n for n in _candidates(self.most) if n != self.current]
        choice = others[self.next_candidate % len(others)]
        self.next_candidate += 1
        return choice

    def _decide(self) -> None:
        probe, current = statistics.median(self.probe_times), statistics.median(self.recent)
        log.debug(
            "decode step, %d rows: %.2f ms with %d threads, %.2f ms with %d",
            self.rows,
            1000 * current,
            self.current,
            1000 * probe,
            self.probing,
        )
        if probe < PROBE_MARGIN * current:
            self.current, self.interval = self.probing, FIRST_INTERVAL
            self.recent = deque(self.probe_times, maxlen=PROBE_STEPS)
            self.switches += 1
            self.baseline = probe
        else:
            self.interval = min(2 * self.interval, LONGEST_INTERVAL)
            self.baseline = current
        self.countdown, self.probing = self.interval, None
