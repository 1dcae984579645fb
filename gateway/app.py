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
from gateway.assertion import AssertionSigner
from gateway.auth import Authenticator, Identity, identity_headers
from gateway.cache import IdentityCache
from gateway.config import Config, Route
from gateway.errors import (
    AuthError,
    BadRequest,
    Forbidden,
    ForwardAuthDenied,
    MethodNotAllowed,
    NotFound,
    PatgateError,
    problem_response,
)
from gateway.headers import HeaderPolicy, is_trusted, request_client_ip
from gateway.lifecycle import TokenService
from gateway.listener import InvalidationListener, listening
from gateway.management.api import PREFIX as API_PREFIX
from gateway.management.api import ManagementApi
from gateway.management.sessions import SessionVerifier
from gateway.management.ui import PREFIX as UI_PREFIX
from gateway.management.ui import StaticPage
from gateway.paths import canonical_path
from gateway.policy import authorize
from gateway.proxy import TOKEN_EXPIRES_HEADER, Forwarder, client_session
from gateway.routing import RouteTable
from gateway.tokens import TokenFormat
from gateway.usage import UsageBuffer

log = logging.getLogger("patgate")

RESERVED_PREFIX = "/_patgate/"
FORWARD_AUTH_PATH = "/_patgate/auth"
JWKS_PATH = "/_patgate/.well-known/jwks.json"

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
SIGNER = web.AppKey("assertion_signer", AssertionSigner)
UI = web.AppKey("ui", StaticPage)


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
        self.signer = app.get(SIGNER)

    async def decide(
        self, request: web.Request, host: str | None, method: str, path: str
    ) -> tuple[Route, Identity | None]:
        """Route, authenticate, authorize: the one decision behind proxying and forward-auth."""
        app = self.app
        route = app[ROUTES].match(host, method, path)
        if route.public:
            return route, None
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
        return route, identity

    async def handle(self, request: web.Request) -> web.StreamResponse:
        request_id = self.header_policy.request_id(request.headers) or secrets.token_hex(16)
        try:
            raw_path, _, query = request.raw_path.partition("?")
            path = canonical_path(raw_path)
            if path == FORWARD_AUTH_PATH:
                return await self.forward_auth(request, request_id)
            if path == JWKS_PATH and self.signer is not None:
                return web.json_response(self.signer.jwks())
            if path.startswith(UI_PREFIX) and UI in self.app and request.method in ("GET", "HEAD"):
                return self.app[UI].serve(path)
            if path.startswith(RESERVED_PREFIX):
                raise NotFound()
            route, identity = await self.decide(request, request.host, request.method, path)
            url = self.app[ROUTES].upstream_url(route, path, query)
            return await self.app[FORWARDER].forward(request, route, url, identity, request_id)
        except PatgateError as error:
            return self.refused(error, request_id)
        except Exception:  # a bug: still problem+json, and logged with its request id
            log.exception("gateway error", extra={"fields": {"request_id": request_id}})
            return problem_response(PatgateError(), request_id, self.names.request_id)

    def refused(self, error: PatgateError, request_id: str) -> web.Response:
        if isinstance(error, AuthError):
            fields = {"reason": error.reason, "request_id": request_id}
            log.info("token refused", extra={"fields": fields})
        return problem_response(error, request_id, self.names.request_id)

    async def forward_auth(self, request: web.Request, request_id: str) -> web.Response:
        """``/_patgate/auth`` for an ingress that keeps proxying itself (nginx ``auth_request``,
        Traefik ``ForwardAuth``): 200 with the identity headers, or 401/403 problem+json.

        The original request is described by ``X-Original-URI``/``X-Original-Method`` (nginx)
        or ``X-Forwarded-Uri``/``-Method``/``-Host`` (Traefik), believed only from
        ``trusted_proxies``. Route table and permissions are the proxy's. nginx knows only
        2xx, 401 and 403, so a bad path or an unknown route or method answers 403 (the
        problem's ``type`` still says which); a database outage stays 503.
        """
        if not is_trusted(request.remote or "", self.trusted_proxies):
            raise Forbidden("forward-auth answers only the proxies in trusted_proxies")
        headers = request.headers
        uri = headers.get("X-Original-URI") or headers.get("X-Forwarded-Uri")
        method = headers.get("X-Original-Method") or headers.get("X-Forwarded-Method")
        if not uri or not method:
            raise BadRequest(
                "forward-auth needs X-Original-URI and X-Original-Method "
                "(or X-Forwarded-Uri and X-Forwarded-Method)"
            )
        host = headers.get("X-Forwarded-Host") or request.host
        try:
            path = canonical_path(uri.partition("?")[0])
            route, identity = await self.decide(request, host, method.upper(), path)
        except (BadRequest, NotFound, MethodNotAllowed) as error:
            raise ForwardAuthDenied(error) from error
        response = web.Response(status=200)
        response.headers[self.names.request_id] = request_id
        if identity is not None:
            response.headers.extend(identity_headers(self.names, identity))
            if self.signer is not None:
                response.headers[self.signer.header] = self.signer.sign(identity, route.name)
            if identity.expires_header is not None:
                response.headers[TOKEN_EXPIRES_HEADER] = identity.expires_header
        return response


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
    if cfg.identity_headers.assertion is not None:
        app[SIGNER] = AssertionSigner(cfg.identity_headers.assertion)
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_upstreams)
    if cfg.management.enabled:
        api = ManagementApi(cfg, SessionVerifier(cfg.management.sessions))
        app[MANAGEMENT] = api
        app[UI] = StaticPage()
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
