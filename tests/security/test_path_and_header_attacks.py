"""Path, host, header and framing attacks on the real gateway, sent as raw bytes.

Every request goes over a plain socket (``tests.security.rawhttp``) so that nothing between
the test and the gateway normalizes it. Every verdict is taken from the upstream's own record
of what it received (``RecordingUpstream.received``): a refusal must leave that record empty,
a forwarded request must arrive exactly as expected, and no path that any plausible upstream
would read as ``/admin`` (``lenient_view``) may arrive unless the request was authorized.

The route table puts a public route next to protected ones, and a public host-less catch-all
``/`` beside a protected virtual host, so that a trick which escapes a protected route lands
on a public one (and is forwarded) rather than on a harmless 404.

Refusals are problem+json from the gateway. A few raw bytes (a raw DEL in the path, obs-fold,
conflicting framing headers) are refused earlier, by aiohttp's llhttp parser, with a
``text/plain`` 400: ``assert_refused`` accepts that for 400 only, and the case ids say so;
every other refused path must be the gateway's own ``bad_path`` problem.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.config import Config
from tests.conftest import RecordingUpstream, Seeder, gateway_config
from tests.security import host_readings, is_under, lenient_view, start_gateway
from tests.security.rawhttp import Header, RawResponse, build_request, exchange, request

ADMIN_HOST = "admin.example"
PROTECTED_PREFIX = "/admin"
IDENTITY = {
    "x-auth-user-id",
    "x-auth-company-id",
    "x-auth-token-id",
    "x-auth-role",
    "x-auth-permissions",
}
FORGED = "forged-value"


def matrix_config(upstream_url: str, *, preserve_host: bool = False, **overrides: Any) -> Config:
    """A public ``/public`` and catch-all ``/`` beside protected ``/admin``, ``/api/jobs`` and
    the ``admin.example`` virtual host, all on one upstream."""
    routes = [
        {
            "name": "site",
            "match": {"prefix": "/"},
            "upstream": upstream_url,
            "public": True,
            "preserve_host": preserve_host,
        },
        {
            "name": "public",
            "match": {"prefix": "/public"},
            "upstream": upstream_url,
            "public": True,
        },
        {
            "name": "admin",
            "match": {"prefix": PROTECTED_PREFIX},
            "upstream": upstream_url,
            "require": ["users:admin"],
        },
        {
            "name": "jobs",
            "match": {"prefix": "/api/jobs"},
            "upstream": upstream_url,
            "require": ["jobs:read"],
        },
        {
            "name": "admin-host",
            "match": {"host": ADMIN_HOST, "prefix": "/"},
            "upstream": upstream_url,
            "require": ["users:admin"],
        },
    ]
    return gateway_config(upstream_url, routes=routes, **overrides)


@dataclass
class Gateway:
    """The gateway on 127.0.0.1, its upstream's record, and the attacker's field_user token."""

    port: int
    upstream: RecordingUpstream
    user_id: str
    token: str

    def bearer(self) -> list[Header]:
        return [("Authorization", f"Bearer {self.token}")]

    async def get(
        self,
        target: str | bytes,
        headers: Sequence[Header] = (),
        *,
        host: str | bytes | None = "127.0.0.1",
        authorized: bool = False,
    ) -> RawResponse:
        sent = [*headers, *self.bearer()] if authorized else list(headers)
        return await request(self.port, "GET", target, sent, host=host)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def open_gateway(
    database_url: str, db: Any, upstream: RecordingUpstream
) -> AsyncIterator[GatewayFactory]:
    """``await open_gateway(**config_overrides)`` → a running ``Gateway``."""
    seeder = Seeder(matrix_config(upstream.url), db)
    user_id, token, _ = await seeder.user_with_token("field_user")
    servers = []

    async def start(**overrides: Any) -> Gateway:
        server = await start_gateway(matrix_config(upstream.url, **overrides), database_url)
        servers.append(server)
        assert server.port is not None
        return Gateway(server.port, upstream, user_id, token)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def gateway(open_gateway: GatewayFactory) -> Gateway:
    return await open_gateway()


def assert_nothing_reached_admin(upstream: RecordingUpstream) -> None:
    """No recorded request is, in any plausible upstream's reading, under ``/admin``."""
    for received in upstream.received:
        path = received.raw_path.partition("?")[0]
        assert not is_under(lenient_view(path), PROTECTED_PREFIX), (
            f"the upstream received {received.raw_path!r}, read as {lenient_view(path)!r}"
        )


def assert_refused(response: RawResponse, status: int, problem: str | None = None) -> None:
    """``status`` as problem+json from the gateway, or a 400 from aiohttp's HTTP parser.

    With ``problem`` (an error code, ``bad_path``), only the gateway's problem of that type.
    """
    assert response.status == status, response.body[:300]
    if problem is not None:
        assert response.header("Content-Type") == "application/problem+json", response.headers
    if response.header("Content-Type") == "application/problem+json":
        body = response.json()
        assert body["status"] == status
        assert body["type"].startswith("urn:patgate:error:")
        if problem is not None:
            assert body["type"] == f"urn:patgate:error:{problem}", body
        assert body["request_id"] == response.header("X-Request-Id")
    else:  # llhttp refused the bytes before the gateway saw a request
        assert status == 400
        assert response.header("Content-Type") in ("text/plain; charset=utf-8", None)


# ---------------------------------------------------------------------------------------------
# Paths

PROTECTED = 401  # refused as unauthenticated (a field_user token: 403, it lacks users:admin)
# Repeated slashes: nginx (merge_slashes on), Tomcat and Apache serve "//admin" as "/admin",
# so the gateway decides "//admin" as "/admin" (protected) while forwarding it as sent; and a
# ".." right after repeated slashes, which the RFC and those upstreams resolve differently
# ("/public//../admin": "/public/admin" or "/admin"), is refused as a bad path.

# A "%3B" is decoded to ";" by a lenient upstream (``lenient_view``) that then drops it as a
# path parameter: "/admin%3bx" is its "/admin". So the gateway refuses "%3B" like a raw ";".


@dataclass(frozen=True)
class PathCase:
    target: bytes
    expect: int | str  # a refusal status, or the exact path the upstream must receive
    id: str
    parser: bool  # refused by llhttp (text/plain 400) before the gateway sees it


def case(
    target: bytes | str,
    expect: int | str,
    id: str | None = None,
    *,
    parser: bool = False,
    **kwargs: Any,
) -> Any:
    raw = target if isinstance(target, bytes) else target.encode()
    name = id or raw.decode("latin-1").encode("unicode_escape").decode()
    return pytest.param(PathCase(raw, expect, name, parser), id=name, **kwargs)


PATH_CASES = [
    # literal dot segments are resolved; the decision is made on what they resolve to
    case("/public/../admin", PROTECTED),
    case("/public/./../admin", PROTECTED),
    case("/PUBLIC/../admin", PROTECTED),
    case("/./admin", PROTECTED),
    case("/admin/../public/x", "/public/x"),
    case("/admin/./users", PROTECTED),
    # encoded dots, slashes, backslashes: refused, never decoded
    case("/public/%2e%2e/admin", 400),
    case("/public/%2E%2E/admin", 400),
    case("/public/.%2e/admin", 400),
    case("/public/%2e./admin", 400),
    case("/public/%2e%2e%2fadmin", 400),
    case("/public/..%2fadmin", 400),
    case("/public/..%2Fadmin", 400),
    case("/public%2f..%2fadmin", 400),
    case("/%2fadmin", 400),
    case("/public/..%5cadmin", 400),
    case("/public/%u002e%u002e/admin", 400),  # IIS %u escapes: malformed
    # double encoding is one level of escaping: forwarded exactly, never decoded twice
    case("/public/%252e%252e/admin", "/public/%252e%252e/admin"),
    case("/public/..%252fadmin", "/public/..%252fadmin"),
    # raw backslashes (llhttp lets them through: the gateway refuses them)
    case(b"/public/..\\admin", 400),
    case(b"/public\\..\\admin", 400),
    # NUL and control characters, encoded or raw
    case("/public/%00/../admin", 400),
    case("/public/..%00/admin", 400),
    case("/public/%01", 400),
    case("/public/%7f", 400),
    case("/public/%0d", 400),
    case("/public/%0a", 400),  # aiohttp's router matches the decoded "\n": still the gateway's
    case("/public/%0A/../admin", 400),
    case("/public/%0d%0aX-Auth-User-Id:%20root", 400),
    case(b"/public/\x7f/../admin", 400, id="raw-DEL (llhttp)", parser=True),
    case(b"/public/\x01/../admin", 400, id="raw-SOH (llhttp)", parser=True),
    # path parameters and fragments
    case("/public/..;/admin", 400),
    case("/public;/../admin", 400),
    case("/admin;x=1", 400),
    case("/admin%3bx", 400),
    case("/admin%3B/users", 400),
    case("/public#/../admin", 400),
    # climbing above the root
    case("/..", 400),
    case("/../admin", 400),
    case("/public/../../admin", 400),
    # escaped letters are compared decoded: still the protected route
    case("/%61dmin", PROTECTED),
    case("/ad%6Din/users", PROTECTED),
    case("/%2561dmin", "/%2561dmin"),  # one level: "/%61dmin" to the upstream, not "/admin"
    # the request target must be origin-form
    case("http://127.0.0.1/admin", 400, id="absolute-form"),
    case("*", 400, id="asterisk-form (llhttp)", parser=True),
    # repeated slashes: decided as one slash, forwarded as sent
    case("/admin//users", PROTECTED),
    case("//admin", PROTECTED),
    case("///admin/users", PROTECTED),
    case("//admin//", PROTECTED),
    case("//%61dmin", PROTECTED),
    case("/public/..//admin", PROTECTED),  # ".." pops "public": "//admin" remains
    case("//public/x", "//public/x"),
    case("/public//admin", "/public//admin"),  # not /admin, merged or not
    # ".." after repeated slashes: "/public/admin" to the RFC, "/admin" once merged: refused
    case("/public//../admin", 400),
    case("/public///../../admin", 400),
    case("/public//./../admin", 400),
    case("/public//x/../../admin", 400),
    case("//..", 400),
    case("//../admin", 400),
]


@pytest.mark.parametrize("who", ["anonymous", "field_user"])
@pytest.mark.parametrize("trick", PATH_CASES)
async def test_path_trick_never_reaches_a_protected_path(
    gateway: Gateway, trick: PathCase, who: str
) -> None:
    response = await gateway.get(trick.target, authorized=who == "field_user")

    assert_nothing_reached_admin(gateway.upstream)
    if isinstance(trick.expect, str):
        assert response.status == 200
        assert [r.raw_path for r in gateway.upstream.received] == [trick.expect]
    else:
        status = 403 if trick.expect == PROTECTED and who == "field_user" else trick.expect
        bad_path = status == 400 and not trick.parser
        assert_refused(response, status, "bad_path" if bad_path else None)
        assert gateway.upstream.received == []


async def test_a_field_user_token_reaches_its_own_route_and_the_public_ones(
    gateway: Gateway,
) -> None:
    """The control for the matrix: the attacker's token and the public routes do work."""
    assert (await gateway.get("/api/jobs/1", authorized=True)).status == 200
    assert (await gateway.get("/public/x")).status == 200
    assert (await gateway.get("/elsewhere")).status == 200
    assert [r.raw_path for r in gateway.upstream.received] == [
        "/api/jobs/1",
        "/public/x",
        "/elsewhere",
    ]


# ---------------------------------------------------------------------------------------------
# Forward-auth: nginx proxies the *raw* URI itself, so the decision must hold for every reading

AUTH = "/_patgate/auth"


@pytest.mark.parametrize(
    ("uri", "status"),
    [
        ("/public/x", 200),
        ("/public/../admin", 401),
        ("/%61dmin", 401),
        ("/public/%2e%2e/admin", 403),  # nginx knows only 2xx/401/403: a bad path is 403
        ("//admin", 401),
        ("///admin/users?x=1", 401),
        ("/public/..//admin", 401),
        ("/public//../admin", 403),  # ".." after repeated slashes: a bad path
        ("//public/x", 200),
    ],
)
async def test_forward_auth_decides_on_what_a_lenient_upstream_will_serve(
    open_gateway: GatewayFactory, uri: str, status: int
) -> None:
    gateway = await open_gateway(trusted_proxies=["127.0.0.1/32"])
    headers = [("X-Original-URI", uri), ("X-Original-Method", "GET")]

    response = await gateway.get(AUTH, headers)

    if is_under(lenient_view(uri.partition("?")[0]), PROTECTED_PREFIX):
        assert response.status in (401, 403), f"{uri!r} allowed, read as {lenient_view(uri)!r}"
    assert response.status == status
    if status == 403:
        assert_refused(response, 403, "bad_path")
    assert gateway.upstream.received == []


# ---------------------------------------------------------------------------------------------
# Hosts


@pytest.mark.parametrize(
    "host",
    [
        "admin.example",
        "ADMIN.EXAMPLE",
        "admin.example.",
        "admin.example:8080",
        "Admin.Example.:80",
        "aDmIn.ExAmPlE.:443",
    ],
)
@pytest.mark.parametrize("who", ["anonymous", "field_user"])
async def test_host_variants_select_the_protected_virtual_host(
    gateway: Gateway, host: str, who: str
) -> None:
    response = await gateway.get("/users", host=host, authorized=who == "field_user")

    assert_refused(response, 401 if who == "anonymous" else 403)
    assert gateway.upstream.received == []


@pytest.mark.parametrize("host", ["www.example", "www.example:8080", "[::1]:8080", "_x.example."])
async def test_other_hosts_use_the_public_catch_all(gateway: Gateway, host: str) -> None:
    """The control for the host matrix: the same request on another (valid) host is forwarded."""
    response = await gateway.get("/users", host=host)
    assert response.status == 200
    assert gateway.upstream.last.raw_path == "/users"
    assert gateway.upstream.last.all("X-Forwarded-Host") == [host]


# A Host that is not host[:port] is read differently by different readers (``host_readings``:
# nginx and Express cut "admin.example:80:80" at the first ':', Express cuts at a ',',
# urlsplit drops userinfo and path), so the gateway refuses it outright, before any route is
# chosen: it can neither be matched as some other host and take the public catch-all, nor
# reach an upstream (as Host with preserve_host, or as X-Forwarded-Host) that reads
# admin.example in it.
MALFORMED_HOSTS = [
    "admin.example:80:80",  # nginx, Express
    "admin.example, evil.example",  # Express
    "evil@admin.example",  # urlsplit
    "admin.example/x",  # urlsplit
    "admin.example..",
    "aDmIn.ExAmPlE..:443",
    "admin.example:",
    "admin example",
    "::1",  # IPv6 must be bracketed
]
REFUSED_HOST = "the Host header is not a valid host"


@pytest.mark.parametrize("host", MALFORMED_HOSTS)
@pytest.mark.parametrize("who", ["anonymous", "field_user"])
async def test_a_malformed_host_is_refused(gateway: Gateway, host: str, who: str) -> None:
    for target in ("/users", "/public/x"):  # on the catch-all and on a public prefix route
        response = await gateway.get(target, host=host, authorized=who == "field_user")

        assert_refused(response, 400, "bad_request")
        assert response.json()["detail"] == REFUSED_HOST
    assert gateway.upstream.received == []


@pytest.mark.parametrize(
    ("host", "status"),
    [
        *[(host, 400) for host in MALFORMED_HOSTS],
        ("admin.example:8080", 401),
        ("ADMIN.example.", 401),
    ],
)
async def test_no_host_read_as_the_protected_one_reaches_the_upstream_anonymously(
    open_gateway: GatewayFactory, host: str, status: int
) -> None:
    gateway = await open_gateway(preserve_host=True)

    response = await gateway.get("/users", host=host)

    for received in gateway.upstream.received:
        for name in ("Host", "X-Forwarded-Host"):
            for value in received.all(name):
                assert ADMIN_HOST not in host_readings(value), f"{name}: {value!r} arrived"
    assert_refused(response, status, "bad_request" if status == 400 else "unauthorized")
    assert gateway.upstream.received == []


@pytest.mark.parametrize("host", ["admin.example:80:80", "evil@admin.example", "admin.example.."])
async def test_forward_auth_refuses_a_malformed_forwarded_host(
    open_gateway: GatewayFactory, host: str
) -> None:
    """From a trusted proxy, X-Forwarded-Host is the host decided on: validated the same."""
    gateway = await open_gateway(trusted_proxies=["127.0.0.1/32"])
    headers = [("X-Original-URI", "/users"), ("X-Original-Method", "GET")]

    allowed = await gateway.get(AUTH, [*headers, ("X-Forwarded-Host", "www.example")])
    protected = await gateway.get(AUTH, [*headers, ("X-Forwarded-Host", "admin.example")])
    response = await gateway.get(AUTH, [*headers, ("X-Forwarded-Host", host)])

    assert allowed.status == 200
    assert protected.status == 401
    assert_refused(response, 403, "bad_request")  # nginx knows only 2xx/401/403
    assert response.json()["detail"] == REFUSED_HOST
    assert gateway.upstream.received == []


# ---------------------------------------------------------------------------------------------
# Headers: on a public route and on the protected jobs route with the attacker's token

ROUTES = ["public", "protected"]


async def send_on(gateway: Gateway, route: str, headers: Sequence[Header]) -> RawResponse:
    if route == "public":
        return await gateway.get("/public/x", headers)
    return await gateway.get("/api/jobs/1", headers, authorized=True)


def normalized(name: str) -> str:
    return name.lower().replace("_", "-")


def assert_identity(gateway: Gateway, route: str) -> None:
    """Exactly the gateway's identity headers arrived (none on a public route), each once."""
    received = gateway.upstream.last
    arrived = [
        (normalized(n), v) for n, v in received.headers if normalized(n).startswith("x-auth-")
    ]
    if route == "public":
        assert arrived == []
        return
    assert sorted(name for name, _ in arrived) == sorted(IDENTITY)
    values = dict(arrived)
    assert values["x-auth-user-id"] == gateway.user_id
    assert values["x-auth-role"] == "field_user"
    assert values["x-auth-permissions"] == "jobs:read"
    assert [n for n, _ in received.headers if normalized(n) == "x-auth-user-id"] == [
        "X-Auth-User-Id"
    ]


def assert_not_forwarded(gateway: Gateway, *names: str) -> None:
    arrived = {normalized(n) for n, _ in gateway.upstream.last.headers}
    assert arrived.isdisjoint(normalized(n) for n in names), arrived
    assert not any(FORGED in v for _, v in gateway.upstream.last.headers)


SPOOFED_IDENTITY = [
    [("X-Auth-User-Id", FORGED)],
    [("x-auth-user-id", FORGED)],
    [("X-AUTH-USER-ID", FORGED)],
    [("X_AUTH_USER_ID", FORGED)],
    [("X-Auth_User-Id", FORGED)],
    [("x_auth_company_id", FORGED)],
    [("X-Auth-Token-Id", FORGED), ("X-Auth-Token-Id", FORGED)],
    [("X-Auth-Role", FORGED)],
    [("x-auth-permissions", "*")],
    [("X-Auth-Anything", FORGED)],
    [("X_Auth_Anything", FORGED)],
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "headers", SPOOFED_IDENTITY, ids=lambda h: "+".join(f"{n}:{v}" for n, v in h)
)
async def test_spoofed_identity_headers_never_arrive(
    gateway: Gateway, route: str, headers: list[Header]
) -> None:
    response = await send_on(gateway, route, headers)

    assert response.status == 200
    assert_identity(gateway, route)
    assert not any(FORGED in v or v == "*" for _, v in gateway.upstream.last.headers)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "nominate",
    ["close, X-Auth-User-Id", "X-Auth-User-Id", "x_auth_user_id, keep-alive", "X-Auth-Role"],
)
async def test_connection_cannot_nominate_away_the_injected_identity(
    gateway: Gateway, route: str, nominate: str
) -> None:
    headers = [("Connection", nominate), ("X-Auth-User-Id", FORGED), ("X-Auth-Role", FORGED)]

    response = await send_on(gateway, route, headers)

    assert response.status == 200
    assert_identity(gateway, route)
    assert not any(FORGED in v for _, v in gateway.upstream.last.headers)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "connections",
    [
        [("Connection", "keep-alive"), ("Connection", "X-Secret")],
        [("Connection", ""), ("Connection", "X-Secret")],
        [("Connection", ","), ("Connection", " x-secret ,")],
        [("Connection", "keep-alive"), ("connection", "x_secret")],
    ],
    ids=["keep-alive+X-Secret", "empty+X-Secret", "commas+x-secret", "keep-alive+x_secret"],
)
async def test_every_connection_header_nominates(
    gateway: Gateway, route: str, connections: list[Header]
) -> None:
    headers = [*connections, ("X-Secret", FORGED), ("X-Kept", "yes")]

    response = await send_on(gateway, route, headers)

    assert response.status == 200
    assert_not_forwarded(gateway, "X-Secret", "Connection")
    assert gateway.upstream.last.all("X-Kept") == ["yes"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "header",
    [
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Late"),
        ("Proxy-Authorization", "Basic Zm9yZ2VkOmZvcmdlZA=="),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy_Authorization", "Basic Zm9yZ2VkOmZvcmdlZA=="),
        ("Upgrade", "h2c"),
        ("Upgrade", "websocket"),
    ],
    ids=lambda h: h[0],
)
async def test_hop_by_hop_headers_never_arrive(
    gateway: Gateway, route: str, header: tuple[str, str]
) -> None:
    response = await send_on(gateway, route, [header, ("X-Kept", "yes")])

    assert response.status == 200
    assert_not_forwarded(gateway, header[0])
    assert gateway.upstream.last.all("X-Kept") == ["yes"]
    assert_identity(gateway, route)


@pytest.mark.parametrize("route", ROUTES)
async def test_an_h2c_upgrade_is_forwarded_as_a_plain_request(gateway: Gateway, route: str) -> None:
    headers = [
        ("Connection", "Upgrade, HTTP2-Settings"),
        ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
    ]

    response = await send_on(gateway, route, headers)

    assert response.status == 200
    assert_not_forwarded(gateway, "Upgrade", "HTTP2-Settings", "Connection")
    assert len(gateway.upstream.received) == 1


SPOOFED_FORWARDING = [
    ("X-Forwarded-For", "1.2.3.4"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-Prefix", "/admin"),
    ("X_Forwarded_For", "5.6.7.8"),
    ("Forwarded", "for=1.2.3.4;host=evil.example;proto=https"),
    ("X-Real-IP", "1.2.3.4"),
]


@pytest.mark.parametrize("route", ROUTES)
async def test_forwarding_headers_from_an_untrusted_peer_are_replaced(
    gateway: Gateway, route: str
) -> None:
    response = await send_on(gateway, route, SPOOFED_FORWARDING)

    assert response.status == 200
    got = gateway.upstream.last
    assert got.all("X-Forwarded-For") == ["127.0.0.1"]
    assert got.all("X-Forwarded-Host") == ["127.0.0.1"]
    assert got.all("X-Forwarded-Proto") == ["http"]
    assert_not_forwarded(
        gateway, "Forwarded", "X-Real-IP", "X-Forwarded-Port", "X-Forwarded-Prefix"
    )
    values = " ".join(v for _, v in got.headers)
    assert "1.2.3.4" not in values
    assert "5.6.7.8" not in values
    assert "evil.example" not in values


@pytest.mark.parametrize("route", ROUTES)
async def test_forwarding_headers_from_a_trusted_proxy_are_kept_and_appended(
    open_gateway: GatewayFactory, route: str
) -> None:
    gateway = await open_gateway(trusted_proxies=["127.0.0.1/32"])

    response = await send_on(gateway, route, SPOOFED_FORWARDING)

    assert response.status == 200
    got = gateway.upstream.last
    assert got.all("X-Forwarded-For") == ["1.2.3.4, 127.0.0.1"]
    assert got.all("X-Forwarded-Host") == ["evil.example"]
    assert got.all("X-Forwarded-Proto") == ["https"]
    assert_not_forwarded(
        gateway, "Forwarded", "X-Real-IP", "X-Forwarded-Port", "X-Forwarded-Prefix"
    )
    assert "5.6.7.8" not in " ".join(v for _, v in got.headers)


@pytest.mark.parametrize("route", ROUTES)
async def test_a_sane_request_id_is_kept_and_returned(gateway: Gateway, route: str) -> None:
    response = await send_on(gateway, route, [("X-Request-Id", "req-42.a:b@c/d+e=f")])

    assert response.status == 200
    assert response.all("X-Request-Id") == ["req-42.a:b@c/d+e=f"]
    assert gateway.upstream.last.all("X-Request-Id") == ["req-42.a:b@c/d+e=f"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        [("X-Request-Id", "has spaces in it")],
        [("X-Request-Id", "a" * 300)],
        [("X-Request-Id", "semi;colon")],
        [("X-Request-Id", "")],
        [("X_Request_Id", "underscored")],
        [("X-Request-Id", "bad id"), ("X-Request-Id", "second-sane")],
    ],
    ids=["spaces", "300-chars", "semicolon", "empty", "underscore", "insane-then-sane"],
)
async def test_an_insane_request_id_is_replaced(
    gateway: Gateway, route: str, headers: list[Header]
) -> None:
    response = await send_on(gateway, route, headers)

    assert response.status == 200
    generated = response.all("X-Request-Id")
    assert len(generated) == 1
    assert len(generated[0]) == 32
    assert int(generated[0], 16) >= 0
    got = gateway.upstream.last
    assert [v for n, v in got.headers if normalized(n) == "x-request-id"] == generated


@pytest.mark.parametrize("route", ROUTES)
async def test_two_request_ids_arrive_as_one(gateway: Gateway, route: str) -> None:
    headers = [("X-Request-Id", "first-id"), ("X-Request-Id", "second-id")]

    response = await send_on(gateway, route, headers)

    assert response.status == 200
    assert response.all("X-Request-Id") == ["first-id"]
    got = gateway.upstream.last
    assert [v for n, v in got.headers if normalized(n) == "x-request-id"] == ["first-id"]


async def test_two_authorization_headers_are_refused(gateway: Gateway) -> None:
    headers = [*gateway.bearer(), *gateway.bearer()]

    response = await gateway.get("/api/jobs/1", headers)

    assert_refused(response, 400)
    assert gateway.upstream.received == []


async def test_authorization_never_reaches_a_public_upstream(gateway: Gateway) -> None:
    response = await gateway.get("/public/x", authorized=True)

    assert response.status == 200
    assert gateway.upstream.last.all("Authorization") == []


# ---------------------------------------------------------------------------------------------
# Request smuggling: llhttp must refuse, or exactly one well-framed request is forwarded

SMUGGLED = b"GET /admin/users HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
CLOSING = build_request("GET", "/public/end")


def post(headers: bytes, body: bytes) -> bytes:
    return b"POST /public/x HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n" + body


SMUGGLING = [
    pytest.param(
        post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        id="CL+TE",
    ),
    pytest.param(
        post(b"Transfer-Encoding: chunked\r\nContent-Length: 6\r\n", b"0\r\n\r\n" + SMUGGLED),
        id="TE+CL",
    ),
    pytest.param(
        post(b"Content-Length: 0\r\nContent-Length: 46\r\n", SMUGGLED),
        id="CL+CL-differing",
    ),
    pytest.param(
        post(b"Content-Length: 46, 0\r\n", SMUGGLED),
        id="CL-list",
    ),
    pytest.param(
        post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n" + SMUGGLED),
        id="TE-chunked-identity",
    ),
    pytest.param(
        post(
            b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
            b"0\r\n\r\n" + SMUGGLED,
        ),
        id="TE-split",
    ),
    pytest.param(
        post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        id="TE-unknown",
    ),
    pytest.param(
        post(b"Transfer-Encoding : chunked\r\nContent-Length: 46\r\n", SMUGGLED),
        id="TE-space-before-colon",
    ),
    pytest.param(
        post(b"X-Note: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 46\r\n", SMUGGLED),
        id="obs-fold",
    ),
    pytest.param(
        post(b"Transfer-Encoding: chunked\r\n", b"0x2e\r\n" + SMUGGLED + b"\r\n0\r\n\r\n"),
        id="chunk-size-0x",
    ),
    pytest.param(
        post(b"Transfer-Encoding: chunked\r\n", b"0\n\n" + SMUGGLED),
        id="chunk-bare-LF",
    ),
    pytest.param(
        post(b"Content-Length: 46\r\n", SMUGGLED).replace(b"\r\nHost", b"\nHost"),
        id="bare-LF-header",
    ),
]


@pytest.mark.parametrize("payload", SMUGGLING)
async def test_smuggling_is_refused_or_framed_as_one_request(
    gateway: Gateway, payload: bytes
) -> None:
    responses = await exchange(gateway.port, payload + CLOSING)

    received = gateway.upstream.received
    assert_nothing_reached_admin(gateway.upstream)
    assert responses, "the gateway answered nothing"
    first = responses[0]
    if first.status == 400:
        assert_refused(first, 400)
        assert received == []
        assert len(responses) == 1  # and the connection was closed: nothing else was parsed
    else:  # one POST, its body exactly the smuggled bytes, then the closing GET
        assert first.status == 200
        assert [(r.method, r.raw_path) for r in received] == [
            ("POST", "/public/x"),
            ("GET", "/public/end"),
        ]
        assert received[0].body == SMUGGLED
