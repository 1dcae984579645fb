"""WebSocket upgrades through the real gateway app to a real upstream WebSocket server:
authenticated like any request, then relayed both ways with close codes and subprotocols."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from gateway import proxy
from gateway.config import Config
from tests.conftest import GatewayFactory, Seeder, bearer, gateway_config

UPSTREAM_PROTOCOLS = ("chat.v2", "chat.v1")


@dataclass
class WsUpstream:
    """A real WebSocket server: echoes, answers pings, closes on request, records it all."""

    url: str = ""
    requests: list[list[tuple[str, str]]] = field(default_factory=list)
    pings: list[bytes] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)
    closes: list[tuple[int | None, str | None]] = field(default_factory=list)
    messages: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    pong_seen: asyncio.Event = field(default_factory=asyncio.Event)

    def headers(self, name: str) -> list[str]:
        assert self.requests, "the upstream received nothing"
        return [v for k, v in self.requests[-1] if k.lower() == name.lower()]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append([(k.decode(), v.decode()) for k, v in request.raw_headers])
        if request.path.endswith("/refuse"):
            return web.Response(status=403, text="no", headers={"X-Why": "not today"})
        ws = web.WebSocketResponse(
            protocols=UPSTREAM_PROTOCOLS, autoping=False, max_msg_size=8 * 1024 * 1024
        )
        await ws.prepare(request)
        try:
            while True:
                message = await ws.receive()
                if message.type is WSMsgType.TEXT:
                    self.messages += 1
                    if message.data == "close-4002":
                        await ws.close(code=4002, message=b"done")
                    elif message.data == "ping-me":
                        await ws.ping(b"from-upstream")
                    else:
                        await ws.send_str(message.data)
                elif message.type is WSMsgType.BINARY:
                    self.messages += 1
                    await ws.send_bytes(message.data)
                elif message.type is WSMsgType.PING:
                    self.pings.append(message.data)
                    await ws.pong(message.data)
                elif message.type is WSMsgType.PONG:
                    self.pongs.append(message.data)
                    self.pong_seen.set()
                else:
                    if message.type is WSMsgType.CLOSE:
                        self.closes.append((message.data, message.extra))
                    else:
                        self.closes.append((ws.close_code, None))
                    break
        finally:
            self.ended.set()
        return ws


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    upstream = WsUpstream()
    app = web.Application()
    app.router.add_get("/{tail:.*}", upstream.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    upstream.url = str(server.make_url("")).rstrip("/")
    yield upstream
    await server.close()


def ws_config(upstream_url: str, **route: Any) -> Config:
    """/ws needs jobs:read unless ``route`` says otherwise; /plain: public, no WebSocket."""
    ws: dict[str, Any] = {"name": "ws", "match": {"prefix": "/ws"}, "upstream": upstream_url}
    ws.update(route if route else {"require": ["jobs:read"]})
    plain = {
        "name": "plain",
        "match": {"prefix": "/plain"},
        "upstream": upstream_url,
        "public": True,
        "websocket": False,
    }
    return gateway_config(upstream_url, routes=[ws, plain])


@pytest.fixture
async def seed(db: Any) -> Seeder:
    return Seeder(gateway_config("http://127.0.0.1:9"), db)


def handshake_headers(**extra: str) -> dict[str, str]:
    """A hand-made client handshake, for answers that ws_connect would turn into exceptions."""
    return {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        **extra,
    }


async def problem(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.headers["Content-Type"] == "application/problem+json"
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == response.status
    return body


async def test_text_and_binary_are_relayed_both_ways(
    make_gateway: GatewayFactory, ws_upstream: WsUpstream, seed: Seeder
) -> None:
    _, token, _ = await seed.user_with_token("field_user")
    client = await make_gateway(ws_config(ws_upstream.url))

    async with client.ws_connect("/ws/echo", headers=bearer(token)) as ws:
        await ws.send_str("héllo, wörld")
        assert await asyncio.wait_for(ws.receive_str(), 10) == "héllo, wörld"
        await ws.send_bytes(bytes(range(256)) * 1000)
        assert await asyncio.wait_for(ws.receive_bytes(), 10) == bytes(range(256)) * 1000
    assert ws_upstream.messages == 2


async def test_identity_headers_reach_the_upstream_handshake_and_spoofed_ones_do_not(
    make_gateway: GatewayFactory, ws_upstream: WsUpstream, seed: Seeder
) -> None:
    user_id, token, token_id = await seed.user_with_token("field_user")
    client = await make_gateway(ws_config(ws_upstream.url))
    spoofed = {"X-Auth-User-Id": "root", "X_Auth_Role": "owner", "X-Auth-Permissions": "*"}

    headers = {**bearer(token), **spoofed, "Origin": "https://app.example", "X-Request-Id": "ws-1"}

    async with client.ws_connect("/ws/echo", headers=headers) as ws:
        await ws.send_str("hi")
        assert await asyncio.wait_for(ws.receive_str(), 10) == "hi"

    assert ws_upstream.headers("X-Auth-User-Id") == [user_id]
    assert ws_upstream.headers("X-Auth-Token-Id") == [token_id]
    assert ws_upstream.headers("X-Auth-Role") == ["field_user"]
    assert ws_upstream.headers("X-Auth-Permissions") == ["jobs:read"]
    assert ws_upstream.headers("X_Auth_Role") == []
    assert ws_upstream.headers("Authorization") == []
    assert ws_upstream.headers("X-Request-Id") == ["ws-1"]
    assert ws_upstream.headers("Origin") == ["https://app.example"]
    assert ws_upstream.headers("Upgrade") == ["websocket"]
    assert len(ws_upstream.headers("Sec-WebSocket-Key")) == 1


@pytest.mark.parametrize(
    ("role", "status"), [(None, 401), ("field_user", 403)], ids=["no-token", "no-permission"]
)
async def test_refused_upgrade_never_reaches_the_upstream(
    make_gateway: GatewayFactory,
    ws_upstream: WsUpstream,
    seed: Seeder,
    role: str | None,
    status: int,
) -> None:
    route = {"require": ["jobs:write"]} if role else {}
    client = await make_gateway(ws_config(ws_upstream.url, **route))
    headers = {}
    if role is not None:
        headers = bearer((await seed.user_with_token(role))[1])

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws/echo", headers=headers)

    assert refused.value.status == status
    assert ws_upstream.requests == []


async def test_client_close_code_and_reason_reach_the_upstream(
    make_gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    client = await make_gateway(ws_config(ws_upstream.url, public=True))

    ws = await client.ws_connect("/ws/echo")
    await ws.send_str("hi")
    assert await asyncio.wait_for(ws.receive_str(), 10) == "hi"
    await asyncio.wait_for(ws.close(code=4001, message=b"bye"), 10)

    await asyncio.wait_for(ws_upstream.ended.wait(), 10)
    assert ws_upstream.closes == [(4001, "bye")]
    assert ws.close_code == 4001  # the upstream's answering close frame, passed back


async def test_upstream_close_code_and_reason_reach_the_client(
    make_gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    client = await make_gateway(ws_config(ws_upstream.url, public=True))

    ws = await client.ws_connect("/ws/echo")
    await ws.send_str("close-4002")
    message = await asyncio.wait_for(ws.receive(), 10)

    assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 4002, "done")
    await asyncio.wait_for(ws_upstream.ended.wait(), 10)
    assert ws.close_code == 4002


async def test_pings_and_pongs_are_relayed_both_ways(
    make_gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    client = await make_gateway(ws_config(ws_upstream.url, public=True))

    async with client.ws_connect("/ws/echo", autoping=False) as ws:
        await ws.ping(b"from-client")
        pong = await asyncio.wait_for(ws.receive(), 10)
        assert (pong.type, pong.data) == (WSMsgType.PONG, b"from-client")

        await ws.send_str("ping-me")
        ping = await asyncio.wait_for(ws.receive(), 10)
        assert (ping.type, ping.data) == (WSMsgType.PING, b"from-upstream")
        await ws.pong(ping.data)
        await asyncio.wait_for(ws_upstream.pong_seen.wait(), 10)

    assert ws_upstream.pings == [b"from-client"]
    assert ws_upstream.pongs == [b"from-upstream"]


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [(("x.unknown", "chat.v1"), "chat.v1"), (("chat.v1", "chat.v2"), "chat.v1"), (("x.y",), None)],
)
async def test_the_upstream_chooses_the_subprotocol(
    make_gateway: GatewayFactory,
    ws_upstream: WsUpstream,
    offered: tuple[str, ...],
    chosen: str | None,
) -> None:
    client = await make_gateway(ws_config(ws_upstream.url, public=True))

    async with client.ws_connect("/ws/echo", protocols=offered) as ws:
        assert ws.protocol == chosen
        await ws.send_str("hi")
        assert await asyncio.wait_for(ws.receive_str(), 10) == "hi"

    assert ws_upstream.headers("Sec-WebSocket-Protocol") == [",".join(offered)]


async def test_message_over_the_limit_closes_both_sides_with_1009(
    make_gateway: GatewayFactory, ws_upstream: WsUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a small limit, so the whole frame is on the wire before the gateway reads its
    header: a client still sending a large frame when the gateway closes may see a reset
    instead of the close frame."""
    limit = 64 * 1024
    monkeypatch.setattr(proxy, "MAX_WS_MESSAGE", limit)
    client = await make_gateway(ws_config(ws_upstream.url, public=True))

    ws = await client.ws_connect("/ws/echo")
    await ws.send_bytes(b"x" * limit)
    assert await asyncio.wait_for(ws.receive_bytes(), 10) == b"x" * limit
    await ws.send_bytes(b"x" * (limit + 1))
    message = await asyncio.wait_for(ws.receive(), 10)

    assert (message.type, message.data) == (WSMsgType.CLOSE, aiohttp.WSCloseCode.MESSAGE_TOO_BIG)
    await asyncio.wait_for(ws_upstream.ended.wait(), 10)
    assert ws_upstream.closes[0][0] == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    assert ws_upstream.messages == 1
    await ws.close()


async def test_a_4_mib_message_is_relayed_both_ways(
    make_gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    assert proxy.MAX_WS_MESSAGE == 4 * 1024 * 1024
    client = await make_gateway(ws_config(ws_upstream.url, public=True))
    message = os.urandom(1024) * 4096

    async with client.ws_connect("/ws/echo", max_msg_size=2 * len(message)) as ws:
        await ws.send_bytes(message)
        assert await asyncio.wait_for(ws.receive_bytes(), 10) == message


async def test_client_vanishing_closes_the_upstream_with_1001(
    make_gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    client = await make_gateway(ws_config(ws_upstream.url, public=True))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = "".join(f"{k}: {v}\r\n" for k, v in handshake_headers(Host="gw").items())
    writer.write(f"GET /ws/echo HTTP/1.1\r\n{head}\r\n".encode())
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert answer.startswith(b"HTTP/1.1 101 ")

    writer.transport.abort()  # no close frame, no FIN handshake: gone

    await asyncio.wait_for(ws_upstream.ended.wait(), 10)
    assert ws_upstream.closes == [(aiohttp.WSCloseCode.GOING_AWAY, "")]


async def test_unreachable_upstream_is_502_before_the_upgrade(
    make_gateway: GatewayFactory, unused_tcp_port: int
) -> None:
    dead = f"http://127.0.0.1:{unused_tcp_port}"
    client = await make_gateway(ws_config(dead, public=True))

    response = await client.get("/ws/echo", headers=handshake_headers())

    assert response.status == 502
    assert (await problem(response))["type"] == "urn:patgate:error:bad_gateway"


async def test_upstream_refusing_the_handshake_has_its_status_relayed(
    make_gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    client = await make_gateway(ws_config(ws_upstream.url, public=True))

    response = await client.get("/ws/refuse", headers=handshake_headers())

    assert response.status == 403
    assert response.headers["X-Why"] == "not today"
    assert response.headers["X-Request-Id"]
    assert await response.read() == b""


async def test_malformed_handshake_is_400_without_reaching_the_upstream(
    make_gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    client = await make_gateway(ws_config(ws_upstream.url, public=True))

    response = await client.get(
        "/ws/echo", headers=handshake_headers(**{"Sec-WebSocket-Key": "short"})
    )

    assert response.status == 400
    assert (await problem(response))["type"] == "urn:patgate:error:bad_request"
    assert ws_upstream.requests == []


async def test_route_without_websocket_forwards_the_upgrade_as_plain_http(
    make_gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    client = await make_gateway(ws_config(ws_upstream.url))

    response = await client.get("/plain/echo", headers=handshake_headers())

    # The upstream saw a plain GET and refused to upgrade it (aiohttp answers 400).
    assert response.status == 400
    assert ws_upstream.headers("Upgrade") == []
    assert ws_upstream.headers("Connection") == []
    assert len(ws_upstream.requests) == 1
