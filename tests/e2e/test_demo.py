"""`patgate demo` as a newcomer runs it: from a directory holding config/gateway.yaml, with
no database configured; the printed curl line must work, and Ctrl-C must clean up."""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.e2e.support import EXAMPLE_CONFIG, ServeProcess, clean_env

READY_TIMEOUT = 60.0  # initdb of the embedded PostgreSQL is the slow part
STOP_TIMEOUT = 30.0
IDENTITY = ("X-Auth-User-Id", "X-Auth-Company-Id", "X-Auth-Token-Id", "X-Auth-Role")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh directory outside pytest's basetemp: every pytest session that starts on this
    machine chmods /tmp/pytest-of-USER to 0700, which locks out the embedded PostgreSQL
    (it runs as the `pgserver` user when patgate runs as root)."""
    with tempfile.TemporaryDirectory(prefix="patgate-demo-e2e-") as folder:
        yield Path(folder)


@pytest.fixture
def demo(workdir: Path) -> Iterator[ServeProcess]:
    """`patgate demo` started from ``workdir``; always stopped afterwards."""
    (workdir / "config").mkdir()
    shutil.copy(EXAMPLE_CONFIG, workdir / "config" / "gateway.yaml")
    # The example config reads its ports from these; 0 lets the OS pick free ones.
    assert "${PATGATE_PORT:-8080}" in EXAMPLE_CONFIG.read_text()
    assert "${PATGATE_ADMIN_PORT:-9191}" in EXAMPLE_CONFIG.read_text()
    env = clean_env(PATGATE_PORT="0", PATGATE_ADMIN_PORT="0")
    process = ServeProcess(["demo"], env, workdir)
    yield process
    process.stop()


def test_demo_prints_a_working_curl_line_and_cleans_up_on_ctrl_c(
    demo: ServeProcess, workdir: Path
) -> None:
    demo.stdout.wait_for(lambda line: "Press Ctrl-C to stop" in line, READY_TIMEOUT)
    curl_line = demo.stdout.wait_for(lambda line: line.strip().startswith("curl -s http"), 0)
    echo = subprocess.run(
        shlex.split(curl_line.strip()), capture_output=True, text=True, timeout=30, check=False
    )

    demo.send(signal.SIGINT)
    code = demo.wait(STOP_TIMEOUT)

    assert echo.returncode == 0, echo.stderr
    answer = orjson.loads(echo.stdout)
    headers = {name.lower(): value for name, value in answer["headers"].items()}
    assert answer["path"] == "/api/jobs/42"
    assert headers["x-auth-user-id"] == "u-alice"
    assert headers["x-auth-company-id"] == "acme"
    assert headers["x-auth-role"] == "admin"
    for name in IDENTITY:
        assert headers[name.lower()], name
    assert "jobs:*" in headers["x-auth-permissions"].split()
    assert "authorization" not in headers
    assert "HTTP 403" in demo.stdout.text  # u-bob, a field_user, may not create a job

    assert code == 0, demo.stderr.text
    folder = re.search(r"embedded PostgreSQL in (\S+)", demo.stderr.text)
    assert folder is not None, demo.stderr.text
    assert not Path(folder.group(1)).exists()
    assert list((workdir / ".patgate").glob("demo-*")) == []
