"""The `patgate` command: argument parsing and printing only.

Errors are one line on stderr: exit 1 for a failed operation, 2 for usage and config
errors. Never a traceback (set PATGATE_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway import embedded, store
from gateway.config import Config, load_config
from gateway.errors import ConfigError, NotFound, PatgateError
from gateway.lifecycle import OPERATOR, Created, Expiry, TokenService
from gateway.store import CompanyRow, TokenRow
from gateway.views import user_json

PID_FILE_ENV = "PATGATE_PID_FILE"
DEFAULT_PID_FILE = ".patgate/patgate.pid"
EXIT_FAILED = 1
EXIT_USAGE = 2
DAYS = {"d": 1.0, "h": 1 / 24, "w": 7.0}
_SLUG = re.compile(r"[^a-z0-9]+")


# ---------------------------------------------------------------------------------------------
# Output


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return str(value)


def emit(args: argparse.Namespace, data: Any, human: str) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(data, default=_json_default).decode() + "\n")
    else:
        print(human)


def company_json(row: CompanyRow) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "created_at": row.created_at}


def token_table(service: TokenService, rows: Sequence[TokenRow]) -> str:
    header = ("ID", "NAME", "PREFIX", "STATE", "USER", "ROLE", "EXPIRES", "LAST USED")
    lines = [header]
    for row in rows:
        data = service.token_json(row)
        last = f"{data['last_used_at']} {data['last_used_ip']}" if data["last_used_at"] else "-"
        lines.append(
            (
                data["id"],
                data["name"],
                data["prefix"],
                data["state"],
                data["user_id"],
                data["role"] or "-",
                data["expires_at"] or "never",
                last,
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def token_details(service: TokenService, row: TokenRow) -> str:
    data = service.token_json(row)
    data["permissions"] = " ".join(data["permissions"]) or "(none)"
    return "\n".join(f"{key:>15}: {'-' if value is None else value}" for key, value in data.items())


def default_pid_file() -> str:
    return os.environ.get(PID_FILE_ENV) or DEFAULT_PID_FILE


# ---------------------------------------------------------------------------------------------
# Argument types


def expires_in(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([dhw]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a lifetime like 90d, 12h or 2w, got {text!r}")
    return float(match.group(1)) * DAYS[match.group(2) or "d"]


def expires_at(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a date like 2027-01-31 or 2027-01-31T12:00:00Z, got {text!r}"
        ) from None
    if isinstance(moment, date) and moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


# ---------------------------------------------------------------------------------------------
# Commands

Command = Callable[[argparse.Namespace, Config, Any], Awaitable[None]]


async def cmd_company_add(args: argparse.Namespace, cfg: Config, conn: Any) -> None:
    company_id = args.id or _SLUG.sub("-", args.name.lower()).strip("-") or os.urandom(4).hex()
    async with store.transaction(conn) as tx:
        row = await store.insert_company(tx, company_id, args.name)
    emit(args, company_json(row), f"company {row.id} ({row.name}) added")


async def cmd_user_add(args: argparse.Namespace, cfg: Config, conn: Any) -> None:
    TokenService(cfg, conn).role_permissions(args.role)
    async with store.transaction(conn) as tx:
        if await store.get_company(tx, args.company) is None:
            raise NotFound(f"no company {args.company!r}")
        row = await store.insert_user(tx, args.id, args.company, args.role, args.email)
    emit(args, user_json(row), f"user {row.id} added to {row.company_id} as {row.role}")


async def cmd_user_set_role(args: argparse.Namespace, cfg: Config, conn: Any) -> None:
    row = await TokenService(cfg, conn).set_role(OPERATOR, args.id, args.role)
    emit(args, user_json(row), f"user {row.id} is now {row.role}")


async def cmd_user_status(args: argparse.Namespace, cfg: Config, conn: Any) -> None:
    status = "deactivated" if args.command == "deactivate" else "active"
    row = await TokenService(cfg, conn).set_status(OPERATOR, args.id, status)
    note = " (their tokens are revoked)" if status == "deactivated" else ""
    emit(args, user_json(row), f"user {row.id} is {row.status}{note}")


def shown_once(headline: str, plaintext: str) -> list[str]:
    return [
        headline,
        "",
        f"    {plaintext}",
        "",
        "Copy it now: it is not stored and will not be shown again.",
    ]


def created_json(service: TokenService, created: Created) -> dict[str, Any]:
    return {
        "token": created.plaintext,
        **service.token_json(created.token),
        "dropped_permissions": list(created.dropped_permissions),
    }


async def cmd_token_create(args: argparse.Namespace, cfg: Config, conn: Any) -> None:
    service = TokenService(cfg, conn)
    expiry = Expiry(in_days=args.expires_in, at=args.expires_at, never=args.no_expiry)
    created = await service.create(
        OPERATOR, user_id=args.user, name=args.name, expiry=expiry, role=args.role
    )
    row = created.token
    lines = shown_once(
        f"token {row.id} created for {row.user_id}, expires {row.expires_at or 'never'}",
        created.plaintext,
    )
    if created.dropped_permissions:
        lines.append("Stripped (the owner lacks them): " + ", ".join(created.dropped_permissions))
    emit(args, created_json(service, created), "\n".join(lines))


async def cmd_token_list(args: argparse.Namespace, cfg: Config, conn: Any) -> None:
    service = TokenService(cfg, conn)
    rows = await service.list(
        OPERATOR, user_id=args.user, company_id=args.company, state=args.state
    )
    emit(args, [service.token_json(r) for r in rows], token_table(service, rows))


async def cmd_token_show(args: argparse.Namespace, cfg: Config, conn: Any) -> None:
    service = TokenService(cfg, conn)
    row = await service.get(OPERATOR, args.id)
    emit(args, service.token_json(row), token_details(service, row))


async def cmd_token_rename(args: argparse.Namespace, cfg: Config, conn: Any) -> None:
    service = TokenService(cfg, conn)
    row = await service.rename(OPERATOR, args.id, args.name)
    emit(args, service.token_json(row), f"token {row.id} renamed to {row.name!r}")


async def cmd_token_refresh(args: argparse.Namespace, cfg: Config, conn: Any) -> None:
    service = TokenService(cfg, conn)
    row = await service.refresh(OPERATOR, args.id)
    emit(args, service.token_json(row), f"token {row.id} now expires {row.expires_at}")


async def cmd_token_rotate(args: argparse.Namespace, cfg: Config, conn: Any) -> None:
    service = TokenService(cfg, conn)
    created = await service.rotate(OPERATOR, args.id)
    row = created.token
    data = {"token": created.plaintext, **service.token_json(row)}
    headline = f"token {args.id} rotated into {row.id}, expires {row.expires_at or 'never'}"
    emit(args, data, "\n".join(shown_once(headline, created.plaintext)))


async def cmd_token_revoke(args: argparse.Namespace, cfg: Config, conn: Any) -> None:
    service = TokenService(cfg, conn)
    row = await service.revoke(OPERATOR, args.id, reason="admin")
    emit(args, service.token_json(row), f"token {row.id} revoked")


# ---------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given before the command is not reset by the command's default.
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="YAML file (default $PATGATE_CONFIG or config/gateway.yaml)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )

    parser = argparse.ArgumentParser(
        prog="patgate", description="Personal Access Token gateway", parents=[common]
    )
    top = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    def leaf(
        parent: Any, name: str, handler: Command | str, help_text: str
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=help_text)
        sub.set_defaults(handler=handler, command=name)
        return sub

    serve = leaf(top, "serve", "serve", "run the gateway")
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    serve.add_argument("--migrate", action="store_true", help="apply migrations first")
    pid_help = f"pid file for `patgate reload` (default ${PID_FILE_ENV} or {DEFAULT_PID_FILE})"
    serve.add_argument("--pid-file", default=default_pid_file(), help=pid_help)
    reload = leaf(top, "reload", "reload", "make the running server re-read its config (SIGHUP)")
    reload.add_argument("--pid-file", default=default_pid_file(), help=pid_help)
    leaf(top, "migrate", "migrate", "apply database migrations")
    leaf(top, "check-config", "check-config", "validate the configuration and exit")
    leaf(top, "demo", "demo", "run a self-contained demo (embedded PostgreSQL)")

    company = top.add_parser("company", help="manage companies").add_subparsers(
        dest="command", required=True, metavar="ACTION"
    )
    add = leaf(company, "add", cmd_company_add, "add a company")
    add.add_argument("name")
    add.add_argument("--id", help="company id (default: derived from the name)")

    user = top.add_parser("user", help="manage users").add_subparsers(
        dest="command", required=True, metavar="ACTION"
    )
    add = leaf(user, "add", cmd_user_add, "add a user")
    add.add_argument("id", help="the backend's own user id")
    add.add_argument("--company", required=True)
    add.add_argument("--role", required=True)
    add.add_argument("--email")
    set_role = leaf(user, "set-role", cmd_user_set_role, "change a user's role")
    set_role.add_argument("id")
    set_role.add_argument("role")
    for name, text in (
        ("deactivate", "deactivate (revokes their tokens)"),
        ("activate", "activate"),
    ):
        leaf(user, name, cmd_user_status, text).add_argument("id")

    token = top.add_parser("token", help="manage tokens").add_subparsers(
        dest="command", required=True, metavar="ACTION"
    )
    create = leaf(token, "create", cmd_token_create, "create a token (shown once)")
    create.add_argument("--user", required=True)
    create.add_argument("--name", required=True)
    create.add_argument("--role", help="scope the token to this role")
    lifetime = create.add_mutually_exclusive_group()
    lifetime.add_argument("--expires-in", type=expires_in, metavar="90d")
    lifetime.add_argument("--expires-at", type=expires_at, metavar="DATE")
    lifetime.add_argument("--no-expiry", action="store_true")
    listing = leaf(token, "list", cmd_token_list, "list tokens")
    owner = listing.add_mutually_exclusive_group()
    owner.add_argument("--user")
    owner.add_argument("--company")
    listing.add_argument("--state", choices=("active", "expired", "revoked"))
    leaf(token, "show", cmd_token_show, "show one token").add_argument("id")
    rename = leaf(token, "rename", cmd_token_rename, "rename a token")
    rename.add_argument("id")
    rename.add_argument("name")
    leaf(token, "refresh", cmd_token_refresh, "extend a token's expiry").add_argument("id")
    leaf(token, "rotate", cmd_token_rotate, "replace a token with a new one").add_argument("id")
    leaf(token, "revoke", cmd_token_revoke, "revoke a token").add_argument("id")
    return parser


# ---------------------------------------------------------------------------------------------
# Entry point


def _database_url(cfg: Config, args: argparse.Namespace) -> tuple[str, bool]:
    """The URL to use, and whether it is the embedded (auto-migrated) development server."""
    if cfg.database.url:
        return cfg.database.url, False
    return embedded.database_url(cfg.database.data_dir, quiet=args.json), True


async def _run_command(args: argparse.Namespace, cfg: Config) -> None:
    url, is_embedded = _database_url(cfg, args)
    async with store.connect(url) as conn:
        if is_embedded:
            await store.migrate(conn)
        elif pending := await store.pending_migrations(conn):
            raise PatgateError(
                f"the database needs migrations {', '.join(pending)}: run `patgate migrate`"
            )
        await args.handler(args, cfg, conn)


async def _migrate(args: argparse.Namespace, cfg: Config) -> None:
    url, _ = _database_url(cfg, args)
    async with store.connect(url) as conn:
        applied = await store.migrate(conn)
    emit(args, {"applied": applied}, f"applied: {', '.join(applied)}" if applied else "up to date")


@contextlib.contextmanager
def pid_file(path: str) -> Iterator[None]:
    """Where `patgate reload` finds the running server; best effort, never fatal."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"{os.getpid()}\n")
    except OSError as error:
        print(f"patgate: warning: cannot write pid file {path}: {error}", file=sys.stderr)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if target.read_text().strip() == str(os.getpid()):
                target.unlink()


def read_pid(path: str) -> int:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        raise PatgateError(
            f"no running patgate found: cannot read a pid from {path} (see --pid-file)"
        ) from None


def dispatch(args: argparse.Namespace) -> int:
    from gateway.server import run_async, serve, serve_workers  # keeps `--help` fast

    cfg = load_config(args.config)
    handler = args.handler
    if handler == "check-config":
        emit(args, {"ok": True, "routes": len(cfg.routes)}, f"config ok: {len(cfg.routes)} routes")
    elif handler == "demo":
        from gateway import demo

        demo.run(args.config)
    elif handler == "migrate":
        run_async(_migrate(args, cfg))
    elif handler == "serve":
        url, is_embedded = _database_url(cfg, args)
        migrate = args.migrate or is_embedded
        if args.workers < 1:
            raise ConfigError(["--workers: expected a number of processes, 1 or more"])
        with pid_file(args.pid_file):
            if args.workers > 1:
                return serve_workers(
                    cfg, url, args.workers, migrate=migrate, config_path=args.config
                )
            run_async(serve(cfg, url, migrate=migrate, config_path=args.config))
    elif handler == "reload":
        pid = read_pid(args.pid_file)
        os.kill(pid, signal.SIGHUP)
        emit(args, {"signalled": pid}, f"sent SIGHUP to patgate (pid {pid})")
    else:
        run_async(_run_command(args, cfg))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.config = getattr(args, "config", None)
    args.json = getattr(args, "json", False)
    try:
        return dispatch(args)
    except ConfigError as error:
        for line in error.errors:
            print(f"patgate: config: {line}", file=sys.stderr)
        return EXIT_USAGE
    except PatgateError as error:
        print(f"patgate: error: {error.detail}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # the promise: never a traceback
        if os.environ.get("PATGATE_DEBUG"):
            raise
        print(f"patgate: error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED
