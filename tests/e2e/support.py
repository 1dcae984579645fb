"""Helpers for driving the `patgate` command as a user runs it: as a subprocess.

`run_cli` runs one command to completion; `ServeProcess` runs a long-lived one (`serve`,
`demo`), drains its output on reader threads and lets a test wait for a line instead of
sleeping. Every process gets a clean environment: no PATGATE_* variable leaks in from the
caller, and `gateway` is imported from this checkout.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import yaml

from tests.conftest import ROLES as ROLES  # re-exported for the e2e modules
from tests.conftest import TOKEN_FIELDS as TOKEN_FIELDS

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO / "config" / "gateway.yaml"
COMMAND = (sys.executable, "-m", "gateway")

CLI_TIMEOUT = 60.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

LISTENING = re.compile(r"patgate: listening on (http://\S+) \(admin (http://\S+)\)")
TOKEN = re.compile(r"pat_[0-9A-Za-z]{38}")


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any PATGATE_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATGATE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    return path


def run_cli(
    args: Sequence[str], env: Mapping[str, str], cwd: Path, *, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """`patgate ARGS` to completion; stdout and stderr captured as text."""
    return subprocess.run(
        [*COMMAND, *args],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass(frozen=True)
class Cli:
    """`patgate` run from ``cwd`` (where config/gateway.yaml is the default config) with ``env``."""

    cwd: Path
    env: Mapping[str, str]

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(args, self.env, self.cwd)

    def json(self, *args: str) -> Any:
        """The parsed stdout of `patgate ARGS --json`, which must succeed."""
        return parse_json(self(*args, "--json"))

    def fails(self, *args: str, code: int = 1) -> str:
        """`patgate ARGS` must fail with ``code`` and one `patgate: error:` line: that line."""
        result = self(*args)
        assert result.returncode == code, f"exit {result.returncode}: {result.stderr}"
        no_traceback(result)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("patgate: error: "), lines[0]
        return lines[0]


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


def parse_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return orjson.loads(result.stdout)


async def sql(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


def run_sql(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """One statement from synchronous test code."""
    return asyncio.run(sql(url, query, *args))


async def create_database(postgres_url: str, name: str) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(postgres_url: str, name: str) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@asynccontextmanager
async def fresh_database(postgres_url: str) -> AsyncIterator[str]:
    """A brand-new database with no tables on the session's server, dropped afterwards."""
    name = f"t_e2e_empty_{uuid.uuid4().hex[:8]}"
    await create_database(postgres_url, name)
    try:
        parts = urlsplit(postgres_url)
        yield urlunsplit(parts._replace(path="/" + name))
    finally:
        await drop_database(postgres_url, name)


def pg_dump_binary() -> str:
    """pgserver's pg_dump (same major version as its server), else the one on PATH."""
    try:
        import pgserver
    except ImportError:
        bundled = None
    else:
        bundled = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"
    if bundled is not None and bundled.exists():
        return str(bundled)
    found = shutil.which("pg_dump")
    assert found, "no pg_dump binary"
    return found


# ---------------------------------------------------------------------------------------------
# Long-running commands


class OutputReader:
    """Collects a pipe's lines on a daemon thread; a test waits for one matching a pattern."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._stream = stream
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for line in self._stream:
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        finally:
            with self._changed:
                self.closed = True
                self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float, *, count: int = 1) -> str:
        """The ``count``-th line (seen so far or to come) for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [line for line in self.lines if predicate(line)]
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    state = "ended" if self.closed else f"no such line within {timeout:g}s"
                    raise AssertionError(f"output {state}:\n" + "\n".join(self.lines))
                self._changed.wait(left)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class ServeProcess:
    """`patgate ARGS` running in the background (serve, demo); stopped by ``stop()``.

    Use as a context manager, or call ``stop()`` from a fixture finalizer: it sends SIGTERM,
    waits, then kills, and is safe to call more than once.
    """

    def __init__(self, args: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
        self.args = list(args)
        self.process = subprocess.Popen(
            [*COMMAND, *args],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self.stdout = OutputReader(self.process.stdout)
        self.stderr = OutputReader(self.process.stderr)
        self.url = ""
        self.admin_url = ""

    def wait_listening(self, timeout: float = START_TIMEOUT) -> ServeProcess:
        """Block until stderr says `patgate: listening on URL (admin URL)`; keep both URLs."""
        line = self.stderr.wait_for(lambda text: LISTENING.fullmatch(text) is not None, timeout)
        match = LISTENING.fullmatch(line)
        assert match is not None
        self.url, self.admin_url = match.group(1), match.group(2)
        return self

    def send(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        code = self.process.wait(timeout)
        self._close_pipes()
        return code

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Signal, wait up to ``timeout``, then kill. The exit code."""
        self.send(sig)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.wait(timeout)

    def _close_pipes(self) -> None:
        self.stdout.join(STOP_TIMEOUT)
        self.stderr.join(STOP_TIMEOUT)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# An embedded PostgreSQL a test may stop and start (a real outage)


def stop_postgres(server: Any) -> None:
    """Stop an ``embedded.EmbeddedPostgres`` (fast mode: sessions are cut, as in a crash of the
    database host) and wait until it is down. Blocking: call it through asyncio.to_thread."""
    from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

    pg = server._server
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pg.pgdata, user=pg.system_user)


def start_postgres(server: Any) -> None:
    """Start a stopped ``embedded.EmbeddedPostgres`` again, on the same socket (same URL), and
    wait until it accepts connections. Blocking: call it through asyncio.to_thread."""
    server._server.ensure_postgres_running()
