"""gateway.upstream.UpstreamPool against real upstreams on 127.0.0.1: aiohttp servers for
ordinary HTTP, and raw asyncio servers that write exactly the bytes a test chooses (framing
edge cases, stale keep-alive connections, malformed answers, hang-ups)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.upstream import READ_HIGH_WATER, UpstreamPool, UpstreamResponse

KiB = 1024
MiB = 1024 * KiB

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
StartApp = Callable[[Handler], Awaitable[str]]
# (index of the connection, reader, writer): the server closes the writer when it returns.
RawHandler = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawUpstream:
    origin: str = ""
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)  # every request head, in arrival order

    async def read_head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        return head


StartRaw = Callable[[Callable[[RawUpstream], RawHandler]], Awaitable[RawUpstream]]


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    upstreams = UpstreamPool()
    yield upstreams
    await upstreams.close()


@pytest.fixture
async def serve_app() -> AsyncIterator[StartApp]:
    """An aiohttp upstream on 127.0.0.1 answering every path with ``handler``; its origin."""
    servers: list[TestServer] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def serve_raw() -> AsyncIterator[StartRaw]:
    """A raw TCP upstream; ``make(upstream)`` returns its per-connection handler."""
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[None]] = set()

    async def start(make: Callable[[RawUpstream], RawHandler]) -> RawUpstream:
        upstream = RawUpstream()
        handler = make(upstream)

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            index = upstream.connections
            upstream.connections += 1
            try:
                await handler(index, reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        servers.append(server)
        upstream.origin = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return upstream

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for server in servers:
        server.close()
        await server.wait_closed()


async def send(
    pool: UpstreamPool,
    origin: str,
    method: str = "GET",
    target: str = "/",
    headers: list[tuple[str, str]] | None = None,
    body: AsyncIterator[bytes] | None = None,
    length: int | None = None,
    read_timeout: float = 10.0,
) -> UpstreamResponse:
    return await pool.request(
        origin,
        method,
        target,
        headers or [],
        body,
        length,
        connect_timeout=5.0,
        read_timeout=read_timeout,
    )


async def fetch(
    pool: UpstreamPool,
    origin: str,
    method: str = "GET",
    target: str = "/",
    headers: list[tuple[str, str]] | None = None,
    body: AsyncIterator[bytes] | None = None,
    length: int | None = None,
    read_timeout: float = 10.0,
) -> tuple[UpstreamResponse, bytes]:
    """Send, read the whole body, release."""
    response = await send(pool, origin, method, target, headers, body, length, read_timeout)
    try:
        data = b"".join([chunk async for chunk in response.iter_chunks()])
    finally:
        await response.release()
    return response, data


def answer(body: bytes = b"", *extra: bytes) -> bytes:
    return b"".join(
        [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body), *extra, b"\r\n", body]
    )


def silent(where: str, never: asyncio.Event) -> Callable[[RawUpstream], RawHandler]:
    """An upstream that goes quiet: before its status line, or five bytes into a body of ten."""

    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            if where == "mid-body":
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
            await never.wait()

        return handle

    return make


def stale_after_first(upstream: RawUpstream) -> RawHandler:
    """The first connection answers once, then hangs up as the second request arrives on it;
    later connections answer "retried"."""

    async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await upstream.read_head(r)
        if index == 0:
            w.write(answer(b"first"))
            await upstream.read_head(r)  # then hang up without answering
        else:
            w.write(answer(b"retried"))

    return handle


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def until(event: asyncio.Event) -> None:
    """Await ``event``; a broken feature fails the test instead of hanging it."""
    async with asyncio.timeout(10):
        await event.wait()


async def read_into(response: UpstreamResponse, received: list[bytes]) -> None:
    async for chunk in response.iter_chunks():
        received.append(chunk)


def header_values(response: UpstreamResponse, name: str) -> list[str]:
    return [value for key, value in response.headers if key.lower() == name.lower()]


# ---------------------------------------------------------------------------------------------
# Keep-alive, bodies, framing


async def test_sequential_gets_reuse_one_keep_alive_connection(
    pool: UpstreamPool, serve_app: StartApp
) -> None:
    async def peer_port(request: web.Request) -> web.Response:
        assert request.transport is not None
        return web.Response(text=str(request.transport.get_extra_info("peername")[1]))

    origin = await serve_app(peer_port)
    first, port1 = await fetch(pool, origin)
    second, port2 = await fetch(pool, origin)
    assert first.status == second.status == 200
    assert port1 == port2  # the upstream saw one TCP connection for both


async def test_idle_connection_past_the_idle_timeout_is_not_reused(
    serve_app: StartApp,
) -> None:
    async def peer_port(request: web.Request) -> web.Response:
        assert request.transport is not None
        return web.Response(text=str(request.transport.get_extra_info("peername")[1]))

    origin = await serve_app(peer_port)
    pool = UpstreamPool(idle_timeout=0.0)
    try:
        _, port1 = await fetch(pool, origin)
        _, port2 = await fetch(pool, origin)
    finally:
        await pool.close()
    assert port1 != port2


async def test_post_with_content_length_arrives_byte_exact(
    pool: UpstreamPool, serve_app: StartApp
) -> None:
    async def digest(request: web.Request) -> web.Response:
        body = await request.read()
        framing = (
            f"{request.headers.get('Content-Length')}|{request.headers.get('Transfer-Encoding')}"
        )
        return web.Response(text=f"{hashlib.sha256(body).hexdigest()}|{framing}")

    payload = bytes(range(256)) * 1200  # 300 KiB, every byte value
    parts = [payload[:1], payload[1 : 100 * KiB], payload[100 * KiB :]]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    response, echoed = await fetch(
        pool, origin := await serve_app(digest), "POST", body=body(), length=len(payload)
    )
    assert response.status == 200
    assert echoed.decode() == f"{hashlib.sha256(payload).hexdigest()}|{len(payload)}|None"
    _, again = await fetch(pool, origin, "POST", body=body(), length=len(payload))
    assert again == echoed  # and the connection was fit for reuse


async def test_chunked_upload_of_8_mib_arrives_intact(
    pool: UpstreamPool, serve_app: StartApp
) -> None:
    async def digest(request: web.Request) -> web.Response:
        sha = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            sha.update(chunk)
            size += len(chunk)
        te = request.headers.get("Transfer-Encoding")
        return web.Response(text=f"{sha.hexdigest()}|{size}|{te}")

    expected = hashlib.sha256()

    async def upload() -> AsyncIterator[bytes]:
        for i in range(128):
            chunk = bytes([i]) * (64 * KiB)
            expected.update(chunk)
            yield chunk

    response, echoed = await fetch(pool, await serve_app(digest), "PUT", body=upload())
    assert response.status == 200
    assert echoed.decode() == f"{expected.hexdigest()}|{8 * MiB}|chunked"


async def test_chunked_response_arrives_chunk_by_chunk(
    pool: UpstreamPool, serve_app: StartApp
) -> None:
    first_seen = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first")
        await first_seen.wait()  # the second chunk exists only once the client has the first
        await response.write(b"second")
        await response.write_eof()
        return response

    response = await send(pool, await serve_app(stream))
    assert header_values(response, "Transfer-Encoding") == ["chunked"]
    chunks = response.iter_chunks()
    assert await anext(chunks) == b"first"
    first_seen.set()
    assert [chunk async for chunk in chunks] == [b"second"]
    await response.release()


async def test_content_length_response_is_read_whole(
    pool: UpstreamPool, serve_app: StartApp
) -> None:
    payload = bytes(range(256)) * 4000

    async def fixed(request: web.Request) -> web.Response:
        return web.Response(body=payload)

    response, body = await fetch(pool, await serve_app(fixed))
    assert header_values(response, "Content-Length") == [str(len(payload))]
    assert body == payload


async def test_close_delimited_response_ends_at_eof(
    pool: UpstreamPool, serve_raw: StartRaw
) -> None:
    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ")
            await w.drain()
            w.write(b"world")

        return handle

    upstream = await serve_raw(make)
    response, body = await fetch(pool, upstream.origin)
    assert (response.status, body) == (200, b"hello world")
    await fetch(pool, upstream.origin)
    assert upstream.connections == 2  # a close-delimited answer leaves nothing to reuse


@pytest.mark.parametrize(
    ("method", "first"),
    [
        pytest.param("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", id="HEAD"),
        pytest.param("HEAD", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n", id="HEAD-no-length"),
        pytest.param("GET", b"HTTP/1.1 204 No Content\r\n\r\n", id="204"),
        pytest.param("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n", id="304"),
    ],
)
async def test_bodyless_answers_leave_the_connection_reusable(
    pool: UpstreamPool, serve_raw: StartRaw, method: str, first: bytes
) -> None:
    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            for response in (first, answer(b"next")):
                await upstream.read_head(r)
                w.write(response)
            await r.read()

        return handle

    upstream = await serve_raw(make)
    response, body = await fetch(pool, upstream.origin, method)
    assert body == b""
    assert response.status == int(first.split()[1])
    _, body = await fetch(pool, upstream.origin)
    assert body == b"next"
    assert upstream.connections == 1


async def test_interim_answers_are_skipped(pool: UpstreamPool, serve_raw: StartRaw) -> None:
    headers_seen = asyncio.Event()

    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            w.write(
                b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: 1\r\n\r\n"
            )
            await headers_seen.wait()
            w.write(b"final")
            await r.read()

        return handle

    upstream = await serve_raw(make)
    response = await send(pool, upstream.origin)
    assert (response.status, response.reason) == (200, "OK")
    assert response.headers == [("Content-Length", "5"), ("X-Final", "1")]
    headers_seen.set()
    assert [chunk async for chunk in response.iter_chunks()] == [b"final"]
    await response.release()


async def test_duplicate_response_headers_are_kept_in_order(
    pool: UpstreamPool, serve_app: StartApp
) -> None:
    async def cookies(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("X-Between", "1")
        response.headers.add("Set-Cookie", "b=2")
        response.headers.add("Set-Cookie", "c=3")
        return response

    response, _ = await fetch(pool, await serve_app(cookies))
    names = [name.lower() for name, _ in response.headers]
    assert header_values(response, "Set-Cookie") == ["a=1", "b=2", "c=3"]
    assert names.index("set-cookie") < names.index("x-between")
    assert names.count("set-cookie") == 3


async def test_request_head_is_sent_exactly_as_given(
    pool: UpstreamPool, serve_raw: StartRaw
) -> None:
    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while True:
                await upstream.read_head(r)
                w.write(answer(b"ok"))

        return handle

    upstream = await serve_raw(make)
    target = "/api/a%2Fb/%7Euser/..%2F;p=1?q=%20x+y&q=&z=%zz&%2F=1"
    headers = [
        ("x-MiXeD-Case", "1"),
        ("Accept", "*/*"),
        ("x-dup", "a"),
        ("x-dup", "b"),
        ("content-LENGTH", "999"),  # framing is the pool's: dropped
        ("Transfer-Encoding", "chunked"),
    ]
    await fetch(pool, upstream.origin, "GET", target, headers=headers)
    host = upstream.origin.removeprefix("http://")
    assert (
        upstream.heads[-1]
        == (
            f"GET {target} HTTP/1.1\r\nx-MiXeD-Case: 1\r\nAccept: */*\r\n"
            f"x-dup: a\r\nx-dup: b\r\nHost: {host}\r\n\r\n"
        ).encode()
    )

    await fetch(pool, upstream.origin, "GET", "/", headers=[("HOST", "example.test")])
    assert upstream.heads[-1] == b"GET / HTTP/1.1\r\nHOST: example.test\r\n\r\n"


async def test_header_with_a_line_break_is_refused_before_sending(
    pool: UpstreamPool, serve_raw: StartRaw
) -> None:
    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)

        return handle

    upstream = await serve_raw(make)
    for headers in ([("X-A", "1\r\nX-Evil: 1")], [("X-A\n", "1")]):
        with pytest.raises(ValueError, match="CR or LF"):
            await send(pool, upstream.origin, headers=headers)
    assert upstream.connections == 0


# ---------------------------------------------------------------------------------------------
# Faults


@pytest.mark.parametrize("where", ["before-status", "mid-body"])
async def test_upstream_silent_past_read_timeout_is_a_timeout(
    pool: UpstreamPool, serve_raw: StartRaw, where: str
) -> None:
    upstream = await serve_raw(silent(where, asyncio.Event()))
    async with asyncio.timeout(5):  # a timer that never fires fails rather than hangs
        if where == "before-status":
            with pytest.raises(UpstreamTimeout):
                await send(pool, upstream.origin, read_timeout=0.2)
        else:
            response = await send(pool, upstream.origin, read_timeout=0.2)
            chunks = response.iter_chunks()
            assert await anext(chunks) == b"01234"
            with pytest.raises(UpstreamTimeout):
                await anext(chunks)
            await response.release()
    assert upstream.heads  # the request did arrive


async def test_connect_to_a_closed_port_is_unavailable(pool: UpstreamPool) -> None:
    with pytest.raises(UpstreamUnavailable):
        await send(pool, f"http://127.0.0.1:{closed_port()}")


@pytest.mark.parametrize(
    "partial",
    [
        pytest.param(b"Content-Length: 100\r\n\r\n0123456789", id="content-length"),
        pytest.param(b"Transfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n", id="chunked"),
    ],
)
async def test_upstream_closing_mid_body_raises_from_iter_chunks(
    pool: UpstreamPool, serve_raw: StartRaw, partial: bytes
) -> None:
    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            w.write(b"HTTP/1.1 200 OK\r\n" + partial)

        return handle

    upstream = await serve_raw(make)
    response = await send(pool, upstream.origin)
    received: list[bytes] = []
    with pytest.raises(UpstreamUnavailable, match="mid-body"):
        await read_into(response, received)
    await response.release()
    assert b"".join(received) == b"0123456789"


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"HTTP/1.1 abc OK\r\n\r\n", id="bad-status"),
        pytest.param(b"garbage\r\n\r\n", id="not-http"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx", id="two-lengths"
        ),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
            id="unasked-101",
        ),
    ],
)
async def test_malformed_answer_is_unavailable(
    pool: UpstreamPool, serve_raw: StartRaw, garbage: bytes
) -> None:
    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            w.write(garbage)
            await r.read()  # stays open: the error is the parser's, not an EOF

        return handle

    upstream = await serve_raw(make)
    with pytest.raises(UpstreamUnavailable, match=r"not valid HTTP|switched protocols"):
        await send(pool, upstream.origin)


async def test_early_answer_stops_the_upload(pool: UpstreamPool, serve_raw: StartRaw) -> None:
    """The upstream refuses without reading the body: its answer is relayed, not a timeout."""
    done = asyncio.Event()

    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            w.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")
            await done.wait()

        return handle

    pulled = 0

    async def upload() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(16 * 1024):  # 1 GiB at most
            pulled += 1
            yield b"u" * (64 * KiB)

    upstream = await serve_raw(make)
    response, body = await fetch(pool, upstream.origin, "POST", body=upload(), read_timeout=5.0)
    done.set()
    assert (response.status, body) == (413, b"big!")
    assert pulled < 16 * 1024


# ---------------------------------------------------------------------------------------------
# Stale pooled connections


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("DELETE", True), ("POST", False)])
async def test_pooled_connection_closed_before_answering(
    pool: UpstreamPool, serve_raw: StartRaw, method: str, retried: bool
) -> None:
    """The upstream closes the keep-alive connection as the second request arrives on it."""
    upstream = await serve_raw(stale_after_first)
    assert (await fetch(pool, upstream.origin))[1] == b"first"
    if retried:
        response, body = await fetch(pool, upstream.origin, method)
        assert (response.status, body) == (200, b"retried")
        assert upstream.connections == 2
        assert [head.split(b" ")[0] for head in upstream.heads] == [
            b"GET",
            method.encode(),
            method.encode(),
        ]
    else:  # not idempotent: the upstream may have acted on it
        with pytest.raises(UpstreamUnavailable):
            await fetch(pool, upstream.origin, method)
        assert upstream.connections == 1


async def test_pooled_connection_closed_while_idle_is_transparent(
    pool: UpstreamPool, serve_raw: StartRaw
) -> None:
    closed = asyncio.Event()

    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            w.write(answer(b"%d" % index))
            if index == 0:
                await w.drain()
                w.close()
                await w.wait_closed()
                closed.set()

        return handle

    upstream = await serve_raw(make)
    assert (await fetch(pool, upstream.origin))[1] == b"0"
    await until(closed)
    response, body = await fetch(pool, upstream.origin)
    assert (response.status, body) == (200, b"1")
    assert upstream.connections == 2


@pytest.mark.parametrize("method", ["PUT", "POST"])
async def test_stale_connection_is_not_retried_once_the_body_started(
    pool: UpstreamPool, serve_raw: StartRaw, method: str
) -> None:
    closed = asyncio.Event()

    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            w.write(answer(b"first"))
            await upstream.read_head(r)
            await r.readuntil(b"first-part")  # the body has started: hang up
            w.close()
            await w.wait_closed()
            closed.set()

        return handle

    pulled: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        for part in (b"first-part", b"second-part"):
            pulled.append(part)
            yield part
            await closed.wait()

    upstream = await serve_raw(make)
    await fetch(pool, upstream.origin)
    with pytest.raises(UpstreamUnavailable):
        await fetch(pool, upstream.origin, method, body=body())
    assert upstream.connections == 1  # no second attempt
    assert pulled == [b"first-part", b"second-part"]


# ---------------------------------------------------------------------------------------------
# Back-pressure and shutdown


async def test_slow_consumer_bounds_what_the_client_buffers(
    pool: UpstreamPool, serve_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 64 * MiB
    piece = 64 * KiB

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        for i in range(size // piece):
            await response.write(bytes([i % 251]) * piece)
        return response

    response = await send(pool, await serve_app(big))
    conn = response._conn
    held = asyncio.Event()
    buffered_at_hold: list[int] = []
    hold = conn._hold

    def observed_hold() -> None:
        buffered_at_hold.append(conn.buffered)
        hold()
        held.set()

    monkeypatch.setattr(conn, "_hold", observed_hold)
    if not conn.reading_paused:
        await until(held)  # the consumer holds off: the client must stop reading
    marks = [16 * MiB, 32 * MiB, 48 * MiB]
    total = 0
    biggest = 0
    sha = hashlib.sha256()
    async for chunk in response.iter_chunks():
        sha.update(chunk)
        total += len(chunk)
        biggest = max(biggest, len(chunk))
        if marks and total >= marks[0]:
            marks.pop(0)
            held.clear()
            await until(held)  # hold off again until reading pauses
            assert conn.reading_paused
            assert READ_HIGH_WATER < conn.buffered <= MiB
    await response.release()

    expected = hashlib.sha256()
    for i in range(size // piece):
        expected.update(bytes([i % 251]) * piece)
    assert total == size
    assert sha.digest() == expected.digest()
    assert len(buffered_at_hold) >= 4
    assert max(buffered_at_hold) <= MiB
    assert biggest <= MiB  # a yielded chunk is everything buffered at that moment


async def test_close_closes_idle_connections(serve_raw: StartRaw) -> None:
    eof = asyncio.Event()

    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            w.write(answer(b"ok"))
            assert await r.read() == b""
            eof.set()

        return handle

    upstream = await serve_raw(make)
    pool = UpstreamPool()
    await fetch(pool, upstream.origin)
    assert not eof.is_set()
    await pool.close()
    await until(eof)
    with pytest.raises(RuntimeError, match="closed"):
        await send(pool, upstream.origin)


# ---------------------------------------------------------------------------------------------
# UpstreamPool.send: the front end's callback exchanges


class Recorder:
    """A ``Relay`` that writes down what it is given."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.flushes = 0
        self.error: Exception | None = None
        self.ended = asyncio.Event()

    def upstream_head(self, conn: Any) -> None:
        self.status = conn.status
        self.headers = list(conn.headers)

    def upstream_body(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def upstream_flush(self) -> None:
        self.flushes += 1

    def upstream_done(self) -> None:
        self.ended.set()

    def upstream_failed(self, error: UpstreamTimeout | UpstreamUnavailable) -> None:
        self.error = error
        self.ended.set()


async def relayed(
    pool: UpstreamPool, origin: str, method: str = "GET", read_timeout: float = 10.0
) -> Recorder:
    recorder = Recorder()
    pool.send(origin, method, "/", [], recorder, connect_timeout=5.0, read_timeout=read_timeout)
    await until(recorder.ended)
    return recorder


async def test_send_relays_the_answer_and_reuses_the_connection(
    pool: UpstreamPool, serve_raw: StartRaw
) -> None:
    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            w.write(answer(b"one", b"X-One: 1\r\n"))
            await upstream.read_head(r)
            w.write(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n")
            w.write(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            await upstream.read_head(r)

        return handle

    upstream = await serve_raw(make)
    first = await relayed(pool, upstream.origin)
    assert (first.status, b"".join(first.chunks), first.error) == (200, b"one", None)
    assert ("X-One", "1") in first.headers
    second = await relayed(pool, upstream.origin)
    assert (second.status, b"".join(second.chunks)) == (201, b"abcde")  # de-chunked
    assert upstream.connections == 1


async def test_send_head_answer_ends_at_its_head(pool: UpstreamPool, serve_raw: StartRaw) -> None:
    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            await upstream.read_head(r)
            w.write(answer(b"after"))

        return handle

    upstream = await serve_raw(make)
    head = await relayed(pool, upstream.origin, "HEAD")
    assert (head.status, head.chunks, head.error) == (200, [], None)
    after = await relayed(pool, upstream.origin)
    assert b"".join(after.chunks) == b"after"
    assert upstream.connections == 1


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("POST", False)])
async def test_send_retries_a_stale_pooled_connection_only_when_idempotent(
    pool: UpstreamPool, serve_raw: StartRaw, method: str, retried: bool
) -> None:
    upstream = await serve_raw(stale_after_first)
    assert b"".join((await relayed(pool, upstream.origin)).chunks) == b"first"
    second = await relayed(pool, upstream.origin, method)
    if retried:
        assert (second.status, b"".join(second.chunks), second.error) == (200, b"retried", None)
        assert upstream.connections == 2
    else:
        assert isinstance(second.error, UpstreamUnavailable)
        assert upstream.connections == 1


@pytest.mark.parametrize("where", ["before-status", "mid-body"])
async def test_send_upstream_silence_past_read_timeout_fails(
    pool: UpstreamPool, serve_raw: StartRaw, where: str
) -> None:
    upstream = await serve_raw(silent(where, asyncio.Event()))
    recorder = await relayed(pool, upstream.origin, read_timeout=0.2)
    assert isinstance(recorder.error, UpstreamTimeout)
    assert b"".join(recorder.chunks) == (b"01234" if where == "mid-body" else b"")
    assert recorder.status == (200 if where == "mid-body" else 0)


def answers_once_then(
    second: Callable[[asyncio.StreamWriter], Awaitable[None]],
) -> Callable[[RawUpstream], RawHandler]:
    """An upstream that answers "one", then meets the second request on that connection
    with ``second``."""

    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            w.write(answer(b"one"))
            await upstream.read_head(r)
            await second(w)

        return handle

    return make


async def test_send_times_out_by_its_own_read_timeout_on_a_reused_connection(
    pool: UpstreamPool, serve_raw: StartRaw
) -> None:
    """The timer set for the first exchange (30 s) stays with the connection: the second
    exchange (0.2 s) must have it fire by its own deadline."""
    never = asyncio.Event()

    async def silent_then(w: asyncio.StreamWriter) -> None:
        await never.wait()

    upstream = await serve_raw(answers_once_then(silent_then))
    first = await relayed(pool, upstream.origin, read_timeout=30.0)
    assert b"".join(first.chunks) == b"one"
    second = await relayed(pool, upstream.origin, read_timeout=0.2)
    assert isinstance(second.error, UpstreamTimeout)
    assert upstream.connections == 1


async def test_a_short_timeout_of_an_earlier_exchange_does_not_cut_a_later_one(
    pool: UpstreamPool, serve_raw: StartRaw
) -> None:
    """The first exchange's timer (0.2 s) fires during the second (10 s), whose upstream
    takes 0.5 s to answer: it re-arms for the second's deadline instead of failing it."""

    async def slow_then(w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.5)  # the upstream is slow: the scenario is time passing
        w.write(answer(b"two"))

    upstream = await serve_raw(answers_once_then(slow_then))
    first = await relayed(pool, upstream.origin, read_timeout=0.2)
    assert b"".join(first.chunks) == b"one"
    second = await relayed(pool, upstream.origin, read_timeout=10.0)
    assert (second.error, b"".join(second.chunks)) == (None, b"two")
    assert upstream.connections == 1


async def test_send_to_a_closed_port_fails_unavailable(pool: UpstreamPool) -> None:
    recorder = await relayed(pool, f"http://127.0.0.1:{closed_port()}")
    assert isinstance(recorder.error, UpstreamUnavailable)


async def test_send_cut_mid_body_fails_after_the_head(
    pool: UpstreamPool, serve_raw: StartRaw
) -> None:
    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")

        return handle  # returning closes the connection

    upstream = await serve_raw(make)
    recorder = await relayed(pool, upstream.origin)
    assert recorder.status == 200
    assert isinstance(recorder.error, UpstreamUnavailable)


async def test_send_cancelled_closes_the_upstream_connection(
    pool: UpstreamPool, serve_raw: StartRaw
) -> None:
    arrived, eof = asyncio.Event(), asyncio.Event()

    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            arrived.set()
            assert await r.read() == b""
            eof.set()

        return handle

    upstream = await serve_raw(make)
    recorder = Recorder()
    exchange = pool.send(
        upstream.origin, "GET", "/", [], recorder, connect_timeout=5.0, read_timeout=10.0
    )
    await until(arrived)
    exchange.cancel()
    await until(eof)
    assert not recorder.ended.is_set()  # a cancelled exchange reports nothing


def two_answers_at_once(upstream: RawUpstream) -> RawHandler:
    """Answers the first request twice, in one write; any later connection answers "next"."""

    async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await upstream.read_head(r)
        if index == 0:
            w.write(answer(b"hi") + b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nevil")
            await upstream.read_head(r)
        else:
            w.write(answer(b"next"))
            await upstream.read_head(r)

    return handle


async def test_a_second_answer_to_one_request_is_dropped_with_its_connection(
    pool: UpstreamPool, serve_raw: StartRaw
) -> None:
    upstream = await serve_raw(two_answers_at_once)
    response, body = await fetch(pool, upstream.origin)
    assert (response.status, body) == (200, b"hi")
    response, body = await fetch(pool, upstream.origin)
    assert (response.status, body) == (200, b"next")  # not the stray 404
    assert upstream.connections == 2


async def test_send_drops_a_second_answer_with_its_connection(
    pool: UpstreamPool, serve_raw: StartRaw
) -> None:
    upstream = await serve_raw(two_answers_at_once)
    first = await relayed(pool, upstream.origin)
    assert (first.status, b"".join(first.chunks), first.error) == (200, b"hi", None)
    second = await relayed(pool, upstream.origin)
    assert (second.status, b"".join(second.chunks)) == (200, b"next")
    assert upstream.connections == 2


async def test_send_paused_before_it_connects_stays_paused_once_connected(
    pool: UpstreamPool, serve_raw: StartRaw
) -> None:
    """The client stopped reading before the upstream connection existed: no answer bytes
    may be read from it until the client drains."""
    arrived = asyncio.Event()

    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            w.write(answer(b"later"))
            await w.drain()
            arrived.set()
            await upstream.read_head(r)

        return handle

    upstream = await serve_raw(make)
    recorder = Recorder()
    exchange = pool.send(
        upstream.origin, "GET", "/", [], recorder, connect_timeout=5.0, read_timeout=10.0
    )
    exchange.pause_reading()  # no connection yet: the pool had none idle
    await until(arrived)
    assert exchange.conn is not None
    assert exchange.conn.reading_paused
    exchange.resume_reading()
    await until(recorder.ended)
    assert b"".join(recorder.chunks) == b"later"


async def test_a_relay_that_fails_is_logged_not_blamed_on_the_upstream(
    pool: UpstreamPool, serve_raw: StartRaw, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Recorder):
        def upstream_head(self, conn: Any) -> None:
            raise RuntimeError("a bug in the relay")

    def make(upstream: RawUpstream) -> RawHandler:
        async def handle(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await upstream.read_head(r)
            w.write(answer(b"fine"))
            await upstream.read_head(r)

        return handle

    upstream = await serve_raw(make)
    broken = Broken()
    pool.send(upstream.origin, "GET", "/", [], broken, connect_timeout=5.0, read_timeout=10.0)
    await until(broken.ended)
    assert isinstance(broken.error, UpstreamUnavailable)
    assert "could not be relayed" in str(broken.error)
    assert "relaying an upstream answer failed" in caplog.text
    assert "a bug in the relay" in caplog.text
