"""The in-process identity cache, keyed by token digest (never by plaintext).

- Positive entries live ``min(ttl, time until the token expires)``; while PostgreSQL is
  unreachable they may be served ``stale_if_error`` longer (never past the token's expiry).
- Negative entries (unknown, revoked, expired, owner inactive) live ``negative_ttl`` in a
  separate, smaller table, so a flood of bad tokens cannot evict good ones.
- Concurrent misses for one digest share one load (single-flight).
- Entries can be dropped by token id or by user id (revocation, role change).

Eviction when full is oldest-inserted first: dicts keep insertion order, so that is one
``next(iter(...))`` and no per-hit bookkeeping on the hot path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")
N = TypeVar("N")


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    negative_hits: int = 0
    coalesced: int = 0
    loads: int = 0
    stale_hits: int = 0


class IdentityCache(Generic[V, N]):
    """``V`` is the positive value (an identity), ``N`` the remembered failure."""

    def __init__(
        self,
        *,
        ttl: float,
        negative_ttl: float,
        max_entries: int,
        negative_max_entries: int,
        stale_if_error: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.stale_if_error = stale_if_error
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.negative_max_entries = negative_max_entries
        self.clock = clock
        self.stats = CacheStats()
        # key → (fresh until, usable-while-the-database-is-down until, value, token, user)
        self._positive: dict[bytes, tuple[float, float, V, str, str]] = {}
        self._negative: dict[bytes, tuple[float, N, str | None]] = {}
        self._by_token: dict[str, bytes] = {}
        self._by_user: dict[str, set[bytes]] = {}
        self._negative_by_token: dict[str, bytes] = {}
        self._inflight: dict[bytes, asyncio.Future[V | N]] = {}
        # Bumped by every invalidation: a load that read the database before one arrived
        # passes the value it saw as ``since`` and its result is not kept (it may be the
        # very row the invalidation was about, read just before the change committed).
        self.generation = 0

    def __len__(self) -> int:
        return len(self._positive)

    def get(self, key: bytes) -> V | N | None:
        entry = self._positive.get(key)
        if entry is not None:
            now = self.clock()
            if entry[0] > now:
                self.stats.hits += 1
                return entry[2]
            if entry[1] <= now:
                self._drop(key)
        negative = self._negative.get(key)
        if negative is not None:
            if negative[0] > self.clock():
                self.stats.negative_hits += 1
                return negative[1]
            self._drop_negative(key)
        return None

    def stale(self, key: bytes) -> V | None:
        """A past-ttl entry still inside ``stale_if_error``: for when the database is down."""
        entry = self._positive.get(key)
        if entry is None or entry[1] <= self.clock():
            return None
        self.stats.stale_hits += 1
        return entry[2]

    def put(
        self,
        key: bytes,
        value: V,
        *,
        token_id: str,
        user_id: str,
        lifetime: float | None = None,
        since: int | None = None,
    ) -> None:
        """Remember ``value``; ``lifetime`` (seconds until the token expires) caps the ttl;
        ``since``: the ``generation`` when the value was read (see there)."""
        if since is not None and since != self.generation:
            return
        ttl = self.ttl if lifetime is None else min(self.ttl, lifetime)
        stale = self.ttl + self.stale_if_error
        stale = stale if lifetime is None else min(stale, lifetime)
        if ttl <= 0 and stale <= 0:
            return
        self._drop_negative(key)
        if key in self._positive:
            self._drop(key)
        elif len(self._positive) >= self.max_entries:
            self._drop(next(iter(self._positive)))
        now = self.clock()
        self._positive[key] = (now + ttl, now + stale, value, token_id, user_id)
        self._by_token[token_id] = key
        self._by_user.setdefault(user_id, set()).add(key)

    def put_negative(
        self, key: bytes, failure: N, *, token_id: str | None = None, since: int | None = None
    ) -> None:
        """Remember a failure; ``token_id`` (a stored but unusable token) lets a refresh or
        reactivation forget it early; ``since`` as for ``put``."""
        if self.negative_ttl <= 0 or (since is not None and since != self.generation):
            return
        self._drop_negative(key)
        if len(self._negative) >= self.negative_max_entries:
            self._drop_negative(next(iter(self._negative)))
        self._negative[key] = (self.clock() + self.negative_ttl, failure, token_id)
        if token_id is not None:
            self._negative_by_token[token_id] = key

    async def get_or_load(self, key: bytes, load: Callable[[], Awaitable[V | N]]) -> V | N:
        """The cached value, or the result of ``load()``; concurrent callers share one load.

        ``load`` stores what it found (it knows the token and user ids); an exception it
        raises reaches every waiter and nothing is cached. The load runs as its own task, so
        a caller that goes away (a client disconnect) does not cancel it for the others.
        """
        cached = self.get(key)
        if cached is not None:
            return cached
        pending = self._inflight.get(key)
        if pending is None:
            self.stats.misses += 1
            self.stats.loads += 1
            pending = asyncio.ensure_future(load())
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        else:
            self.stats.coalesced += 1
        return await asyncio.shield(pending)

    def drop_token(self, token_id: str) -> None:
        self.generation += 1
        key = self._by_token.get(token_id)
        if key is not None:
            self._drop(key)
        negative = self._negative_by_token.get(token_id)
        if negative is not None:
            self._drop_negative(negative)

    def drop_user(self, user_id: str) -> None:
        self.generation += 1
        for key in list(self._by_user.get(user_id, ())):
            self._drop(key)

    def clear(self) -> None:
        self.generation += 1
        self._positive.clear()
        self._negative.clear()
        self._by_token.clear()
        self._by_user.clear()
        self._negative_by_token.clear()

    def _drop_negative(self, key: bytes) -> None:
        entry = self._negative.pop(key, None)
        if entry is not None and entry[2] is not None:
            self._negative_by_token.pop(entry[2], None)

    def _drop(self, key: bytes) -> None:
        entry = self._positive.pop(key, None)
        if entry is None:
            return
        token_id, user_id = entry[3], entry[4]
        if self._by_token.get(token_id) == key:
            del self._by_token[token_id]
        keys = self._by_user.get(user_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_user[user_id]
