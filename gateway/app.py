"""create_app(cfg): the gateway application, and the admin application beside it.

The request path reads top to bottom in ``GatewayHandler.handle``:
canonical path → route → authenticate → authorize → forward.
Every gateway error becomes problem+json here, in one place.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Collection

import asyncpg
from aiohttp import web

from gateway import store, usage
from gateway.auth import Authenticator, Identity
from gateway.cache import IdentityCache
from gateway.config import Config
from gateway.errors import (
    AuthError,
    BadRequest,
    Forbidden,
    NotFound,
    PatgateError,
    problem_response,
)
from gateway.headers import HeaderPolicy, request_client_ip
from gateway.lifecycle import TokenService
from gateway.listener import InvalidationListener, listening
from gateway.management.api import PREFIX as API_PREFIX
from gateway.management.api import ManagementApi
from gateway.management.sessions import SessionVerifier
from gateway.paths import canonical_path
from gateway.policy import authorize
from gateway.proxy import Forwarder, client_session
from gateway.routing import RouteTable
from gateway.tokens import TokenFormat
from gateway.usage import UsageBuffer

log = logging.getLogger("patgate")

RESERVED_PREFIX = "/_patgate/"

CONFIG = web.AppKey("config", Config)
DATABASE_URL = web.AppKey("database_url", str)
POOL = web.AppKey("pool", asyncpg.Pool)
CACHE = web.AppKey("cache", IdentityCache[Identity, type[AuthError]])
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
FORWARDER = web.AppKey("forwarder", Forwarder)
ROUTES = web.AppKey("routes", RouteTable)
USAGE = web.AppKey("usage", UsageBuffer)
MANAGEMENT = web.AppKey("management", ManagementApi)
LISTENER = web.AppKey("listener", InvalidationListener)


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


class GatewayHandler:
    """The catch-all handler of the main listener."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        cfg = app[CONFIG]
        self.names = cfg.identity_headers
        self.header_policy = HeaderPolicy(cfg.identity_headers)
        self.trusted_proxies = cfg.trusted_proxies

    async def handle(self, request: web.Request) -> web.StreamResponse:
        app = self.app
        request_id = self.header_policy.request_id(request.headers) or secrets.token_hex(16)
        try:
            raw_path, _, query = request.raw_path.partition("?")
            path = canonical_path(raw_path)
            if path.startswith(RESERVED_PREFIX):
                raise NotFound()
            routes = app[ROUTES]
            route = routes.match(request.host, request.method, path)
            identity = None
            if not route.public:
                authorization = request.headers.getall("Authorization", [])
                if len(authorization) > 1:
                    raise BadRequest("only one Authorization header is allowed")
                identity = await app[AUTHENTICATOR].authenticate(
                    authorization[0] if authorization else None
                )
                app[USAGE].record(
                    identity.token_id,
                    request_client_ip(request.remote, request.headers, self.trusted_proxies),
                )
                if not authorize(identity.permissions, route.require, route.require_any):
                    raise Forbidden("the token lacks a permission this route requires")
            url = routes.upstream_url(route, path, query)
            return await app[FORWARDER].forward(request, route, url, identity, request_id)
        except AuthError as error:
            log.info(
                "token refused",
                extra={"fields": {"reason": error.reason, "request_id": request_id}},
            )
            return problem_response(error, request_id, self.names.request_id)
        except PatgateError as error:
            return problem_response(error, request_id, self.names.request_id)
        except Exception:  # a bug: still problem+json, and logged with its request id
            log.exception("gateway error", extra={"fields": {"request_id": request_id}})
            return problem_response(PatgateError(), request_id, self.names.request_id)


async def _database(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    pool = await create_pool(app[DATABASE_URL], cfg)
    app[POOL] = pool
    app[AUTHENTICATOR] = Authenticator(
        TokenFormat(cfg.tokens.prefix, cfg.tokens.pepper), app[CACHE], pool, cfg.roles
    )
    if MANAGEMENT in app:

        def forget(token_ids: Collection[str]) -> None:
            for token_id in token_ids:
                cache.drop_token(token_id)

        app[MANAGEMENT].bind(TokenService(cfg, pool, invalidate=forget), app[AUTHENTICATOR])
    cache = app[CACHE]
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
    session = client_session()
    cfg = app[CONFIG]
    app[FORWARDER] = Forwarder(session, cfg.identity_headers, cfg.trusted_proxies)
    yield
    await session.close()


def create_app(cfg: Config, database_url: str) -> web.Application:
    app = web.Application(handler_args={"max_field_size": 16384})
    app[CONFIG] = cfg
    app[DATABASE_URL] = database_url
    app[ROUTES] = RouteTable(cfg.routes)
    app[USAGE] = UsageBuffer()
    c = cfg.cache
    app[CACHE] = IdentityCache(
        ttl=c.ttl,
        negative_ttl=c.negative_ttl,
        max_entries=c.max_entries,
        negative_max_entries=c.negative_max_entries,
        stale_if_error=c.stale_if_error,
    )
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_upstreams)
    if cfg.management.enabled:
        api = ManagementApi(cfg, SessionVerifier(cfg.management.sessions))
        app[MANAGEMENT] = api
        app.add_subapp(API_PREFIX, api.app())
    app.router.add_route("*", "/{tail:.*}", GatewayHandler(app).handle)
    return app


# ---------------------------------------------------------------------------------------------
# Admin listener: /healthz, /readyz (and /metrics later)


def create_admin_app(gateway: web.Application) -> web.Application:
    admin = web.Application()

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        """Ready when PostgreSQL answers, or while it does not but the cache is warm: cached
        identities keep being served, so leaving rotation would refuse more than it saves."""
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

    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    return admin
