"""Metrics (Prometheus, on the admin listener) and the JSON access log.

Labels never carry a token, user, company or request id: only route names, method classes,
status codes and outcome names, so every series is bounded by the configuration.

The hot path pays for one dict increment and two bucket searches (``RequestMetrics``, plain
Python, no lock: the event loop is the only writer) and, when on, one log line; the
Prometheus families are built from those numbers at scrape time, as are the cache, pool and
usage numbers. prometheus_client's own ``Counter``/``Histogram`` take a lock and do several
calls per observation, which cost more than the rest of the metrics work together.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

access_log = logging.getLogger("patgate.access")

METHOD_CLASSES = {"GET": "read", "HEAD": "read", "OPTIONS": "read"}
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class StatsCollector(Collector):
    """Numbers that already live elsewhere (cache stats, pool, usage buffer), read on scrape."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        stats = self.read()
        cache = CounterMetricFamily(
            "patgate_cache_events", "Identity cache lookups by outcome", labels=["kind"]
        )
        for kind in ("hits", "misses", "negative_hits", "coalesced", "stale_hits"):
            cache.add_metric([kind], stats.get(f"cache_{kind}", 0))
        yield cache
        yield GaugeMetricFamily(
            "patgate_cache_entries", "Identities cached", value=stats.get("cache_entries", 0)
        )
        pool = GaugeMetricFamily(
            "patgate_db_pool_connections", "Database pool connections", labels=["state"]
        )
        pool.add_metric(["in_use"], stats.get("pool_in_use", 0))
        pool.add_metric(["idle"], stats.get("pool_idle", 0))
        yield pool
        yield GaugeMetricFamily(
            "patgate_usage_buffer_entries",
            "last_used updates waiting to be written",
            value=stats.get("usage_pending", 0),
        )
        yield CounterMetricFamily(
            "patgate_usage_dropped",
            "last_used updates dropped because the buffer was full",
            value=stats.get("usage_dropped", 0),
        )
        yield CounterMetricFamily(
            "patgate_invalidations_received",
            "Cache invalidation notices received",
            value=stats.get("invalidations", 0),
        )


# The "le" labels, spelled as prometheus_client spells them.
_BOUNDS = tuple(floatToGoString(b) for b in (*LATENCY_BUCKETS, float("inf")))  # type: ignore[no-untyped-call]


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one: above every bound
        self.sum = 0.0


class RequestMetrics(Collector):
    """``patgate_requests``, ``patgate_auth``, ``patgate_gateway_seconds`` and
    ``patgate_upstream_seconds``:
    counted in plain dicts per request, turned into Prometheus families on scrape."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}  # by route, method class, status
        self.auth: dict[str, int] = {}
        self.gateway: dict[str, _Histogram] = {}
        self.upstream: dict[str, _Histogram] = {}

    def count(self, route: str, method: str, status: int) -> None:
        key = (route, METHOD_CLASSES.get(method, "write"), status)  # status labelled on scrape
        self.requests[key] = self.requests.get(key, 0) + 1

    @staticmethod
    def observe(histograms: dict[str, _Histogram], route: str, seconds: float) -> None:
        histogram = histograms.get(route)
        if histogram is None:
            histogram = histograms[route] = _Histogram()
        histogram.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: bound included
        histogram.sum += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "patgate_requests",
            "Requests by route, method class and status",
            labels=["route", "method", "status"],
        )
        for (route, method, status), value in list(self.requests.items()):
            requests.add_metric([route, method, str(status)], value)
        yield requests
        auth = CounterMetricFamily(
            "patgate_auth", "Authentication and authorization outcomes", labels=["outcome"]
        )
        for outcome, value in list(self.auth.items()):
            auth.add_metric([outcome], value)
        yield auth
        yield self._histogram(
            "patgate_gateway_seconds",
            "Time the gateway adds before forwarding (routing, authentication, authorization)",
            self.gateway,
        )
        yield self._histogram(
            "patgate_upstream_seconds",
            "Time spent forwarding: the upstream's answer, streamed back",
            self.upstream,
        )

    @staticmethod
    def _histogram(name: str, documentation: str, by_route: dict[str, _Histogram]) -> Metric:
        family = HistogramMetricFamily(name, documentation, labels=["route"])
        for route, histogram in list(by_route.items()):
            buckets: list[tuple[str, float]] = []
            total = 0
            for bound, count in zip(_BOUNDS, histogram.counts, strict=True):
                total += count
                buckets.append((bound, total))
            family.add_metric([route], buckets, sum_value=histogram.sum)
        return family


class Telemetry:
    def __init__(self, *, access_log_enabled: bool) -> None:
        self.registry = CollectorRegistry()
        self.access_log_enabled = access_log_enabled
        self.metrics = RequestMetrics()
        self.registry.register(self.metrics)
        self.upstream_errors = Counter(
            "patgate_upstream_errors", "Upstream failures by kind", ["kind"], registry=self.registry
        )
        self.reloads = Counter(
            "patgate_config_reloads", "Configuration reloads", ["result"], registry=self.registry
        )
        self._children: dict[tuple[str, ...], Any] = {}

    def watch(self, read: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(StatsCollector(read))

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def auth_outcome(self, outcome: str) -> None:
        auth = self.metrics.auth
        auth[outcome] = auth.get(outcome, 0) + 1

    def upstream_error(self, kind: str) -> None:
        self._child(self.upstream_errors, kind).inc()

    def reload(self, ok: bool) -> None:
        self._child(self.reloads, "ok" if ok else "failed").inc()

    def request(
        self,
        *,
        route: str,
        method: str,
        status: int,
        started: float,
        forwarded: float | None,
        ended: float,
        fields: Callable[[], dict[str, Any]],
    ) -> None:
        """One finished request: ``started``/``forwarded``/``ended`` are perf_counter()
        readings (``forwarded`` None when the gateway answered itself); ``fields`` builds
        the access-log line only when it is written."""
        metrics = self.metrics
        metrics.count(route, method, status)
        decided = forwarded if forwarded is not None else ended
        metrics.observe(metrics.gateway, route, decided - started)
        if forwarded is not None:
            metrics.observe(metrics.upstream, route, ended - forwarded)
        if self.access_log_enabled and access_log.isEnabledFor(logging.INFO):
            line = fields()
            line["status"] = status
            line["route"] = route
            line["duration_ms"] = round((ended - started) * 1000, 3)
            if forwarded is not None:
                line["upstream_ms"] = round((ended - forwarded) * 1000, 3)
            access_log.info("request", extra={"fields": line})

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))
