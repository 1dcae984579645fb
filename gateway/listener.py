"""The LISTEN side of cache invalidation: a dedicated connection, never a pooled one.

Every change that can shrink access sends ``NOTIFY patgate_invalidate`` in its transaction
(see ``store.notify_invalidated``); each process listens here and drops the named tokens
from its cache. A lost connection is re-opened with exponential backoff, and the whole cache
is cleared once it is back, because notices sent meanwhile were missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
import orjson

from gateway import store
from gateway.tasks import in_background

log = logging.getLogger("patgate.listener")

BACKOFF_START = 0.1
BACKOFF_MAX = 5.0


class InvalidationListener:
    def __init__(
        self,
        database_url: str,
        *,
        drop_token: Callable[[str], None],
        clear: Callable[[], None],
    ) -> None:
        self.database_url = database_url
        self.drop_token = drop_token
        self.clear = clear
        self.connected = asyncio.Event()
        self.notified = asyncio.Event()  # set on every notice (tests and metrics wait on it)
        self.reconnects = 0
        self.received = 0
        self._lost = asyncio.Event()

    def _notice(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            tokens = orjson.loads(payload)["tokens"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            tokens = None
        if not isinstance(tokens, list):
            log.warning("ignoring a malformed invalidation notice")
            return
        self.received += 1
        for token_id in tokens:
            self.drop_token(str(token_id))
        self.notified.set()

    def _terminated(self, _conn: Any) -> None:
        self.connected.clear()
        self._lost.set()

    async def run(self) -> None:
        """Listen forever, reconnecting with backoff; cancel to stop.

        Any failure to connect or to keep listening (PostgreSQL down, but also a refused
        password or too many connections) is logged and retried: without this task, other
        replicas' revocations would stop reaching the cache. Once listening again after any
        failure (a first connection that failed included), the cache is cleared: what was
        cached meanwhile may have missed notices.
        """
        backoff = BACKOFF_START
        first = True
        missed = False  # the gateway has run without listening
        while True:
            try:
                conn = await asyncpg.connect(self.database_url, timeout=5)
            except Exception as exc:
                log.warning("invalidation listener cannot connect (%s); retrying", exc)
                missed = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            started = asyncio.get_running_loop().time()
            try:
                self._lost.clear()
                conn.add_termination_listener(self._terminated)
                await conn.add_listener(store.INVALIDATION_CHANNEL, self._notice)
                if missed:
                    self.clear()
                    log.warning("invalidation listener connected after a failure; cache cleared")
                if not first:
                    self.reconnects += 1
                first = False
                missed = True  # from here on, a lost connection means missed notices
                self.connected.set()
                await self._watch(conn)
            except Exception as exc:
                log.warning("invalidation listener lost its connection: %s", exc)
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)
            if asyncio.get_running_loop().time() - started > BACKOFF_MAX:
                backoff = BACKOFF_START  # it had been up a while: not a flapping connection
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _watch(self, conn: asyncpg.Connection) -> None:
        """Until the connection dies: asyncpg tells us on termination, and a periodic
        no-op query catches a peer that vanished without a FIN."""
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), timeout=BACKOFF_MAX)
            if not self._lost.is_set():
                await conn.execute("SELECT 1", timeout=BACKOFF_MAX)


def listening(listener: InvalidationListener) -> AbstractAsyncContextManager[None]:
    return in_background(listener.run(), "patgate-invalidation-listener")
