"""`patgate serve` as an operator runs it: a subprocess with a YAML file, tokens made with the
CLI, requests over real sockets to a recording upstream running in this test's event loop."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.tokens import TokenFormat
from tests.conftest import Received, RecordingUpstream, bearer, gateway_config_data
from tests.e2e.support import (
    START_TIMEOUT,
    Cli,
    ServeProcess,
    clean_env,
    fresh_database,
    write_config,
)

REVOCATION_DEADLINE = 2.0  # SPEC §10: "well under a second"; slack for a loaded machine
CHALLENGE = 'Bearer realm="patgate"'
PROBLEM_JSON = "application/problem+json"

Launch = Callable[..., ServeProcess]


def is_listening(line: str) -> bool:
    return line.startswith("patgate: listening on ")


def serve_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """The tests' usual config as a file's data: OS-picked ports, the URL from the env."""
    file: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin_listen": {"host": "127.0.0.1", "port": 0},
        "database": {"url": "${PATGATE_DATABASE_URL}"},
    }
    return gateway_config_data(upstream_url, **(file | overrides))


@pytest.fixture
def config_file(tmp_path: Path, upstream: RecordingUpstream) -> Path:
    return write_config(tmp_path / "config" / "gateway.yaml", serve_config(upstream.url))


@pytest.fixture
def cli(tmp_path: Path, config_file: Path, database_url: str) -> Cli:
    """The CLI in the same directory, so it reads the same config/gateway.yaml."""
    return Cli(tmp_path, clean_env(PATGATE_DATABASE_URL=database_url))


@pytest.fixture
def launch(
    tmp_path: Path, config_file: Path, upstream: RecordingUpstream, database_url: str
) -> Iterator[Launch]:
    """Start `patgate serve --config F`, wait until it listens; always stopped afterwards."""
    started: list[ServeProcess] = []

    def start(*args: str, database: str = database_url, **overrides: Any) -> ServeProcess:
        if overrides:
            write_config(config_file, serve_config(upstream.url, **overrides))
        process = ServeProcess(
            ["serve", "--config", str(config_file), *args],
            clean_env(PATGATE_DATABASE_URL=database),
            tmp_path,
        )
        started.append(process)
        return process.wait_listening()

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def gateway(launch: Launch) -> ServeProcess:
    return launch()


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


async def new_token(cli: Cli, role: str, *args: str) -> tuple[str, str, dict[str, Any]]:
    """(company id, user id, the `token create --json` answer) for a new user."""
    company_id, user_id = f"c-{uuid.uuid4().hex[:8]}", f"u-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(cli.json, "company", "add", "Acme", "--id", company_id)
    await asyncio.to_thread(
        cli.json, "user", "add", user_id, "--company", company_id, "--role", role
    )
    created = await asyncio.to_thread(
        cli.json, "token", "create", "--user", user_id, "--name", "e2e", *args
    )
    return company_id, user_id, created


async def problem(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.headers["Content-Type"] == PROBLEM_JSON
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == response.status
    return body


def auth_headers(got: Received) -> dict[str, list[str]]:
    """Every header the upstream got that a backend could read as X-Auth-*, by its name."""
    found: dict[str, list[str]] = {}
    for name, value in got.headers:
        normalized = name.lower().replace("_", "-")
        if normalized.startswith("x-auth-"):
            found.setdefault(normalized, []).append(value)
    return found


# ---------------------------------------------------------------------------------------------


async def test_a_valid_pat_reaches_the_upstream_with_identity_headers(
    gateway: ServeProcess, cli: Cli, upstream: RecordingUpstream, http: aiohttp.ClientSession
) -> None:
    company_id, user_id, created = await new_token(cli, "full_user")

    async with http.get(f"{gateway.url}/api/jobs/7?x=1", headers=bearer(created["token"])) as r:
        status, headers = r.status, r.headers

    assert status == 200
    got = upstream.last
    assert got.raw_path == "/api/jobs/7?x=1"
    assert got.header("X-Auth-User-Id") == user_id
    assert got.header("X-Auth-Company-Id") == company_id
    assert got.header("X-Auth-Token-Id") == created["id"]
    assert got.header("X-Auth-Role") == "full_user"
    assert got.header("X-Auth-Permissions") == "invoices:read jobs:* tokens:create"
    assert got.header("Authorization") is None
    assert "X-Auth-Token-Expires-At" in headers
    output = gateway.stdout.text + gateway.stderr.text
    assert created["token"] not in output  # never logged


async def test_requests_without_a_valid_token_get_401(
    gateway: ServeProcess, cli: Cli, upstream: RecordingUpstream, http: aiohttp.ClientSession
) -> None:
    _, _, created = await new_token(cli, "admin")
    token = created["token"]
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    unknown = TokenFormat("pat_").generate().plaintext  # well-formed, never stored

    async with http.get(f"{gateway.url}/api/jobs/7") as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == CHALLENGE
        await problem(r)
    for bad in (tampered, unknown):
        async with http.get(f"{gateway.url}/api/jobs/7", headers=bearer(bad)) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == f'{CHALLENGE}, error="invalid_token"'
            body = await problem(r)
            assert bad not in str(body)

    assert upstream.received == []


async def test_a_revoked_token_is_refused_at_once(
    launch: Launch, cli: Cli, upstream: RecordingUpstream, http: aiohttp.ClientSession
) -> None:
    gateway = await asyncio.to_thread(launch, cache={"ttl": "0s"})
    _, _, created = await new_token(cli, "admin")
    url, headers = f"{gateway.url}/api/jobs/1", bearer(created["token"])
    async with http.get(url, headers=headers) as r:
        assert r.status == 200

    revoked = await asyncio.to_thread(cli.json, "token", "revoke", created["id"])
    async with http.get(url, headers=headers) as r:
        status = r.status

    assert revoked["state"] == "revoked"
    assert status == 401
    assert len(upstream.received) == 1


async def test_a_revocation_reaches_a_running_gateway_despite_its_cache(
    gateway: ServeProcess, cli: Cli, http: aiohttp.ClientSession
) -> None:
    """The default cache.ttl (30s) would keep serving it: LISTEN/NOTIFY must drop it."""
    _, _, created = await new_token(cli, "admin")
    url, headers = f"{gateway.url}/api/jobs/1", bearer(created["token"])
    for _ in range(2):  # the second answer comes from the cache
        async with http.get(url, headers=headers) as r:
            assert r.status == 200

    await asyncio.to_thread(cli.json, "token", "revoke", created["id"])
    loop = asyncio.get_running_loop()
    deadline, statuses = loop.time() + REVOCATION_DEADLINE, []
    while loop.time() < deadline:
        async with http.get(url, headers=headers) as r:
            statuses.append(r.status)
        if statuses[-1] != 200:
            break
        await asyncio.sleep(0.02)  # no event to await from outside the process: poll

    assert statuses[-1] == 401, f"still {statuses[-1]} after {REVOCATION_DEADLINE}s"


async def test_a_field_user_may_read_but_not_write(
    gateway: ServeProcess, cli: Cli, upstream: RecordingUpstream, http: aiohttp.ClientSession
) -> None:
    _, _, created = await new_token(cli, "field_user")
    headers = bearer(created["token"])

    async with http.get(f"{gateway.url}/api/jobs", headers=headers) as r:
        assert r.status == 200
    async with http.post(f"{gateway.url}/api/jobs", headers=headers, json={}) as r:
        assert r.status == 403
        assert r.headers["WWW-Authenticate"] == f'{CHALLENGE}, error="insufficient_scope"'
        await problem(r)

    assert [req.method for req in upstream.received] == ["GET"]


async def test_unknown_path_is_404_and_wrong_method_is_405(
    gateway: ServeProcess, upstream: RecordingUpstream, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gateway.url}/nowhere") as r:
        assert r.status == 404
        await problem(r)
    async with http.options(f"{gateway.url}/api/jobs/7") as r:
        assert r.status == 405
        allow = {m.strip() for m in r.headers["Allow"].split(",")}
        await problem(r)

    assert {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"} == allow
    assert upstream.received == []


async def test_clients_cannot_forge_identity_headers(
    gateway: ServeProcess, cli: Cli, upstream: RecordingUpstream, http: aiohttp.ClientSession
) -> None:
    company_id, user_id, created = await new_token(cli, "full_user")
    forged = {"X_Auth_User_Id": "evil", "x-auth-role": "owner", "X-Auth-Permissions": "*"}

    async with http.get(
        f"{gateway.url}/api/jobs/7", headers={**forged, **bearer(created["token"])}
    ) as r:
        assert r.status == 200
    protected = upstream.last
    async with http.get(f"{gateway.url}/public/page", headers=forged) as r:
        assert r.status == 200
    public = upstream.last

    assert auth_headers(protected) == {
        "x-auth-user-id": [user_id],
        "x-auth-company-id": [company_id],
        "x-auth-token-id": [created["id"]],
        "x-auth-role": ["full_user"],
        "x-auth-permissions": ["invoices:read jobs:* tokens:create"],
    }
    assert auth_headers(public) == {}


async def test_the_admin_listener_answers_health_and_readiness(
    gateway: ServeProcess, http: aiohttp.ClientSession
) -> None:
    assert gateway.admin_url != gateway.url
    for path in ("/healthz", "/readyz"):
        async with http.get(f"{gateway.admin_url}{path}") as r:
            assert r.status == 200, path
    async with http.get(f"{gateway.url}/readyz") as r:
        assert r.status == 404  # the admin endpoints are not on the main listener


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_stops_the_gateway_with_exit_code_0(
    gateway: ServeProcess, http: aiohttp.ClientSession, sig: signal.Signals
) -> None:
    # Once it has answered a request, its loop is past start-up and handles signals.
    async with http.get(f"{gateway.admin_url}/healthz") as r:
        assert r.status == 200

    code = await asyncio.to_thread(gateway.stop, sig)

    assert code == 0
    assert "Traceback" not in gateway.stderr.text
    assert not [line for line in gateway.stderr.lines if line.startswith("patgate: error")]
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(f"{gateway.url}/public/x"):
            pass


def test_a_broken_config_exits_2_before_serving(tmp_path: Path, database_url: str) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("listen: {port: eighty}\nroutes: [{name: x}]\n", encoding="utf-8")

    with ServeProcess(
        ["serve", "--config", str(config)], clean_env(PATGATE_DATABASE_URL=database_url), tmp_path
    ) as process:
        code = process.wait()

    assert code == 2
    lines = process.stderr.lines
    assert any(line.startswith("patgate: config: listen.port: ") for line in lines), lines
    assert any(line.startswith("patgate: config: routes[0].") for line in lines), lines
    assert not any(is_listening(line) for line in lines)
    assert "Traceback" not in process.stderr.text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve_on_a_taken_port(
    tmp_path: Path, config_file: Path, database_url: str, *args: str
) -> ServeProcess:
    """``patgate serve *args`` on a port another socket holds: the finished process."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_config(
            config_file,
            serve_config("http://127.0.0.1:9", listen={"host": "127.0.0.1", "port": port}),
        )
        with ServeProcess(
            ["serve", *args, "--config", str(config_file)],
            clean_env(PATGATE_DATABASE_URL=database_url),
            tmp_path,
        ) as process:
            assert process.wait() == 1
    return process


def test_a_port_in_use_is_one_error_line(
    tmp_path: Path, config_file: Path, database_url: str
) -> None:
    process = serve_on_a_taken_port(tmp_path, config_file, database_url)

    assert len(process.stderr.lines) == 1, process.stderr.text
    assert process.stderr.lines[0].startswith("patgate: error: ")


async def test_workers_share_one_port(
    tmp_path: Path,
    config_file: Path,
    upstream: RecordingUpstream,
    database_url: str,
    http: aiohttp.ClientSession,
) -> None:
    main, admin = free_port(), free_port()
    write_config(
        config_file,
        serve_config(
            upstream.url,
            listen={"host": "127.0.0.1", "port": main},
            admin_listen={"host": "127.0.0.1", "port": admin},
        ),
    )
    with ServeProcess(
        ["serve", "--workers", "2", "--config", str(config_file)],
        clean_env(PATGATE_DATABASE_URL=database_url),
        tmp_path,
    ) as gateway:
        await asyncio.to_thread(gateway.stderr.wait_for, is_listening, START_TIMEOUT, count=2)
        listening = [line for line in gateway.stderr.lines if is_listening(line)]
        for _ in range(4):
            async with http.get(f"http://127.0.0.1:{main}/public/x") as r:
                assert r.status == 200
        code = await asyncio.to_thread(gateway.stop)

    assert len(listening) == 2
    assert len(set(listening)) == 1
    assert f"http://127.0.0.1:{main} (admin http://127.0.0.1:{admin})" in listening[0]
    assert code == 0
    assert len(upstream.received) == 4


async def test_serve_migrate_prepares_a_new_database_then_serves(
    launch: Launch,
    tmp_path: Path,
    postgres_url: str,
    upstream: RecordingUpstream,
    http: aiohttp.ClientSession,
) -> None:
    async with fresh_database(postgres_url) as url:
        gateway = await asyncio.to_thread(launch, "--migrate", database=url)
        cli = Cli(tmp_path, clean_env(PATGATE_DATABASE_URL=url))
        _, user_id, created = await new_token(cli, "admin")

        async with http.get(f"{gateway.admin_url}/readyz") as r:
            ready = r.status
        async with http.get(f"{gateway.url}/api/jobs", headers=bearer(created["token"])) as r:
            status = r.status
        code = await asyncio.to_thread(gateway.stop)

    assert "patgate: applied migrations 001_init" in gateway.stderr.text
    assert ready == 200
    assert status == 200
    assert upstream.last.header("X-Auth-User-Id") == user_id
    assert code == 0


def test_workers_that_cannot_start_say_why(
    tmp_path: Path, config_file: Path, database_url: str
) -> None:
    process = serve_on_a_taken_port(tmp_path, config_file, database_url, "--workers", "2")

    lines = process.stderr.lines
    assert len(lines) == 2, process.stderr.text  # one per worker
    for line in lines:
        assert re.match(r"patgate: worker \d+: error: ", line), line
        assert "in use" in line
    assert "Traceback" not in process.stderr.text


async def test_serve_starts_while_postgres_is_down(
    launch: Launch, unused_tcp_port: int, http: aiohttp.ClientSession
) -> None:
    """SPEC §3/§11: public routes work, an uncached token is 503 (never 401), not ready."""
    down = f"postgresql://patgate@127.0.0.1:{unused_tcp_port}/patgate"
    gateway = await asyncio.to_thread(launch, database=down)

    async with http.get(f"{gateway.admin_url}/readyz") as r:
        ready = r.status
    async with http.get(f"{gateway.url}/public/x") as r:
        public = r.status
    token = TokenFormat("pat_").generate().plaintext
    async with http.get(f"{gateway.url}/api/jobs", headers=bearer(token)) as r:
        protected, retry_after = r.status, r.headers.get("Retry-After")

    assert ready == 503
    assert public == 200
    assert protected == 503
    assert retry_after is not None
