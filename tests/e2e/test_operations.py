"""Operations, as an on-call engineer meets them: drain on SIGTERM, reload on SIGHUP or
`patgate reload`, and metrics that count exactly what happened."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import RecordingUpstream
from tests.e2e.support import ROLES, ServeProcess, clean_env, run_cli, write_config

IN_FLIGHT = 200


def config(upstream: str, *routes: dict[str, Any]) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin_listen": {"host": "127.0.0.1", "port": 0},
        "database": {"url": "${PATGATE_DATABASE_URL}"},
        "roles": ROLES,
        "routes": list(routes)
        or [
            {"name": "public", "match": {"prefix": "/public"}, "upstream": upstream, "public": True}
        ],
    }


def route(name: str, prefix: str, upstream: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "match": {"prefix": prefix}, "upstream": upstream, **extra}


async def status(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Any:
    """The answer, read in full and released (an unreleased one leaks its connection)."""
    async with session.request(method.upper(), url, **kwargs) as response:
        await response.read()
        return response


def logged(message: str) -> Any:
    """A predicate for a JSON log line with this message."""

    def matches(line: str) -> bool:
        try:
            return bool(orjson.loads(line).get("message") == message)
        except orjson.JSONDecodeError:
            return False

    return matches


@pytest.fixture
def start(tmp_path: Path, database_url: str) -> Iterator[Any]:
    started: list[ServeProcess] = []

    def launch(cfg: dict[str, Any], *args: str) -> ServeProcess:
        path = write_config(tmp_path / "gateway.yaml", cfg)
        env = clean_env(PATGATE_DATABASE_URL=database_url)
        process = ServeProcess(
            ["serve", "--config", str(path), "--pid-file", str(tmp_path / "patgate.pid"), *args],
            env,
            tmp_path,
        )
        started.append(process)
        return process.wait_listening()

    yield launch
    for process in started:
        process.stop()


class SlowUpstream:
    """Holds every request until released; tells the test when ``n`` are waiting."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = 0
        self.all_waiting = asyncio.Event()
        self.expected = IN_FLIGHT

    async def handle(self, request: web.Request) -> web.Response:
        self.waiting += 1
        if self.waiting >= self.expected:
            self.all_waiting.set()
        await self.release.wait()
        return web.Response(text="done")


@pytest.fixture
async def slow() -> AsyncIterator[tuple[SlowUpstream, str]]:
    upstream = SlowUpstream()
    app = web.Application()
    app.router.add_get("/{tail:.*}", upstream.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield upstream, str(server.make_url("")).rstrip("/")
    upstream.release.set()
    await server.close()


async def test_sigterm_drains_200_in_flight_requests_and_exits_0(
    start: Any, slow: tuple[SlowUpstream, str]
) -> None:
    upstream, url = slow
    gateway = start(config(url))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            async with session.get(f"{gateway.url}/public/{i}") as response:
                assert await response.text() == "done"
                return response.status

        requests = [asyncio.create_task(one(i)) for i in range(IN_FLIGHT)]
        await asyncio.wait_for(upstream.all_waiting.wait(), 30)

        gateway.send(signal.SIGTERM)
        await asyncio.to_thread(gateway.stderr.wait_for, lambda s: s == "patgate: draining", 10)
        async with session.get(f"{gateway.admin_url}/readyz") as ready:
            assert ready.status == 503
            assert (await ready.json())["status"] == "draining"
        upstream.release.set()
        statuses = await asyncio.gather(*requests)

    assert statuses == [200] * IN_FLIGHT
    assert await asyncio.to_thread(gateway.wait) == 0


async def metric(session: aiohttp.ClientSession, admin: str, name: str, **labels: str) -> float:
    async with session.get(f"{admin}/metrics") as response:
        text = await response.text()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


async def test_sighup_with_a_new_route_table_under_load_fails_no_request(
    start: Any, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    base = config(upstream.url)
    gateway = start(base)
    async with aiohttp.ClientSession() as session:
        assert (await status(session, "get", f"{gateway.url}/reports/x")).status == 404
        failures: list[int] = []
        stop = asyncio.Event()

        async def load() -> int:
            sent = 0
            while not stop.is_set():
                async with session.get(f"{gateway.url}/public/load") as response:
                    await response.read()
                    if response.status != 200:
                        failures.append(response.status)
                sent += 1
            return sent

        loaders = [asyncio.create_task(load()) for _ in range(8)]
        new = config(
            upstream.url,
            route("public", "/public", upstream.url, public=True),
            route("reports", "/reports", upstream.url, public=True),
        )
        write_config(tmp_path / "gateway.yaml", new)
        gateway.send(signal.SIGHUP)
        await asyncio.to_thread(gateway.stderr.wait_for, logged("configuration reloaded"), 10)
        assert (await status(session, "get", f"{gateway.url}/reports/x")).status == 200
        stop.set()
        sent = sum(await asyncio.gather(*loaders))
        reloads = await metric(
            session, gateway.admin_url, "patgate_config_reloads_total", result="ok"
        )

    assert sent > 0
    assert failures == []
    assert reloads == 1


async def test_a_broken_file_changes_nothing_and_counts_a_failed_reload(
    start: Any, upstream: RecordingUpstream, tmp_path: Path, database_url: str
) -> None:
    gateway = start(config(upstream.url))
    (tmp_path / "gateway.yaml").write_text("routes:\n  - name: [broken\n")

    # `patgate reload` validates the file first and refuses to signal a broken one ...
    env = clean_env(PATGATE_DATABASE_URL=database_url)
    pid_file = str(tmp_path / "patgate.pid")
    refused = run_cli(
        ["reload", "--config", str(tmp_path / "gateway.yaml"), "--pid-file", pid_file],
        env,
        tmp_path,
    )
    assert refused.returncode == 2
    # ... and a raw SIGHUP with the broken file keeps the old configuration.
    gateway.send(signal.SIGHUP)
    await asyncio.to_thread(gateway.stderr.wait_for, logged("reload refused"), 10)

    async with aiohttp.ClientSession() as session:
        assert (await status(session, "get", f"{gateway.url}/public/x")).status == 200
        assert (
            await metric(
                session, gateway.admin_url, "patgate_config_reloads_total", result="failed"
            )
            == 1
        )


async def test_patgate_reload_signals_the_running_server(
    start: Any, upstream: RecordingUpstream, tmp_path: Path, database_url: str
) -> None:
    gateway = start(config(upstream.url))
    write_config(
        tmp_path / "gateway.yaml",
        config(upstream.url, route("moved", "/moved", upstream.url, public=True)),
    )
    env = clean_env(PATGATE_DATABASE_URL=database_url)
    result = run_cli(
        [
            "reload",
            "--config",
            str(tmp_path / "gateway.yaml"),
            "--pid-file",
            str(tmp_path / "patgate.pid"),
        ],
        env,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    await asyncio.to_thread(gateway.stderr.wait_for, logged("configuration reloaded"), 10)
    async with aiohttp.ClientSession() as session:
        assert (await status(session, "get", f"{gateway.url}/moved/1")).status == 200
        assert (await status(session, "get", f"{gateway.url}/public/1")).status == 404


async def test_metrics_count_exactly_the_traffic_sent(
    start: Any, upstream: RecordingUpstream
) -> None:
    gateway = start(
        config(
            upstream.url,
            route("public", "/public", upstream.url, public=True),
            route("jobs", "/api/jobs", upstream.url, require=["jobs:read"]),
        )
    )
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            assert (await status(session, "get", f"{gateway.url}/public/a")).status == 200
        for _ in range(2):
            assert (await status(session, "post", f"{gateway.url}/public/a")).status == 200
        for _ in range(4):
            assert (await status(session, "get", f"{gateway.url}/api/jobs/1")).status == 401
        bad = {"Authorization": "Bearer nope"}
        assert (
            await status(session, "get", f"{gateway.url}/api/jobs/1", headers=bad)
        ).status == 401
        assert (await status(session, "get", f"{gateway.url}/nowhere")).status == 404

        admin = gateway.admin_url
        requests = "patgate_requests_total"
        assert (
            await metric(session, admin, requests, route="public", method="read", status="200") == 3
        )
        assert (
            await metric(session, admin, requests, route="public", method="write", status="200")
            == 2
        )
        assert (
            await metric(session, admin, requests, route="jobs", method="read", status="401") == 5
        )
        assert await metric(session, admin, requests, route="-", method="read", status="404") == 1
        assert await metric(session, admin, "patgate_auth_total", outcome="missing") == 4
        assert await metric(session, admin, "patgate_auth_total", outcome="malformed") == 1
        assert await metric(session, admin, "patgate_gateway_seconds_count", route="public") == 5
        assert await metric(session, admin, "patgate_upstream_seconds_count", route="public") == 5
        async with session.get(f"{admin}/metrics") as response:
            text = await response.text()
    assert "patgate_cache_events_total" in text
    assert "patgate_db_pool_connections" in text
    assert "patgate_usage_buffer_entries" in text


async def test_access_log_is_one_json_line_per_request_without_a_token(
    start: Any, upstream: RecordingUpstream
) -> None:
    gateway = start(config(upstream.url))
    async with aiohttp.ClientSession() as session:
        response = await status(
            session,
            "get",
            f"{gateway.url}/public/page?secret=1",
            headers={"Authorization": "Bearer pat_should_never_be_logged", "X-Request-Id": "r-1"},
        )
        assert response.status == 200
    line = await asyncio.to_thread(
        gateway.stderr.wait_for, lambda s: '"request_id":"r-1"' in s and "patgate.access" in s, 10
    )
    entry = orjson.loads(line)
    assert entry["method"] == "GET"
    assert entry["path"] == "/public/page"
    assert entry["route"] == "public"
    assert entry["status"] == 200
    assert entry["client_ip"] == "127.0.0.1"
    assert entry["duration_ms"] >= entry["upstream_ms"] >= 0
    assert "pat_should_never_be_logged" not in gateway.stderr.text
    assert "secret=1" not in line
