"""Service metrics in the Prometheus text format.

The registry has counters of received, duplicate, scored, not scorable,
skipped and failed events, and a histogram of the latency from webhook
request to metadata written. The same latency is also a summary with
p50/p95/p99 over the last ``LATENCY_WINDOW`` finished events, so the
percentiles can be read without a Prometheus server.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import SummaryMetricFamily
from prometheus_client.samples import Sample

LATENCY_WINDOW = 10_000
QUANTILES = (0.5, 0.95, 0.99)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _LatencySummary:
    """A collector that reports quantiles of the recent latencies."""

    def __init__(self, window: deque, lock: threading.Lock) -> None:
        self._window = window
        self._lock = lock
        self._count = 0
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._window.append(seconds)
            self._count += 1
            self._sum += seconds

    def quantiles(self) -> dict[float, float]:
        with self._lock:
            values = np.array(self._window, dtype=np.float64)
        if values.size == 0:
            return {}
        return {quantile: float(np.quantile(values, quantile)) for quantile in QUANTILES}

    def collect(self):
        name = "kle_event_latency_recent_seconds"
        family = SummaryMetricFamily(
            name, f"Seconds from webhook request to metadata written, quantiles of the last {LATENCY_WINDOW} events",
            count_value=self._count, sum_value=self._sum,
        )
        for quantile, value in self.quantiles().items():
            family.samples.append(Sample(name, {"quantile": str(quantile)}, value, None, None))
        yield family


class ServiceMetrics:
    """The counters, gauges and latency figures of one service instance."""

    def __init__(self, queue_depth: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter("kle_events_received", "Webhook events accepted and stored", registry=self.registry)
        self.duplicates = Counter("kle_events_duplicate", "Webhook events whose label id was already stored",
                                  registry=self.registry)
        self.rejected = Counter("kle_requests_rejected", "Webhook requests rejected, by HTTP status",
                                ["status"], registry=self.registry)
        self.scored = Counter("kle_events_scored", "Labels scored, by verdict", ["verdict"], registry=self.registry)
        self.unscorable = Counter("kle_events_not_scorable", "Labels stored as not scorable", registry=self.registry)
        self.skipped = Counter("kle_events_skipped", "Events skipped because no model version exists",
                               registry=self.registry)
        self.failed = Counter("kle_events_failed", "Events that failed after all retries", registry=self.registry)
        self.retries = Counter("kle_kili_retries", "Retried Kili or network calls", registry=self.registry)
        self.batch_size = Histogram("kle_batch_size", "Events per processed batch", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.latency = Histogram("kle_event_latency_seconds", "Seconds from webhook request to metadata written",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.recent_latency = _LatencySummary(deque(maxlen=LATENCY_WINDOW), threading.Lock())
        self.registry.register(self.recent_latency)
        if queue_depth is not None:
            depth = Gauge("kle_queue_depth", "Events pending or being processed", registry=self.registry)
            depth.set_function(queue_depth)

    def observe_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)
        self.recent_latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
