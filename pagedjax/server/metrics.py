"""Prometheus metrics of the server (GET /metrics), vLLM's set under a `pagedjax_` prefix.

Each app has its own registry, so several apps can live in one process (tests). Gauges of the
queues and the page pool are set by the engine loop after every step; latencies are observed on
the event loop as outputs arrive.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0)
_RATE_WINDOW_S = 10.0  # tokens/s is measured over this many seconds


class ServerMetrics:
    """The server's counters, gauges and histograms, in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "pagedjax_"
        self.running = Gauge(p + "num_requests_running", "Sequences in the running batch.", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Sequences waiting to run (preempted included).",
                             registry=r)
        self.pages_total = Gauge(p + "kv_pages_total", "Usable KV cache pages (the null page excluded).",
                                 registry=r)
        self.pages_free = Gauge(p + "kv_pages_free", "Free KV pages (evictable prefix-cache pages included).",
                                registry=r)
        self.pages_used = Gauge(p + "kv_pages_in_use", "KV pages held by requests.", registry=r)
        self.cache_usage = Gauge(p + "kv_cache_usage_ratio", "Fraction of KV pages in use (0 to 1).",
                                 registry=r)
        self.preemptions = Counter(p + "num_preemptions", "Preemptions (pages ran out).", registry=r)
        self.steps = Counter(p + "engine_steps", "Engine steps run.", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of requests that started.",
                                     registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated.", registry=r)
        self.tokens_per_second = Gauge(p + "generation_tokens_per_second",
                                       f"Tokens generated per second over the last {_RATE_WINDOW_S:.0f} s.",
                                       registry=r)
        self.tokens_per_second.set_function(self._rate)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between a request's successive tokens.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Time from arrival to the final output.",
                             buckets=_E2E_BUCKETS, registry=r)
        self.finished = Counter(p + "requests_finished", "Requests finished, by finish reason.",
                                ["finished_reason"], registry=r)
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self._last_preemptions = 0

    # -- engine loop ---------------------------------------------------------------------------

    def engine_stats(self, stats) -> None:
        """Queue and pool gauges from the scheduler's stats (after every step)."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.pages_total.set(stats.num_usable_pages)
        self.pages_free.set(stats.num_free_pages)
        self.pages_used.set(stats.num_usable_pages - stats.num_free_pages)
        self.cache_usage.set(stats.kv_cache_usage)
        if stats.num_preemptions > self._last_preemptions:
            self.preemptions.inc(stats.num_preemptions - self._last_preemptions)
            self._last_preemptions = stats.num_preemptions

    def engine_step(self, finished: list) -> None:
        """One step ran; `finished` are its final RequestOutputs (aborted requests' included)."""
        self.steps.inc()
        for out in finished:
            reason = next((c.finish_reason for c in out.outputs if c.finish_reason), "abort")
            self.finished.labels(finished_reason=reason).inc()

    # -- event loop ----------------------------------------------------------------------------

    def first_token(self, seconds: float, num_prompt_tokens: int) -> None:
        self.ttft.observe(seconds)
        self.prompt_tokens.inc(num_prompt_tokens)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def generated(self, num_tokens: int, now: float) -> None:
        self.generation_tokens.inc(num_tokens)
        with self._lock:
            self._window.append((now, num_tokens))

    def e2e_latency(self, seconds: float) -> None:
        self.e2e.observe(seconds)

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0][0] < now - _RATE_WINDOW_S:
                self._window.popleft()
            return sum(n for _, n in self._window) / _RATE_WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)
