"""The HTTP server's way out: on SIGTERM or Ctrl-C, drain before stopping."""

from __future__ import annotations

import uvicorn


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM or Ctrl-C stops taking connections and waits for the
    open ones; first the scheduler is told to drain (`Scheduler.drain`), so that running requests
    finish within the grace period or end with an error event, never cut mid-chunk. uvicorn waits
    for the connections a little longer than the grace period. A second Ctrl-C stops at once, as
    in uvicorn."""

    def __init__(self, config: uvicorn.Config, scheduler, grace_s: float):
        super().__init__(config)
        self.scheduler, self.grace_s = scheduler, grace_s

    @classmethod
    def for_app(cls, app, host: str, port: int, log_level: str, grace_s: float) -> DrainingServer:
        """Serving `app` (its state holds the scheduler)."""
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s + 5)
        return cls(config, app.state.scheduler, grace_s)

    def handle_exit(self, sig, frame) -> None:
        self.scheduler.drain(self.grace_s)
        super().handle_exit(sig, frame)
