"""Metrics (Prometheus, on the admin listener) and the JSON access log.

Labels never carry a token, user, company or request id: only route names, method classes,
status codes and outcome names, so every series is bounded by the configuration.

The hot path pays for two histogram observations, one counter and (when on) one log line.
Labelled children are looked up once and kept; the cache, pool and usage numbers are read
by a collector at scrape time, not counted per request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

access_log = logging.getLogger("patgate.access")

METHOD_CLASSES = {"GET": "read", "HEAD": "read", "OPTIONS": "read"}
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def method_class(method: str) -> str:
    return METHOD_CLASSES.get(method, "write")


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


class Telemetry:
    def __init__(self, *, access_log_enabled: bool) -> None:
        self.registry = CollectorRegistry()
        self.access_log_enabled = access_log_enabled
        self.requests = Counter(
            "patgate_requests",
            "Requests by route, method class and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.gateway_seconds = Histogram(
            "patgate_gateway_seconds",
            "Time the gateway adds before forwarding (routing, authentication, authorization)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "patgate_upstream_seconds",
            "Time spent forwarding: the upstream's answer, streamed back",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.auth = Counter(
            "patgate_auth",
            "Authentication and authorization outcomes",
            ["outcome"],
            registry=self.registry,
        )
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
        self._child(self.auth, outcome).inc()

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
        self._child(self.requests, route, method_class(method), str(status)).inc()
        decided = forwarded if forwarded is not None else ended
        self._child(self.gateway_seconds, route).observe(decided - started)
        if forwarded is not None:
            self._child(self.upstream_seconds, route).observe(ended - forwarded)
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
