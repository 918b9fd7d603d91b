"""The server's Prometheus metrics, served as text at `GET /metrics` (prometheus-client).

One registry per app. The HTTP layer counts responses by status; the scheduler reports each
request's end, its first token, the gaps between a sequence's tokens and each prompt's prefix
cache look-up; queue depth, running
sequences and KV-cache use are read from the scheduler when scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a few milliseconds (a decode step) to minutes (a long queue).
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """The metrics of one server: counters and histograms the server feeds, gauges it reads."""

    def __init__(self, stats):
        """`stats()`: the scheduler's counts now (Scheduler.stats), read at each scrape."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.responses = Counter("llamascope_http_responses", "HTTP responses by status code", ["status"], registry=r)
        self.requests = Counter("llamascope_requests", "generation requests ended, by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("llamascope_prompt_tokens", "prompt tokens of ended requests", registry=r)
        self.completion_tokens = Counter("llamascope_completion_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "llamascope_time_to_first_token_seconds",
            "from a request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "llamascope_inter_token_latency_seconds",
            "between two tokens of one sequence",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prefix_cache_queries = Counter(
            "llamascope_prefix_cache_queries", "prompt positions looked up in the prefix cache", registry=r
        )
        self.prefix_cache_hits = Counter(
            "llamascope_prefix_cache_hits", "prompt positions the prefix cache held (not computed)", registry=r
        )
        for name, key, text in (
            ("llamascope_queue_sequences", "waiting", "sequences waiting for a slot"),
            ("llamascope_running_sequences", "active", "sequences admitted and not finished"),
            ("llamascope_kv_cache_bytes", "kv_bytes", "bytes the KV cache holds"),
            ("llamascope_kv_cache_budget_bytes", "kv_budget_bytes", "bytes the KV cache may take"),
            ("llamascope_prefix_cache_bytes", "prefix_cache_bytes", "bytes the prefix cache holds"),
        ):
            Gauge(name, text, registry=r).set_function(lambda key=key: stats()[key])

    def request_ended(self, outcome: str, prompt_tokens: int) -> None:
        self.requests.labels(outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)

    def prefix_cache(self, queried: int, hit: int) -> None:
        self.prefix_cache_queries.inc(queried)
        self.prefix_cache_hits.inc(hit)

    def tokens(self, count: int) -> None:
        self.completion_tokens.inc(count)

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)

    def response(self, status: int) -> None:
        self.responses.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
