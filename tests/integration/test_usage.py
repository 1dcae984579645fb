"""last_used_at / last_used_ip written behind (SPEC §10): one batched UPDATE per flush however
many requests came in, a final flush at shutdown, entries kept (bounded) while PostgreSQL is
unreachable, and a last_used_at that never moves backwards."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway.app import POOL, USAGE
from gateway.config import Config
from gateway.lifecycle import OPERATOR
from gateway.usage import UsageBuffer
from tests.conftest import GatewayFactory, RecordingUpstream, Seeder, bearer, gateway_config

REQUESTS = 10_000
BATCH = 200
COUNT_UPDATES = """
CREATE TABLE test_token_updates (at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION test_count_token_updates() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_token_updates DEFAULT VALUES;
    RETURN NULL;
END $$;
CREATE TRIGGER test_count_token_updates AFTER UPDATE ON tokens
    FOR EACH STATEMENT EXECUTE FUNCTION test_count_token_updates();
"""
UNCOUNT_UPDATES = """
DROP TRIGGER test_count_token_updates ON tokens;
DROP FUNCTION test_count_token_updates();
DROP TABLE test_token_updates;
"""


class CountingPool:
    """Delegates to the real pool and counts the UPDATE statements sent through it."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.updates = 0

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
        if query.lstrip().upper().startswith("UPDATE"):
            self.updates += 1
        return await self.pool.execute(query, *args, **kwargs)


class UnreachablePool:
    """PostgreSQL is down: every statement fails as a refused connection does."""

    def __init__(self) -> None:
        self.calls = 0

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise ConnectionRefusedError(111, "Connection refused")


class ComesBackPool:
    """Refused once, then PostgreSQL is back: ``written`` is set by the first real write."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.failures = 0
        self.written = asyncio.Event()

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
        if self.failures == 0:
            self.failures += 1
            raise ConnectionRefusedError(111, "Connection refused")
        result = await self.pool.execute(query, *args, **kwargs)
        self.written.set()
        return result


def config(upstream_url: str) -> Config:
    """Public and protected routes; the periodic flush never fires inside a test."""
    return gateway_config(upstream_url, usage={"flush_interval": "1h"})


@pytest.fixture
async def seed(db: asyncpg.Connection, upstream: RecordingUpstream) -> Seeder:
    return Seeder(gateway_config(upstream.url), db)


@pytest.fixture
async def gateway(
    make_gateway: GatewayFactory, upstream: RecordingUpstream
) -> TestClient[Any, Any]:
    return await make_gateway(config(upstream.url))


@pytest.fixture
async def update_statements(db: asyncpg.Connection) -> AsyncIterator[Any]:
    """count() → UPDATE statements on tokens since the fixture started, from any
    connection (a statement-level trigger, so per-request writes could not hide)."""
    await db.execute(COUNT_UPDATES)

    async def count() -> int:
        return int(await db.fetchval("SELECT count(*) FROM test_token_updates"))

    yield count
    await db.execute(UNCOUNT_UPDATES)


async def last_used(db: asyncpg.Connection, token_id: str) -> tuple[datetime | None, str | None]:
    row = await db.fetchrow(
        "SELECT last_used_at, host(last_used_ip) AS ip FROM tokens WHERE id = $1::uuid", token_id
    )
    assert row is not None
    return row["last_used_at"], row["ip"]


async def use(client: TestClient[Any, Any], token: str, path: str = "/api/jobs/1") -> None:
    response = await client.get(path, headers=bearer(token))
    await response.read()
    assert response.status == 200


async def test_ten_thousand_requests_cost_one_update_per_flush(
    gateway: TestClient[Any, Any], seed: Seeder, db: asyncpg.Connection, update_statements: Any
) -> None:
    _, token, token_id = await seed.user_with_token("full_user")
    buffer = gateway.app[USAGE]
    counting = CountingPool(gateway.app[POOL])
    last_batch_started = datetime.now(UTC)

    async def batch(index: int) -> None:
        nonlocal last_batch_started
        last_batch_started = datetime.now(UTC)
        requests = [use(gateway, token, f"/api/jobs/{index}-{i}") for i in range(BATCH - 2)]
        requests += [use(gateway, token, "/public/x"), use(gateway, token, "/healthz")]
        await asyncio.gather(*requests)

    batches = REQUESTS // BATCH
    for index in range(batches // 2):
        await batch(index)
    assert len(buffer) == 1  # one entry per token, however many requests
    assert await update_statements() == 0  # nothing written on the request path

    assert await buffer.flush(counting) == 1
    for index in range(batches // 2, batches):
        await batch(index)
    assert await buffer.flush(counting) == 1
    flushed = datetime.now(UTC)

    assert counting.updates == 2
    assert await update_statements() == 2
    assert len(buffer) == 0
    at, ip = await last_used(db, token_id)
    assert at is not None
    assert last_batch_started <= at <= flushed
    assert ip == "127.0.0.1"


async def test_one_statement_writes_every_token_used(
    gateway: TestClient[Any, Any], seed: Seeder, db: asyncpg.Connection, update_statements: Any
) -> None:
    tokens = [await seed.user_with_token("field_user") for _ in range(5)]
    started = datetime.now(UTC)
    await asyncio.gather(*(use(gateway, token) for _, token, _ in tokens for _ in range(20)))
    counting = CountingPool(gateway.app[POOL])

    assert await gateway.app[USAGE].flush(counting) == 5

    assert counting.updates == 1
    assert await update_statements() == 1
    for _, _, token_id in tokens:
        at, ip = await last_used(db, token_id)
        assert at is not None
        assert started <= at <= datetime.now(UTC)
        assert ip == "127.0.0.1"


async def test_nothing_pending_writes_nothing(
    gateway: TestClient[Any, Any], update_statements: Any
) -> None:
    counting = CountingPool(gateway.app[POOL])
    assert await gateway.app[USAGE].flush(counting) == 0
    assert counting.updates == 0
    assert await update_statements() == 0


async def test_only_authenticated_uses_are_recorded(
    gateway: TestClient[Any, Any], seed: Seeder, db: asyncpg.Connection
) -> None:
    _, token, token_id = await seed.user_with_token("field_user")
    _, revoked, revoked_id = await seed.user_with_token()
    await seed.service.revoke(OPERATOR, revoked_id)
    forbidden = await gateway.post("/api/jobs", headers=bearer(token))  # authenticated, 403
    assert forbidden.status == 403
    assert (await gateway.get("/api/jobs/1", headers=bearer(revoked))).status == 401
    assert (await gateway.get("/public/x", headers=bearer(revoked))).status == 200
    assert len(gateway.app[USAGE]) == 1

    await gateway.app[USAGE].flush(gateway.app[POOL])

    assert (await last_used(db, token_id))[1] == "127.0.0.1"  # used, even if refused a route
    assert await last_used(db, revoked_id) == (None, None)


async def test_the_flush_happens_at_shutdown(
    make_gateway: GatewayFactory,
    upstream: RecordingUpstream,
    seed: Seeder,
    db: asyncpg.Connection,
) -> None:
    _, token, token_id = await seed.user_with_token()
    client = await make_gateway(config(upstream.url))
    started = datetime.now(UTC)
    await use(client, token)
    assert await last_used(db, token_id) == (None, None)  # still only in memory

    await client.close()

    at, ip = await last_used(db, token_id)
    assert at is not None
    assert started <= at <= datetime.now(UTC)
    assert ip == "127.0.0.1"


async def test_the_client_ip_behind_a_trusted_proxy_is_recorded(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder, db: asyncpg.Connection
) -> None:
    _, token, token_id = await seed.user_with_token()
    cfg = gateway_config(
        upstream.url, usage={"flush_interval": "1h"}, trusted_proxies=["127.0.0.1/32"]
    )
    client = await make_gateway(cfg)
    headers = {**bearer(token), "X-Forwarded-For": "198.51.100.4, 203.0.113.9"}
    assert (await client.get("/api/jobs/1", headers=headers)).status == 200

    await client.app[USAGE].flush(client.app[POOL])

    assert (await last_used(db, token_id))[1] == "203.0.113.9"


async def test_unreachable_postgres_keeps_entries_for_the_next_flush(
    gateway: TestClient[Any, Any], seed: Seeder, db: asyncpg.Connection
) -> None:
    _, first, first_id = await seed.user_with_token()
    _, second, second_id = await seed.user_with_token()
    buffer = gateway.app[USAGE]
    await use(gateway, first)
    down = UnreachablePool()

    with contextlib.suppress(ConnectionRefusedError):
        await buffer.flush(down)

    assert down.calls == 1
    assert len(buffer) == 1
    assert buffer.dropped == 0
    assert await last_used(db, first_id) == (None, None)

    await use(gateway, second)  # arrives while PostgreSQL is away
    with contextlib.suppress(ConnectionRefusedError):
        await buffer.flush(down)
    assert len(buffer) == 2

    assert await buffer.flush(gateway.app[POOL]) == 2
    for token_id in (first_id, second_id):
        at, ip = await last_used(db, token_id)
        assert at is not None
        assert ip == "127.0.0.1"
    assert len(buffer) == 0


async def test_the_periodic_flusher_survives_an_outage(
    seed: Seeder, db: asyncpg.Connection, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, token_id = await seed.user_with_token()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    assert pool is not None
    buffer = UsageBuffer()
    buffer.record(token_id, "192.0.2.1")
    flaky = ComesBackPool(pool)
    task = asyncio.create_task(buffer.run(flaky, 0.001))
    try:
        with caplog.at_level(logging.WARNING, logger="patgate.usage"):
            await asyncio.wait_for(flaky.written.wait(), timeout=10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pool.close()

    assert flaky.failures == 1
    assert "usage flush failed, 1 entries kept" in caplog.text
    assert (await last_used(db, token_id))[1] == "192.0.2.1"


async def test_the_buffer_is_bounded_and_drops_the_oldest(
    seed: Seeder, db: asyncpg.Connection, database_url: str
) -> None:
    ids = [(await seed.user_with_token())[2] for _ in range(5)]
    buffer = UsageBuffer(max_entries=3)
    for token_id in ids[:4]:
        buffer.record(token_id, "192.0.2.10")
    assert len(buffer) == 3
    assert buffer.dropped == 1  # ids[0], the oldest

    down = UnreachablePool()
    with contextlib.suppress(ConnectionRefusedError):
        await buffer.flush(down)
    buffer.record(ids[4], "192.0.2.11")  # newer than everything kept
    with contextlib.suppress(ConnectionRefusedError):
        await buffer.flush(down)
    assert len(buffer) == 3
    assert buffer.dropped == 2  # ids[1]

    conn = await asyncpg.connect(database_url)
    try:
        assert await buffer.flush(conn) == 3
    finally:
        await conn.close()
    written = {
        str(r["id"])
        for r in await db.fetch(
            "SELECT id FROM tokens WHERE id = ANY($1::uuid[]) AND last_used_at IS NOT NULL",
            [UUID(i) for i in ids],
        )
    }
    assert written == {ids[2], ids[3], ids[4]}


async def test_last_used_at_never_moves_backwards(
    gateway: TestClient[Any, Any], seed: Seeder, db: asyncpg.Connection
) -> None:
    _, token, token_id = await seed.user_with_token()
    other_replica = UsageBuffer()
    other_replica.record(token_id, "192.0.2.99")  # an older use, seen by another replica
    await use(gateway, token)

    await gateway.app[USAGE].flush(gateway.app[POOL])
    newer, _ = await last_used(db, token_id)
    await other_replica.flush(gateway.app[POOL])

    assert await last_used(db, token_id) == (newer, "127.0.0.1")

    future = datetime.now(UTC) + timedelta(hours=1)
    await db.execute("UPDATE tokens SET last_used_at = $2 WHERE id = $1::uuid", token_id, future)
    await use(gateway, token)
    await gateway.app[USAGE].flush(gateway.app[POOL])
    assert (await last_used(db, token_id))[0] == future


class HangingPool:
    """A pool whose execute never returns: the flush is in the middle of its write."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def execute(self, *args: Any) -> None:
        self.entered.set()
        await asyncio.Event().wait()


async def test_a_flush_cancelled_mid_write_keeps_its_batch_for_the_final_flush(
    gateway: TestClient[Any, Any], seed: Seeder, db: asyncpg.Connection
) -> None:
    """At shutdown the periodic flusher is cancelled; what it was writing must not be lost."""
    _, token, token_id = await seed.user_with_token()
    buffer = gateway.app[USAGE]
    await use(gateway, token)
    hanging = HangingPool()
    flush = asyncio.create_task(buffer.flush(hanging))
    async with asyncio.timeout(5):
        await hanging.entered.wait()
    flush.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flush
    assert len(buffer) == 1
    assert await buffer.flush(gateway.app[POOL]) == 1
    assert (await last_used(db, token_id))[0] is not None
