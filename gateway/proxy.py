"""forward(): one request to its upstream and the answer back, streamed both ways.

This is the path of the requests aiohttp's server answers (bodies, WebSockets, anything
the front end hands over). A plain request the front end (``gateway.front``) answers itself
takes the same decisions and headers from here (``prepare``, ``response_headers``) and goes
through ``UpstreamPool.send``; the behaviour below is the same for both.

HTTP
    Sent through ``gateway.upstream.UpstreamPool``, the lean keep-alive client (llhttp via
    httptools). Bodies are streamed in both directions with each hop's back-pressure, so a
    multi-GB upload or download holds a few 64 KiB buffers, never the body; a chunked or
    SSE answer reaches the client chunk by chunk, as the upstream sends it. Faults: the
    upstream refused or reset before answering → 502; the route ``timeout`` of upstream
    silence (awaiting the answer, or between two of its chunks) → 504; ``max_body`` → 413,
    from ``Content-Length`` before connecting, or mid-stream for a chunked body (the body
    generator raises and the upstream connection is dropped without the final chunk, so the
    upstream never sees a complete body). Once the answer has started, a fault can no longer
    become a status: the client connection is aborted, so the client sees a truncated
    response, never a seemingly complete one. Redirects are passed through, never followed;
    bodies are never decompressed. A client that goes away cancels the handler (the server
    runs with ``handler_cancellation``), and the cancellation closes the upstream
    connection, so the upstream sees the client leave.

WebSockets
    A GET that is a WebSocket handshake (``is_websocket_upgrade``) on a route with
    ``websocket: true`` has been authenticated and authorized like any request by the time
    it gets here. The upstream handshake is made first, so an unreachable upstream is still
    a 502 problem (a silent one past ``connect_timeout + timeout``: 504) and the client is
    upgraded only once the upstream is. An upstream refusing the handshake with a status
    has that status and its headers relayed, without the body (aiohttp's client has
    released it). The client's subprotocols (its first ``Sec-WebSocket-Protocol`` header,
    the one aiohttp's server reads) are offered upstream; the upstream's choice is the
    client's answer. Messages, not bytes, are relayed: text, binary, ping and pong both ways;
    a close frame's code and reason are passed on and the close handshake completed on
    both sides; a peer that vanishes without one gets the other side closed with 1001. Each
    hop does its own framing, without compression, and a message over ``MAX_WS_MESSAGE``
    closes both sides with 1009. There is no idle timeout: a socket lives until a side ends.

    Why aiohttp's client for WebSockets: a relay needs a handshake, a frame codec with
    masking, ping/pong, per-message limits and close-code bookkeeping on each hop, and
    ``ws_connect`` / ``WebSocketResponse`` are exactly that, tested upstream. The fast path
    of issue 7 (pooled connections, httptools) replaces the *plain HTTP* forwarding, where
    per-request overhead dominates; a WebSocket pays its handshake once and then costs per
    message, so it keeps this path.

    On a route with ``websocket: false`` the upgrade headers are stripped like every
    hop-by-hop header and the request goes upstream as plain HTTP, as nginx does without
    upgrade configuration; the upstream's answer is relayed as is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final, Protocol

import aiohttp
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from gateway.assertion import AssertionSigner
from gateway.auth import Identity, identity_headers
from gateway.config import Route
from gateway.errors import BadRequest, PayloadTooLarge, UpstreamTimeout, UpstreamUnavailable
from gateway.headers import (
    forwarded_headers,
    is_trusted,
    is_websocket_upgrade,
    request_header_items,
    response_header_items,
)
from gateway.upstream import UpstreamPool, request_line

if TYPE_CHECKING:  # gateway.keys imports this module for its FORWARDER key
    from gateway.keys import Runtime

TOKEN_EXPIRES_HEADER = "X-Auth-Token-Expires-At"
# Headers aiohttp's client would invent when the client did not send them.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
READ_CHUNK = 64 * 1024
MAX_WS_MESSAGE = 4 * 1024 * 1024  # the largest WebSocket message relayed, in bytes
WS_CLOSE_TIMEOUT = 5.0  # how long a close waits for the peer's answering close frame
_WS_SCHEMES = {"http": "ws", "https": "wss"}
# Headers that describe a body, dropped when the body is not relayed.
_BODY_HEADERS = frozenset({"content-length", "content-type", "content-encoding"})

_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse

# Where a template's request id goes: no client header, route header or identity value has
# a NUL (llhttp and PostgreSQL refuse them; a config value that has one gets no template).
REQUEST_ID_MARK: Final = "\x00request-id\x00"
_REQUEST_ID_MARK_BYTES: Final = REQUEST_ID_MARK.encode()


class RequestView(Protocol):
    """What the request path reads of a request: an aiohttp ``web.Request``, or the front
    end's ``FrontRequest`` (``gateway.front``)."""

    @property
    def method(self) -> str: ...
    @property
    def raw_path(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def headers(self) -> MultiMapping[str]: ...
    @property
    def remote(self) -> str | None: ...
    @property
    def scheme(self) -> str: ...


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=SKIP_AUTO_HEADERS,
        trust_env=False,
    )


async def _limited(content: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    """The request body as chunks, refused (413) once it passes ``limit`` bytes."""
    seen = 0
    async for chunk in content.iter_chunked(READ_CHUNK):
        seen += len(chunk)
        if seen > limit:
            raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
        yield chunk


class UpstreamTemplate:
    """A bodyless request's upstream head for one client's headers, runtime, route and
    identity, with a place for each request's line and request id (``Forwarder.template``).
    """

    __slots__ = ("after", "before", "identity", "origin", "route", "rt")

    def __init__(
        self,
        rt: Runtime,
        route: Route,
        identity: Identity | None,
        origin: str,
        before: bytes,
        after: bytes,
    ) -> None:
        self.rt = rt
        self.route = route
        self.identity = identity
        self.origin = origin
        self.before = before
        self.after = after

    def fits(self, rt: Runtime, route: Route, identity: Identity | None) -> bool:
        return self.rt is rt and self.route is route and self.identity is identity

    def head(self, method: str, target: str, request_id: str) -> bytes:
        """The head ``prepare`` and ``UpstreamPool.send`` would make: the request id is a
        header policy's sane one or a new hex one, so it needs no further check."""
        return request_line(method, target) + self.before + request_id.encode() + self.after


class Forwarder:
    """Header names, trusted proxies and header policy come from the request's ``Runtime``
    (``rt``, read once per request), so a reload never mixes two configurations in one
    request; the signer is replaced by the reload itself."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        signer: AssertionSigner | None = None,
        pool: UpstreamPool | None = None,
    ) -> None:
        self.session = session  # WebSockets
        self.pool = pool or UpstreamPool()  # plain HTTP: the lean client
        self.signer = signer

    def request_headers(
        self,
        request: RequestView,
        rt: Runtime,
        route: Route,
        identity: Identity | None,
        request_id: str,
    ) -> CIMultiDict[str]:
        """Strip what a client could spoof or that belongs to this hop, then inject ours."""
        return CIMultiDict(self.request_items(request, rt, route, identity, request_id))

    def request_items(
        self,
        request: RequestView,
        rt: Runtime,
        route: Route,
        identity: Identity | None,
        request_id: str,
        base: list[tuple[str, str]] | None = None,
    ) -> list[tuple[str, str]]:
        """``request_headers`` as a list, in the order they are sent. ``base``: what
        ``base_items`` returned for this request, runtime and route, when the caller kept it."""
        items = self.base_items(request, rt, route) if base is None else base.copy()
        names = rt.cfg.identity_headers
        if identity is not None:
            items += identity_headers(names, identity)
            if self.signer is not None:
                _put(items, self.signer.header, self.signer.sign(identity, route.name))
        _put(items, names.request_id, request_id)
        return items

    def base_items(self, request: RequestView, rt: Runtime, route: Route) -> list[tuple[str, str]]:
        """The headers sent upstream before identity and request id: the client's, cleaned,
        the route's own and ``X-Forwarded-*``. A function of the request's headers and peer,
        the runtime and the route."""
        headers = request.headers
        items = request_header_items(
            headers,
            rt.header_policy,
            websocket=False,
            keep_authorization=route.forward_authorization,
            remove=route.remove_request_headers,
        )
        for name, value in route.set_request_headers:
            _put(items, name, value)
        peer = request.remote or ""
        items += forwarded_headers(
            headers,
            peer=peer,
            proto=request.scheme,
            host=request.host,
            trusted_peer=is_trusted(peer, rt.cfg.trusted_proxies),
        )
        if route.preserve_host:
            _put(items, "Host", request.host)
        return items

    def prepare(
        self,
        request: RequestView,
        rt: Runtime,
        route: Route,
        url: str,
        identity: Identity | None,
        request_id: str,
        base: list[tuple[str, str]] | None = None,
    ) -> tuple[str, str, list[tuple[str, str]]]:
        """The upstream's origin, the request target (the exact canonical path and query)
        and the headers to send."""
        cut = url.find("/", url.find("://") + 3)
        items = self.request_items(request, rt, route, identity, request_id, base)
        return url[:cut], url[cut:], items

    def template(
        self,
        request: RequestView,
        rt: Runtime,
        route: Route,
        identity: Identity | None,
        base: list[tuple[str, str]] | None = None,
    ) -> UpstreamTemplate | None:
        """``prepare``'s headers for every request of a client that repeats its headers, as
        one head with a place for the request line and id; None when each request needs its
        own (a signed assertion changes over time)."""
        if self.signer is not None:
            return None
        items = self.request_items(request, rt, route, identity, REQUEST_ID_MARK, base)
        origin = rt.routes.origin(route)
        parts = self.pool.header_block(origin, items).split(_REQUEST_ID_MARK_BYTES)
        if len(parts) != 2:
            return None
        return UpstreamTemplate(rt, route, identity, origin, parts[0], parts[1])

    def response_headers(
        self,
        upstream: list[tuple[str, str]],
        rt: Runtime,
        identity: Identity | None,
        request_id: str,
    ) -> list[tuple[str, str]]:
        """The upstream's answer's headers as the client gets them, in order."""
        items = response_header_items(upstream)
        if identity is not None and identity.expires_header is not None:
            _put(items, TOKEN_EXPIRES_HEADER, identity.expires_header)
        _put(items, rt.cfg.identity_headers.request_id, request_id)
        return items

    async def forward(
        self,
        request: web.Request,
        rt: Runtime,
        route: Route,
        url: str,
        identity: Identity | None,
        request_id: str,
    ) -> web.StreamResponse:
        if route.websocket and request.method == "GET" and is_websocket_upgrade(request.headers):
            return await self.websocket(request, rt, route, url, identity, request_id)
        origin, target, headers = self.prepare(request, rt, route, url, identity, request_id)
        body: AsyncIterator[bytes] | None = None
        length = request.content_length
        if request.body_exists:
            if route.max_body is not None:
                if length is not None and length > route.max_body:
                    raise PayloadTooLarge(f"the request body exceeds {route.max_body} bytes")
                body = _limited(request.content, route.max_body)
            else:
                body = request.content.iter_any()
        upstream = await self.pool.request(
            origin,
            request.method,
            target,
            headers,
            body,
            length if body is not None else None,
            connect_timeout=route.connect_timeout,
            read_timeout=route.timeout,
        )
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        try:
            response.headers.extend(
                self.response_headers(upstream.headers, rt, identity, request_id)
            )
            await response.prepare(request)
            async for chunk in upstream.iter_chunks():
                await response.write(chunk)
            await response.write_eof()
        except (UpstreamUnavailable, UpstreamTimeout, OSError):
            upstream.close()
            if response.prepared:  # the answer has started: cut the connection
                return _abort(request, response)
            raise
        except BaseException:
            upstream.close()
            raise
        await upstream.release()
        return response

    async def websocket(
        self,
        request: web.Request,
        rt: Runtime,
        route: Route,
        url: str,
        identity: Identity | None,
        request_id: str,
    ) -> web.StreamResponse:
        """Handshake with the upstream, then with the client, then relay until one side ends."""
        offered = _subprotocols(request.headers)
        if not web.WebSocketResponse(protocols=offered).can_prepare(request).ok:
            raise BadRequest("the WebSocket handshake is malformed")
        headers = self.request_headers(request, rt, route, identity, request_id)
        for name in [name for name in headers if name.lower().startswith("sec-websocket-")]:
            headers.popall(name, None)  # aiohttp's client writes its own key, version, protocol
        target = URL(url, encoded=True)
        target = target.with_scheme(_WS_SCHEMES.get(target.scheme, target.scheme))
        try:
            async with asyncio.timeout(route.connect_timeout + route.timeout):
                upstream = await self.session.ws_connect(
                    target,
                    headers=headers,
                    protocols=offered,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=WS_CLOSE_TIMEOUT),
                    autoclose=False,
                    autoping=False,
                    max_msg_size=MAX_WS_MESSAGE + 1,  # aiohttp refuses a size that reaches it
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 101:
                raise UpstreamUnavailable("the upstream's WebSocket handshake is invalid") from exc
            return self._refusal(exc.status, exc.headers, rt, identity, request_id)
        except TimeoutError as exc:
            raise UpstreamTimeout("the upstream did not complete the WebSocket handshake") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable("the upstream refused or reset the connection") from exc

        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            timeout=WS_CLOSE_TIMEOUT,
            autoclose=False,
            autoping=False,
            compress=False,
            max_msg_size=MAX_WS_MESSAGE + 1,  # aiohttp refuses a size that reaches it
        )
        client.headers.extend(self.response_headers([], rt, identity, request_id))
        try:
            await client.prepare(request)
        except BaseException:
            await upstream.close(code=WSCloseCode.GOING_AWAY)
            raise
        await _relay(client, upstream)
        return client

    def _refusal(
        self,
        status: int,
        headers: MultiMapping[str] | None,
        rt: Runtime,
        identity: Identity | None,
        request_id: str,
    ) -> web.Response:
        """The upstream answered the handshake with ``status``: relay it, without a body."""
        upstream = [] if headers is None else list(headers.items())
        answer = self.response_headers(upstream, rt, identity, request_id)
        response = web.Response(status=status)
        response.headers.extend(item for item in answer if item[0].lower() not in _BODY_HEADERS)
        return response


def _put(items: list[tuple[str, str]], name: str, value: str) -> None:
    """``items[name] = value`` as a multidict does it: the first header of that name (any
    case) takes the value in place, the others go; else it is appended."""
    lower = name.lower()
    at = -1
    for index, (other, _) in enumerate(items):
        if other.lower() == lower:
            at = index
            break
    if at < 0:
        items.append((name, value))
        return
    items[at] = (name, value)
    items[at + 1 :] = [item for item in items[at + 1 :] if item[0].lower() != lower]


def _subprotocols(headers: MultiMapping[str]) -> tuple[str, ...]:
    offered = headers.get("Sec-WebSocket-Protocol", "")
    return tuple(name for name in (part.strip() for part in offered.split(",")) if name)


async def _relay(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    """Pump messages both ways until both sides have closed.

    Cancelled (the client vanished, which cancels its handler, or the server stops), it
    closes both sides itself before stopping the pumps, passing on a side's error code
    (aiohttp closes the transport on a protocol error or an oversized message, and that
    cancels the handler before the pump has passed the code on) or else 1001.
    """
    pumps = (
        asyncio.create_task(_pump(client, upstream)),
        asyncio.create_task(_pump(upstream, client)),
    )
    try:
        await asyncio.wait(pumps)  # unlike gather, a cancellation here leaves the pumps be
    finally:
        try:
            await client.close(code=_close_code(upstream.exception()))
            await upstream.close(code=_close_code(client.exception()))
        finally:
            for pump in pumps:
                pump.cancel()
    for pump in pumps:
        pump.result()  # a bug in a pump is raised, not lost


def _close_code(error: BaseException | None) -> int:
    return error.code if isinstance(error, WebSocketError) else WSCloseCode.GOING_AWAY


async def _pump(source: _Socket, sink: _Socket) -> None:
    """Relay ``source``'s messages to ``sink`` until ``source`` ends, then pass its end on.

    Closing ``sink`` wakes the other pump, waiting in ``sink.receive()``, with CLOSING.
    """
    try:
        while True:
            message = await source.receive()
            kind = message.type
            if kind is WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif kind is WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif kind is WSMsgType.PING:
                await sink.ping(message.data)
            elif kind is WSMsgType.PONG:
                await sink.pong(message.data)
            elif kind is WSMsgType.CLOSE:
                code = message.data or WSCloseCode.OK  # 0: a close frame without a code
                await sink.close(code=code, message=(message.extra or "").encode())
                await source.close(code=code)  # the answering close frame, echoing the code
                return
            elif kind is WSMsgType.ERROR:  # aiohttp has closed source with the error's code
                error = message.data
                if isinstance(error, WebSocketError):
                    await sink.close(code=error.code, message=str(error).encode()[:123])
                else:
                    await sink.close(code=WSCloseCode.INTERNAL_ERROR)
                return
            else:  # CLOSING: the other pump is closing source; CLOSED: source vanished
                if kind is WSMsgType.CLOSED:
                    await sink.close(code=WSCloseCode.GOING_AWAY)
                return
    except ConnectionError:  # sink went away mid-send; its own pump passes that on
        return


def _abort(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """The answer has started: the only honest signal left is to cut the connection."""
    if request.transport is not None:
        request.transport.abort()
    response.force_close()
    return response
