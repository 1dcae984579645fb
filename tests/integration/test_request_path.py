"""The request path end to end: real PostgreSQL, a real upstream, the real gateway app."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp.http_parser
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from gateway.app import AUTHENTICATOR, CACHE, LISTENER
from gateway.lifecycle import OPERATOR, Expiry
from tests.conftest import GatewayFactory, RecordingUpstream, Seeder, bearer, gateway_config


class CountingPool:
    """Delegates to the real pool and counts the token lookups that reach PostgreSQL."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.queries = 0

    async def fetchrow(self, *args: Any, **kwargs: Any) -> Any:
        self.queries += 1
        return await self.pool.fetchrow(*args, **kwargs)


def count_queries(client: Any) -> CountingPool:
    authenticator = client.app[AUTHENTICATOR]
    counter = CountingPool(authenticator.pool)
    authenticator.pool = counter
    return counter


@pytest.fixture
async def seed(db: Any, upstream: RecordingUpstream) -> Seeder:
    return Seeder(gateway_config(upstream.url), db)


async def problem(response: Any) -> dict[str, Any]:
    assert response.headers["Content-Type"] == "application/problem+json"
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == response.status
    assert body["type"].startswith("urn:patgate:error:")
    assert body["request_id"] == response.headers["X-Request-Id"]
    return body


def test_the_c_http_parser_is_in_use() -> None:
    """The pure-Python parser has had request-smuggling bugs: llhttp must be the one used."""
    from aiohttp import _http_parser  # type: ignore[attr-defined]

    assert aiohttp.http_parser.HttpRequestParser is _http_parser.HttpRequestParser


async def test_valid_pat_reaches_upstream_with_identity_and_without_authorization(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    company_id = await seed.company()
    user_id = await seed.user(company_id, "full_user")
    token, token_id = await seed.token(user_id)
    client = await make_gateway(gateway_config(upstream.url))

    url = URL("/api/jobs/7?x=1&y=%2F", encoded=True)  # sent exactly as written
    response = await client.get(url, headers=bearer(token))

    assert response.status == 200
    got = upstream.last
    assert got.raw_path == "/api/jobs/7?x=1&y=%2F"
    assert got.header("X-Auth-User-Id") == user_id
    assert got.header("X-Auth-Token-Id") == token_id
    assert got.header("X-Auth-Role") == "full_user"
    assert got.header("X-Auth-Permissions") == "invoices:read jobs:* tokens:create"
    assert got.header("X-Auth-Company-Id") == company_id
    assert got.header("Authorization") is None
    assert got.header("X-Request-Id") == response.headers["X-Request-Id"]
    assert got.header("X-Forwarded-For") == "127.0.0.1"
    expires = datetime.fromisoformat(response.headers["X-Auth-Token-Expires-At"])
    assert timedelta(days=364) < expires - datetime.now(UTC) <= timedelta(days=365)


async def test_missing_header_is_401_with_bearer_challenge(
    make_gateway: GatewayFactory, upstream: RecordingUpstream
) -> None:
    client = await make_gateway(gateway_config(upstream.url))

    response = await client.get("/api/jobs/7")

    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="patgate"'
    assert (await problem(response))["type"] == "urn:patgate:error:unauthorized"
    assert upstream.received == []


async def test_bad_checksum_is_401_without_a_database_query(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    _, token, _ = await seed.user_with_token()
    client = await make_gateway(gateway_config(upstream.url))
    queries = count_queries(client)
    last = token[-1]
    tampered = token[:-1] + ("A" if last != "A" else "B")

    response = await client.get("/api/jobs/7", headers=bearer(tampered))

    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="patgate", error="invalid_token"'
    assert queries.queries == 0
    assert client.app[CACHE].stats.misses == 0
    assert upstream.received == []


@pytest.mark.parametrize(
    "value", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "bearer pat_short", "Token x"]
)
async def test_malformed_authorization_is_401(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, value: str
) -> None:
    client = await make_gateway(gateway_config(upstream.url))
    response = await client.get("/api/jobs/7", headers={"Authorization": value})
    assert response.status == 401
    body = await problem(response)
    assert body["detail"] == "The access token is invalid or expired."


async def test_two_authorization_headers_are_refused(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    _, token, _ = await seed.user_with_token()
    client = await make_gateway(gateway_config(upstream.url))
    headers = [("Authorization", f"Bearer {token}"), ("Authorization", "Bearer other")]
    response = await client.get("/api/jobs/7", headers=headers)
    assert response.status == 400
    assert upstream.received == []


async def test_unknown_token_is_401_and_says_nothing_more(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    client = await make_gateway(gateway_config(upstream.url))
    unknown = seed.service.format.generate().plaintext  # well-formed, never stored

    response = await client.get("/api/jobs/7", headers=bearer(unknown))

    assert response.status == 401
    assert (await problem(response))["detail"] == "The access token is invalid or expired."
    assert unknown not in await response.text()


async def test_expired_token_is_401(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder, db: Any
) -> None:
    _, token, token_id = await seed.user_with_token()
    await db.execute(
        "UPDATE tokens SET expires_at = now() - interval '1 second' WHERE id = $1::uuid", token_id
    )
    client = await make_gateway(gateway_config(upstream.url))
    response = await client.get("/api/jobs/7", headers=bearer(token))
    assert response.status == 401
    assert upstream.received == []


async def test_revocation_without_a_notice_is_visible_once_the_cache_ttl_has_passed(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder, db: Any
) -> None:
    """cache.ttl is the backstop for a change that sent no NOTIFY (a manual SQL fix)."""
    _, token, token_id = await seed.user_with_token()
    client = await make_gateway(gateway_config(upstream.url, cache={"ttl": "30s"}))
    now = [1000.0]
    client.app[CACHE].clock = lambda: now[0]
    assert (await client.get("/api/jobs/1", headers=bearer(token))).status == 200

    await db.execute(
        "UPDATE tokens SET revoked_at = now(), revoked_reason = 'admin' WHERE id = $1::uuid",
        token_id,
    )
    now[0] += 29.0  # still inside the ttl: the cached identity is served
    assert (await client.get("/api/jobs/2", headers=bearer(token))).status == 200
    now[0] += 1.5  # past the ttl: the token is looked up again and refused
    assert (await client.get("/api/jobs/3", headers=bearer(token))).status == 401
    assert [r.raw_path for r in upstream.received] == ["/api/jobs/1", "/api/jobs/2"]


async def test_revocation_elsewhere_reaches_the_cache_through_notify(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    """A revocation by another process (here: the CLI's service on its own connection)."""
    _, token, token_id = await seed.user_with_token()
    client = await make_gateway(gateway_config(upstream.url, cache={"ttl": "1h"}))
    listener = client.app[LISTENER]
    await asyncio.wait_for(listener.connected.wait(), 10)
    assert (await client.get("/api/jobs/1", headers=bearer(token))).status == 200

    listener.notified.clear()
    await seed.service.revoke(OPERATOR, token_id)
    await asyncio.wait_for(listener.notified.wait(), 10)

    assert (await client.get("/api/jobs/2", headers=bearer(token))).status == 401
    assert [r.raw_path for r in upstream.received] == ["/api/jobs/1"]


async def test_cached_token_costs_no_second_query(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    _, token, _ = await seed.user_with_token()
    client = await make_gateway(gateway_config(upstream.url))
    queries = count_queries(client)
    for _ in range(5):
        assert (await client.get("/api/jobs/1", headers=bearer(token))).status == 200
    assert queries.queries == 1


async def test_missing_permission_is_403_insufficient_scope(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    _, token, _ = await seed.user_with_token("field_user")
    client = await make_gateway(gateway_config(upstream.url))

    assert (await client.get("/api/jobs/1", headers=bearer(token))).status == 200
    response = await client.post("/api/jobs", headers=bearer(token), data=b"{}")

    assert response.status == 403
    assert response.headers["WWW-Authenticate"] == (
        'Bearer realm="patgate", error="insufficient_scope"'
    )
    assert (await problem(response))["type"] == "urn:patgate:error:insufficient_scope"
    assert [r.method for r in upstream.received] == ["GET"]


async def test_require_any_needs_one_of_the_permissions(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    _, reader, _ = await seed.user_with_token("full_user")  # invoices:read
    _, field, _ = await seed.user_with_token("field_user")  # jobs:read only
    client = await make_gateway(gateway_config(upstream.url))
    assert (await client.get("/api/invoices/1", headers=bearer(reader))).status == 200
    assert (await client.get("/api/invoices/1", headers=bearer(field))).status == 403


async def test_unknown_path_404_and_wrong_method_405(
    make_gateway: GatewayFactory, upstream: RecordingUpstream
) -> None:
    client = await make_gateway(gateway_config(upstream.url))

    missing = await client.get("/nowhere")
    assert missing.status == 404
    await problem(missing)

    wrong = await client.post("/api/invoices/1")
    assert wrong.status == 405
    assert wrong.headers["Allow"] == "GET"
    await problem(wrong)

    reserved = await client.get("/_patgate/anything")
    assert reserved.status == 404
    assert upstream.received == []


async def test_bad_path_is_400_problem(
    make_gateway: GatewayFactory, upstream: RecordingUpstream
) -> None:
    client = await make_gateway(gateway_config(upstream.url))
    response = await client.get(URL("/public/%2e%2e/api/jobs", encoded=True))
    assert response.status == 400
    assert (await problem(response))["type"] == "urn:patgate:error:bad_path"
    assert upstream.received == []


SPOOFED = [
    ("X-Auth-User-Id", "root"),
    ("x-auth-user-id", "root"),
    ("X_Auth_User_Id", "root"),
    ("X-AUTH-COMPANY-ID", "other"),
    ("x_auth_permissions", "*"),
    ("X-Auth-Anything", "1"),
]


@pytest.mark.parametrize("path", ["/public/x", "/api/jobs/1"])
async def test_spoofed_identity_headers_never_arrive(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder, path: str
) -> None:
    company_id = await seed.company()
    user_id = await seed.user(company_id, "field_user")
    token, token_id = await seed.token(user_id)
    client = await make_gateway(gateway_config(upstream.url))

    response = await client.get(path, headers=[*SPOOFED, *bearer(token).items()])

    assert response.status == 200
    # every spelling, in arrival order: a forged one ahead of the real one would show
    arrived = [
        (name.lower().replace("_", "-"), value)
        for name, value in upstream.last.headers
        if name.lower().replace("_", "-").startswith("x-auth-")
    ]
    if path.startswith("/public"):
        assert arrived == []
    else:
        assert arrived == [
            ("x-auth-user-id", user_id),
            ("x-auth-company-id", company_id),
            ("x-auth-token-id", token_id),
            ("x-auth-role", "field_user"),
            ("x-auth-permissions", "jobs:read"),
        ]


async def test_connection_nominated_and_hop_by_hop_headers_are_removed(
    make_gateway: GatewayFactory, upstream: RecordingUpstream
) -> None:
    client = await make_gateway(gateway_config(upstream.url))
    headers = [
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("X-Secret-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic eA=="),
        ("TE", "trailers"),
        ("X-Kept", "yes"),
    ]
    assert (await client.get("/public/x", headers=headers)).status == 200
    names = {name.lower() for name, _ in upstream.last.headers}
    assert names.isdisjoint({"x-secret-hop", "keep-alive", "proxy-authorization", "te"})
    assert upstream.last.header("X-Kept") == "yes"


async def test_forward_authorization_route_keeps_the_header(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    _, token, _ = await seed.user_with_token()
    cfg = gateway_config(
        upstream.url,
        routes=[
            {
                "name": "raw",
                "match": {"prefix": "/"},
                "upstream": upstream.url,
                "forward_authorization": True,
            }
        ],
    )
    client = await make_gateway(cfg)
    assert (await client.get("/x", headers=bearer(token))).status == 200
    assert upstream.last.header("Authorization") == f"Bearer {token}"


async def test_token_role_narrows_permissions_and_owner_role_change_shrinks_them(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    owner = await seed.user(await seed.company(), "admin")
    scoped, _ = await seed.token(owner, role="field_user")
    client = await make_gateway(gateway_config(upstream.url, cache={"ttl": "0s"}))

    assert (await client.get("/api/jobs/1", headers=bearer(scoped))).status == 200
    assert upstream.last.header("X-Auth-Permissions") == "jobs:read"
    assert upstream.last.header("X-Auth-Role") == "field_user"
    assert (await client.post("/api/jobs", headers=bearer(scoped))).status == 403

    full, _ = await seed.token(owner)
    await seed.service.set_role(OPERATOR, owner, "full_user")  # still may hold tokens
    assert (await client.get("/api/invoices/1", headers=bearer(full))).status == 200
    assert upstream.last.header("X-Auth-Permissions") == "invoices:read jobs:* tokens:create"


async def test_deactivated_owner_disables_the_token(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    user_id, token, _ = await seed.user_with_token()
    client = await make_gateway(gateway_config(upstream.url, cache={"ttl": "0s"}))
    assert (await client.get("/api/jobs/1", headers=bearer(token))).status == 200

    await seed.service.set_status(OPERATOR, user_id, "deactivated")
    assert (await client.get("/api/jobs/1", headers=bearer(token))).status == 401
    await seed.service.set_status(OPERATOR, user_id, "active")
    assert (await client.get("/api/jobs/1", headers=bearer(token))).status == 401


async def test_token_without_expiry_has_no_expiry_header(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    _, token, _ = await seed.user_with_token(expiry=Expiry(never=True))
    client = await make_gateway(gateway_config(upstream.url))
    response = await client.get("/api/jobs/1", headers=bearer(token))
    assert response.status == 200
    assert "X-Auth-Token-Expires-At" not in response.headers


async def test_request_body_and_response_headers_pass_through(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    _, token, _ = await seed.user_with_token()
    upstream.status = 201
    upstream.response_headers = {"Location": "/api/jobs/9", "X-Upstream": "1"}
    client = await make_gateway(gateway_config(upstream.url))
    body = bytes(range(256)) * 4096  # 1 MiB, every byte value

    response = await client.post("/api/jobs", headers=bearer(token), data=body)

    assert response.status == 201
    assert response.headers["Location"] == "/api/jobs/9"
    assert response.headers["X-Upstream"] == "1"
    assert upstream.last.body == body
    assert upstream.last.header("Content-Length") == str(len(body))


async def test_client_request_id_is_kept_when_sane_and_replaced_otherwise(
    make_gateway: GatewayFactory, upstream: RecordingUpstream
) -> None:
    client = await make_gateway(gateway_config(upstream.url))
    kept = await client.get("/public/x", headers={"X-Request-Id": "abc-123"})
    assert kept.headers["X-Request-Id"] == "abc-123"
    assert upstream.last.header("X-Request-Id") == "abc-123"

    replaced = await client.get("/public/x", headers={"X-Request-Id": "bad id\twith spaces"})
    new_id = replaced.headers["X-Request-Id"]
    assert new_id != "bad id\twith spaces"
    assert len(new_id) == 32
    assert upstream.last.all("X-Request-Id") == [new_id]


async def test_upstream_refusing_connections_is_502(
    make_gateway: GatewayFactory, unused_tcp_port: int
) -> None:
    dead = f"http://127.0.0.1:{unused_tcp_port}"
    client = await make_gateway(gateway_config(dead))
    response = await client.get("/public/x")
    assert response.status == 502
    assert (await problem(response))["type"] == "urn:patgate:error:bad_gateway"


async def test_upstream_silence_past_the_route_timeout_is_504(
    make_gateway: GatewayFactory,
) -> None:
    never = asyncio.Event()
    arrived = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        arrived.set()
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/{tail:.*}", stall)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    cfg = gateway_config(
        url,
        routes=[
            {
                "name": "slow",
                "match": {"prefix": "/"},
                "upstream": url,
                "public": True,
                "timeout": "200ms",
            }
        ],
    )
    client = await make_gateway(cfg)
    try:
        response = await client.get("/slow")
        assert arrived.is_set()
        assert response.status == 504
        assert (await problem(response))["type"] == "urn:patgate:error:gateway_timeout"
    finally:
        never.set()
        await server.close()
