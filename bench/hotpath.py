"""The hot path's own CPU per request, in process: no sockets, no kernel, no other process.

``python -m bench.hotpath`` drives one ``FrontProtocol`` and one pooled upstream connection
with in-memory transports: each round feeds a request head to the front end, which runs the
real decisions (canonical path, route, cache, permissions, headers) and writes the upstream
head; then it feeds the upstream's answer, which is relayed and accounted for. What it
times is patgate's Python, and uvloop's and the kernel's share is what it leaves out: on
this 2-vCPU VM a wrk run moves by 10 to 30% from one run to the next, this by a few percent.

Rows: the public route, a cached PAT, a bad checksum (refused), each with the same head on
every request (what wrk sends, and a client polling one URL); for the PAT also with a
different path every time (the same headers: what a keep-alive API client sends, so only
the per-connection header memo applies, not the whole-head one) and with a different token
every time (no memo applies).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import uvloop

from bench.database import bad_checksum
from bench.patgate import config_data
from gateway.app import create_app
from gateway.auth import Authenticator, Identity
from gateway.config import parse_config
from gateway.front import FrontProtocol
from gateway.handler import GATE
from gateway.keys import CACHE, USAGE
from gateway.proxy import Forwarder
from gateway.tokens import TokenFormat
from gateway.upstream import UpstreamPool, _Connection

ORIGIN = "http://127.0.0.1:9"  # never connected to: the pooled connection is in memory
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n"
    + b'{"ok":true,"upstream":"bench","padding":"'
    + b"x" * 20
    + b'"}\n'
)
# The bench's own patgate config (bench.patgate), its upstream in memory here.
CONFIG = config_data(
    port=8080,
    admin_port=8081,
    upstream=ORIGIN,
    database_url="postgresql://unused",
    cache_entries=10_000,
)


class Transport:
    """Enough of an asyncio transport for both protocols: writes are kept, then dropped."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class Server:
    """What a FrontProtocol asks of its FrontServer."""

    def __init__(self, gate: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.gate = gate
        self.loop = loop
        self.fronts: set[FrontProtocol] = set()

    def forget(self, front: FrontProtocol) -> None:
        self.fronts.discard(front)


def head(path: str, token: str | None) -> bytes:
    authorization = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n{authorization}\r\n".encode()


def drive(
    front: FrontProtocol, conn: _Connection, heads: list[bytes], answer: bytes | None
) -> None:
    for data in heads:
        front.data_received(data)
        if answer is not None:
            conn.data_received(answer)


async def measure(rounds: int) -> list[tuple[str, float, bytes]]:
    cfg = parse_config(CONFIG)
    app = create_app(cfg, cfg.database.url)
    gate = app[GATE]
    tokens = TokenFormat(cfg.tokens.prefix, cfg.tokens.pepper)
    gate.authenticator = Authenticator(tokens, app[CACHE], None, cfg.roles)
    gate.usage = app[USAGE]
    pool = UpstreamPool()
    gate.forwarder = Forwarder(None, pool=pool)  # type: ignore[arg-type]  # no WebSockets
    loop = asyncio.get_running_loop()

    def cached_token() -> str:
        new = tokens.generate()
        permissions = cfg.roles["full_user"]
        identity = Identity(
            token_id=str(len(app[CACHE]) + 1),
            user_id="u-1",
            company_id="c-1",
            role="full_user",
            permissions=permissions,
            permissions_header=" ".join(sorted(permissions)),
            expires_at=None,
            expires_header=None,
        )
        app[CACHE].put(new.digest, identity, token_id=identity.token_id, user_id="u-1")
        return new.plaintext

    hot = cached_token()
    many = [head("/api/jobs/1", cached_token()) for _ in range(1000)]
    bad = bad_checksum(hot)
    rows: list[tuple[str, Callable[[int], bytes], bool]] = [
        ("public route", lambda i: head("/public/a", None), True),
        ("hot PAT", lambda i: head("/api/jobs/1", hot), True),
        ("hot PAT, a different path each time", lambda i: head(f"/api/jobs/{i}", hot), True),
        ("hot PAT, a different cached token each time", lambda i: many[i % len(many)], True),
        ("bad checksum (401)", lambda i: head("/api/jobs/1", bad), False),
    ]
    results = []
    for label, request, forwarded in rows:
        front = FrontProtocol(Server(gate, loop))  # type: ignore[arg-type]
        client = Transport()
        front.connection_made(client)  # type: ignore[arg-type]
        conn = _Connection(loop)
        conn.connection_made(Transport())  # type: ignore[arg-type]
        conn.active = False
        conn.idle_since = loop.time()
        pool._origin(ORIGIN).idle.append(conn)
        heads = [request(i) for i in range(rounds)]
        answer = ANSWER if forwarded else None
        drive(front, conn, heads[:1000], answer)  # warm-up: caches, the memo, first calls
        sample = client.written[-1]
        started = time.perf_counter()
        drive(front, conn, heads, answer)
        elapsed = time.perf_counter() - started
        assert front.busy is False, "a request was left unanswered"
        results.append((label, elapsed / rounds * 1e6, sample))
        pool._origin(ORIGIN).idle.clear()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__)
    parser.add_argument("--rounds", type=int, default=100_000, help="requests per row")
    parser.add_argument("--show", action="store_true", help="print one answer per row")
    args = parser.parse_args()
    results = uvloop.run(measure(args.rounds))
    print("| hot path, in process | µs of Python per request |")
    print("|---|--:|")
    for label, micros, sample in results:
        print(f"| {label} | {micros:.1f} |")
        if args.show:
            print(sample.decode(errors="replace"))


if __name__ == "__main__":
    main()
