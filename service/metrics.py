"""Prometheus metrics of one app: requests, queue depth, job seconds, slices/s, cache hits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    """One registry per app, so several apps (tests, workers) never share counters."""

    def __init__(self, queue_depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "radcache_http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=r,
        )
        self.queue = Gauge("radcache_queue_depth", "jobs waiting for the worker", registry=r)
        self.queue.set_function(lambda: float(queue_depth()))
        self.job_seconds = Histogram(
            "radcache_job_seconds",
            "wall time of finished jobs",
            registry=r,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
        )
        self.slices = Counter("radcache_slices", "slices handled", ["cache"], registry=r)
        self.series = Counter("radcache_series", "series handled", ["cache"], registry=r)
        self.rate = Gauge(
            "radcache_slices_per_second", "embedded slices per second of the last job", registry=r
        )

    def job(self, seconds: float, series: list[dict[str, Any]]) -> None:
        """Record a finished job's report."""
        self.job_seconds.observe(seconds)
        embedded = 0
        for s in series:
            self.series.labels(s["cache"]).inc()
            self.slices.labels(s["cache"]).inc(int(s["slices"]))
            embedded += int(s["slices"]) if s["cache"] == "miss" else 0
        if embedded and seconds > 0:
            self.rate.set(embedded / seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
