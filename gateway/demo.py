"""`patgate demo`: embedded PostgreSQL, an echo upstream, a seeded company, and the gateway.

Everything it creates lives in a temporary database directory that is deleted on Ctrl-C.
"""

from __future__ import annotations

import os
import secrets
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import jwt
import orjson
from aiohttp import web

from gateway import embedded, store
from gateway.config import Config, load_config
from gateway.lifecycle import OPERATOR, Expiry, TokenService
from gateway.server import run_async, serve

DEMO_COMPANY = ("acme", "Acme Plumbing")
DEMO_USERS = (
    ("u-alice", "admin", "alice@acme.example"),
    ("u-bob", "field_user", "bob@acme.example"),
)
DEMO_ADMIN = "u-alice"
UPSTREAM_ENV = "PATGATE_UPSTREAM"
SESSION_SECRET_ENV = "PATGATE_SESSION_SECRET"  # config/gateway.yaml reads hs256_secret from it
DEFAULT_UPSTREAM_PORT = 9000
UI_SESSION_SECONDS = 4 * 3600
UI_PATH = "/_patgate/ui/"


async def echo(request: web.Request) -> web.Response:
    """The sample upstream: answers with what it received."""
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path.partition("?")[0],
            "query": request.query_string,
            "headers": {str(name): request.headers.getone(name) for name in request.headers},
            "body_bytes": len(body),
        },
        dumps=lambda obj: orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode(),
    )


def echo_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def _upstream_port() -> int:
    """9000 when it is free, else any free port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", DEFAULT_UPSTREAM_PORT))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _seed(cfg: Config, database_url: str) -> dict[str, str]:
    async with store.connect(database_url) as conn:
        await store.migrate(conn)
        service = TokenService(cfg, conn)
        company_id, company_name = DEMO_COMPANY
        await store.insert_company(conn, company_id, company_name)
        tokens = {}
        for user_id, role, email in DEMO_USERS:
            service.role_permissions(role)  # the config must know the demo's roles
            await store.insert_user(conn, user_id, company_id, role, email)
            created = await service.create(
                OPERATOR, user_id=user_id, name=f"{user_id} demo token", expiry=Expiry(in_days=30)
            )
            tokens[user_id] = created.plaintext
    return tokens


def ui_link(cfg: Config, main_url: str, *, now: float | None = None) -> str | None:
    """The token page signed in as the demo admin: a short-lived session JWT (with a second
    factor, so it may create tokens) in the URL fragment, which the page moves to
    sessionStorage at once. None when the config takes no HS256 sessions."""
    sessions = cfg.management.sessions
    if not cfg.management.enabled or not sessions.hs256_secret:
        return None
    issued = int(now if now is not None else time.time())
    claims: dict[str, object] = {
        sessions.claims.user: DEMO_ADMIN,
        sessions.claims.company: DEMO_COMPANY[0],
        "amr": ["mfa"],
        "iat": issued,
        "exp": issued + UI_SESSION_SECONDS,
    }
    if sessions.issuer is not None:
        claims["iss"] = sessions.issuer
    if sessions.audience is not None:
        claims["aud"] = sessions.audience
    session = jwt.encode(claims, sessions.hs256_secret, algorithm="HS256")
    return f"{main_url}{UI_PATH}#session={session}"


async def _show(main_url: str, tokens: dict[str, str], link: str | None) -> None:
    alice, bob = tokens["u-alice"], tokens["u-bob"]
    curl = f"curl -s {main_url}/api/jobs/42 -H {shlex.quote('Authorization: Bearer ' + alice)}"
    page = (
        f"\nThe self-service token page, signed in as {DEMO_ADMIN} for "
        f"{UI_SESSION_SECONDS // 3600} hours (the link holds a session; keep it to yourself):\n"
        f"  {link}\n"
        if link
        else ""
    )
    print(
        f"""
patgate demo is running: gateway {main_url}
  company  acme (Acme Plumbing)
  u-alice  admin       {alice}
  u-bob    field_user  {bob}
(These tokens are shown once; the database keeps only their SHA-256 digests.)

A request through the gateway, as alice - the echo upstream shows the identity headers:
  {curl}

Without a token (401):
  curl -si {main_url}/api/jobs/42
{page}""",
        flush=True,
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{main_url}/api/jobs", headers={"Authorization": f"Bearer {bob}"}, json={}
        ) as response,
    ):
        answer = await response.text()
    print(
        "u-bob (field_user: jobs:read only) creating a job gets a 403:\n"
        f"  curl -si -X POST {main_url}/api/jobs -H "
        f"{shlex.quote('Authorization: Bearer ' + bob)}\n"
        f"  -> HTTP {response.status} {response.headers.get('WWW-Authenticate', '')}\n"
        f"     {answer}\n\nPress Ctrl-C to stop; the demo database is deleted.",
        flush=True,
    )


async def _main(
    cfg: Config, database_url: str, upstream_port: int, config_path: str | None
) -> None:
    runner = web.AppRunner(echo_app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
        tokens = await _seed(cfg, database_url)
        await serve(
            cfg,
            database_url,
            config_path=config_path,  # SIGHUP reloads the file the demo started with
            started=lambda url, _: _show(url, tokens, ui_link(cfg, url)),
        )
    finally:
        await runner.cleanup()


def run(config_path: str | None) -> None:
    upstream_port = _upstream_port()
    # config/gateway.yaml sends its routes to ${PATGATE_UPSTREAM}: the echo server here.
    os.environ[UPSTREAM_ENV] = f"http://127.0.0.1:{upstream_port}"
    # The token page's link carries a session JWT: sign it with a secret made for this run.
    if not os.environ.get(SESSION_SECRET_ENV):
        os.environ[SESSION_SECRET_ENV] = secrets.token_urlsafe(36)  # 48 characters
    cfg = load_config(config_path)
    base = Path(cfg.database.data_dir).expanduser()
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="demo-", dir=base) as folder:
        print(f"patgate demo: embedded PostgreSQL in {folder} (development only)", file=sys.stderr)
        database = embedded.start(folder, delete_on_stop=True)
        try:
            run_async(_main(cfg, database.url, upstream_port, config_path))
        finally:
            database.stop()
