"""Shared fixtures: one real PostgreSQL per session, a fresh database per test module,
real upstream servers on 127.0.0.1 that record what they received, and the real gateway."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway import embedded, store
from gateway.app import create_app
from gateway.config import Config, parse_config
from gateway.lifecycle import OPERATOR, Expiry, TokenService
from tests.servers import GatewayTestServer

TEST_DATABASE_ENV = "PATGATE_TEST_DATABASE_URL"

ROLES = {
    "owner": ["*"],
    "admin": ["jobs:*", "invoices:*", "tokens:admin", "tokens:create", "users:admin"],
    "full_user": ["jobs:*", "invoices:read", "tokens:create"],
    "field_user": ["jobs:read"],
}


# The SPEC §9 Token JSON, exactly: what the API and `token list/show --json` show per token.
TOKEN_FIELDS = frozenset(
    {
        "id",
        "name",
        "prefix",
        "state",
        "role",
        "permissions",
        "user_id",
        "company_id",
        "created_at",
        "created_by",
        "expires_at",
        "last_used_at",
        "last_used_ip",
        "revoked_at",
        "revoked_reason",
        "rotated_to",
    }
)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The session's PostgreSQL server: $PATGATE_TEST_DATABASE_URL, or an embedded one.

    The embedded one lives in its own temporary directory, not pytest's basetemp: pytest
    prunes old basetemps, which would pull the data directory from under a server that
    another pytest run on the same machine still uses.
    """
    configured = os.environ.get(TEST_DATABASE_ENV)
    if configured:
        yield configured
        return
    folder = tempfile.mkdtemp(prefix="patgate-test-pg-")
    server = embedded.start(folder, delete_on_stop=True)
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def database_url(postgres_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, migrated database for one test module, dropped afterwards."""
    module = re.sub(r"[^a-z0-9]+", "_", request.module.__name__.lower())[-40:]
    name = f"t_{module}_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        admin = await asyncpg.connect(postgres_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        async with store.connect(with_database(postgres_url, name)) as conn:
            await store.migrate(conn)

    async def drop() -> None:
        admin = await asyncpg.connect(postgres_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(create())
    yield with_database(postgres_url, name)
    asyncio.run(drop())


# ---------------------------------------------------------------------------------------------
# Upstreams


@dataclass
class Received:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class RecordingUpstream:
    """A real HTTP server that remembers every request exactly as it arrived."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    status: int = 200
    response_headers: dict[str, str] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(
                request.method,
                request.raw_path,
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
                body,
            )
        )
        return web.json_response(
            {"path": request.raw_path}, status=self.status, headers=self.response_headers
        )

    @property
    def last(self) -> Received:
        assert self.received, "the upstream received nothing"
        return self.received[-1]


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    recorder = RecordingUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    recorder.url = str(server.make_url("")).rstrip("/")
    yield recorder
    await server.close()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
StartRaw = Callable[[RawHandler], Awaitable[str]]


@pytest.fixture
async def raw_server() -> AsyncIterator[StartRaw]:
    """Start a raw TCP upstream that writes exactly the bytes a test chooses; its URL."""
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------------------------------
# Configuration and the gateway


def bearer(token: str) -> dict[str, str]:
    """The Authorization header of a request with ``token`` (a PAT or a session JWT)."""
    return {"Authorization": f"Bearer {token}"}


def gateway_config(upstream_url: str, **overrides: Any) -> Config:
    """A Config from a small dict: the SPEC's roles and a few routes to ``upstream_url``."""
    return parse_config(gateway_config_data(upstream_url, **overrides))


def gateway_config_data(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """``gateway_config`` as the data of a config file (for the tests that run the command)."""
    data: dict[str, Any] = {
        "roles": ROLES,
        "routes": [
            {
                "name": "health",
                "match": {"path": "/healthz"},
                "upstream": upstream_url,
                "public": True,
            },
            {
                "name": "public",
                "match": {"prefix": "/public"},
                "upstream": upstream_url,
                "public": True,
            },
            {
                "name": "jobs-read",
                "match": {"prefix": "/api/jobs", "methods": ["GET", "HEAD"]},
                "upstream": upstream_url,
                "require": ["jobs:read"],
            },
            {
                "name": "jobs-write",
                "match": {"prefix": "/api/jobs", "methods": ["POST", "PUT", "PATCH", "DELETE"]},
                "upstream": upstream_url,
                "require": ["jobs:write"],
            },
            {
                "name": "invoices",
                "match": {"prefix": "/api/invoices", "methods": ["GET"]},
                "upstream": upstream_url,
                "require_any": ["invoices:read", "invoices:admin"],
            },
        ],
    }
    data.update(overrides)
    return data


GatewayFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def make_gateway(
    database_url: str, aiohttp_client: Any
) -> Callable[[Config], Awaitable[TestClient[Any, Any]]]:
    async def start(cfg: Config) -> TestClient[Any, Any]:
        # As in server.serve: the front end first. aiohttp's TestServer starts every runner
        # with handler_cancellation=True, as serve does.
        server = GatewayTestServer(create_app(cfg, database_url), host="127.0.0.1")
        client: TestClient[Any, Any] = await aiohttp_client(server)
        return client

    return start


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


class Seeder:
    """Companies, users and tokens through the same service the CLI uses."""

    def __init__(self, cfg: Config, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.service = TokenService(cfg, conn)

    async def company(self, name: str = "Acme") -> str:
        company_id = f"c-{uuid.uuid4().hex[:8]}"
        await store.insert_company(self.conn, company_id, name)
        return company_id

    async def user(self, company_id: str, role: str = "admin") -> str:
        user_id = f"u-{uuid.uuid4().hex[:8]}"
        await store.insert_user(self.conn, user_id, company_id, role, None)
        return user_id

    async def token(
        self, user_id: str, *, expiry: Expiry = Expiry(), role: str | None = None
    ) -> tuple[str, str]:
        """(plaintext, token id)"""
        created = await self.service.create(
            OPERATOR, user_id=user_id, name="test token", expiry=expiry, role=role
        )
        return created.plaintext, str(created.token.id)

    async def user_with_token(self, role: str = "admin", **kwargs: Any) -> tuple[str, str, str]:
        """(user id, plaintext, token id) in a new company."""
        user_id = await self.user(await self.company(), role)
        plaintext, token_id = await self.token(user_id, **kwargs)
        return user_id, plaintext, token_id
