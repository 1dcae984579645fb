"""A real nginx with auth_request, configured with deploy/forward-auth/nginx.conf, asking
the real gateway at /_patgate/auth before it proxies to a real upstream."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import LISTENER, create_app
from gateway.lifecycle import OPERATOR
from tests.conftest import RecordingUpstream, Seeder, gateway_config
from tests.servers import GatewayTestServer

SNIPPET = Path(__file__).parents[2] / "deploy" / "forward-auth" / "nginx.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

pytestmark = pytest.mark.skipif(
    not Path(NGINX).exists(), reason="nginx is not installed (./dev.sh test installs it)"
)

MAIN_CONFIG = """
daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    include {root}/site.conf;
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def nginx_port() -> int:
    return free_port()


@pytest.fixture
async def gateway(database_url: str, upstream: RecordingUpstream) -> AsyncIterator[TestServer]:
    cfg = gateway_config(upstream.url, trusted_proxies=["127.0.0.1/32"])
    server = GatewayTestServer(create_app(cfg, database_url), host="127.0.0.1")
    await server.start_server()
    await asyncio.wait_for(server.app[LISTENER].connected.wait(), 10)
    yield server
    await server.close()


@pytest.fixture
def nginx(
    tmp_path: Path, nginx_port: int, gateway: TestServer, upstream: RecordingUpstream
) -> Iterator[str]:
    site = SNIPPET.read_text().replace("@LISTEN@", f"127.0.0.1:{nginx_port}")
    site = site.replace("@PATGATE@", f"127.0.0.1:{gateway.port}")
    site = site.replace("@APP@", upstream.url.removeprefix("http://"))
    (tmp_path / "site.conf").write_text(site)
    config = tmp_path / "nginx.conf"
    config.write_text(MAIN_CONFIG.format(root=tmp_path))
    check = subprocess.run(
        [NGINX, "-t", "-c", str(config), "-p", str(tmp_path)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen([NGINX, "-c", str(config), "-p", str(tmp_path)])
    try:
        wait_for_port(nginx_port, process, tmp_path / "error.log")
        yield f"http://127.0.0.1:{nginx_port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """nginx offers no readiness signal: try to connect until it accepts (bounded)."""
    for _ in range(500):
        assert process.poll() is None, log.read_text() if log.exists() else "nginx exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.01)
    raise AssertionError("nginx did not start listening")


@pytest.fixture
async def seed(db: Any, upstream: RecordingUpstream) -> Seeder:
    return Seeder(gateway_config(upstream.url), db)


async def get(url: str, method: str = "GET", **headers: str) -> tuple[int, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as response,
    ):
        await response.read()
        return response.status, dict(response.headers)


async def test_nginx_passes_the_identity_and_drops_what_the_client_forged(
    nginx: str, upstream: RecordingUpstream, seed: Seeder
) -> None:
    user_id, token, token_id = await seed.user_with_token("full_user")

    status, _ = await get(
        f"{nginx}/api/jobs/7?x=1",
        Authorization=f"Bearer {token}",
        **{"X-Auth-User-Id": "root", "X-Auth-Permissions": "*"},
    )

    assert status == 200
    got = upstream.last
    assert got.raw_path == "/api/jobs/7?x=1"
    assert got.all("X-Auth-User-Id") == [user_id]
    assert got.all("X-Auth-Token-Id") == [token_id]
    assert got.all("X-Auth-Permissions") == ["invoices:read jobs:* tokens:create"]
    assert got.header("Authorization") is None


async def test_nginx_relays_401_and_403(
    nginx: str, upstream: RecordingUpstream, seed: Seeder
) -> None:
    _, token, _ = await seed.user_with_token("field_user")

    missing, headers = await get(f"{nginx}/api/jobs/7")
    wrong, _ = await get(f"{nginx}/api/jobs/7", Authorization="Bearer pat_not_a_token")
    forbidden, _ = await get(f"{nginx}/api/jobs", "POST", Authorization=f"Bearer {token}")
    unrouted, _ = await get(f"{nginx}/not/routed", Authorization=f"Bearer {token}")

    assert missing == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="patgate"'
    assert wrong == 401
    assert forbidden == 403
    assert unrouted == 403
    assert upstream.received == []


async def test_nginx_public_route_without_token_carries_no_identity(
    nginx: str, upstream: RecordingUpstream
) -> None:
    status, _ = await get(f"{nginx}/public/page", **{"X-Auth-User-Id": "root"})
    assert status == 200
    assert not any(name.lower().startswith("x-auth-") for name, _ in upstream.last.headers)


async def test_revocation_is_seen_by_nginx_at_once(
    nginx: str, gateway: TestServer, seed: Seeder
) -> None:
    _, token, token_id = await seed.user_with_token()
    assert (await get(f"{nginx}/api/jobs/1", Authorization=f"Bearer {token}"))[0] == 200
    listener = gateway.app[LISTENER]
    listener.notified.clear()

    await seed.service.revoke(OPERATOR, token_id)  # another connection, as the CLI would
    await asyncio.wait_for(listener.notified.wait(), 10)

    assert (await get(f"{nginx}/api/jobs/1", Authorization=f"Bearer {token}"))[0] == 401
