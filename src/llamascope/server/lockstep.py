"""Tensor-parallel serving: rank 0 serves HTTP and schedules, the other ranks repeat its model calls.

    torchrun --nproc-per-node 2 -m llamascope serve --tp 2 --model PATH --port 8000

Under tensor parallelism every forward pass contains collectives (all-reduces, an all-gather), so
every rank must run the same forward passes with the same shapes in the same order. Rank 0 alone
binds the port and runs the FastAPI app and the scheduler; its scheduler talks to the model
through a `LeaderRunner`, which sends each call (`ModelRunner.begin_prefill`, `prefill`, `place`,
`decode`, and the cache calls `drop`, `free`, `move`) to the other ranks before making
it itself. The other ranks run
`follow`: receive a message, make the same calls on their own shard and cache, repeat. Sampling,
detokenising and stop strings happen on rank 0 only; the followers' logits are dropped.

Messages. A message is a list of calls, each a name and arguments that are integers or (nested)
lists of integers (token ids, slot numbers, lengths), sent as int64 tensors with
`torch.distributed.broadcast`: a fixed-size first tensor (`HEADER` values) holds the length and,
for a decode step of up to about 35 sequences, the whole message; the rest of a longer one (a
prefill's prompt) follows in a second tensor. No pickle crosses the wire. Cache calls that need
no forward (`drop`, `free`, `move`) wait and travel with the next message. Each rank keeps its
own prefix cache of its own shard of keys and values; the same calls in the same order keep the
caches alike. A decode call carries rank 0's
lengths of its slots: a follower whose cache disagrees stops with an error instead of computing
something else.

Idle. A follower waits for the next message inside a broadcast, which the process group's timeout
(`--tp-timeout`, default 300 s) would end after that long without a request. So rank 0 sends an
empty message (a keepalive) whenever it has been idle for a quarter of the timeout: the scheduler's
idle wait wakes for it. A follower therefore hears from a live rank 0 at least every
timeout/4 seconds, and a rank 0 that has died or hangs is noticed within the timeout; rank 0
notices a follower that has died at its next keepalive or request.

Stopping. When the server shuts down (Ctrl-C, SIGTERM, or a failure) rank 0's scheduler sends
"stop"; the followers leave the loop and exit with status 0, and torchrun ends. torchrun passes a
SIGINT or SIGTERM it receives to every rank at once: a follower then keeps waiting for rank 0's
stop for up to `STOP_GRACE_S` seconds (a second signal ends it at once). Failures stop everyone:
a follower whose call fails exits with an error, so rank 0's next collective fails and it stops
serving (every open request gets an error); a rank 0 whose model call fails stops serving without
sending "stop" (the ranks may have parted ways in the middle of a forward), so the followers'
next collective fails and they exit with an error too. Either way no rank waits longer than the
timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import torch

from .. import openmp
from ..errors import LlamascopeError
from ..parallel import ParallelError, ParallelGroup, broadcast
from .draining import DrainingServer
from .scheduler import ModelRunner

log = logging.getLogger("llamascope")

HEADER = 256  # int64s in a message's first broadcast: its length, then up to HEADER - 1 values
STOP_GRACE_S = 20.0  # a signalled follower waits this long for rank 0's "stop"

# Call names, by their number on the wire.
CALLS = ("stop", "start", "begin_prefill", "prefill", "place", "drop", "decode", "free", "move", "restart", "verify")
_CODES = {name: code for code, name in enumerate(CALLS)}


# ---- messages ----------------------------------------------------------------------------------


def encode(calls: list[tuple]) -> list[int]:
    """[(name, arg, ...), ...] -> flat integers. Each value is written as (0, int) or
    (1, length, items...), so arguments may be integers or nested lists of them."""
    out: list[int] = []

    def put(value) -> None:
        if isinstance(value, (list, tuple)):
            out.extend((1, len(value)))
            for item in value:
                put(item)
        else:
            out.extend((0, int(value)))

    put([[_CODES[name], *args] for name, *args in calls])
    return out


def decode_message(values: list[int]) -> list[tuple]:
    """The inverse of `encode`."""
    position = 0

    def take():
        nonlocal position
        kind, value = values[position], values[position + 1]
        position += 2
        if kind == 0:
            return value
        if kind != 1 or value < 0:
            raise ValueError(f"bad value tag {kind} at {position - 2}")
        return [take() for _ in range(value)]

    try:
        calls = take()
        if position != len(values):
            raise ValueError(f"{len(values) - position} values left over")
        return [(CALLS[call[0]], *call[1:]) for call in calls]
    except (IndexError, TypeError, ValueError) as e:
        raise LlamascopeError(f"tensor parallel server: a message from rank 0 is malformed ({e})") from None


def send(calls: list[tuple], group: ParallelGroup) -> None:
    """Rank 0: broadcast a message to the other ranks (see `receive`)."""
    values = encode(calls)
    head = torch.zeros(HEADER, dtype=torch.int64)
    head[0] = len(values)
    first = values[: HEADER - 1]
    head[1 : 1 + len(first)] = torch.tensor(first, dtype=torch.int64)
    broadcast(head.to(group.device), group, "broadcast of the server's next step")
    if len(values) > HEADER - 1:
        rest = torch.tensor(values[HEADER - 1 :], dtype=torch.int64, device=group.device)
        broadcast(rest, group, "broadcast of the server's next step")


def receive(group: ParallelGroup) -> list[tuple]:
    """Other ranks: wait for rank 0's next message."""
    head = torch.empty(HEADER, dtype=torch.int64, device=group.device)
    broadcast(head, group, "waiting for rank 0's next step")
    head = head.cpu()
    n = int(head[0])
    values = head[1 : 1 + min(n, HEADER - 1)].tolist()
    if n > HEADER - 1:
        rest = torch.empty(n - (HEADER - 1), dtype=torch.int64, device=group.device)
        broadcast(rest, group, "waiting for rank 0's next step")
        values += rest.cpu().tolist()
    return decode_message(values)


# ---- rank 0 --------------------------------------------------------------------------------------


class LeaderRunner(ModelRunner):
    """Rank 0's ModelRunner: sends each call to the other ranks, then makes it here."""

    lockstep = True

    def __init__(self, model, max_batch: int, slot_capacity: int, prefix_cache_bytes: int, group: ParallelGroup):
        super().__init__(model, max_batch, slot_capacity, prefix_cache_bytes, measure_resume=False)
        self.group = group
        self.max_batch, self.slot_capacity, self.prefix_cache_bytes = max_batch, slot_capacity, prefix_cache_bytes
        self.keepalive_s = group.timeout_s / 4
        self._pending: list[tuple] = []  # cache calls made here, sent with the next message
        self._last_sent = time.monotonic()

    def _send(self, *calls: tuple) -> None:
        message, self._pending = self._pending + list(calls), []
        send(message, self.group)
        self._last_sent = time.monotonic()

    def open(self) -> None:
        _use_device(self.group)
        self._send(("start", self.max_batch, self.slot_capacity, self.prefix_cache_bytes))

    def close(self, clean: bool = True) -> None:
        if not clean:
            return  # the ranks may be in different places: let their collectives fail instead
        try:
            self._send(("stop",))
        except ParallelError as e:  # the others are gone already (they got the signal first)
            log.debug("%s", e)

    def keepalive(self) -> None:
        if time.monotonic() - self._last_sent >= self.keepalive_s / 2:
            self._send()

    def begin_prefill(self, key: int, prompt: list[int]) -> int:
        self._send(("begin_prefill", key, prompt))
        return super().begin_prefill(key, prompt)

    def prefill(self, key: int, stages: int | None = None) -> torch.Tensor | None:
        self._send(("prefill", key, stages or 0))
        return super().prefill(key, stages)

    def place(self, key: int, copies: int) -> list[int]:
        self._send(("place", key, copies))
        return super().place(key, copies)

    def drop(self, key: int) -> None:
        super().drop(key)
        self._pending.append(("drop", key))

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        self._send(("decode", slots, tokens, [self.cache.lengths[s] for s in slots]))
        return super().decode(slots, tokens)

    def restart(self, slot: int, tokens: list[int]) -> torch.Tensor:
        self._send(("restart", slot, tokens))
        return super().restart(slot, tokens)

    def verify(self, slot: int, tokens: list[int], start: int) -> torch.Tensor:
        self._send(("verify", slot, tokens, start))
        return super().verify(slot, tokens, start)

    def free(self, slot: int) -> None:
        super().free(slot)
        self._pending.append(("free", slot))

    def move(self, source: int, target: int) -> None:
        super().move(source, target)
        self._pending.append(("move", source, target))


def leader_runner(group: ParallelGroup):
    """The Scheduler's `runner` factory for rank 0."""

    def make(model, max_batch: int, slot_capacity: int, prefix_cache_bytes: int) -> LeaderRunner:
        return LeaderRunner(model, max_batch, slot_capacity, prefix_cache_bytes, group)

    return make


def serve_leader(app, host: str, port: int, log_level: str) -> None:
    """Rank 0: run uvicorn until a signal or a failure, making sure the followers hear "stop".

    uvicorn turns SIGINT / SIGTERM into a graceful shutdown: the scheduler drains (running
    requests get the grace period), the app's lifespan stops it, which sends "stop", and uvicorn
    then raises the signal again: here that lands in a handler that only notes it, so the process
    ends normally after leaving the process group. A failed model call (scheduler.error) stops
    uvicorn and is raised once it has stopped.
    """
    scheduler = app.state.scheduler
    server = DrainingServer.for_app(app, host, port, log_level, app.state.settings.shutdown_grace_s)
    scheduler.on_fatal = lambda error: setattr(server, "should_exit", True)
    received: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: received.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    started = True
    try:
        try:
            server.run()
        except SystemExit:  # uvicorn could not start (it has said why)
            started = False
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        stopped = scheduler.stop()  # sends "stop" where uvicorn's shutdown did not (a forced exit)
    if scheduler.error is not None:
        raise scheduler.error
    if not stopped:
        raise LlamascopeError(
            "tensor parallel rank 0: the scheduler did not stop: a model call still waits for the other ranks"
        )
    if not started:
        raise LlamascopeError(f"cannot serve on {host}:{port} (see uvicorn's message above)")


# ---- the other ranks -----------------------------------------------------------------------------


class Follower:
    """A rank other than 0: its own ModelRunner, driven by rank 0's messages."""

    def __init__(self, model, group: ParallelGroup):
        self.model, self.group = model, group
        self.runner: ModelRunner | None = None  # made by rank 0's "start"

    def apply(self, calls: list[tuple]) -> bool:
        """Make one message's calls here; False once rank 0 has said "stop"."""
        where = f"tensor parallel {self.group.describe()}"
        for name, *args in calls:
            if name == "stop":
                return False
            if name == "start":
                self.runner = ModelRunner(self.model, *args, measure_resume=False)
                continue
            runner = self.runner
            if runner is None:
                raise LlamascopeError(f"{where}: rank 0 sent {name!r} before starting the server")
            if name == "decode":
                slots, tokens, lengths = args
                here = [runner.cache.lengths[s] if 0 <= s < runner.cache.num_slots else None for s in slots]
                if here != lengths:
                    raise LlamascopeError(
                        f"{where}: out of step with rank 0 (slots {slots} hold {here} "
                        f"positions here, {lengths} on rank 0)"
                    )
                args = [slots, tokens]
            try:
                _replay(runner, name, args)
            except LlamascopeError:
                raise
            except Exception as e:  # noqa: BLE001 - one line, not a torch traceback
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise LlamascopeError(
                    f"{where}: repeating rank 0's {name} failed ({type(e).__name__}: {reason})"
                ) from None
        return True


def _replay(runner: ModelRunner, name: str, args: list) -> None:
    """Make rank 0's call `name` (one of CALLS but "start" and "stop") on this rank's runner."""
    match name:
        case "begin_prefill":
            runner.begin_prefill(*args)
        case "prefill":
            runner.prefill(*args)  # (0 stages: the whole prompt)
        case "place":
            runner.place(*args)
        case "drop":
            runner.drop(*args)
        case "decode":
            runner.decode(*args)
        case "free":
            runner.free(*args)
        case "move":
            runner.move(*args)
        case "restart":
            runner.restart(*args)
        case "verify":
            runner.verify(*args)
        case _:
            raise LlamascopeError(f"rank 0 sent an unknown call {name!r}")


def _use_device(group: ParallelGroup) -> None:
    """On a GPU, make this thread's current device the rank's (it is per thread)."""
    if group.device.type == "cuda":
        torch.cuda.set_device(group.device)


def _follow_loop(model, group: ParallelGroup) -> None:
    _use_device(group)
    follower = Follower(model, group)
    with torch.inference_mode():
        while follower.apply(receive(group)):
            pass


def follow(model, group: ParallelGroup, grace_s: float = STOP_GRACE_S) -> None:
    """A rank other than 0: repeat rank 0's model calls until it sends "stop".

    The loop runs on a thread of its own, so that this (main) thread can take SIGINT / SIGTERM
    while the loop waits inside a collective: after a signal it waits up to `grace_s` seconds for
    rank 0's "stop"; a second signal, or no "stop" in time, ends the process at once.
    """
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            _follow_loop(model, group)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = e

    signals: list[tuple[int, float]] = []

    def on_signal(signum, frame) -> None:
        signals.append((signum, time.monotonic()))
        if len(signals) > 1:
            _exit_now(group, f"stopped by a second {signal.Signals(signum).name}", 128 + signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    openmp.release_pool()  # the loop's thread is the one that runs the model in parallel (openmp.py)
    openmp.serial_thread()
    thread = threading.Thread(target=run, name="llamascope-follower", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
            if signals and time.monotonic() - signals[0][1] > grace_s:
                name = signal.Signals(signals[0][0]).name
                _exit_now(
                    group, f"stopped by {name}: rank 0 did not end the server within {grace_s:g} s", 128 + signals[0][0]
                )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]


def _exit_now(group: ParallelGroup, why: str, status: int) -> None:
    """End the process while the loop's thread may still wait inside a collective (a normal exit
    would tear the process group down under it)."""
    print(f"llamascope: error: [rank {group.rank}/{group.world_size}] {why}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)
