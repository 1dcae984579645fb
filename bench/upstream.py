"""The fast upstream: a raw uvloop protocol answering every request with one fixed 200.

No framework and no parser library: wrk, nginx and patgate send small requests, so finding
the end of the head (and skipping a Content-Length body, if any) is all the parsing needed.
Keep-alive unless the client says ``Connection: close``; pipelined requests are answered in
order. Run it as ``python -m bench.upstream PORT``; it prints ``ready`` once listening.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from typing import cast

BODY = b'{"ok":true,"upstream":"bench","padding":"' + b"x" * 20 + b'"}\n'
assert len(BODY) == 64
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
    b"\r\n" + BODY
)
CLOSE_RESPONSE = RESPONSE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
MAX_HEAD = 65536


class FixedResponse(asyncio.Protocol):
    __slots__ = ("buffer", "skip", "transport")

    def __init__(self) -> None:
        self.buffer = b""
        self.skip = 0  # body bytes of the current request still to discard
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        buffer = self.buffer + data if self.buffer else data
        answers = []
        while buffer:
            if self.skip:
                taken = min(self.skip, len(buffer))
                self.skip -= taken
                buffer = buffer[taken:]
                continue
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    transport.close()
                    return
                break
            head = buffer[:end]
            buffer = buffer[end + 4 :]
            length = _CONTENT_LENGTH.search(head)
            if length is not None:
                self.skip = int(length.group(1))
            if _CONNECTION_CLOSE.search(head):
                answers.append(CLOSE_RESPONSE)
                transport.write(b"".join(answers))
                transport.close()
                return
            answers.append(RESPONSE)
        self.buffer = buffer
        if answers:
            transport.write(answers[0] if len(answers) == 1 else b"".join(answers))


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FixedResponse, host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    import uvloop

    host, port = "127.0.0.1", int(sys.argv[1])
    uvloop.run(serve(host, port))


if __name__ == "__main__":
    main()
