"""The identity cache (SPEC §10): lifetimes, the separate negative table, eviction,
invalidation indexes and single-flight loading. Time is a fake clock, never a sleep."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gateway.cache import IdentityCache

Cache = IdentityCache[str, str]


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_cache(
    clock: FakeClock,
    *,
    ttl: float = 30.0,
    negative_ttl: float = 5.0,
    max_entries: int = 100,
    negative_max_entries: int = 10,
) -> Cache:
    return IdentityCache(
        ttl=ttl,
        negative_ttl=negative_ttl,
        max_entries=max_entries,
        negative_max_entries=negative_max_entries,
        clock=clock,
    )


def key(n: int | str) -> bytes:
    return f"digest-{n}".encode()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock: FakeClock) -> Cache:
    return make_cache(clock)


async def yield_until(condition: Callable[[], bool], rounds: int = 1000) -> None:
    """Let other tasks run (no timed sleep) until ``condition`` holds."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


# ---------------------------------------------------------------------------------------------
# Counters and lifetimes


async def test_counters_count_misses_hits_and_negative_hits(cache: Cache) -> None:
    async def load_good() -> str:
        cache.put(key("good"), "alice", token_id="t1", user_id="u1")
        return "alice"

    async def load_bad() -> str:
        cache.put_negative(key("bad"), "unknown")
        return "unknown"

    assert await cache.get_or_load(key("good"), load_good) == "alice"
    assert (cache.stats.misses, cache.stats.loads, cache.stats.hits) == (1, 1, 0)

    assert await cache.get_or_load(key("good"), load_good) == "alice"
    assert cache.get(key("good")) == "alice"
    assert (cache.stats.misses, cache.stats.loads, cache.stats.hits) == (1, 1, 2)

    assert await cache.get_or_load(key("bad"), load_bad) == "unknown"
    assert await cache.get_or_load(key("bad"), load_bad) == "unknown"
    assert cache.stats.misses == 2
    assert cache.stats.loads == 2
    assert cache.stats.negative_hits == 1
    assert cache.stats.hits == 2


def test_positive_entry_lives_ttl(cache: Cache, clock: FakeClock) -> None:
    cache.put(key(1), "alice", token_id="t1", user_id="u1")

    clock.advance(29.999)
    assert cache.get(key(1)) == "alice"
    clock.advance(0.001)
    assert cache.get(key(1)) is None
    assert len(cache) == 0


def test_positive_lifetime_is_capped_by_token_expiry(cache: Cache, clock: FakeClock) -> None:
    """A token that expires in 2 s is not served from a 30 s cache after those 2 s."""
    cache.put(key(1), "alice", token_id="t1", user_id="u1", lifetime=2.0)

    clock.advance(1.999)
    assert cache.get(key(1)) == "alice"
    clock.advance(0.001)
    assert cache.get(key(1)) is None


def test_lifetime_longer_than_ttl_does_not_extend_it(cache: Cache, clock: FakeClock) -> None:
    cache.put(key(1), "alice", token_id="t1", user_id="u1", lifetime=3600.0)

    clock.advance(30.0)
    assert cache.get(key(1)) is None


@pytest.mark.parametrize("lifetime", [0.0, -5.0])
def test_already_expired_token_is_not_cached(cache: Cache, lifetime: float) -> None:
    cache.put(key(1), "alice", token_id="t1", user_id="u1", lifetime=lifetime)

    assert cache.get(key(1)) is None
    assert len(cache) == 0


def test_ttl_zero_caches_nothing(clock: FakeClock) -> None:
    cache = make_cache(clock, ttl=0.0)

    cache.put(key(1), "alice", token_id="t1", user_id="u1")
    cache.put(key(2), "bob", token_id="t2", user_id="u2", lifetime=10.0)

    assert cache.get(key(1)) is None
    assert cache.get(key(2)) is None
    assert len(cache) == 0


async def test_ttl_zero_loads_every_time(clock: FakeClock) -> None:
    cache = make_cache(clock, ttl=0.0)
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        cache.put(key(1), "alice", token_id="t1", user_id="u1")
        return "alice"

    for _ in range(3):
        assert await cache.get_or_load(key(1), load) == "alice"
    assert calls == 3


def test_negative_entry_lives_negative_ttl(cache: Cache, clock: FakeClock) -> None:
    cache.put_negative(key(1), "revoked")

    clock.advance(4.999)
    assert cache.get(key(1)) == "revoked"
    clock.advance(0.001)
    assert cache.get(key(1)) is None
    assert cache.stats.negative_hits == 1


def test_negative_ttl_zero_remembers_nothing(clock: FakeClock) -> None:
    cache = make_cache(clock, negative_ttl=0.0)

    cache.put_negative(key(1), "unknown")

    assert cache.get(key(1)) is None


def test_positive_put_replaces_a_negative_entry(cache: Cache) -> None:
    cache.put_negative(key(1), "unknown")
    cache.put(key(1), "alice", token_id="t1", user_id="u1")

    assert cache.get(key(1)) == "alice"
    cache.drop_token("t1")
    assert cache.get(key(1)) is None  # the old negative entry does not come back


# ---------------------------------------------------------------------------------------------
# Bounded tables


def test_a_flood_of_bad_tokens_cannot_evict_a_good_one(clock: FakeClock) -> None:
    """SPEC §10: the negative table is separate and smaller, so 100,000 distinct bad digests
    leave a cached identity in place and the negative table at its bound."""
    cache = make_cache(clock, max_entries=10, negative_max_entries=1000)
    cache.put(key("good"), "alice", token_id="t1", user_id="u1")

    for n in range(100_000):
        cache.put_negative(key(f"bad-{n}"), "unknown")

    assert cache.get(key("good")) == "alice"
    assert len(cache) == 1
    assert cache.get(key("bad-0")) is None  # the oldest bad ones made room
    assert cache.get(key("bad-99999")) == "unknown"
    remembered = sum(cache.get(key(f"bad-{n}")) is not None for n in range(98_000, 100_000))
    assert remembered == 1000


def test_full_positive_table_drops_the_oldest_entry(clock: FakeClock) -> None:
    cache = make_cache(clock, max_entries=3)
    for n in range(3):
        cache.put(key(n), f"user-{n}", token_id=f"t{n}", user_id=f"u{n}")

    cache.put(key(3), "user-3", token_id="t3", user_id="u3")

    assert len(cache) == 3
    assert cache.get(key(0)) is None
    assert [cache.get(key(n)) for n in (1, 2, 3)] == ["user-1", "user-2", "user-3"]
    # The evicted entry left the indexes too: dropping its token or user touches nothing else.
    cache.drop_token("t0")
    cache.drop_user("u0")
    assert len(cache) == 3


def test_replacing_an_entry_in_a_full_table_evicts_nothing(clock: FakeClock) -> None:
    cache = make_cache(clock, max_entries=2)
    cache.put(key(0), "a", token_id="t0", user_id="u0")
    cache.put(key(1), "b", token_id="t1", user_id="u1")

    cache.put(key(1), "b2", token_id="t1", user_id="u1")

    assert cache.get(key(0)) == "a"
    assert cache.get(key(1)) == "b2"


# ---------------------------------------------------------------------------------------------
# Invalidation


def test_drop_token_removes_only_that_token(cache: Cache) -> None:
    cache.put(key(1), "a", token_id="t1", user_id="u1")
    cache.put(key(2), "b", token_id="t2", user_id="u1")

    cache.drop_token("t1")
    cache.drop_token("no-such-token")

    assert cache.get(key(1)) is None
    assert cache.get(key(2)) == "b"


def test_drop_user_removes_all_of_that_users_tokens_only(cache: Cache) -> None:
    cache.put(key(1), "a", token_id="t1", user_id="u1")
    cache.put(key(2), "b", token_id="t2", user_id="u1")
    cache.put(key(3), "c", token_id="t3", user_id="u2")

    cache.drop_user("u1")
    cache.drop_user("no-such-user")

    assert cache.get(key(1)) is None
    assert cache.get(key(2)) is None
    assert cache.get(key(3)) == "c"
    assert len(cache) == 1


def test_clear_drops_positive_and_negative_entries(cache: Cache) -> None:
    cache.put(key(1), "a", token_id="t1", user_id="u1")
    cache.put_negative(key(2), "unknown")

    cache.clear()

    assert cache.get(key(1)) is None
    assert cache.get(key(2)) is None
    assert len(cache) == 0
    cache.drop_token("t1")  # the indexes were cleared with the tables: no KeyError
    cache.drop_user("u1")


def test_put_of_an_existing_key_replaces_the_value(cache: Cache, clock: FakeClock) -> None:
    cache.put(key(1), "old", token_id="t1", user_id="u1")
    clock.advance(20.0)

    cache.put(key(1), "new", token_id="t1", user_id="u1")

    assert cache.get(key(1)) == "new"
    assert len(cache) == 1
    clock.advance(20.0)  # the replacement has a fresh ttl
    assert cache.get(key(1)) == "new"
    cache.drop_token("t1")
    assert cache.get(key(1)) is None


def test_drop_user_after_replace_does_not_drop_another_users_key(cache: Cache) -> None:
    """A key re-stored under a different user leaves the first user's index."""
    cache.put(key(1), "a", token_id="t1", user_id="u1")
    cache.put(key(1), "a2", token_id="t1", user_id="u2")
    cache.put(key(2), "b", token_id="t2", user_id="u1")

    cache.drop_user("u1")

    assert cache.get(key(1)) == "a2"
    assert cache.get(key(2)) is None
    cache.drop_user("u2")
    assert cache.get(key(1)) is None


def test_drop_token_after_replace_under_a_new_token_id(cache: Cache) -> None:
    cache.put(key(1), "a", token_id="t1", user_id="u1")
    cache.put(key(1), "a2", token_id="t9", user_id="u1")

    cache.drop_token("t1")  # the old id no longer points at the key
    assert cache.get(key(1)) == "a2"

    cache.drop_token("t9")
    assert cache.get(key(1)) is None


def test_expired_entry_is_removed_from_the_indexes(cache: Cache, clock: FakeClock) -> None:
    cache.put(key(1), "a", token_id="t1", user_id="u1")
    clock.advance(30.0)
    assert cache.get(key(1)) is None

    cache.put(key(2), "b", token_id="t1", user_id="u1")  # same ids, another digest
    cache.drop_token("t1")

    assert cache.get(key(2)) is None


# ---------------------------------------------------------------------------------------------
# Single-flight


class GatedLoader:
    """A loader that waits for the test to open the gate, counting how often it ran."""

    def __init__(self, cache: Cache, result: str | BaseException) -> None:
        self.cache = cache
        self.result = result
        self.gate = asyncio.Event()
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        await self.gate.wait()
        if isinstance(self.result, BaseException):
            raise self.result
        self.cache.put(key(1), self.result, token_id="t1", user_id="u1")
        return self.result


def start_many(cache: Cache, load: Callable[[], Awaitable[str]], n: int) -> list[asyncio.Task[str]]:
    return [asyncio.create_task(cache.get_or_load(key(1), load)) for _ in range(n)]


async def test_concurrent_misses_share_one_load(cache: Cache) -> None:
    loader = GatedLoader(cache, "alice")
    tasks = start_many(cache, loader, 100)
    await yield_until(lambda: cache.stats.coalesced == 99 and loader.calls == 1)

    assert not any(t.done() for t in tasks)
    loader.gate.set()
    results = await asyncio.gather(*tasks)

    assert loader.calls == 1
    assert results == ["alice"] * 100
    assert all(r is results[0] for r in results)
    assert (cache.stats.loads, cache.stats.misses, cache.stats.coalesced) == (1, 1, 99)
    assert cache.get(key(1)) == "alice"


async def test_a_load_error_reaches_every_waiter_and_is_not_cached(cache: Cache) -> None:
    failure = ConnectionError("database down")
    loader = GatedLoader(cache, failure)
    tasks = start_many(cache, loader, 100)
    await yield_until(lambda: cache.stats.coalesced == 99)
    loader.gate.set()

    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert loader.calls == 1
    assert all(r is failure for r in results)
    assert cache.get(key(1)) is None
    assert len(cache) == 0

    loader.result = "alice"
    assert await cache.get_or_load(key(1), loader) == "alice"
    assert loader.calls == 2


async def test_a_cancelled_waiter_does_not_cancel_the_shared_load(cache: Cache) -> None:
    loader = GatedLoader(cache, "alice")
    tasks = start_many(cache, loader, 3)
    await yield_until(lambda: cache.stats.coalesced == 2)

    tasks[1].cancel()
    await yield_until(tasks[1].done)
    loader.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert results[0] == "alice"
    assert isinstance(results[1], asyncio.CancelledError)
    assert results[2] == "alice"
    assert loader.calls == 1


async def test_separate_keys_load_separately(cache: Cache) -> None:
    calls: list[bytes] = []

    def loader_for(k: bytes) -> Callable[[], Awaitable[str]]:
        async def load() -> str:
            calls.append(k)
            return k.decode()

        return load

    results = await asyncio.gather(
        *(cache.get_or_load(key(n), loader_for(key(n))) for n in range(5))
    )

    assert results == [key(n).decode() for n in range(5)]
    assert sorted(calls) == sorted(key(n) for n in range(5))
    assert cache.stats.coalesced == 0


async def test_a_cancelled_leader_does_not_cancel_the_other_waiters(cache: Cache) -> None:
    loader = GatedLoader(cache, "alice")
    tasks = start_many(cache, loader, 3)
    await yield_until(lambda: cache.stats.coalesced == 2)

    tasks[0].cancel()  # the request that started the load goes away
    await yield_until(tasks[0].done)
    loader.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert results[1:] == ["alice", "alice"]


# ---------------------------------------------------------------------------------------------
# An invalidation that overtakes a load


@pytest.mark.parametrize("invalidate", ["drop_token", "clear"])
def test_a_value_read_before_an_invalidation_is_not_kept(cache: Cache, invalidate: str) -> None:
    """The load read the row, then the revocation's notice arrived (finding nothing to
    drop), then the load finished: caching it would serve the revoked token for a ttl."""
    since = cache.generation  # the load starts its query
    if invalidate == "drop_token":
        cache.drop_token("t-1")
    else:
        cache.clear()
    cache.put(key(1), "identity", token_id="t-1", user_id="u-1", since=since)
    cache.put_negative(key(2), "revoked", token_id="t-2", since=since)
    assert cache.get(key(1)) is None
    assert cache.get(key(2)) is None


def test_a_value_read_with_no_invalidation_meanwhile_is_kept(cache: Cache) -> None:
    since = cache.generation
    cache.put(key(1), "identity", token_id="t-1", user_id="u-1", since=since)
    assert cache.get(key(1)) == "identity"
