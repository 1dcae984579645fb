"""The front end (gateway.front) against aiohttp's server: the same bytes for the same request.

Each request is sent twice over raw sockets: to the gateway as ``patgate serve`` runs it
(the front end answers plain requests itself) and to the same application behind aiohttp's
plain ``TestServer`` (aiohttp answers everything). The answers must be identical: status
line, every header in order (the ``Date`` value aside), and body. The upstream is a raw
server that writes exactly the answer a case chooses, so framing edge cases are covered too.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app, reload
from gateway.config import Config, parse_config
from gateway.keys import LISTENER
from gateway.lifecycle import OPERATOR
from tests.conftest import (
    GatewayFactory,
    RecordingUpstream,
    Seeder,
    StartRaw,
    gateway_config,
    gateway_config_data,
)
from tests.security.rawhttp import RawResponse, build_request, exchange, read_response
from tests.servers import GatewayTestServer

REQUEST_ID = ("X-Request-Id", "parity-1")  # a sane client id is kept: both answers carry it

UPSTREAM_ANSWERS = {
    "json": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    "no-content-type": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    "empty-body": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    ),
    "close-delimited": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nbye"
    ),
    "204": b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-Kept: yes\r\n\r\n",
    "304": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 12\r\n\r\n',
    "hop-by-hop": (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nServer: upstream/1\r\n"
        b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\nX-Request-Id: from-upstream\r\n"
        b"X-Request-Id: again\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 2\r\n\r\nok"
    ),
    "empty-reason": b"HTTP/1.1 418 \r\nContent-Length: 0\r\n\r\n",
    "interim": (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
    ),
    "garbage": b"this is not http\r\n\r\n",
}

Start = Callable[[bytes], Awaitable[str]]


@pytest.fixture
def raw_upstream(raw_server: StartRaw) -> Start:
    """An upstream answering every request with the bytes given; its URL."""

    async def start(answer: bytes) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(answer)
                    await writer.drain()
                    if b"Connection: close" in answer or not answer.startswith(b"HTTP/"):
                        break
            writer.close()

        return await raw_server(handle)

    return start


@pytest.fixture
async def serve_both(
    database_url: str,
) -> AsyncIterator[Callable[[Config], Awaitable[tuple[int, int]]]]:
    """The same configuration served by the front end and by aiohttp alone: their ports."""
    servers: list[TestServer] = []

    async def start(cfg: Config) -> tuple[int, int]:
        front = GatewayTestServer(create_app(cfg, database_url), host="127.0.0.1")
        plain = TestServer(create_app(cfg, database_url), host="127.0.0.1")
        for server in (front, plain):
            await server.start_server()
            servers.append(server)
        assert front.port is not None
        assert plain.port is not None
        return front.port, plain.port

    yield start
    for server in servers:
        await server.close()


UPSTREAM_DATE = "Mon, 01 Jan 2024 00:00:00 GMT"  # an upstream's Date is relayed as is


def comparable(response: RawResponse) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """The answer with the gateway's own Date value masked (the two may straddle a second)."""
    headers = [
        (name, "<date>" if name.lower() == "date" and value != UPSTREAM_DATE else value)
        for name, value in response.headers
    ]
    return response.status, response.reason, headers, response.body


async def both_answer(ports: tuple[int, int], data: bytes, method: bytes = b"GET") -> RawResponse:
    front, plain = [await exchange(port, data, methods=(method,)) for port in ports]
    assert [comparable(r) for r in front] == [comparable(r) for r in plain]
    assert len(front) == 1
    return front[0]


@pytest.mark.parametrize("case", sorted(UPSTREAM_ANSWERS))
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_front_answers_as_aiohttp_does(
    raw_upstream: Start,
    serve_both: Callable[[Config], Awaitable[tuple[int, int]]],
    case: str,
    method: str,
) -> None:
    ports = await serve_both(gateway_config(await raw_upstream(UPSTREAM_ANSWERS[case])))
    data = build_request(method, "/public/a?q=1", [REQUEST_ID])
    answer = await both_answer(ports, data, method.encode())
    assert answer.header("X-Request-Id") == "parity-1"


@pytest.mark.parametrize(
    ("method", "target", "headers", "status"),
    [
        ("GET", "/api/jobs/1", [], 401),
        ("GET", "/api/jobs/1", [("Authorization", "Bearer pat_nope")], 401),
        ("GET", "/api/jobs/1", [("Authorization", "Basic eDp5")], 401),
        ("GET", "/nowhere", [], 404),
        ("DELETE", "/api/invoices/1", [], 405),
        ("HEAD", "/nowhere", [], 404),
        ("GET", "/public/%2e%2e/api", [], 400),
        ("GET", "/public/a", [("Authorization", "Bearer a"), ("Authorization", "Bearer b")], 200),
        ("GET", "/api/jobs/1", [("Authorization", "Bearer a"), ("Authorization", "Bearer b")], 400),
    ],
)
async def test_front_refuses_as_aiohttp_does(
    upstream: RecordingUpstream,
    serve_both: Callable[[Config], Awaitable[tuple[int, int]]],
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    status: int,
) -> None:
    ports = await serve_both(gateway_config(upstream.url))
    data = build_request(method, target, [REQUEST_ID, *headers])
    answer = await both_answer(ports, data, method.encode())
    assert answer.status == status


async def test_front_forwards_identity_as_aiohttp_does(
    upstream: RecordingUpstream,
    serve_both: Callable[[Config], Awaitable[tuple[int, int]]],
    db: object,
) -> None:
    cfg = gateway_config(upstream.url)
    seed = Seeder(cfg, db)  # type: ignore[arg-type]
    user_id, token, token_id = await seed.user_with_token("full_user")
    ports = await serve_both(cfg)
    sent = [
        REQUEST_ID,
        ("Authorization", f"Bearer {token}"),
        ("X-Auth-User-Id", "spoofed"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("Connection", "keep-alive, X-Drop-Me"),
        ("X-Drop-Me", "1"),
        ("User-Agent", "parity"),
    ]
    answer = await both_answer(ports, build_request("GET", "/api/jobs/7?x=%2F", sent))
    assert answer.status == 200
    assert answer.header("X-Auth-Token-Expires-At") is not None
    front, plain = upstream.received[-2:]
    assert front.raw_path == plain.raw_path == "/api/jobs/7?x=%2F"
    assert front.headers == plain.headers  # the same headers, in the same order
    assert front.all("X-Auth-User-Id") == [user_id]  # the spoofed one is gone
    assert front.all("X-Auth-Token-Id") == [token_id]
    assert front.header("X-Drop-Me") is None


async def test_pipelined_requests_are_answered_in_order_across_a_hand_over(
    upstream: RecordingUpstream,
    serve_both: Callable[[Config], Awaitable[tuple[int, int]]],
) -> None:
    """Plain GETs (the front end's), a POST with a body (handed to aiohttp mid-connection)
    and a GET after it, all in one write: four answers, in order, on one connection."""
    front_port, _ = await serve_both(gateway_config(upstream.url))
    data = b"".join(
        [
            build_request("GET", "/public/1", close=False),
            build_request("GET", "/public/2", close=False),
            build_request("POST", "/public/3", body=b"three", close=False),
            build_request("GET", "/public/4"),
        ]
    )
    answers = await exchange(front_port, data)
    assert [a.status for a in answers] == [200, 200, 200, 200]
    assert [a.json()["path"] for a in answers] == [
        "/public/1",
        "/public/2",
        "/public/3",
        "/public/4",
    ]
    assert [r.raw_path for r in upstream.received] == [
        "/public/1",
        "/public/2",
        "/public/3",
        "/public/4",
    ]
    assert upstream.received[2].body == b"three"


@pytest.mark.parametrize("state", ["after an answer", "inside a partial head"])
async def test_idle_keep_alive_connections_are_closed(
    upstream: RecordingUpstream, database_url: str, state: str
) -> None:
    server = GatewayTestServer(create_app(gateway_config(upstream.url), database_url))
    await server.start_server(keepalive_timeout=0.2)  # as aiohttp's own connections
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            if state == "after an answer":
                writer.write(build_request("GET", "/public/a", close=False))
                assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(len(b'{"path": "/public/a"}'))
            else:
                writer.write(b"GET /public/a HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends
            assert await reader.read() == b""  # the gateway closed it
            writer.close()
    finally:
        await server.close()


@pytest.fixture
def answering_upstream(raw_server: StartRaw) -> Callable[[], Awaitable[tuple[str, list[bytes]]]]:
    """An upstream answering ``UPSTREAM_ANSWERS[case]`` for a path ending in ``/case``; its
    URL and the heads it received, in order."""

    async def start() -> tuple[str, list[bytes]]:
        heads: list[bytes] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    heads.append(head)
                    target = head.split(b" ", 2)[1].decode()
                    answer = UPSTREAM_ANSWERS[target.partition("?")[0].rpartition("/")[2]]
                    writer.write(answer)
                    await writer.drain()
                    if b"Connection: close" in answer:
                        break
            writer.close()

        return await raw_server(handle), heads

    return start


# One keep-alive connection whose headers never change: after the first request the front
# end answers from its per-connection templates (gateway.front's _Memo and _Answer).
REPEATED = [
    ("GET", "/api/jobs/json"),
    ("GET", "/api/jobs/json"),  # the whole head again: a poll
    ("GET", "/api/jobs/json?page=2"),
    ("HEAD", "/api/jobs/json"),
    ("HEAD", "/api/jobs/json"),
    ("GET", "/public/json"),  # the same upstream answer, no identity: no token expiry
    ("GET", "/api/jobs/no-content-type"),
    ("GET", "/api/jobs/204"),
    ("GET", "/api/jobs/chunked"),
    ("GET", "/api/jobs/hop-by-hop"),
    ("GET", "/api/jobs/json"),
    ("GET", "/nowhere"),  # a 404 from the gateway itself
    ("GET", "/api/jobs/empty-reason"),
    ("GET", "/api/jobs/json"),
    ("GET", "/api/jobs/json"),  # the same answer, but the last: Connection: close
]


async def test_a_client_repeating_its_headers_gets_what_aiohttp_sends(
    answering_upstream: Callable[[], Awaitable[tuple[str, list[bytes]]]],
    serve_both: Callable[[Config], Awaitable[tuple[int, int]]],
    db: object,
) -> None:
    url, heads = await answering_upstream()
    cfg = gateway_config(url)
    _, token, _ = await Seeder(cfg, db).user_with_token("full_user")  # type: ignore[arg-type]
    ports = await serve_both(cfg)
    sent = [REQUEST_ID, ("Authorization", f"Bearer {token}"), ("User-Agent", "repeat")]
    data = b"".join(
        build_request(method, target, sent, close=index == len(REPEATED) - 1)
        for index, (method, target) in enumerate(REPEATED)
    )
    methods = tuple(method.encode() for method, _ in REPEATED)
    front = await exchange(ports[0], data, methods=methods)
    forwarded = len(heads)
    plain = await exchange(ports[1], data, methods=methods)
    assert [comparable(r) for r in front] == [comparable(r) for r in plain]
    assert [r.status for r in front] == [200] * 7 + [204, 200, 200, 200, 404, 418, 200, 200]
    assert [r.header("X-Request-Id") for r in front] == ["parity-1"] * len(REPEATED)
    assert heads[:forwarded] == heads[forwarded:]  # the upstream got the same heads, byte for byte
    assert [h.split(b"\r\n", 1)[0] for h in heads[:forwarded]] == [
        f"{method} {target} HTTP/1.1".encode()
        for method, target in REPEATED
        if target != "/nowhere"
    ]


async def test_each_repeated_request_gets_its_own_request_id(
    answering_upstream: Callable[[], Awaitable[tuple[str, list[bytes]]]],
    serve_both: Callable[[Config], Awaitable[tuple[int, int]]],
) -> None:
    url, heads = await answering_upstream()
    front_port, _ = await serve_both(gateway_config(url))
    count = 4
    data = b"".join(
        build_request("GET", "/public/json", close=index == count - 1) for index in range(count)
    )
    answers = await exchange(front_port, data)
    ids = [answer.header("X-Request-Id") for answer in answers]
    assert len(set(ids)) == count
    assert all(value is not None and re.fullmatch("[0-9a-f]{32}", value) for value in ids)
    sent = [dict(line.split(": ", 1) for line in h.decode().split("\r\n")[1:-2]) for h in heads]
    assert [s["X-Request-Id"] for s in sent] == ids
    assert all(answer.header("Date") for answer in answers)
    # apart from its id, each head is the first one
    assert len({h.replace(i.encode(), b"") for h, i in zip(heads, ids, strict=True)}) == 1  # type: ignore[union-attr]


async def test_a_reason_that_looks_like_a_template_mark_is_relayed_as_is(
    raw_upstream: Start, serve_both: Callable[[Config], Awaitable[tuple[int, int]]]
) -> None:
    """A NUL is allowed in an upstream's reason phrase: it must not be taken for the place
    of the request id or the Date in the front end's answer template."""
    reason = b"a\x00request-id\x00b\x00date\x00c"
    front_port, _ = await serve_both(
        gateway_config(
            await raw_upstream(b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 0\r\n\r\n")
        )
    )
    data = build_request("GET", "/public/a", close=False) + build_request("GET", "/public/b")
    answers = await exchange(front_port, data)
    assert [answer.reason for answer in answers] == [reason.decode()] * 2
    ids = [answer.header("X-Request-Id") for answer in answers]
    assert ids[0] != ids[1]
    assert all(value is not None and re.fullmatch("[0-9a-f]{32}", value) for value in ids)
    assert all(
        re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} [\d:]{8} GMT", answer.header("Date") or "")
        for answer in answers
    )


async def test_a_poll_repeating_its_whole_head_is_still_authenticated_each_time(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, db: object
) -> None:
    """The same bytes on one connection skip llhttp, never the token: a revocation that
    arrives between two polls refuses the next one."""
    cfg = gateway_config(upstream.url, cache={"ttl": "1h"})
    seed = Seeder(cfg, db)  # type: ignore[arg-type]
    _, token, token_id = await seed.user_with_token()
    client = await make_gateway(cfg)
    listener = client.app[LISTENER]
    await asyncio.wait_for(listener.connected.wait(), 10)
    poll = build_request("GET", "/api/jobs/1", [("Authorization", f"Bearer {token}")], close=False)
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        try:
            statuses = []
            for _ in range(2):
                writer.write(poll)
                statuses.append((await read_response(reader)).status)
            listener.notified.clear()
            await seed.service.revoke(OPERATOR, token_id)
            await asyncio.wait_for(listener.notified.wait(), 10)
            writer.write(poll)
            answer = await read_response(reader)
        finally:
            writer.close()
    assert statuses == [200, 200]
    assert answer.status == 401
    assert [r.raw_path for r in upstream.received] == ["/api/jobs/1", "/api/jobs/1"]


async def test_a_reload_between_two_polls_applies_to_the_next_one(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, db: object
) -> None:
    """What a connection remembers is for one runtime: after a reload, the same head is
    routed, authorized and forwarded under the new configuration."""
    data = gateway_config_data(upstream.url)
    cfg = parse_config(data)
    seed = Seeder(cfg, db)  # type: ignore[arg-type]
    user_id, token, _ = await seed.user_with_token("full_user")
    client = await make_gateway(cfg)
    poll = build_request("GET", "/api/jobs/1", [("Authorization", f"Bearer {token}")], close=False)
    renamed = parse_config({**data, "identity_headers": {"user_id": "X-Who"}})
    stricter = parse_config(
        {
            **data,
            "routes": [
                {**r, "require": ["users:admin"]} if r["name"] == "jobs-read" else r
                for r in data["routes"]
            ],
        }
    )
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        try:
            statuses = []
            for cfg_next in (None, renamed, stricter):
                if cfg_next is not None:
                    reload(client.app, cfg_next)
                writer.write(poll)
                statuses.append((await read_response(reader)).status)
        finally:
            writer.close()
    assert statuses == [200, 200, 403]
    first, second = upstream.received
    assert (first.all("X-Auth-User-Id"), first.all("X-Who")) == ([user_id], [])
    assert (second.all("X-Auth-User-Id"), second.all("X-Who")) == ([], [user_id])


async def test_one_connection_is_authorized_for_each_route_it_asks_for(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, db: object
) -> None:
    """The same headers on one connection, two routes: being let into one says nothing
    about the other (field_user may read jobs, not invoices)."""
    cfg = gateway_config(upstream.url)
    _, token, _ = await Seeder(cfg, db).user_with_token("field_user")  # type: ignore[arg-type]
    client = await make_gateway(cfg)
    sent = [("Authorization", f"Bearer {token}")]
    targets = ["/api/jobs/1", "/api/jobs/1", "/api/invoices/1", "/api/jobs/2", "/api/invoices/1"]
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        try:
            statuses = []
            for target in targets:
                writer.write(build_request("GET", target, sent, close=False))
                statuses.append((await read_response(reader)).status)
        finally:
            writer.close()
    assert statuses == [200, 200, 403, 200, 403]
    assert [r.raw_path for r in upstream.received] == ["/api/jobs/1", "/api/jobs/1", "/api/jobs/2"]
