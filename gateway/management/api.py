"""The management HTTP API at ``/_patgate/api/v1`` (SPEC §9).

Callers sign in with the product's session JWT (``Authorization: Bearer <jwt>`` or the UI's
cookie) or, when ``management.allow_pat``, with a PAT that carries a ``tokens:`` permission.
Either way the caller's user is looked up in patgate's users table: its *current* role
gives the permissions, and an unknown or deactivated user is refused (401). Everything is
scoped to the caller's company. The rules themselves live in ``gateway.lifecycle``.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from gateway import store
from gateway.auth import Authenticator, bearer_token
from gateway.config import Config
from gateway.errors import (
    BadRequest,
    Forbidden,
    InvalidInput,
    MethodNotAllowed,
    MfaRequired,
    MissingToken,
    NotFound,
    PatgateError,
    TooManyRequests,
    problem_response,
)
from gateway.headers import HeaderPolicy, forwarded_headers, is_trusted, request_client_ip
from gateway.lifecycle import (
    TOKEN_MANAGING_PERMISSIONS,
    UNSET,
    Actor,
    Created,
    Expiry,
    TokenService,
)
from gateway.management.openapi import MAX_LEAKED_TOKENS, openapi_document
from gateway.management.sessions import InvalidSession, SessionVerifier
from gateway.policy import allows
from gateway.views import event_json, user_json

log = logging.getLogger("patgate.api")

PREFIX = "/_patgate/api/v1"
MAX_BODY = 64 * 1024
CSRF_HEADER = "X-Patgate-Csrf"
LEAK_REPORTS_PER_MINUTE = 10
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[["Call"], Awaitable[web.StreamResponse]]


class Call:
    """One API request: who is calling, and how."""

    __slots__ = ("actor", "mfa", "request", "via")

    def __init__(self, request: web.Request, actor: Actor, *, mfa: bool, via: str) -> None:
        self.request = request
        self.actor = actor
        self.mfa = mfa
        self.via = via

    def id(self) -> str:
        return self.request.match_info["id"]


class RateLimiter:
    """A fixed one-minute window per key, bounded in memory."""

    def __init__(self, per_minute: int, max_keys: int = 10_000) -> None:
        self.per_minute = per_minute
        self.max_keys = max_keys
        self._windows: dict[str, tuple[int, int]] = {}

    def allow(self, key: str) -> bool:
        minute = int(time.monotonic() // 60)
        window, count = self._windows.get(key, (minute, 0))
        if window != minute:
            count = 0
        if len(self._windows) >= self.max_keys and key not in self._windows:
            self._windows.clear()
        self._windows[key] = (minute, count + 1)
        return count < self.per_minute


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def read_json(request: web.Request, allowed: dict[str, tuple[type, ...]]) -> dict[str, Any]:
    """The JSON object of the body, with only ``allowed`` fields of the given types."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BadRequest(f"the body exceeds {MAX_BODY} bytes")
    raw = bytearray()  # read(n) returns what has arrived: the body may come in pieces
    while chunk := await request.content.readany():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise BadRequest(f"the body exceeds {MAX_BODY} bytes")
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InvalidInput(f"unknown fields: {', '.join(unknown)}")
    for name, value in body.items():
        types = allowed[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise InvalidInput(f"{name}: expected {expected}")
    return body


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise InvalidInput(f"{name} must be true or false")
    return value in ("true", "1")


class ManagementApi:
    service: TokenService
    authenticator: Authenticator

    def __init__(self, cfg: Config, verifier: SessionVerifier) -> None:
        self.cfg = cfg
        self.verifier = verifier
        self.sessions = cfg.management.sessions
        self.request_ids = HeaderPolicy(cfg.identity_headers)
        self.leak_limiter = RateLimiter(LEAK_REPORTS_PER_MINUTE)

    def bind(self, service: TokenService, authenticator: Authenticator) -> None:
        """Called once the database pool exists (the gateway's startup)."""
        self.service = service
        self.authenticator = authenticator

    def reconfigure(self, cfg: Config) -> None:
        """A reload: roles, trusted proxies and header names; sessions stay as started."""
        self.cfg = dataclasses.replace(
            self.cfg,
            roles=cfg.roles,
            trusted_proxies=cfg.trusted_proxies,
            identity_headers=cfg.identity_headers,
        )
        self.request_ids = HeaderPolicy(cfg.identity_headers)
        if hasattr(self, "service"):
            self.service.roles = cfg.roles

    # -- who is calling ----------------------------------------------------------------------

    async def caller(self, request: web.Request) -> Call:
        ip = self.client_ip(request)
        header = request.headers.get("Authorization")
        cookie = request.cookies.get(self.sessions.cookie)
        if header:
            credential, via = bearer_token(header), "bearer"
        elif cookie:
            credential, via = cookie, "cookie"
            self._check_csrf(request)
        else:
            raise MissingToken("Sign in with a session, or send a bearer token.")
        if self.service.format.is_well_formed(credential):
            return await self._pat_caller(request, credential, ip)
        session = self.verifier.verify(credential)
        user = await self._user(session.user_id)
        if user is None or user.status != "active":
            raise InvalidSession()
        if session.company_id is not None and session.company_id != user.company_id:
            raise InvalidSession()
        permissions = self.service.roles.get(user.role, frozenset())
        actor = Actor(user.id, user.company_id, permissions, ip)
        return Call(request, actor, mfa=session.mfa, via=via)

    def client_ip(self, request: web.Request) -> str:
        return request_client_ip(request.remote, request.headers, self.cfg.trusted_proxies)

    async def _pat_caller(self, request: web.Request, token: str, ip: str | None) -> Call:
        if not self.cfg.management.allow_pat:
            raise Forbidden("personal access tokens cannot manage tokens here; use a session")
        identity = await self.authenticator.authenticate(f"Bearer {token}")
        managing = (*TOKEN_MANAGING_PERMISSIONS, "users:admin")
        if not any(allows(identity.permissions, p) for p in managing):
            raise Forbidden("this token carries no tokens: permission")
        actor = Actor(identity.user_id, identity.company_id, identity.permissions, ip)
        return Call(request, actor, mfa=True, via="pat")

    async def _user(self, user_id: str) -> store.UserRow | None:
        if "\x00" in user_id:  # PostgreSQL text cannot hold NUL: no such user can exist
            return None
        async with store.transaction(self.service.pool) as conn:
            return await store.get_user(conn, user_id)

    def _check_csrf(self, request: web.Request) -> None:
        """A cookie rides along on cross-site requests: changes need proof of same origin."""
        if request.method in SAFE_METHODS:
            return
        # Behind a TLS-terminating proxy the browser's origin is https://<its host>: the
        # origin this listener serves is what a trusted proxy says it is, as upstreams see.
        peer = request.remote or ""
        seen = dict(
            forwarded_headers(
                request.headers,
                peer=peer,
                proto=request.scheme,
                host=request.host,
                trusted_peer=is_trusted(peer, self.cfg.trusted_proxies),
            )
        )
        served = f"{seen['X-Forwarded-Proto']}://{seen['X-Forwarded-Host']}"
        origin = request.headers.get("Origin")
        if origin is None or origin != served:
            raise Forbidden("cross-site request refused (Origin)")
        if request.headers.get(CSRF_HEADER) != "1":
            raise Forbidden(f"cross-site request refused ({CSRF_HEADER} header missing)")

    # -- endpoints ---------------------------------------------------------------------------

    async def me(self, call: Call) -> web.StreamResponse:
        actor = call.actor
        user = await self._user(actor.user_id or "")
        return json_response(
            {
                "user_id": actor.user_id,
                "company_id": actor.company_id,
                "role": user.role if user else None,
                "email": user.email if user else None,
                "permissions": sorted(actor.permissions),
                "mfa": call.mfa,
                "auth": call.via,
            }
        )

    async def list_tokens(self, call: Call) -> web.StreamResponse:
        query = call.request.query
        rows = await self.service.list(
            call.actor,
            user_id=query.get("user") or None,
            state=query.get("state") or None,
            all_users=_flag(call.request, "all"),
        )
        return json_response({"items": [self.service.token_json(r) for r in rows]})

    async def create_token(self, call: Call) -> web.StreamResponse:
        body = await read_json(
            call.request,
            {
                "name": (str,),
                "expires_in_days": (int, float),
                "expires_at": (str, type(None)),
                "no_expiry": (bool,),
                "role": (str, type(None)),
                "user_id": (str, type(None)),
            },
        )
        if "name" not in body:
            raise InvalidInput("name: required")
        self._require_mfa(call)
        chosen = [k for k in ("expires_in_days", "expires_at") if body.get(k) is not None]
        if body.get("no_expiry"):
            chosen.append("no_expiry")
        if len(chosen) > 1:
            raise InvalidInput("give at most one of expires_in_days, expires_at, no_expiry")
        expiry = Expiry(
            in_days=body.get("expires_in_days"),
            at=_datetime(body.get("expires_at")),
            never=bool(body.get("no_expiry")),
        )
        created = await self.service.create(
            call.actor,
            name=body["name"],
            user_id=body.get("user_id"),
            expiry=expiry,
            role=body.get("role"),
        )
        return json_response(self._created(created, dropped=True), status=201)

    def _require_mfa(self, call: Call) -> None:
        if self.sessions.require_mfa_for_create and not call.mfa:
            raise MfaRequired("creating a token needs a session signed in with a second factor")

    def _created(self, created: Created, *, dropped: bool) -> dict[str, Any]:
        data = {"token": created.plaintext, **self.service.token_json(created.token)}
        if dropped:
            data["dropped_permissions"] = list(created.dropped_permissions)
        return data

    async def get_token(self, call: Call) -> web.StreamResponse:
        row = await self.service.get(call.actor, call.id())
        return json_response(self.service.token_json(row))

    async def rename_token(self, call: Call) -> web.StreamResponse:
        body = await read_json(call.request, {"name": (str,)})
        if "name" not in body:
            raise InvalidInput("name: required")
        row = await self.service.rename(call.actor, call.id(), body["name"])
        return json_response(self.service.token_json(row))

    async def refresh_token(self, call: Call) -> web.StreamResponse:
        row = await self.service.refresh(call.actor, call.id())
        return json_response(self.service.token_json(row))

    async def rotate_token(self, call: Call) -> web.StreamResponse:
        self._require_mfa(call)
        created = await self.service.rotate(call.actor, call.id())
        return json_response(self._created(created, dropped=False), status=201)

    async def revoke_token(self, call: Call) -> web.StreamResponse:
        row = await self.service.revoke(call.actor, call.id())
        return json_response(self.service.token_json(row))

    async def token_events(self, call: Call) -> web.StreamResponse:
        events = await self.service.events(call.actor, call.id())
        return json_response({"items": [event_json(e) for e in events]})

    async def revoke_leaked(self, request: web.Request) -> web.StreamResponse:
        """Unauthenticated on purpose (secret scanners call it): always 202, no oracle."""
        ip = self.client_ip(request)
        if not self.leak_limiter.allow(ip):
            raise TooManyRequests("too many leak reports from this address; try again later")
        body = await read_json(request, {"tokens": (list,)})
        tokens = body.get("tokens", [])
        if len(tokens) > MAX_LEAKED_TOKENS or not all(isinstance(t, str) for t in tokens):
            raise InvalidInput(f"tokens: a list of at most {MAX_LEAKED_TOKENS} strings")
        await self.service.revoke_leaked(tokens, ip=ip)
        return json_response({"status": "accepted"}, status=202)

    async def list_roles(self, call: Call) -> web.StreamResponse:
        """The roles the caller may give a token: those whose every permission they hold."""
        granted = call.actor.permissions
        roles = [
            {"name": name, "permissions": sorted(permissions)}
            for name, permissions in self.service.roles.items()
            if all(allows(granted, p) for p in permissions)
        ]
        return json_response({"items": roles})

    async def list_users(self, call: Call) -> web.StreamResponse:
        users = await self.service.list_users(call.actor)
        return json_response({"items": [user_json(u) for u in users]})

    async def put_user(self, call: Call) -> web.StreamResponse:
        body = await read_json(
            call.request,
            {"company_id": (str,), "role": (str,), "email": (str, type(None)), "status": (str,)},
        )
        missing = [k for k in ("company_id", "role") if k not in body]
        if missing:
            raise InvalidInput(f"{', '.join(missing)}: required")
        user, created = await self.service.put_user(
            call.actor,
            call.id(),
            company_id=body["company_id"],
            role=body["role"],
            email=body.get("email"),
            status=body.get("status", "active"),
        )
        return json_response(user_json(user), status=201 if created else 200)

    async def patch_user(self, call: Call) -> web.StreamResponse:
        body = await read_json(
            call.request, {"role": (str,), "email": (str, type(None)), "status": (str,)}
        )
        user = await self.service.change_user(
            call.actor,
            call.id(),
            role=body.get("role"),
            status=body.get("status"),
            email=body.get("email") if "email" in body else UNSET,
        )
        return json_response(user_json(user))

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return json_response(openapi_document())

    # -- wiring ------------------------------------------------------------------------------

    def signed_in(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            return await handler(await self.caller(request))

        return wrapped

    def app(self) -> web.Application:
        api = web.Application(middlewares=[self.problems])
        add, signed = api.router.add_route, self.signed_in
        add("GET", "/openapi.json", self.openapi)
        add("GET", "/me", signed(self.me))
        add("GET", "/tokens", signed(self.list_tokens))
        add("POST", "/tokens", signed(self.create_token))
        add("POST", "/tokens/revoke-leaked", self.revoke_leaked)
        add("GET", "/tokens/{id}", signed(self.get_token))
        add("PATCH", "/tokens/{id}", signed(self.rename_token))
        add("DELETE", "/tokens/{id}", signed(self.revoke_token))
        add("POST", "/tokens/{id}/refresh", signed(self.refresh_token))
        add("POST", "/tokens/{id}/rotate", signed(self.rotate_token))
        add("GET", "/tokens/{id}/events", signed(self.token_events))
        add("GET", "/roles", signed(self.list_roles))
        add("GET", "/users", signed(self.list_users))
        add("PUT", "/users/{id}", signed(self.put_user))
        add("PATCH", "/users/{id}", signed(self.patch_user))
        return api

    @web.middleware
    async def problems(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every error of the API is problem+json, aiohttp's own 404/405 included."""
        request_id = self.request_ids.request_id(request.headers) or secrets.token_hex(16)
        header = self.cfg.identity_headers.request_id
        try:
            response: web.StreamResponse = await handler(request)
        except PatgateError as error:
            response = problem_response(error, request_id, header)
        except web.HTTPMethodNotAllowed as error:
            allowed = MethodNotAllowed(sorted(error.allowed_methods))
            response = problem_response(allowed, request_id, header)
        except web.HTTPNotFound:
            response = problem_response(NotFound("no such API endpoint"), request_id, header)
        except Exception:  # a bug: still problem+json, and logged with its request id
            log.exception("management API error", extra={"fields": {"request_id": request_id}})
            response = problem_response(PatgateError(), request_id, header)
        response.headers[header] = request_id
        response.headers["Cache-Control"] = "no-store"
        return response


def _datetime(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput("expires_at: expected an RFC 3339 date-time") from None
