"""create_app(cfg): the gateway application — keys, cleanup contexts, sub-apps — and the
reload that swaps its routes, roles and header names while it runs.

The request path itself is ``gateway.handler``; the admin listener ``gateway.admin``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Collection

import asyncpg
from aiohttp import web

from gateway import logs, store, usage
from gateway.admin import create_admin_app
from gateway.assertion import AssertionSigner
from gateway.auth import Authenticator
from gateway.cache import IdentityCache
from gateway.config import Config
from gateway.handler import GATE, GatewayHandler
from gateway.keys import (
    AUTHENTICATOR,
    CACHE,
    CONFIG,
    DATABASE_URL,
    FORWARDER,
    LISTENER,
    LIVE,
    MANAGEMENT,
    POOL,
    SIGNER,
    TELEMETRY,
    UI,
    USAGE,
    Live,
    Runtime,
)
from gateway.lifecycle import TokenService
from gateway.listener import InvalidationListener, listening
from gateway.management.api import PREFIX as API_PREFIX
from gateway.management.api import ManagementApi
from gateway.management.sessions import SessionVerifier
from gateway.management.ui import StaticPage
from gateway.observability import Telemetry
from gateway.proxy import Forwarder, client_session
from gateway.tokens import TokenFormat
from gateway.upstream import UpstreamPool
from gateway.usage import UsageBuffer

__all__ = [
    "AUTHENTICATOR",
    "CACHE",
    "LISTENER",
    "LIVE",
    "POOL",
    "TELEMETRY",
    "USAGE",
    "create_admin_app",
    "create_app",
    "reload",
]

log = logging.getLogger("patgate")

# Keys a reload can change; any other difference needs a restart (and is logged as such).
RELOADABLE = frozenset({"routes", "roles", "identity_headers", "trusted_proxies", "logging"})


async def create_pool(url: str, cfg: Config) -> asyncpg.Pool:
    """The pool; when PostgreSQL is unreachable at start, a lazy one that connects on first
    use, so the gateway starts anyway (uncached tokens get 503 until the database is back)."""
    for min_size in (cfg.database.pool.min, 0):
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=cfg.database.pool.max,
                timeout=5,
                command_timeout=5,
            )
        except store.UNAVAILABLE_ERRORS as exc:
            log.warning("PostgreSQL is unreachable at start (%s); serving without it", exc)
            continue
        assert pool is not None
        return pool
    raise AssertionError("a pool with min_size=0 does not connect")


async def _database(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    pool = await create_pool(app[DATABASE_URL], cfg)
    app[POOL] = pool
    cache = app[CACHE]
    app[AUTHENTICATOR] = Authenticator(
        TokenFormat(cfg.tokens.prefix, cfg.tokens.pepper), cache, pool, cfg.roles
    )
    if MANAGEMENT in app:

        def forget(token_ids: Collection[str]) -> None:
            for token_id in token_ids:
                cache.drop_token(token_id)

        app[MANAGEMENT].bind(TokenService(cfg, pool, invalidate=forget), app[AUTHENTICATOR])
    app[LISTENER] = InvalidationListener(
        app[DATABASE_URL], drop_token=cache.drop_token, clear=cache.clear
    )
    try:
        async with (
            listening(app[LISTENER]),
            usage.flushing(app[USAGE], pool, cfg.usage.flush_interval),
        ):
            yield
    finally:
        await pool.close()


async def _upstreams(app: web.Application) -> AsyncIterator[None]:
    session = client_session()  # WebSockets
    pool = UpstreamPool()  # plain HTTP
    app[FORWARDER] = Forwarder(session, signer=app.get(SIGNER), pool=pool)
    yield
    await pool.close()
    await session.close()


def create_app(cfg: Config, database_url: str) -> web.Application:
    app = web.Application(handler_args={"max_field_size": 16384})
    app[CONFIG] = cfg
    app[LIVE] = Live(Runtime.of(cfg))
    app[DATABASE_URL] = database_url
    app[USAGE] = UsageBuffer()
    app[TELEMETRY] = Telemetry(access_log_enabled=cfg.logging.access_log)
    c = cfg.cache
    app[CACHE] = IdentityCache(
        ttl=c.ttl,
        negative_ttl=c.negative_ttl,
        max_entries=c.max_entries,
        negative_max_entries=c.negative_max_entries,
        stale_if_error=c.stale_if_error,
    )
    if cfg.identity_headers.assertion is not None:
        app[SIGNER] = AssertionSigner(cfg.identity_headers.assertion)
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_upstreams)
    if cfg.management.enabled:
        api = ManagementApi(cfg, SessionVerifier(cfg.management.sessions))
        app[MANAGEMENT] = api
        app[UI] = StaticPage()
        app.add_subapp(API_PREFIX, api.app())
    # [\s\S]: aiohttp matches the decoded path, and "." would stop at a decoded newline.
    gate = app[GATE] = GatewayHandler(app)
    app.on_startup.append(gate.bind)
    app.router.add_route("*", r"/{tail:[\s\S]*}", gate.handle)
    return app


def reload(app: web.Application, cfg: Config) -> list[str]:
    """Swap in a validated new config's routes, roles and header names, all at once.

    Everything is built first (a key file that no longer reads raises ``ConfigError`` and
    changes nothing); the swap itself has no await, so each request sees the old
    runtime or the new one, never a mix. Identities computed under the old roles are
    dropped. Returns the changed keys that only a restart applies (they are left as is).
    """
    live = app[LIVE]
    old = live.runtime.cfg
    runtime = Runtime.of(cfg)
    assertion = cfg.identity_headers.assertion  # its keys are read again: ConfigError here
    signer = AssertionSigner(assertion) if assertion is not None else None
    restart_only = sorted(
        name
        for name in type(cfg).__dataclass_fields__
        if name not in RELOADABLE and name != "source" and getattr(cfg, name) != getattr(old, name)
    )
    # -- the swap: no await from here on
    live.runtime = runtime
    if FORWARDER in app:
        app[FORWARDER].signer = signer
    app[GATE].signer = signer  # SIGNER keeps the one made at start, as CONFIG its config
    if AUTHENTICATOR in app:
        app[AUTHENTICATOR].roles = cfg.roles
    if MANAGEMENT in app:
        app[MANAGEMENT].reconfigure(cfg)
    app[CACHE].clear()
    app[TELEMETRY].access_log_enabled = cfg.logging.access_log
    logs.set_level(cfg.logging.level)
    return restart_only
