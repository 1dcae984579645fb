"""last_used_at / last_used_ip, written behind.

The hot path only records ``token id → (time, ip)`` in a dict (the latest use wins). A
background task writes the whole dict in one UPDATE every ``usage.flush_interval`` and once
more at shutdown. While PostgreSQL is unreachable the entries are kept, up to
``max_entries``; past that the oldest are dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from gateway import store
from gateway.tasks import in_background

log = logging.getLogger("patgate.usage")

DEFAULT_MAX_ENTRIES = 100_000

# Never moves last_used_at backwards (another replica may have written a later use).
FLUSH_USAGE = """
UPDATE tokens AS t SET last_used_at = u.at, last_used_ip = u.ip
FROM unnest($1::uuid[], $2::timestamptz[], $3::inet[]) AS u(id, at, ip)
WHERE t.id = u.id AND (t.last_used_at IS NULL OR t.last_used_at < u.at)"""


class UsageBuffer:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._pending: dict[str, tuple[float, str | None]] = {}
        self.dropped = 0
        self.flushes = 0

    def __len__(self) -> int:
        return len(self._pending)

    def record(self, token_id: str, ip: str | None) -> None:
        pending = self._pending
        if token_id in pending:
            del pending[token_id]  # re-insert: dict order stays oldest-first
        elif len(pending) >= self.max_entries:
            del pending[next(iter(pending))]
            self.dropped += 1
        pending[token_id] = (time.time(), ip or None)

    async def flush(self, pool: Any) -> int:
        """Write everything pending in one statement; on failure (or cancellation) keep it for
        the next try."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        ids, times, ips = [], [], []
        for token_id, (at, ip) in batch.items():
            ids.append(UUID(token_id))
            times.append(datetime.fromtimestamp(at, UTC))
            ips.append(ip)
        try:
            await pool.execute(FLUSH_USAGE, ids, times, ips)
        except BaseException:  # unavailable, or cancelled at shutdown: the final flush retries
            self._merge_back(batch)
            raise
        self.flushes += 1
        return len(batch)

    def _merge_back(self, batch: dict[str, tuple[float, str | None]]) -> None:
        """Put a failed batch back in front of what arrived meanwhile (newer uses win)."""
        merged = {k: v for k, v in batch.items() if k not in self._pending}
        merged.update(self._pending)
        while len(merged) > self.max_entries:
            del merged[next(iter(merged))]
            self.dropped += 1
        self._pending = merged

    async def run(self, pool: Any, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush(pool)
            except store.UNAVAILABLE_ERRORS as exc:
                log.warning("usage flush failed, %d entries kept: %s", len(self), exc)
            except Exception:  # a bad batch must not stop the flusher; it is not retried
                log.exception("usage flush failed")


@contextlib.asynccontextmanager
async def flushing(buffer: UsageBuffer, pool: Any, interval: float) -> AsyncIterator[None]:
    """Flush every ``interval`` while inside, and once more on the way out."""
    try:
        async with in_background(buffer.run(pool, interval), "patgate-usage-flush"):
            yield
    finally:
        try:
            await buffer.flush(pool)
        except store.UNAVAILABLE_ERRORS as exc:
            log.warning("final usage flush failed, %d entries lost: %s", len(buffer), exc)
