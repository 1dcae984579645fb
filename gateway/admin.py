"""The admin listener: /healthz (alive), /readyz (should get traffic), /metrics."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import store
from gateway.keys import CACHE, LISTENER, LIVE, POOL, TELEMETRY, USAGE

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def scrape_stats(gateway: web.Application) -> dict[str, Any]:
    """The numbers other objects already keep, for the metrics collector."""
    cache = gateway[CACHE]
    stats: dict[str, Any] = {
        f"cache_{name}": getattr(cache.stats, name)
        for name in ("hits", "misses", "negative_hits", "coalesced", "stale_hits")
    }
    stats["cache_entries"] = len(cache)
    usage = gateway[USAGE]
    stats["usage_pending"] = len(usage)
    stats["usage_dropped"] = usage.dropped
    pool = gateway.get(POOL)
    if pool is not None:
        idle = pool.get_idle_size()
        stats["pool_idle"] = idle
        stats["pool_in_use"] = pool.get_size() - idle
    listener = gateway.get(LISTENER)
    if listener is not None:
        stats["invalidations"] = listener.received
    return stats


def create_admin_app(gateway: web.Application) -> web.Application:
    admin = web.Application()
    gateway[TELEMETRY].watch(lambda: scrape_stats(gateway))

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        """Not ready while draining (SIGTERM). Otherwise ready when PostgreSQL answers, or
        while it does not but the cache is warm: cached identities keep being served, so
        leaving rotation would refuse more than it saves."""
        if gateway[LIVE].draining:
            return web.json_response({"status": "draining"}, status=503)
        cached = len(gateway[CACHE])
        try:
            async with gateway[POOL].acquire(timeout=2) as conn:
                await conn.fetchval("SELECT 1", timeout=2)
        except store.UNAVAILABLE_ERRORS as exc:
            body = {"database": type(exc).__name__, "cached_identities": cached}
            if cached:
                return web.json_response({"status": "degraded", **body})
            return web.json_response({"status": "unavailable", **body}, status=503)
        return web.json_response({"status": "ready", "database": "ok", "cached_identities": cached})

    async def metrics(request: web.Request) -> web.Response:
        body = gateway[TELEMETRY].exposition()
        return web.Response(body=body, headers={"Content-Type": PROMETHEUS_TEXT})

    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    admin.router.add_get("/metrics", metrics)
    return admin
