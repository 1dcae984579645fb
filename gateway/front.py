"""The main listener's front end: its own HTTP/1.1 protocol for the hot path (issue 7).

Why: aiohttp's server spends about 80 µs of CPU per request before a handler runs (a
``BaseRequest``, a ``StreamResponse``, a task, its writer and timers), against a few µs of
llhttp parsing. A reverse proxy's common request is a GET with no body, and for that one
``FrontProtocol`` does everything itself, with callbacks and no task: llhttp (httptools)
parses the head; ``GatewayHandler`` makes the same decisions as for any request (canonical
path, route, the cache's identity, permissions, headers); ``UpstreamPool.send`` relays the
answer chunk by chunk as it arrives; one metrics update and one access-log line end it.

Everything else is handed to aiohttp, on the same connection, before a byte of it is
answered: ``transport.set_protocol`` to aiohttp's ``RequestHandler`` and the unparsed bytes
from the start of that request replayed into it. Handed over are requests with a body or
``Expect``, upgrades (WebSockets), anything not HTTP/1.1, paths that are not canonical (so
that aiohttp and ``GatewayHandler`` refuse them exactly as before), ``/_patgate/`` (the
management API, forward-auth, the page), heads over ``MAX_HEAD`` bytes and anything llhttp
will not parse. A token not in the cache is looked up in a task, then the request goes on
as above. The connection stays aiohttp's once handed over.

A keep-alive client usually sends the same headers on every request. When the bytes after
the request line are the previous request's, llhttp still checks the whole head, but what
depends on the headers alone is reused from that request (``_Memo``): their multidict, the
client's request id, the token's cache key, the route for the last path, and the upstream
head for a runtime, route and identity, made once with a place for each request's line and
id (``UpstreamTemplate``). When the request line repeats too (a client polling one URL),
the parse of that line is reused as well: llhttp accepted those very bytes before. Every
request is still routed for its runtime and authenticated against the cache, and gets its
own request id. These are caches of pure functions of the bytes received, kept per
connection, never shared between clients; what pays off only when headers repeat waits for
a second request with them.

The answer's head is kept the same way (``_Answer``): when the upstream's status and
headers are the previous answer's on this connection (and the runtime, the token's expiry,
HEAD and keep-alive are too), the client's head is the previous one with this request's id
and ``Date``.

What the client gets is what aiohttp's server would send: the same status line, headers
(``Date``, ``Server``, ``Content-Type`` defaulted as aiohttp does), framing (the upstream's
``Content-Length``, else chunked; no body for HEAD, 1xx, 204, 304), the same problem+json
errors. A fault after the answer has started cuts the connection. A client that goes away
closes the upstream connection. Requests on one connection are answered in order, one at a
time; pipelined ones wait in the buffer (reading pauses above ``READ_HIGH_WATER``). Idle
keep-alive connections close after the runner's ``keepalive_timeout`` (aiohttp's default,
``KEEPALIVE_TIMEOUT``), as aiohttp's own do.

Stopping (``pre_shutdown``/``shutdown``, from aiohttp's runner): idle connections close at
once; one with a request in flight finishes it with ``Connection: close``, or is cut when
the shutdown timeout ends.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from time import perf_counter
from typing import Final, cast

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web_protocol import RequestHandler
from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth import Identity
from gateway.config import Route
from gateway.errors import PatgateError, UpstreamTimeout, UpstreamUnavailable
from gateway.handler import (
    GATE,
    NO_ROUTE,
    PENDING,
    RESERVED_PREFIX,
    Admission,
    GatewayHandler,
    access_fields,
    new_request_id,
)
from gateway.keys import Runtime
from gateway.paths import canonical_path
from gateway.proxy import REQUEST_ID_MARK, UpstreamTemplate
from gateway.upstream import Exchange, _Connection

__all__ = ["FrontProtocol", "FrontRequest", "FrontServer", "GatewayRunner"]

log = logging.getLogger("patgate")

MAX_HEAD: Final = 8190  # a longer head goes to aiohttp, which applies its own limits
MAX_HEADERS: Final = 128  # aiohttp's limit: more go to aiohttp, which refuses them
# aiohttp's parser refuses a second one of these (RFC 9110 singletons) with 400.
_SINGLETONS: Final = frozenset(
    {
        b"content-length",
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"host",
        b"max-forwards",
        b"server",
        b"transfer-encoding",
        b"user-agent",
    }
)
_ODD: Final = frozenset({b"expect", b"upgrade"})
_WATCHED: Final = _SINGLETONS | _ODD
READ_HIGH_WATER: Final = 64 * 1024  # pipelined bytes held before reading pauses
KEEPALIVE_TIMEOUT: Final = 75.0  # aiohttp's default
_ENCODING: Final = "utf-8"
_ERRORS: Final = "surrogateescape"  # as aiohttp's parser: any header byte survives
_EMPTY_STATUSES: Final = frozenset((204, 304, *range(100, 200)))
_LAST_CHUNK: Final = b"0\r\n\r\n"
_SERVER_LINE: Final = f"Server: {SERVER_SOFTWARE}\r\n"
_HAS_TYPE, _HAS_DATE, _HAS_SERVER = 1, 2, 4
# Where an _Answer's Date goes: no upstream header has a NUL (llhttp refuses them).
_DATE_MARK_TEXT: Final = "\x00date\x00"
_DATE_MARK: Final = _DATE_MARK_TEXT.encode()
_REQUEST_ID_MARK_BYTES: Final = REQUEST_ID_MARK.encode()
_PRESENCE: Final = {"content-type": _HAS_TYPE, "date": _HAS_DATE, "server": _HAS_SERVER}


def _present(items: list[tuple[str, str]]) -> int:
    """Which of Content-Type, Date and Server the headers have, as _HAS_* bits."""
    has = 0
    for name, _ in items:
        size = len(name)
        if size == 12 or size == 4 or size == 6:
            has |= _PRESENCE.get(name.lower(), 0)
    return has


def _framing(items: list[tuple[str, str]]) -> str:
    """The upstream's Content-Length, kept as the answer's framing; "" (chunked) without."""
    for name, value in items:
        if len(name) == 14 and name.lower() == "content-length":
            return value
    return ""


class FrontRequest:
    """A parsed request head: what ``GatewayHandler`` reads (``RequestView``)."""

    __slots__ = ("headers", "host", "method", "raw_path", "remote")

    scheme: Final = "http"

    def __init__(
        self, method: str, raw_path: str, headers: CIMultiDictProxy[str], host: str, remote: str
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.headers = headers
        self.host = host
        self.remote = remote


class _Memo:
    """What one connection's last full parse found, for requests that repeat its headers."""

    __slots__ = (
        "admission",
        "base",
        "base_for",
        "block",
        "headers",
        "host",
        "last",
        "request_id",
        "request_id_policy",
        "route_for",
        "template",
        "token_key",
        "used",
    )

    def __init__(self, block: bytes, headers: CIMultiDictProxy[str]) -> None:
        self.block = block  # the head after the request line, as received
        self.headers = headers
        self.host: str = headers["Host"]
        self.last: _Line | None = None  # the last request line with these headers
        self.request_id: str | None = None  # the client's sane request id, under ...
        self.request_id_policy: object = None  # ... this HeaderPolicy
        self.base: list[tuple[str, str]] = []  # Forwarder.base_items, for ...
        self.base_for: tuple[Runtime, Route] | None = None
        self.route_for: tuple[Runtime, str, str, Route] | None = None  # rt, method, path
        self.template: UpstreamTemplate | None = None  # Forwarder.template
        self.token_key: bytes | None = None  # GatewayHandler.token_key: a well-formed token's
        self.admission = Admission()
        # Set on its second request: what pays off only when the headers repeat waits for it.
        self.used = False


class _Answer:
    """The client's answer head for an upstream answer head seen before on this connection:
    ``FrontProtocol._head``'s bytes with a place for the request id and, unless the upstream
    sent its own, the ``Date``."""

    __slots__ = (
        "after",
        "before",
        "between",
        "bodyless",
        "chunked",
        "key",
        "reusable",
        "rt",
        "upstream",
    )

    def __init__(
        self,
        rt: Runtime,
        key: tuple[int, str, str | None, bool, bool],
        upstream: list[tuple[str, str]],
        head: bytes,
        *,
        bodyless: bool,
        chunked: bool,
    ) -> None:
        self.rt = rt
        self.key = key  # status, reason, the token's expiry header, HEAD, keep-alive
        self.upstream = upstream  # the upstream's headers, as parsed
        self.bodyless = bodyless
        self.chunked = chunked
        self.reusable = head.count(_REQUEST_ID_MARK_BYTES) == 1 and head.count(_DATE_MARK) <= 1
        self.before, _, rest = head.partition(_REQUEST_ID_MARK_BYTES)
        between, dated, after = rest.partition(_DATE_MARK)
        self.between = between if dated else rest
        self.after = after if dated else None

    def head(self, request_id: str) -> bytes:
        if self.after is None:
            return self.before + request_id.encode() + self.between
        date = rfc822_formatted_time().encode()
        return self.before + request_id.encode() + self.between + date + self.after


class _Line:
    """A memo's last request line and what it came to, for a client that sends the very same
    head again (a poll): the request, read-only once made, is shared by both."""

    __slots__ = ("keep_alive", "line", "path", "query", "request")

    def __init__(
        self, line: bytes, request: FrontRequest, path: str, query: str, keep_alive: bool
    ) -> None:
        self.line = line
        self.request = request
        self.path = path
        self.query = query
        self.keep_alive = keep_alive


class _QuickReader:
    """llhttp over a whole head, reporting only the request line and the framing: for a head
    whose headers are the ones already parsed."""

    __slots__ = ("complete", "keep_alive", "parser", "url")

    def __init__(self) -> None:
        self.parser = HttpRequestParser(self)
        self.url = b""
        self.complete = False
        self.keep_alive = True

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()

    def read(self, head: bytes) -> bool:
        """False if the head is not the plain HTTP/1.1 request its headers promise."""
        self.url = b""
        self.complete = False
        try:
            self.parser.feed_data(head)
        except (HttpParserError, HttpParserUpgrade):
            return False
        return self.complete and self.parser.get_http_version() == "1.1"


class FrontProtocol(asyncio.Protocol):
    """One client connection, until it ends or is handed to aiohttp."""

    transport: asyncio.Transport

    def __init__(self, server: FrontServer) -> None:
        self.server = server
        self.gate = server.gate
        self.loop = server.loop
        self.parser = HttpRequestParser(self)
        self.buffer = b""  # received, not yet answered: starts at a request's first byte
        self.remote = ""
        self.idle_since = 0.0
        self.busy = False  # a request is being answered
        self.processing = False  # inside process(): finish() must not re-enter it
        self.closing = False  # answer the request in flight, then close
        self.closed = False
        self.reading_paused = False
        self.write_paused = False  # the client is not reading: neither does the exchange
        # the head being parsed
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._complete = False
        self._keep_alive = True
        self._odd = False  # a head only aiohttp's server answers
        self._singletons: set[bytes] = set()
        self._memo: _Memo | None = None
        self._answer: _Answer | None = None
        self.quick = _QuickReader()
        self._reset()

    def _reset(self) -> None:
        """No request in flight."""
        self.request: FrontRequest | None = None
        self.rt: Runtime | None = None
        self.request_id = ""
        self.label = NO_ROUTE
        self.identity: Identity | None = None
        self.started = 0.0
        self.forwarded: float | None = None
        self.keep_alive = True
        self.exchange: Exchange | None = None
        self.task: asyncio.Task[None] | None = None
        self.pending: bytes | None = None  # the answer's head, held to go with its body
        self.answered = False  # the answer's head was decided: faults now cut the connection
        self.status = 0
        self.chunked = False
        self.bodyless = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else ""
        self.idle_since = self.loop.time()
        self.server.fronts.add(self)

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        if self.busy:
            if len(self.buffer) > READ_HIGH_WATER and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()
            return
        self.process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.exchange is not None:
            self.exchange.cancel()
        if self.task is not None:
            self.task.cancel()
        self.server.forget(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.resume_reading()

    # -- httptools callbacks (fed one complete head at a time) --------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower in _WATCHED:
            if lower in _ODD or lower in self._singletons:
                self._odd = True  # aiohttp's: Expect, Upgrade, a duplicate singleton (a 400)
            self._singletons.add(lower)
        if b"\x00" in value:
            self._odd = True  # aiohttp refuses it (llhttp leaves it to the caller)
        value = value.rstrip(b" \t")  # llhttp strips the OWS before a value, not after
        self._headers.append((name.decode(_ENCODING, _ERRORS), value.decode(_ENCODING, _ERRORS)))

    def on_message_complete(self) -> None:
        self._complete = True
        self._keep_alive = self.parser.should_keep_alive()  # llhttp resets it after this

    # -- requests -----------------------------------------------------------------------------

    def process(self) -> None:
        """Take requests from the buffer until one is in flight, or the head is partial."""
        self.processing = True
        try:
            while not self.busy and self.buffer and not self.closed:
                if not self._next():
                    return
        finally:
            self.processing = False

    def _next(self) -> bool:
        """Start the buffer's first request; False when there is nothing more to do now."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD or b"\n\n" in buffer:
                self.hand_off()
            return False
        end += 4
        if end > MAX_HEAD:
            self.hand_off()
            return False
        # The bytes after the request line: the previous request's? (see _Memo)
        line_end = buffer.find(b"\r\n")
        block = buffer[line_end:end]
        memo = self._memo
        if memo is not None and block == memo.block:
            memo.used = True
            last = memo.last
            if last is not None and last.line == buffer[:line_end]:
                # The whole head repeats: llhttp accepted these very bytes last time.
                self.buffer = buffer[end:]
                self.busy = True
                self.keep_alive = last.keep_alive
                self.begin(last.request, last.path, last.query, memo)
                return True
            parser = self.quick.parser
            headers, host = memo.headers, memo.host
            if not self.quick.read(buffer[:end]):
                self.hand_off()
                return False
            url, keep_alive = self.quick.url, self.quick.keep_alive
        else:
            parser = self.parser
            if not self._parse(buffer[:end]):
                self.hand_off()  # a body, Expect, an upgrade, HTTP/1.0, no Host, ...
                return False
            memo = self._memo = _Memo(block, CIMultiDictProxy(CIMultiDict(self._headers)))
            headers, host = memo.headers, memo.host
            url, keep_alive = self._url, self._keep_alive
        target = url.decode(_ENCODING, _ERRORS)
        raw_path, _, query = target.partition("?")
        try:
            path = canonical_path(raw_path)
        except PatgateError:
            self.hand_off()  # refused by GatewayHandler, as before
            return False
        if path.startswith(RESERVED_PREFIX):
            self.hand_off()
            return False
        self.buffer = buffer[end:]
        method = parser.get_method().decode(_ENCODING, _ERRORS)
        request = FrontRequest(method, target, headers, host, self.remote)
        memo.last = _Line(buffer[:line_end], request, path, query, keep_alive)
        self.busy = True
        self.keep_alive = keep_alive
        self.begin(request, path, query, memo)
        return True

    def _parse(self, head: bytes) -> bool:
        """The full parse of a head, with every header; False if aiohttp must answer it."""
        self._url = b""
        self._headers = []
        self._complete = self._odd = False
        if self._singletons:
            self._singletons = set()
        parser = self.parser
        try:
            parser.feed_data(head)
        except (HttpParserError, HttpParserUpgrade):
            return False
        return (
            self._complete
            and not self._odd
            and len(self._headers) <= MAX_HEADERS
            and parser.get_http_version() == "1.1"
            and b"host" in self._singletons  # on_header noted it
        )

    def hand_off(self) -> None:
        """The connection is aiohttp's from here: the buffer holds the next request whole."""
        handler = self.server.aiohttp_protocol()
        transport = self.transport
        self.server.forget(self)
        self.closed = True  # to this protocol
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.reading_paused:
            transport.resume_reading()
        if self.write_paused:
            handler.pause_writing()
        buffer, self.buffer = self.buffer, b""
        if buffer:
            handler.data_received(buffer)

    def begin(self, request: FrontRequest, path: str, query: str, memo: _Memo) -> None:
        gate = self.gate
        self.started = perf_counter()
        rt = self.rt = gate.live.runtime
        self.request = request
        policy = rt.header_policy
        if memo.request_id_policy is not policy:
            memo.request_id = policy.request_id(request.headers)
            memo.request_id_policy = policy
        self.request_id = memo.request_id or new_request_id()
        try:
            known = memo.route_for
            if (
                known is not None
                and known[0] is rt
                and known[2] == path
                and known[1] == request.method
            ):
                route = known[3]
            else:
                route = rt.routes.match(request.host, request.method, path)
                memo.route_for = (rt, request.method, path, route)
            self.label = route.name
            if memo.used and not route.public and memo.token_key is None:
                memo.token_key = gate.token_key(request)
            identity = gate.admit_cached(request, rt, route, memo.token_key, memo.admission)
            if identity is PENDING:
                self.task = self.loop.create_task(
                    self._admit(request, rt, route, path, query, memo)
                )
                return
            self.forward(route, path, query, identity, memo)
        except PatgateError as error:
            self.refuse(error)
        except Exception:
            self.fault()

    async def _admit(
        self, request: FrontRequest, rt: Runtime, route: Route, path: str, query: str, memo: _Memo
    ) -> None:
        """A token the cache does not know: the database answers, then on as usual."""
        try:
            identity = await self.gate.admit_loaded(request, rt, route)
            self.forward(route, path, query, identity, memo)
        except PatgateError as error:
            self.refuse(error)
        except Exception:
            self.fault()

    def forward(
        self, route: Route, path: str, query: str, identity: Identity | None, memo: _Memo
    ) -> None:
        request, rt = self.request, self.rt
        assert request is not None
        assert rt is not None
        self.identity = identity
        forwarder = self.gate.forwarder
        template = memo.template
        if template is None or not template.fits(rt, route, identity):
            known = memo.base_for
            if known is None or known[0] is not rt or known[1] is not route:
                memo.base = forwarder.base_items(request, rt, route)
                memo.base_for = (rt, route)
            template = None
            if memo.used:
                template = memo.template = forwarder.template(
                    request, rt, route, identity, memo.base
                )
        if template is None:
            url = rt.routes.upstream_url(route, path, query)
            origin, target, headers = forwarder.prepare(
                request, rt, route, url, identity, self.request_id, memo.base
            )
            head = forwarder.pool.head(origin, request.method, target, headers)
        else:
            origin = template.origin
            target = rt.routes.upstream_target(route, path, query)
            head = template.head(request.method, target, self.request_id)
        self.forwarded = perf_counter()
        self.exchange = forwarder.pool.send_head(
            origin,
            request.method,
            head,
            self,
            connect_timeout=route.connect_timeout,
            read_timeout=route.timeout,
        )
        if self.write_paused:
            self.exchange.pause_reading()

    # -- the upstream's answer (gateway.upstream.Relay) ---------------------------------------

    def upstream_head(self, conn: _Connection) -> None:
        request, rt, identity = self.request, self.rt, self.identity
        assert request is not None
        assert rt is not None
        if self.closing:
            self.keep_alive = False
        key = (
            conn.status,
            conn.reason,
            identity.expires_header if identity is not None else None,
            request.method == "HEAD",
            self.keep_alive,
        )
        answer = self._answer
        if (
            answer is None
            or answer.rt is not rt
            or answer.key != key
            or answer.upstream != conn.headers
        ):
            head, bodyless, chunked = self._render(
                conn.headers, rt, key, REQUEST_ID_MARK, _DATE_MARK_TEXT
            )
            answer = self._answer = _Answer(
                rt, key, conn.headers, head, bodyless=bodyless, chunked=chunked
            )
        self.status = conn.status
        self.answered = True
        self.bodyless = answer.bodyless
        self.chunked = answer.chunked
        if answer.reusable:
            self.pending = answer.head(self.request_id)
        else:  # the upstream's reason has a NUL, which could pass for a mark
            self.pending = self._render(
                conn.headers, rt, key, self.request_id, rfc822_formatted_time()
            )[0]

    def _render(
        self,
        upstream: list[tuple[str, str]],
        rt: Runtime,
        key: tuple[int, str, str | None, bool, bool],
        request_id: str,
        date: str,
    ) -> tuple[bytes, bool, bool]:
        """The answer's head for the upstream's headers and ``upstream_head``'s ``key``,
        whether it has no body, and whether its body is chunked."""
        status, reason, _, is_head, _ = key
        items = self.gate.forwarder.response_headers(upstream, rt, self.identity, request_id)
        if status in _EMPTY_STATUSES:
            items = [item for item in items if item[0].lower() != "content-length"]
            return self._head(status, reason, items, None, date), True, False
        if is_head:
            return self._head(status, reason, items, None, date), True, False
        length = _framing(items)
        return self._head(status, reason, items, length, date), False, length == ""

    def upstream_body(self, chunk: bytes) -> None:
        if self.bodyless or not chunk:
            return
        if self.chunked:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        pending = self.pending
        if pending is not None:
            self.pending = None
            chunk = pending + chunk
        self.transport.write(chunk)

    def upstream_flush(self) -> None:
        pending = self.pending
        if pending is not None:
            self.pending = None
            self.transport.write(pending)

    def upstream_done(self) -> None:
        self.exchange = None
        tail = _LAST_CHUNK if self.chunked and not self.bodyless else b""
        pending = self.pending
        if pending is not None:
            self.pending = None
            tail = pending + tail
        if tail:
            self.transport.write(tail)
        self.finish(self.status)

    def upstream_failed(self, error: UpstreamTimeout | UpstreamUnavailable) -> None:
        self.exchange = None
        if not self.answered:
            self.refuse(error)
            return
        self.transport.abort()  # the answer has started: cut the connection, never fake an end
        self.keep_alive = False
        self.closed = True
        self.finish(self.status)

    # -- answers ------------------------------------------------------------------------------

    def _head(
        self,
        status: int,
        reason: str,
        items: list[tuple[str, str]],
        length: str | None,
        date: str,
    ) -> bytes:
        """The answer's head as aiohttp's ``StreamResponse`` writes it: the headers, then
        what it adds when they lack it (``date`` the ``Date``). ``length``: the body's
        ``Content-Length`` ("" for chunked), or None for an answer without a body."""
        lines = [f"HTTP/1.1 {status} {reason}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in items]
        has = _present(items)
        if length is not None:
            if length == "":
                lines.append("Transfer-Encoding: chunked\r\n")
            if length != "0" and not has & _HAS_TYPE:
                lines.append("Content-Type: application/octet-stream\r\n")
        if not has & _HAS_DATE:
            lines.append(f"Date: {date}\r\n")
        if not has & _HAS_SERVER:
            lines.append(_SERVER_LINE)
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode(_ENCODING, _ERRORS)

    def refuse(self, error: PatgateError) -> None:
        """problem+json, as ``GatewayHandler`` answers it."""
        rt = self.rt
        assert rt is not None
        response = self.gate.refused(error, rt, self.request_id)
        body = response.body
        assert isinstance(body, bytes)
        items = [*response.headers.items(), ("Content-Length", str(len(body)))]
        if self.closing:
            self.keep_alive = False
        head = self._head(response.status, response.reason, items, None, rfc822_formatted_time())
        request = self.request
        self.transport.write(
            head if request is not None and request.method == "HEAD" else head + body
        )
        self.finish(response.status)

    def fault(self) -> None:
        """A bug: still problem+json, and logged with its request id."""
        log.exception("gateway error", extra={"fields": {"request_id": self.request_id}})
        self.refuse(PatgateError())

    def finish(self, status: int) -> None:
        request, rt = self.request, self.rt
        assert request is not None
        assert rt is not None
        self.gate.telemetry.request(
            route=self.label,
            method=request.method,
            status=status,
            started=self.started,
            forwarded=self.forwarded,
            ended=perf_counter(),
            fields=partial(access_fields, request, rt, self.request_id, self.identity),
        )
        keep_alive = self.keep_alive and not self.closing
        self._reset()
        self.busy = False
        if self.closed:
            return
        if not keep_alive:
            self.closed = True
            self.transport.close()
            return
        self.idle_since = self.loop.time()
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.buffer and not self.processing:
            self.process()

    # -- stopping -----------------------------------------------------------------------------

    def shut(self) -> None:
        """Stop: close if idle, else after the answer in flight."""
        self.closing = True
        if not self.busy and not self.closed:
            self.closed = True
            self.transport.close()

    def cut(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abort()


class FrontServer(web.Server):
    """aiohttp's ``Server`` whose protocol factory makes ``FrontProtocol``s (aiohttp's
    ``RequestHandler`` only on a hand-over), and whose shutdown also drains them."""

    def __init__(self, inner: web.Server, gate: GatewayHandler) -> None:
        # aiohttp has no public way to copy a Server's settings: these are its own attributes.
        super().__init__(
            inner.request_handler,
            request_factory=inner.request_factory,
            handler_cancellation=inner.handler_cancellation,
            loop=inner._loop,
            **inner._kwargs,
        )
        self.gate = gate
        self.loop = inner._loop
        self.fronts: set[FrontProtocol] = set()
        self._drained: asyncio.Future[None] | None = None
        # aiohttp's RequestHandler takes the same keyword: one idle limit for both protocols
        self.keepalive_timeout = float(inner._kwargs.get("keepalive_timeout", KEEPALIVE_TIMEOUT))
        self._sweeper = self.loop.call_later(self.keepalive_timeout / 4, self._sweep)

    def __call__(self) -> FrontProtocol:  # type: ignore[override]  # the socket's protocol
        return FrontProtocol(self)

    def aiohttp_protocol(self) -> RequestHandler:
        return super().__call__()

    def forget(self, front: FrontProtocol) -> None:
        self.fronts.discard(front)
        if not self.fronts and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _sweep(self) -> None:
        """Close keep-alive connections idle (or stuck in a partial head) for too long."""
        expired = self.loop.time() - self.keepalive_timeout
        for front in [f for f in self.fronts if not f.busy and f.idle_since < expired]:
            front.shut()
        self._sweeper = self.loop.call_later(self.keepalive_timeout / 4, self._sweep)

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        self._sweeper.cancel()
        for front in list(self.fronts):
            front.shut()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - aiohttp's
        await asyncio.gather(super().shutdown(timeout), self._drain(timeout))

    async def _drain(self, grace: float | None) -> None:
        if self.fronts:
            self._drained = self.loop.create_future()
            try:
                async with asyncio.timeout(grace):
                    await self._drained
            except TimeoutError:
                for front in list(self.fronts):
                    front.cut()


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` for the gateway application, serving through the front end."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return FrontServer(server, self.app[GATE])
