"""HTTP forwarding semantics through real upstream servers and the real gateway app:
streaming both ways, SSE, body limits, upstream faults, client disconnects, and the
status codes and headers a proxy must relay untouched."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import Config
from tests.conftest import GatewayFactory, RecordingUpstream, StartRaw, gateway_config

MiB = 1024 * 1024

StartApp = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def serve_app() -> AsyncIterator[StartApp]:
    """Start an aiohttp upstream on 127.0.0.1; its base URL."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


def one_route(url: str, **fields: Any) -> Config:
    """A config whose only route sends everything, publicly, to ``url``."""
    route = {"name": "all", "match": {"prefix": "/"}, "upstream": url, "public": True, **fields}
    return gateway_config(url, routes=[route])


def app_with(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def problem(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.headers["Content-Type"] == "application/problem+json"
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == response.status
    return body


def raw_header_names(response: aiohttp.ClientResponse) -> list[str]:
    return [name.decode("latin-1").lower() for name, _ in response.raw_headers]


# ---------------------------------------------------------------------------------------------
# Streaming


async def test_sse_events_reach_the_client_one_by_one(
    make_gateway: GatewayFactory, serve_app: StartApp
) -> None:
    """Event 2 is only sent once the client has *received* event 1 through the gateway: a
    gateway that buffered the answer would never deliver event 1, and the test would time out."""
    first_received = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"id: 1\ndata: one\n\n")
        await first_received.wait()
        await response.write(b"id: 2\ndata: two\n\n")
        await response.write_eof()
        return response

    client = await make_gateway(one_route(await serve_app(app_with(events))))

    response = await client.get("/events")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 10)
    assert first == b"id: 1\ndata: one\n\n"
    first_received.set()
    assert await asyncio.wait_for(response.read(), 10) == b"id: 2\ndata: two\n\n"


async def test_request_body_is_streamed_to_the_upstream_before_it_ends(
    make_gateway: GatewayFactory, serve_app: StartApp
) -> None:
    """The client sends its second chunk only once the upstream holds the first."""
    first_arrived = asyncio.Event()
    received: list[bytes] = []

    async def sink(request: web.Request) -> web.Response:
        received.append(await request.content.readexactly(5))
        first_arrived.set()
        received.append(await request.read())
        return web.Response(text="ok")

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.wait_for(first_arrived.wait(), 10)
        yield b"second"

    client = await make_gateway(one_route(await serve_app(app_with(sink))))

    response = await client.post("/upload", data=body())
    assert response.status == 200
    assert received == [b"first", b"second"]


async def test_chunked_response_arrives_intact_and_framed_once(
    make_gateway: GatewayFactory, raw_server: StartRaw
) -> None:
    chunks = [bytes([n]) * (n * 97 + 1) for n in range(40)]

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Transfer-Encoding: chunked\r\n"
            b"Connection: keep-alive, X-Hop\r\n"
            b"X-Hop: secret\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Trailer: X-Checksum\r\n"
            b"X-End: 1\r\n\r\n"
        )
        for chunk in chunks:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    client = await make_gateway(one_route(await raw_server(chunked)))

    response = await client.get("/chunked")
    assert response.status == 200
    assert await response.read() == b"".join(chunks)
    names = raw_header_names(response)
    assert names.count("transfer-encoding") == 1
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert "content-length" not in names
    assert not {"x-hop", "keep-alive", "trailer"} & set(names)
    assert response.headers["X-End"] == "1"


async def test_256_mib_up_and_down_without_memory_growth(
    make_gateway: GatewayFactory, serve_app: StartApp
) -> None:
    """256 MiB streamed up and 256 MiB down, counted and hashed at both ends, never stored.

    The gateway runs in this process, so this process's RSS bounds the gateway's: sampled
    every 4 MiB on both client sides, its peak must stay within 64 MiB of the start.
    """
    total = 256 * MiB
    chunk_size = 64 * 1024
    seed = hashlib.blake2b(b"patgate").digest() * (chunk_size // 64)
    upstream_got: dict[str, Any] = {}
    rss = [vm_rss()]

    def chunk(n: int) -> bytes:
        return struct.pack(">Q", n) + seed[8:]

    def sample(n: int) -> None:
        if n % 64 == 0:
            rss.append(vm_rss())

    async def both_ways(request: web.Request) -> web.StreamResponse:
        digest, count = hashlib.blake2b(), 0
        async for piece in request.content.iter_chunked(chunk_size):
            digest.update(piece)
            count += len(piece)
        if request.path == "/warm":
            return web.Response(text="warm")
        upstream_got.update(count=count, digest=digest.hexdigest())
        response = web.StreamResponse()
        response.content_length = total
        await response.prepare(request)
        for n in range(total // chunk_size):
            await response.write(chunk(n))
        await response.write_eof()
        return response

    expected = hashlib.blake2b()  # both ends generate the same sequence
    for n in range(total // chunk_size):
        expected.update(chunk(n))

    async def upload() -> AsyncIterator[bytes]:
        for n in range(total // chunk_size):
            sample(n)
            yield chunk(n)

    client = await make_gateway(one_route(await serve_app(app_with(both_ways))))
    warm = await client.post("/warm", data=b"x" * chunk_size)  # pools and buffers in place
    assert await warm.text() == "warm"
    rss[0] = vm_rss()

    response = await client.post("/big", data=upload())
    assert response.status == 200
    received, count, n = hashlib.blake2b(), 0, 0
    async for piece in response.content.iter_chunked(chunk_size):
        received.update(piece)
        count += len(piece)
        n += 1
        sample(n)
    rss.append(vm_rss())

    assert upstream_got == {"count": total, "digest": expected.hexdigest()}
    assert count == total
    assert received.hexdigest() == expected.hexdigest()
    growth = max(rss) - rss[0]
    print(
        f"\nRSS before {rss[0] / MiB:.1f} MiB, peak {max(rss) / MiB:.1f} MiB, "
        f"after {rss[-1] / MiB:.1f} MiB, growth {growth / MiB:.1f} MiB ({len(rss)} samples)"
    )
    assert growth < 64 * MiB


def vm_rss() -> int:
    """This process's resident set size in bytes (``VmRSS`` of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# ---------------------------------------------------------------------------------------------
# max_body


async def test_content_length_over_max_body_is_413_before_the_upstream(
    make_gateway: GatewayFactory, upstream: RecordingUpstream
) -> None:
    client = await make_gateway(one_route(upstream.url, max_body="1KiB"))

    assert (await client.post("/small", data=b"x" * 1024)).status == 200
    response = await client.post("/big", data=b"x" * 1025)

    assert response.status == 413
    assert (await problem(response))["type"] == "urn:patgate:error:payload_too_large"
    assert [r.raw_path for r in upstream.received] == ["/small"]


async def test_chunked_upload_over_max_body_is_413_and_the_upstream_never_gets_it_whole(
    make_gateway: GatewayFactory, serve_app: StartApp
) -> None:
    upstream_reading = asyncio.Event()
    upstream_done = asyncio.Event()
    complete_bodies: list[int] = []

    async def sink(request: web.Request) -> web.Response:
        try:
            first = await request.content.readany()
            upstream_reading.set()
            rest = await request.read()
            complete_bodies.append(len(first) + len(rest))
            return web.Response(text="stored")
        finally:
            upstream_done.set()

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 16 * 1024
        await asyncio.wait_for(upstream_reading.wait(), 10)  # the upstream is mid-body
        yield b"b" * 16 * 1024
        yield b"c" * 16 * 1024

    client = await make_gateway(one_route(await serve_app(app_with(sink)), max_body="32KiB"))

    response = await client.post("/upload", data=body())

    assert response.status == 413
    assert (await problem(response))["detail"] == "the request body exceeds 32768 bytes"
    await asyncio.wait_for(upstream_done.wait(), 10)
    assert complete_bodies == []


# ---------------------------------------------------------------------------------------------
# Upstream faults


@pytest.mark.parametrize("how", ["reset", "close"])
async def test_upstream_dropping_the_connection_before_answering_is_502(
    make_gateway: GatewayFactory, raw_server: StartRaw, how: str
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if how == "reset":  # RST instead of FIN
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    client = await make_gateway(one_route(await raw_server(hang_up)))

    response = await client.get("/x")
    assert response.status == 502
    assert (await problem(response))["type"] == "urn:patgate:error:bad_gateway"


@pytest.mark.parametrize(
    "head",
    [b"Content-Length: 100000\r\n", b"Transfer-Encoding: chunked\r\n"],
    ids=["content-length", "chunked"],
)
async def test_upstream_closing_mid_response_aborts_the_client_response(
    make_gateway: GatewayFactory, raw_server: StartRaw, head: bytes
) -> None:
    async def truncate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        start = b"a\r\n0123456789\r\n" if b"chunked" in head else b"0123456789"
        writer.write(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + start)
        await writer.drain()
        writer.close()

    client = await make_gateway(one_route(await raw_server(truncate)))

    response = await client.get("/x")
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(response.read(), 10)


async def test_upstream_silent_mid_response_past_the_timeout_aborts_the_response(
    make_gateway: GatewayFactory, serve_app: StartApp
) -> None:
    never = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"partial")
        await never.wait()
        return response

    client = await make_gateway(one_route(await serve_app(app_with(stall)), timeout="200ms"))
    try:
        response = await client.get("/x")
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.read(), 10)
    finally:
        never.set()


# ---------------------------------------------------------------------------------------------
# Client disconnects


@pytest.mark.parametrize("when", ["awaiting-answer", "mid-upload", "mid-download"])
async def test_client_disconnect_cancels_the_upstream_request(
    make_gateway: GatewayFactory, serve_app: StartApp, when: str
) -> None:
    reached = asyncio.Event()
    cancelled = asyncio.Event()
    never = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        try:
            if when == "mid-upload":
                await request.content.readany()
                reached.set()
                await request.read()
            elif when == "mid-download":
                response = web.StreamResponse()
                await response.prepare(request)
                await response.write(b"first chunk")
                reached.set()
                await never.wait()
            else:
                reached.set()
                await never.wait()
            return web.Response(text="finished")
        except (asyncio.CancelledError, ConnectionError):
            cancelled.set()
            raise

    client = await make_gateway(one_route(await serve_app(app_with(slow))))
    assert client.server.runner.server.handler_cancellation  # what the test relies on

    reader, writer = await asyncio.open_connection(client.host, client.port)
    if when == "mid-upload":
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        writer.write(b"x" * 1000)
    else:
        writer.write(b"GET /down HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reached.wait(), 10)
    if when == "mid-download":
        assert (await asyncio.wait_for(reader.readuntil(b"first chunk"), 10)).startswith(
            b"HTTP/1.1 200"
        )
    writer.close()

    await asyncio.wait_for(cancelled.wait(), 10)
    never.set()


# ---------------------------------------------------------------------------------------------
# What a proxy relays untouched


async def test_redirect_is_passed_through_not_followed(
    make_gateway: GatewayFactory, upstream: RecordingUpstream
) -> None:
    upstream.status = 302
    upstream.response_headers = {"Location": "/public/elsewhere?a=%2F"}
    client = await make_gateway(one_route(upstream.url))

    response = await client.get("/public/go", allow_redirects=False)

    assert response.status == 302
    assert response.headers["Location"] == "/public/elsewhere?a=%2F"
    assert [r.raw_path for r in upstream.received] == ["/public/go"]


async def test_head_has_no_body_but_keeps_the_upstream_content_length(
    make_gateway: GatewayFactory, serve_app: StartApp
) -> None:
    document = bytes(range(256)) * 40

    async def file(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/octet-stream")

    client = await make_gateway(one_route(await serve_app(app_with(file))))

    head = await client.head("/file")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(document))
    assert await head.read() == b""
    # A body after the HEAD answer would corrupt the next answer on the same connection.
    after = await client.get("/file")
    assert await after.read() == document


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses_carry_no_body(
    make_gateway: GatewayFactory, serve_app: StartApp, status: int
) -> None:
    async def empty(request: web.Request) -> web.Response:
        if request.path == "/next":
            return web.Response(text="next")
        return web.Response(status=status, headers={"ETag": '"v1"'})

    client = await make_gateway(one_route(await serve_app(app_with(empty))))

    response = await client.get("/thing")
    assert response.status == status
    assert response.headers["ETag"] == '"v1"'
    assert "transfer-encoding" not in raw_header_names(response)
    assert await response.read() == b""
    assert await (await client.get("/next")).text() == "next"  # same connection, intact


async def test_gzip_body_is_relayed_byte_identical(
    make_gateway: GatewayFactory, serve_app: StartApp
) -> None:
    compressed = gzip.compress(b"patgate " * 10_000, mtime=0)

    async def zipped(request: web.Request) -> web.Response:
        return web.Response(
            body=compressed,
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )

    client = await make_gateway(one_route(await serve_app(app_with(zipped))))

    async with (
        aiohttp.ClientSession(auto_decompress=False) as raw,
        raw.get(client.make_url("/text"), headers={"Accept-Encoding": "gzip"}) as response,
    ):
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Length"] == str(len(compressed))
        assert await response.read() == compressed


async def test_every_set_cookie_header_is_relayed(
    make_gateway: GatewayFactory, serve_app: StartApp
) -> None:
    cookies = ["a=1; Path=/", "b=2; HttpOnly", "c=3; Secure; SameSite=Lax"]

    async def set_cookies(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        for cookie in cookies:
            response.headers.add("Set-Cookie", cookie)
        return response

    client = await make_gateway(one_route(await serve_app(app_with(set_cookies))))

    response = await client.get("/login")
    assert response.headers.getall("Set-Cookie") == cookies
