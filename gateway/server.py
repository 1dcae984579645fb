"""Running the gateway: both listeners, signals, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web

from gateway import logs, store
from gateway.app import create_admin_app, create_app, reload
from gateway.config import Config, Listen, load_config
from gateway.errors import ConfigError
from gateway.front import GatewayRunner
from gateway.keys import LIVE, TELEMETRY

SHUTDOWN_GRACE = 20.0


def say(line: str) -> None:
    """One status line on stderr, in one write: worker processes never merge lines."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


log = logging.getLogger("patgate")


def run_async(main: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every POSIX system
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def bound_url(site: web.TCPSite) -> str:
    server = site._server  # aiohttp keeps the asyncio server here; it knows the real port
    sockets = getattr(server, "sockets", None)  # asyncio's and uvloop's Server both have it
    if not sockets:
        return site.name
    host, port = sockets[0].getsockname()[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a URL one can open here
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


async def start_site(runner: web.AppRunner, listen: Listen, *, reuse_port: bool) -> web.TCPSite:
    site = web.TCPSite(runner, listen.host, listen.port, reuse_port=reuse_port or None)
    await site.start()
    return site


def try_reload(app: web.Application, config_path: str | None) -> bool:
    """SIGHUP: read the config file again; a broken one changes nothing and is counted."""
    telemetry = app[TELEMETRY]
    try:
        cfg = load_config(config_path)
        restart_only = reload(app, cfg)
    except ConfigError as error:
        for line in error.errors:
            log.error("reload refused", extra={"fields": {"error": line}})
        telemetry.reload(ok=False)
        return False
    if restart_only:
        log.warning("reloaded; these keys change only with a restart: %s", ", ".join(restart_only))
    else:
        log.info("configuration reloaded", extra={"fields": {"routes": len(cfg.routes)}})
    telemetry.reload(ok=True)
    return True


async def serve(
    cfg: Config,
    database_url: str,
    *,
    migrate: bool = False,
    reuse_port: bool = False,
    config_path: str | None = None,
    started: Callable[[str, str], Awaitable[None] | None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; ``started(main_url, admin_url)`` once listening.

    Stopping drains: readiness turns false first, the listening sockets close, requests in
    flight get up to SHUTDOWN_GRACE seconds to finish, then usage is flushed. SIGHUP reloads
    routes, roles and identity headers from ``config_path``.
    """
    logs.configure(cfg.logging.level)
    if migrate:
        await _migrate(database_url)
    app = create_app(cfg, database_url)
    # handler_cancellation: a client that goes away cancels its handler, and with it the
    # upstream request (SPEC §6), instead of leaving it to run to its end.
    runner = GatewayRunner(
        app,
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_GRACE,
    )
    admin_runner = web.AppRunner(create_admin_app(app), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await admin_runner.setup()
        site = await start_site(runner, cfg.listen, reuse_port=reuse_port)
        admin_site = await start_site(admin_runner, cfg.admin_listen, reuse_port=reuse_port)
        main_url, admin_url = bound_url(site), bound_url(admin_site)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, try_reload, app, config_path)
        say(f"patgate: listening on {main_url} (admin {admin_url})")
        if started is not None:
            result = started(main_url, admin_url)
            if result is not None:
                await result
        await stop.wait()
        app[LIVE].draining = True
        say("patgate: draining")
    finally:
        # Stops accepting, waits for the requests in flight, then flushes usage; the admin
        # listener goes last, so /readyz keeps saying "draining" meanwhile.
        await runner.cleanup()
        await admin_runner.cleanup()
    say("patgate: stopped")


def serve_workers(
    cfg: Config, database_url: str, workers: int, *, migrate: bool, config_path: str | None
) -> int:
    """``--workers N``: N forked processes sharing the listening ports (SO_REUSEPORT).

    The parent only supervises: it forwards SIGTERM/SIGINT/SIGHUP to the workers, exits with
    the worst of their exit codes. Each worker has its own cache and pool; they share
    nothing but PostgreSQL.
    """
    if migrate:
        run_async(_migrate(database_url))
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                run_async(serve(cfg, database_url, reuse_port=True, config_path=config_path))
            except BaseException as error:  # the child must never return into the parent's code
                detail = getattr(error, "detail", None) or f"{type(error).__name__}: {error}"
                say(f"patgate: worker {os.getpid()}: error: {detail}")
                code = 1
            os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    worst = 0
    for child in children:
        _, status = os.waitpid(child, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status))
    return worst


async def _migrate(database_url: str) -> None:
    async with store.connect(database_url) as conn:
        applied = await store.migrate(conn)
    if applied:
        say(f"patgate: applied migrations {', '.join(applied)}")
