"""A real PostgreSQL outage under a real `patgate serve` (SPEC §10, §11; issue 4).

This module runs its own embedded PostgreSQL (outside pytest's temp root, which concurrent
pytest runs chmod 0700) so that stopping it leaves the session's shared server alone. While
traffic flows, the server is stopped: the cached token keeps working, an uncached one gets
503 + Retry-After, the management API 503, /readyz "degraded"; nothing is 401 or 500 and
nothing hangs. Then it is started again, and within 5 s a never-used token validates and the
usage buffered during the outage is written.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jwt
import orjson
import pytest

from gateway import embedded, store
from gateway.embedded import EmbeddedPostgres
from tests.conftest import RecordingUpstream, Seeder, bearer, gateway_config
from tests.e2e.support import (
    ROLES,
    ServeProcess,
    clean_env,
    start_postgres,
    stop_postgres,
    write_config,
)

SECRET = "outage-test-session-secret-0123456789abc"  # 40 characters: HS256 wants >= 32 bytes
REQUEST_TIMEOUT = 10.0
MAX_LATENCY = 7.0
RECOVERY_BUDGET = 5.0
OUTAGE_REQUESTS = 30  # requests with the uncached token while the database is down


@pytest.fixture(scope="module")
def postgres() -> Iterator[EmbeddedPostgres]:
    """This module's own PostgreSQL, migrated; stopped and deleted afterwards."""
    root = Path(tempfile.mkdtemp(prefix="patgate-outage-"))
    server = embedded.start(root, delete_on_stop=True)
    try:

        async def migrate() -> None:
            async with store.connect(server.url) as conn:
                await store.migrate(conn)

        asyncio.run(migrate())
        yield server
    finally:
        server.stop()  # a server left stopped by a failed test is just deleted
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Seeded:
    user_id: str
    warm: str  # used before the outage: in the gateway's cache
    warm_id: str
    cold: str  # never used before the outage
    session: str  # a session JWT of the same (admin) user, for the management API


@pytest.fixture
async def seeded(postgres: EmbeddedPostgres, upstream: RecordingUpstream) -> Seeded:
    conn = await asyncpg.connect(postgres.url)
    try:
        seed = Seeder(gateway_config(upstream.url), conn)
        user_id, warm, warm_id = await seed.user_with_token("admin")
        cold, _ = await seed.token(user_id)
    finally:
        await conn.close()
    claims = {"sub": user_id, "exp": int(time.time()) + 3600, "amr": ["mfa"]}
    return Seeded(user_id, warm, warm_id, cold, jwt.encode(claims, SECRET, algorithm="HS256"))


@pytest.fixture
def gateway(
    tmp_path: Path, postgres: EmbeddedPostgres, upstream: RecordingUpstream
) -> Iterator[ServeProcess]:
    config = write_config(
        tmp_path / "gateway.yaml",
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "admin_listen": {"host": "127.0.0.1", "port": 0},
            "database": {"url": postgres.url},
            "cache": {"ttl": "1h"},
            "usage": {"flush_interval": "200ms"},
            "management": {"sessions": {"hs256_secret": SECRET}},
            "roles": ROLES,
            "routes": [
                {
                    "name": "jobs",
                    "match": {"prefix": "/api/jobs"},
                    "upstream": upstream.url,
                    "require": ["jobs:read"],
                }
            ],
        },
    )
    process = ServeProcess(["serve", "--config", str(config)], clean_env(), tmp_path)
    try:
        yield process.wait_listening()
    finally:
        process.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


@dataclass(frozen=True)
class Outcome:
    kind: str  # "warm" or "cold"
    sent: float  # time.time() when sent
    seconds: float
    status: int  # 0: no answer within the client timeout (or a broken connection)
    retry_after: str | None


async def call(http: aiohttp.ClientSession, kind: str, url: str, token: str) -> Outcome:
    sent, started = time.time(), time.monotonic()
    try:
        async with http.get(url, headers=bearer(token)) as response:
            await response.read()
            status, retry_after = response.status, response.headers.get("Retry-After")
    except (TimeoutError, aiohttp.ClientError):
        status, retry_after = 0, None
    return Outcome(kind, sent, time.monotonic() - started, status, retry_after)


@dataclass(frozen=True)
class Answer:
    status: int
    retry_after: str | None
    body: Any
    seconds: float


async def fetch(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Answer:
    started = time.monotonic()
    async with http.get(url, headers=headers) as response:
        body = await response.json(content_type=None)
        retry_after = response.headers.get("Retry-After")
        return Answer(response.status, retry_after, body, time.monotonic() - started)


class Traffic:
    """Requests with one token, back to back, until stopped; ``enough`` is set after
    ``wanted`` outcomes."""

    def __init__(self, http: aiohttp.ClientSession, url: str, kind: str, token: str) -> None:
        self.http, self.url, self.kind, self.token = http, url, kind, token
        self.outcomes: list[Outcome] = []
        self.enough = asyncio.Event()
        self.wanted = OUTAGE_REQUESTS
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.outcomes.append(await call(self.http, self.kind, self.url, self.token))
            if len(self.outcomes) >= self.wanted:
                self.enough.set()
            await asyncio.sleep(0.005)  # a steady stream, not a busy loop

    async def stop(self) -> list[Outcome]:
        self._stop.set()
        await self._task
        return self.outcomes


FLUSH_FAILED = re.compile(r"usage flush failed, (\d+) entries kept")


def flush_failed(line: str) -> bool:
    return FLUSH_FAILED.search(line) is not None


def kept_entries(line: str) -> int:
    """How many uses the failed flush kept for later, from its JSON log line."""
    record = orjson.loads(line)
    assert record["logger"] == "patgate.usage"
    found = FLUSH_FAILED.search(record["message"])
    assert found is not None
    return int(found.group(1))


async def last_used_at(url: str, token_id: str) -> datetime | None:
    conn = await asyncpg.connect(url)
    try:
        value: datetime | None = await conn.fetchval(
            "SELECT last_used_at FROM tokens WHERE id = $1::uuid", token_id
        )
        return value
    finally:
        await conn.close()


async def test_a_real_outage_keeps_cached_tokens_working_and_recovers_by_itself(
    postgres: EmbeddedPostgres,
    seeded: Seeded,
    gateway: ServeProcess,
    http: aiohttp.ClientSession,
) -> None:
    jobs = f"{gateway.url}/api/jobs/1"
    tokens_api = f"{gateway.url}/_patgate/api/v1/tokens"
    readyz = f"{gateway.admin_url}/readyz"
    assert (await call(http, "warm", jobs, seeded.warm)).status == 200
    async with http.get(tokens_api, headers=bearer(seeded.session)) as response:
        assert response.status == 200  # the session is good: a 503 later is the database's
    async with http.get(readyz) as response:
        assert (await response.json())["status"] == "ready"

    # The outage, under traffic.
    warm = Traffic(http, jobs, "warm", seeded.warm)
    outage_began = time.time()
    await asyncio.to_thread(stop_postgres, postgres)
    down_at = time.time()
    cold = Traffic(http, jobs, "cold", seeded.cold)
    await asyncio.wait_for(cold.enough.wait(), 60)

    management = await fetch(http, tokens_api, bearer(seeded.session))
    ready = await fetch(http, readyz, {})
    outcomes = [*(await warm.stop()), *(await cold.stop())]
    # With no more traffic, the write-behind flusher fails once more: what it holds now is
    # the warm token's use during the outage, and it must keep it (its log line says so).
    failed_so_far = sum(map(flush_failed, gateway.stderr.text.splitlines()))
    failure = await asyncio.to_thread(
        gateway.stderr.wait_for, flush_failed, 10, count=failed_so_far + 1
    )

    log = gateway.stderr.text
    assert all(o.status in (200, 503) for o in outcomes), (outcomes, log)  # never 401/500
    slowest = max(o.seconds for o in outcomes)
    assert slowest < MAX_LATENCY
    assert kept_entries(failure) == 1, failure
    warm_during = [o for o in outcomes if o.kind == "warm" and o.sent > down_at]
    assert len(warm_during) >= 5
    assert {o.status for o in outcomes if o.kind == "warm"} == {200}, log
    assert len(cold.outcomes) >= OUTAGE_REQUESTS
    assert {(o.status, o.retry_after is not None) for o in cold.outcomes} == {(503, True)}
    assert (management.status, management.retry_after) == (503, "2"), management
    assert management.body["type"] == "urn:patgate:error:database_unavailable"
    assert ready.status == 200, ready
    assert ready.body["status"] == "degraded", ready
    assert ready.body["cached_identities"] >= 1
    assert max(management.seconds, ready.seconds) < MAX_LATENCY

    # PostgreSQL comes back: the gateway needs no help.
    restart_began = time.monotonic()
    await asyncio.to_thread(start_postgres, postgres)
    accepting = time.monotonic()
    while True:
        answer = await call(http, "cold", jobs, seeded.cold)
        assert answer.status in (200, 503), (answer, gateway.stderr.text)
        if answer.status == 200 or time.monotonic() - restart_began > 2 * RECOVERY_BUDGET:
            break
        await asyncio.sleep(0.02)
    validated = time.monotonic()
    written = None
    while time.monotonic() - restart_began <= 2 * RECOVERY_BUDGET:
        used = await last_used_at(postgres.url, seeded.warm_id)
        if used is not None and used.timestamp() > down_at:
            written = time.monotonic()
            break
        await asyncio.sleep(0.02)

    print(
        f"\ndatabase outage: {len(outcomes)} requests under traffic ({len(warm_during)} cached "
        f"and {len(cold.outcomes)} uncached while down), slowest {1000 * slowest:.0f}ms; "
        f"server accepting {accepting - restart_began:.2f}s after restart; "
        f"new token validated after {validated - restart_began:.2f}s; "
        f"outage usage written after "
        f"{(written - restart_began) if written else float('nan'):.2f}s"
    )
    assert answer.status == 200
    assert validated - restart_began < RECOVERY_BUDGET
    assert written is not None, "the usage buffered during the outage was never written"
    assert written - restart_began < RECOVERY_BUDGET
    used = await last_used_at(postgres.url, seeded.warm_id)
    assert used is not None
    assert outage_began < down_at < used.timestamp() <= warm_during[-1].sent + 1.0
    async with http.get(readyz) as response:
        assert (await response.json())["status"] == "ready"
