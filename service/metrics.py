"""Prometheus metrics of one app: requests, queue depth, job seconds, slices/s, cache hits,
and the embedding stages' seconds with the encoder's busy fraction."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["Metrics"]


class StageClock(Protocol):
    """What the pipeline's stage clock (``Pipeline.profile``) tells."""

    def seconds(self) -> dict[str, float]: ...
    def busy_fraction(self) -> float: ...
    @property
    def wall(self) -> float: ...


class _Stages(Collector):
    """The pipeline's stage clock, read at each scrape."""

    def __init__(self, clock: StageClock) -> None:
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        stage = CounterMetricFamily(
            "radcache_stage_seconds",
            "seconds spent in each embedding stage (decode, preprocess, forward, write) and "
            "waiting (wait_decode, wait_batch), by the pipeline of this process",
            labels=["stage"],
        )
        for name, seconds in self.clock.seconds().items():
            stage.add_metric([name], seconds)
        yield stage
        yield CounterMetricFamily(
            "radcache_embed_seconds", "wall time of embedding runs", value=self.clock.wall
        )
        yield GaugeMetricFamily(
            "radcache_encoder_busy_fraction",
            "fraction of embedding wall time the model forward was running",
            value=self.clock.busy_fraction(),
        )


class Metrics:
    """One registry per app, so several apps (tests, workers) never share counters.
    ``stages``: the pipeline's stage clock, exported as it stands at each scrape."""

    def __init__(self, queue_depth: Callable[[], int], *, stages: StageClock | None = None) -> None:
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
        if stages is not None:
            r.register(_Stages(stages))

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
