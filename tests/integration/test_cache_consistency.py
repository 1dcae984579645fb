"""SPEC §10 against a real PostgreSQL: single-flight, a negative cache that a flood cannot turn
against good tokens, NOTIFY-driven invalidation with a reconnecting listener, and
``cache.stale_if_error`` while the database is unreachable."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway import store
from gateway.app import AUTHENTICATOR, CACHE, LISTENER
from gateway.auth import Identity
from gateway.errors import UnknownToken
from gateway.lifecycle import OPERATOR
from gateway.listener import InvalidationListener
from gateway.tokens import TokenFormat
from tests.conftest import GatewayFactory, RecordingUpstream, Seeder, bearer, gateway_config
from tests.integration.test_request_path import CountingPool, count_queries, problem

CONCURRENT_FIRST_REQUESTS = 1_000
FLOOD_SIZE = 100_000
FLOOD_BATCH = 500


@pytest.fixture
async def seed(db: Any, upstream: RecordingUpstream) -> Seeder:
    return Seeder(gateway_config(upstream.url), db)


def digest_of(client: Any, token: str) -> bytes:
    digest: bytes = client.app[AUTHENTICATOR].token_format.digests(token)[0]
    return digest


# ---------------------------------------------------------------------------------------------
# Single-flight


class HeldPool(CountingPool):
    """Counts token lookups and holds each one until ``release`` is set, so that every
    concurrent request is provably waiting on the same lookup when it completes."""

    def __init__(self, pool: Any) -> None:
        super().__init__(pool)
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def fetchrow(self, *args: Any, **kwargs: Any) -> Any:
        self.queries += 1
        self.entered.set()
        await self.release.wait()
        return await self.pool.fetchrow(*args, **kwargs)


def arrivals(cache: Any, expected: int) -> asyncio.Event:
    """An event set once ``expected`` lookups have reached the cache's single-flight entry
    point (each is then either the one load or a coalesced wait, before it yields)."""
    everyone = asyncio.Event()
    get_or_load = cache.get_or_load
    count = 0

    async def counted(key: bytes, load: Callable[[], Awaitable[Any]]) -> Any:
        nonlocal count
        count += 1
        if count == expected:
            everyone.set()
        return await get_or_load(key, load)

    cache.get_or_load = counted
    return everyone


async def test_a_thousand_concurrent_first_requests_query_the_tokens_table_once(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    _, token, token_id = await seed.user_with_token("full_user")
    client = await make_gateway(gateway_config(upstream.url))
    cache = client.app[CACHE]
    authenticator = client.app[AUTHENTICATOR]
    lookups = HeldPool(authenticator.pool)
    authenticator.pool = lookups
    everyone = arrivals(cache, CONCURRENT_FIRST_REQUESTS)
    url = client.make_url("/api/jobs/1")

    # The TestClient's own session pools at most 100 connections: use one without a limit,
    # so that all 1,000 requests are in the gateway at the same time.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def first_use() -> int:
            async with http.get(url, headers=bearer(token)) as response:
                await response.read()
                return response.status

        requests = asyncio.gather(*(first_use() for _ in range(CONCURRENT_FIRST_REQUESTS)))
        # The one lookup is held until all 1,000 requests are in the cache's hands.
        await asyncio.wait_for(everyone.wait(), 60)
        lookups.release.set()
        statuses = await requests

    assert statuses == [200] * CONCURRENT_FIRST_REQUESTS
    assert lookups.queries == 1
    assert cache.stats.loads == 1
    assert cache.stats.coalesced == CONCURRENT_FIRST_REQUESTS - 1
    assert len(upstream.received) == CONCURRENT_FIRST_REQUESTS
    assert {r.header("X-Auth-Token-Id") for r in upstream.received} == {token_id}


# ---------------------------------------------------------------------------------------------
# The negative cache


async def test_a_flood_of_random_well_formed_tokens_leaves_a_valid_entry_in_place(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    _, token, token_id = await seed.user_with_token("full_user")
    cfg = gateway_config(
        upstream.url,
        cache={"ttl": "1h", "max_entries": 10, "negative_max_entries": 1000},
    )
    client = await make_gateway(cfg)
    cache = client.app[CACHE]
    authenticator = client.app[AUTHENTICATOR]
    assert (await client.get("/api/jobs/1", headers=bearer(token))).status == 200
    key = digest_of(client, token)

    token_format = TokenFormat(cfg.tokens.prefix)
    flood = [token_format.generate().plaintext for _ in range(FLOOD_SIZE)]

    async def refused(candidate: str) -> bool:
        try:
            await authenticator.authenticate("Bearer " + candidate)
        except UnknownToken:
            return True
        return False

    started = time.monotonic()
    for start in range(0, FLOOD_SIZE, FLOOD_BATCH):
        batch = flood[start : start + FLOOD_BATCH]
        assert all(await asyncio.gather(*(refused(t) for t in batch)))
    elapsed = time.monotonic() - started

    identity = cache.get(key)
    assert isinstance(identity, Identity)
    assert identity.token_id == token_id
    # Every flood token was unknown to the database (nothing coalesced, nothing cached as valid).
    assert cache.stats.loads == 1 + FLOOD_SIZE
    assert len(cache) == 1
    # The negative table holds at most its bound: the newest failures, not the oldest.
    assert len(cache._negative) <= 1000
    assert cache.get(digest_of(client, flood[0])) is None
    assert cache.get(digest_of(client, flood[-1])) is UnknownToken

    queries = count_queries(client)
    response = await client.get("/api/jobs/2", headers=bearer(token))
    assert response.status == 200
    assert queries.queries == 0
    assert upstream.last.header("X-Auth-Token-Id") == token_id
    print(f"flood of {FLOOD_SIZE} unknown tokens authenticated in {elapsed:.1f}s")


# ---------------------------------------------------------------------------------------------
# Invalidation through NOTIFY, and the listener's reconnection


async def notify(db: asyncpg.Connection, payload: str) -> None:
    await db.execute("SELECT pg_notify($1, $2)", store.INVALIDATION_CHANNEL, payload)


async def test_notify_from_another_connection_drops_the_token_and_bad_notices_are_ignored(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder, db: Any
) -> None:
    _, dropped, dropped_id = await seed.user_with_token()
    _, kept, _ = await seed.user_with_token()
    client = await make_gateway(gateway_config(upstream.url, cache={"ttl": "1h"}))
    cache = client.app[CACHE]
    listener = client.app[LISTENER]
    await asyncio.wait_for(listener.connected.wait(), 10)
    for token in (dropped, kept):
        assert (await client.get("/api/jobs/1", headers=bearer(token))).status == 200

    listener.notified.clear()
    await notify(db, f'{{"tokens": ["{dropped_id}"]}}')
    await asyncio.wait_for(listener.notified.wait(), 10)
    assert cache.get(digest_of(client, dropped)) is None
    assert isinstance(cache.get(digest_of(client, kept)), Identity)

    # Malformed notices, then a well-formed one: notices arrive in order, so once the last
    # is handled the others were too, and ignored.
    received = listener.received
    listener.notified.clear()
    for payload in ("not json", "[]", "null", '{"token": ["x"]}', ""):
        await notify(db, payload)
    await notify(db, '{"tokens": []}')
    await asyncio.wait_for(listener.notified.wait(), 10)
    assert listener.received == received + 1
    assert listener.connected.is_set()
    assert isinstance(cache.get(digest_of(client, kept)), Identity)

    queries = count_queries(client)
    assert (await client.get("/api/jobs/2", headers=bearer(kept))).status == 200
    assert (await client.get("/api/jobs/3", headers=bearer(dropped))).status == 200
    assert queries.queries == 1  # only the dropped token was looked up again


async def test_notice_with_a_non_list_tokens_field_is_ignored(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder, db: Any
) -> None:
    """``{"tokens": 5}`` is valid JSON of the wrong shape: it must be ignored like the rest,
    not raise out of the notice callback into the event loop's exception handler."""
    _, token, _ = await seed.user_with_token()
    client = await make_gateway(gateway_config(upstream.url, cache={"ttl": "1h"}))
    listener = client.app[LISTENER]
    await asyncio.wait_for(listener.connected.wait(), 10)
    assert (await client.get("/api/jobs/1", headers=bearer(token))).status == 200
    loop = asyncio.get_running_loop()
    raised: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: raised.append(context))
    try:
        listener.notified.clear()
        await notify(db, '{"tokens": 5}')
        await notify(db, '{"tokens": []}')
        await asyncio.wait_for(listener.notified.wait(), 10)
    finally:
        loop.set_exception_handler(None)
    assert raised == []
    assert isinstance(client.app[CACHE].get(digest_of(client, token)), Identity)


async def test_a_lost_listener_connection_reconnects_and_clears_the_cache(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder, db: Any
) -> None:
    _, token, token_id = await seed.user_with_token()
    client = await make_gateway(gateway_config(upstream.url, cache={"ttl": "1h"}))
    cache = client.app[CACHE]
    listener = client.app[LISTENER]
    await asyncio.wait_for(listener.connected.wait(), 10)
    assert (await client.get("/api/jobs/1", headers=bearer(token))).status == 200
    assert len(cache) == 1

    cleared = asyncio.Event()
    clear = listener.clear

    def clear_and_tell() -> None:
        clear()
        cleared.set()

    listener.clear = clear_and_tell
    backends = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid()"
    )
    assert len(backends) == 1, backends
    assert await db.fetchval("SELECT pg_terminate_backend($1)", backends[0]["pid"])

    await asyncio.wait_for(cleared.wait(), 10)
    await asyncio.wait_for(listener.connected.wait(), 10)
    assert listener.reconnects == 1
    assert len(cache) == 0  # notices may have been missed: nothing cached is trusted

    queries = count_queries(client)
    assert (await client.get("/api/jobs/2", headers=bearer(token))).status == 200
    assert queries.queries == 1
    # The new connection listens: a revocation elsewhere still reaches this cache.
    listener.notified.clear()
    await seed.service.revoke(OPERATOR, token_id)
    await asyncio.wait_for(listener.notified.wait(), 10)
    assert (await client.get("/api/jobs/3", headers=bearer(token))).status == 401


# ---------------------------------------------------------------------------------------------
# stale_if_error


class UnreachablePool:
    """A pool whose database is gone: every lookup fails as a refused connection does."""

    def __init__(self) -> None:
        self.queries = 0

    async def fetchrow(self, *args: Any, **kwargs: Any) -> Any:
        self.queries += 1
        raise ConnectionRefusedError(111, "Connection refused")


async def test_stale_if_error_serves_a_cached_identity_past_its_ttl_only_while_the_db_is_down(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    _, cached, cached_id = await seed.user_with_token()
    _, uncached, _ = await seed.user_with_token()
    client = await make_gateway(
        gateway_config(upstream.url, cache={"ttl": "30s", "stale_if_error": "1m"})
    )
    cache = client.app[CACHE]
    now = [1000.0]
    cache.clock = lambda: now[0]
    assert (await client.get("/api/jobs/1", headers=bearer(cached))).status == 200

    down = UnreachablePool()
    client.app[AUTHENTICATOR].pool = down

    now[0] += 10.0  # inside the ttl: a plain hit, the database is not asked
    assert (await client.get("/api/jobs/2", headers=bearer(cached))).status == 200
    assert down.queries == 0

    for moment in (1031.0, 1089.0):  # past the ttl, inside ttl + stale_if_error
        now[0] = moment
        response = await client.get("/api/jobs/3", headers=bearer(cached))
        assert response.status == 200
    assert down.queries == 2  # it did try the database first
    assert cache.stats.stale_hits == 2
    assert upstream.last.header("X-Auth-Token-Id") == cached_id

    now[0] = 1091.0  # past ttl + stale_if_error: the cached identity is not served
    for token in (cached, uncached):
        response = await client.get("/api/jobs/4", headers=bearer(token))
        assert response.status == 503
        assert int(response.headers["Retry-After"]) > 0
        assert (await problem(response))["type"] == "urn:patgate:error:database_unavailable"
    assert [r.raw_path for r in upstream.received] == [
        "/api/jobs/1",
        "/api/jobs/2",
        "/api/jobs/3",
        "/api/jobs/3",
    ]


async def test_a_revocation_notice_during_the_lookup_keeps_the_result_out_of_the_cache(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    """The lookup read the row before the revocation committed; its notice arrived before
    the lookup finished. The next request must ask PostgreSQL again."""
    _, token, token_id = await seed.user_with_token("full_user")
    client = await make_gateway(gateway_config(upstream.url))
    cache = client.app[CACHE]
    authenticator = client.app[AUTHENTICATOR]
    lookups = HeldPool(authenticator.pool)
    authenticator.pool = lookups

    first = asyncio.ensure_future(client.get("/api/jobs/1", headers=bearer(token)))
    async with asyncio.timeout(10):
        await lookups.entered.wait()  # the query is under way
    cache.drop_token(token_id)  # what the listener does with the notice
    lookups.release.set()
    assert (await first).status == 200  # valid when it was read
    assert (await client.get("/api/jobs/1", headers=bearer(token))).status == 200
    assert lookups.queries == 2


async def test_the_listener_outlives_errors_other_than_an_outage(database_url: str) -> None:
    """A missing database (or a refused password, too many connections) is a PostgresError
    outside the outage family: logged and retried, never the end of the listener."""
    attempts = 0
    retried = asyncio.Event()

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            nonlocal attempts
            if "cannot connect" in record.getMessage():
                attempts += 1
                if attempts == 2:
                    retried.set()

    scheme, _, rest = database_url.partition("://")
    base, _, query = rest.partition("?")
    missing = f"{scheme}://{base.rsplit('/', 1)[0]}/patgate_no_such_db" + (
        f"?{query}" if query else ""
    )
    listener = InvalidationListener(missing, drop_token=lambda _: None, clear=lambda: None)
    handler = Count()
    logging.getLogger("patgate").addHandler(handler)
    task = asyncio.create_task(listener.run())
    try:
        async with asyncio.timeout(10):
            await retried.wait()
        assert not task.done()
    finally:
        logging.getLogger("patgate").removeHandler(handler)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
