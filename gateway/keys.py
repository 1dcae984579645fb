"""The typed keys of the gateway application's shared objects, and its reloadable state."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiohttp import web

from gateway.assertion import AssertionSigner
from gateway.auth import Authenticator, Identity
from gateway.cache import IdentityCache
from gateway.config import Config
from gateway.errors import AuthError
from gateway.headers import HeaderPolicy
from gateway.listener import InvalidationListener
from gateway.management.api import ManagementApi
from gateway.management.ui import StaticPage
from gateway.observability import Telemetry
from gateway.proxy import Forwarder
from gateway.routing import RouteTable
from gateway.usage import UsageBuffer


@dataclass(frozen=True, slots=True)
class Runtime:
    """What a reload (SIGHUP) replaces, as one object: a request reads it once and keeps
    the same routes, roles and header names from start to end."""

    cfg: Config
    routes: RouteTable
    header_policy: HeaderPolicy

    @classmethod
    def of(cls, cfg: Config) -> Runtime:
        return cls(cfg, RouteTable(cfg.routes), HeaderPolicy(cfg.identity_headers))


class Live:
    """The holder of the current Runtime (the application's state is frozen once it runs)."""

    __slots__ = ("draining", "runtime")

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.draining = False  # set on SIGTERM: /readyz answers 503 from then on


CONFIG = web.AppKey("config", Config)  # as started; the current one is LIVE.runtime.cfg
LIVE = web.AppKey("live", Live)
DATABASE_URL = web.AppKey("database_url", str)
POOL = web.AppKey("pool", asyncpg.Pool)
CACHE = web.AppKey("cache", IdentityCache[Identity, type[AuthError]])
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
FORWARDER = web.AppKey("forwarder", Forwarder)
USAGE = web.AppKey("usage", UsageBuffer)
MANAGEMENT = web.AppKey("management", ManagementApi)
LISTENER = web.AppKey("listener", InvalidationListener)
SIGNER = web.AppKey("assertion_signer", AssertionSigner)
UI = web.AppKey("ui", StaticPage)
TELEMETRY = web.AppKey("telemetry", Telemetry)
