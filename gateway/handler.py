"""The main listener's request path, top to bottom:
canonical path → route → authenticate → authorize → forward (or answer forward-auth).

Every gateway error becomes problem+json here, in one place, and every request ends in
one metrics update and one access-log line. ``handle`` serves what aiohttp's server
answers; the front end (``gateway.front``) asks the same methods (``admit_cached``, then
``admit_loaded`` on a cache miss, ``refused``) for the plain requests it answers itself.
"""

from __future__ import annotations

import logging
import os
from enum import Enum
from functools import partial
from time import perf_counter
from typing import Any, Final

from aiohttp import web

from gateway.auth import Identity, identity_headers
from gateway.config import Route
from gateway.errors import (
    AuthError,
    BadRequest,
    DatabaseUnavailable,
    Forbidden,
    ForwardAuthDenied,
    MethodNotAllowed,
    NotFound,
    PatgateError,
    UpstreamTimeout,
    UpstreamUnavailable,
    problem_response,
)
from gateway.headers import is_trusted, request_client_ip
from gateway.keys import AUTHENTICATOR, FORWARDER, LIVE, SIGNER, TELEMETRY, UI, USAGE, Runtime
from gateway.management.ui import PREFIX as UI_PREFIX
from gateway.paths import canonical_path
from gateway.policy import authorize
from gateway.proxy import TOKEN_EXPIRES_HEADER, RequestView

log = logging.getLogger("patgate")

RESERVED_PREFIX = "/_patgate/"
FORWARD_AUTH_PATH = "/_patgate/auth"
JWKS_PATH = "/_patgate/.well-known/jwks.json"
NO_ROUTE = "-"  # the route label of requests answered before a route was chosen
RESERVED_LABEL = "_patgate"  # ... and of forward-auth, the JWKS and the page


class _RequestIds:
    """New request ids: 128 random bits as hex, like ``secrets.token_hex(16)``, with the
    randomness read 4 KiB at a time (one ``getrandom`` per 256 ids, not one per request)."""

    __slots__ = ("_at", "_pool")

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)  # a worker never repeats its parent

    def _forget(self) -> None:
        self._pool = b""
        self._at = 0

    def __call__(self) -> str:
        at = self._at
        if at >= len(self._pool):
            self._pool = os.urandom(4096)
            at = 0
        self._at = at + 16
        return self._pool[at : at + 16].hex()


new_request_id = _RequestIds()


class Pending(Enum):
    PENDING = "pending"


PENDING: Final = Pending.PENDING  # admit_cached: the cache cannot tell, the database must


class Admission:
    """Whom a client that repeats its headers was last admitted as, to which route (the
    front end keeps one per connection): while the cache returns that very identity for the
    same runtime and route, the permission check stands; the use is still recorded."""

    __slots__ = ("client", "identity", "route", "rt")

    def __init__(self) -> None:
        self.rt: Runtime | None = None
        self.route: Route | None = None
        self.identity: Identity | None = None
        self.client = ""


def _authorization(request: RequestView) -> str | None:
    authorization = request.headers.getall("Authorization", [])
    if len(authorization) > 1:
        raise BadRequest("only one Authorization header is allowed")
    return authorization[0] if authorization else None


def access_fields(
    request: RequestView, rt: Runtime, request_id: str, identity: Identity | None
) -> dict[str, Any]:
    """The access-log line's request fields (built only when the line is written)."""
    return {
        "request_id": request_id,
        "method": request.method,
        "path": request.raw_path.partition("?")[0],
        "user_id": identity.user_id if identity else None,
        "company_id": identity.company_id if identity else None,
        "token_id": identity.token_id if identity else None,
        "client_ip": request_client_ip(request.remote, request.headers, rt.cfg.trusted_proxies),
    }


class GatewayHandler:
    """The catch-all handler of the main listener, and the decisions the front end shares."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.live = app[LIVE]
        self.telemetry = app[TELEMETRY]
        self.signer = app.get(SIGNER)
        self.ui = app.get(UI)

    async def bind(self, _app: web.Application) -> None:
        """On startup, after the cleanup contexts: the objects they made."""
        self.authenticator = self.app[AUTHENTICATOR]
        self.forwarder = self.app[FORWARDER]
        self.usage = self.app[USAGE]

    def token_key(self, request: RequestView) -> bytes:
        """The cache key of the request's token (``Authenticator.key``), for a caller that
        will see the same ``Authorization`` again."""
        try:
            return self.authenticator.key(_authorization(request))
        except AuthError as error:
            self.telemetry.auth_outcome(error.reason)
            raise

    def admit_cached(
        self,
        request: RequestView,
        rt: Runtime,
        route: Route,
        key: bytes | None = None,
        last: Admission | None = None,
    ) -> Identity | Pending | None:
        """``admit`` as far as it goes without awaiting: PENDING when only the database
        can tell who the token belongs to. ``key``: the request's ``token_key``, if kept;
        ``last``: the caller's ``Admission`` for these headers, read and updated."""
        if route.public:
            return None
        authenticator = self.authenticator
        try:
            if key is None:
                identity = authenticator.cached(_authorization(request))
            else:
                identity = authenticator.cached_key(key)
        except AuthError as error:
            self.telemetry.auth_outcome(error.reason)
            raise
        if identity is None:
            return PENDING
        if last is not None and last.identity is identity and last.route is route and last.rt is rt:
            self.usage.record(identity.token_id, last.client)
            self.telemetry.auth_outcome("ok")
            return identity
        return self.authorized(request, rt, route, identity, last)

    async def admit(self, request: RequestView, rt: Runtime, route: Route) -> Identity | None:
        """Authenticate and authorize for ``route``: the decision behind proxying and
        forward-auth alike (the route comes from the same table for both)."""
        decided = self.admit_cached(request, rt, route)
        if decided is not PENDING:
            return decided
        return await self.admit_loaded(request, rt, route)

    async def admit_loaded(self, request: RequestView, rt: Runtime, route: Route) -> Identity:
        """``admit`` after ``admit_cached`` answered PENDING: the database decides."""
        try:
            identity = await self.authenticator.load(_authorization(request))
        except AuthError as error:
            self.telemetry.auth_outcome(error.reason)
            raise
        except DatabaseUnavailable:
            self.telemetry.auth_outcome("database_unavailable")
            raise
        return self.authorized(request, rt, route, identity)

    def authorized(
        self,
        request: RequestView,
        rt: Runtime,
        route: Route,
        identity: Identity,
        last: Admission | None = None,
    ) -> Identity:
        client = request_client_ip(request.remote, request.headers, rt.cfg.trusted_proxies)
        self.usage.record(identity.token_id, client)
        if not authorize(identity.permissions, route.require, route.require_any):
            self.telemetry.auth_outcome("forbidden")
            raise Forbidden("the token lacks a permission this route requires")
        self.telemetry.auth_outcome("ok")
        if last is not None:
            last.rt, last.route, last.identity, last.client = rt, route, identity, client
        return identity

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = perf_counter()
        rt = self.live.runtime
        request_id = rt.header_policy.request_id(request.headers) or new_request_id()
        label, identity, forwarded = NO_ROUTE, None, None
        response: web.StreamResponse
        try:
            raw_path, _, query = request.raw_path.partition("?")
            path = canonical_path(raw_path)
            if path.startswith(RESERVED_PREFIX):
                label = RESERVED_LABEL
                response = await self.reserved(request, rt, path, request_id)
            else:
                route = rt.routes.match(request.host, request.method, path)
                label = route.name
                identity = await self.admit(request, rt, route)
                url = rt.routes.upstream_url(route, path, query)
                forwarded = perf_counter()
                response = await self.forwarder.forward(
                    request, rt, route, url, identity, request_id
                )
        except PatgateError as error:
            response = self.refused(error, rt, request_id)
        except Exception:  # a bug: still problem+json, and logged with its request id
            log.exception("gateway error", extra={"fields": {"request_id": request_id}})
            response = self.refused(PatgateError(), rt, request_id)

        self.telemetry.request(
            route=label,
            method=request.method,
            status=response.status,
            started=started,
            forwarded=forwarded,
            ended=perf_counter(),
            fields=partial(access_fields, request, rt, request_id, identity),
        )
        return response

    async def reserved(
        self, request: web.Request, rt: Runtime, path: str, request_id: str
    ) -> web.StreamResponse:
        """Paths under /_patgate/ that are not the management API: never proxied."""
        if path == FORWARD_AUTH_PATH:
            return await self.forward_auth(request, rt, request_id)
        if path == JWKS_PATH and self.signer is not None:
            return web.json_response(self.signer.jwks())
        if path.startswith(UI_PREFIX) and self.ui is not None and request.method in ("GET", "HEAD"):
            return self.ui.serve(path)
        raise NotFound()

    def refused(self, error: PatgateError, rt: Runtime, request_id: str) -> web.Response:
        if isinstance(error, UpstreamTimeout | UpstreamUnavailable):
            self.telemetry.upstream_error(error.code)
        if isinstance(error, AuthError):
            fields = {"reason": error.reason, "request_id": request_id}
            log.info("token refused", extra={"fields": fields})
        return problem_response(error, request_id, rt.cfg.identity_headers.request_id)

    async def forward_auth(
        self, request: web.Request, rt: Runtime, request_id: str
    ) -> web.Response:
        """``/_patgate/auth`` for an ingress that keeps proxying itself (nginx ``auth_request``,
        Traefik ``ForwardAuth``): 200 with the identity headers, or 401/403 problem+json.

        The original request is described by ``X-Original-URI``/``X-Original-Method`` (nginx)
        or ``X-Forwarded-Uri``/``-Method``/``-Host`` (Traefik), believed only from
        ``trusted_proxies``. Route table and permissions are the proxy's. nginx knows only
        2xx, 401 and 403, so a bad path or an unknown route or method answers 403 (the
        problem's ``type`` still says which); a database outage stays 503.
        """
        if not is_trusted(request.remote or "", rt.cfg.trusted_proxies):
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
            route = rt.routes.match(host, method.upper(), path)
        except (BadRequest, NotFound, MethodNotAllowed) as error:
            raise ForwardAuthDenied(error) from error
        identity = await self.admit(request, rt, route)
        names = rt.cfg.identity_headers
        response = web.Response(status=200)
        response.headers[names.request_id] = request_id
        if identity is not None:
            response.headers.extend(identity_headers(names, identity))
            if self.signer is not None:
                response.headers[self.signer.header] = self.signer.sign(identity, route.name)
            if identity.expires_header is not None:
                response.headers[TOKEN_EXPIRES_HEADER] = identity.expires_header
        return response


GATE = web.AppKey("gate", GatewayHandler)  # the front end (gateway.front) asks it every question
