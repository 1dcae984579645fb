"""A tiny raw HTTP/1.1 client for the security tests.

aiohttp's and yarl's clients normalize what they send (dot segments, escapes, header
spelling), which would hide exactly the tricks these tests are about. Here a request is the
bytes put on the socket, and a response is parsed from the bytes that come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Header", "RawResponse", "build_request", "exchange", "request"]

# Every exchange is bounded: a gateway that hangs fails the test instead of stalling it.
TIMEOUT = 10.0

Header = tuple[str | bytes, str | bytes]


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def build_request(
    method: str | bytes,
    target: str | bytes,
    headers: Iterable[Header] = (),
    body: bytes = b"",
    *,
    host: str | bytes | None = "127.0.0.1",
    close: bool = True,
) -> bytes:
    """The bytes of one request, headers exactly as given (name, spelling, order, duplicates).

    ``host`` adds a ``Host`` header first (None: none); ``close`` adds ``Connection: close``
    last; a non-empty ``body`` gets a ``Content-Length`` unless the headers frame it already.
    """
    lines = [_bytes(method) + b" " + _bytes(target) + b" HTTP/1.1"]
    given = [(_bytes(name), _bytes(value)) for name, value in headers]
    if host is not None:
        lines.append(b"Host: " + _bytes(host))
    lines.extend(name + b": " + value for name, value in given)
    framed = {name.lower() for name, _ in given} & {b"content-length", b"transfer-encoding"}
    if body and not framed:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _read_response(reader: asyncio.StreamReader, method: bytes) -> RawResponse | None:
    """One response, or None when the connection ended before a status line."""
    try:
        status_line = await reader.readuntil(b"\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise
        return None
    _, code, *reason = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    status = int(code)
    headers: list[tuple[str, str]] = []
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name, value.strip(" \t\r\n")))
    lowered = {name.lower(): value for name, value in headers}
    if method == b"HEAD" or status in (204, 304) or status < 200:
        body = b""
    elif "chunked" in lowered.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    elif "content-length" in lowered:
        body = await reader.readexactly(int(lowered["content-length"]))
    else:
        body = await reader.read()
    return RawResponse(status, reason[0] if reason else "", headers, body)


async def read_response(reader: asyncio.StreamReader, method: bytes = b"GET") -> RawResponse:
    """The next response on a connection the caller keeps."""
    response = await _read_response(reader, method)
    assert response is not None, "the server closed the connection"
    return response


async def exchange(
    port: int,
    data: bytes,
    *,
    methods: Sequence[bytes] = (b"GET",),
) -> list[RawResponse]:
    """Send ``data`` to 127.0.0.1:``port`` as is; read responses until the server closes.

    ``methods`` names the request method behind each expected response in turn (HEAD
    responses have no body); the last one is reused for any further response.
    """
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            await writer.drain()
            responses: list[RawResponse] = []
            while True:
                method = methods[min(len(responses), len(methods) - 1)]
                try:
                    response = await _read_response(reader, method)
                except ConnectionResetError:
                    break
                if response is None:
                    break
                responses.append(response)
            return responses
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def request(
    port: int,
    method: str | bytes,
    target: str | bytes,
    headers: Iterable[Header] = (),
    body: bytes = b"",
    *,
    host: str | bytes | None = "127.0.0.1",
) -> RawResponse:
    """One request with ``Connection: close``; exactly one response is expected."""
    data = build_request(method, target, headers, body, host=host, close=True)
    responses = await exchange(port, data, methods=(_bytes(method),))
    assert len(responses) == 1, f"expected one response, got {len(responses)}"
    return responses[0]
