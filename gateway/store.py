"""PostgreSQL access: every SQL statement of the product, as named constants + small functions.

Functions take an asyncpg connection, so a caller composes several of them in one
transaction (``async with transaction(pool) as conn``). Foreign exceptions are translated
here, at the boundary: a lost or refused connection becomes ``DatabaseUnavailable`` (503),
a unique violation becomes ``Conflict`` (409).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from gateway.errors import Conflict, DatabaseUnavailable, InvalidInput

MIGRATION_LOCK_ID = 0x7061_7467_6174_65  # "patgate"
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[asyncpg.Connection]:
    """One connection, for the CLI and migrations."""
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except UNAVAILABLE_ERRORS as exc:
        raise DatabaseUnavailable(f"cannot reach PostgreSQL: {_describe(exc)}") from exc
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def transaction(pool: asyncpg.Pool | asyncpg.Connection) -> AsyncIterator[Any]:
    """A connection inside a transaction, with database faults translated."""
    try:
        if isinstance(pool, asyncpg.Connection):
            async with pool.transaction():
                yield pool
        else:
            async with pool.acquire() as conn, conn.transaction():
                yield conn
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(exc.detail or "already exists") from exc
    except asyncpg.TransactionRollbackError as exc:  # a deadlock or serialization failure
        raise Conflict("a concurrent change to the same user or token; try again") from exc
    except asyncpg.DataError as exc:  # e.g. a NUL character, which text cannot hold
        raise InvalidInput(f"a value cannot be stored: {exc}") from exc
    except UNAVAILABLE_ERRORS as exc:
        raise DatabaseUnavailable() from exc


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Migrations


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("gateway") / "migrations"
    files = sorted((f.name, f) for f in folder.iterdir() if f.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), f.read_text()) for name, f in files]


CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
)"""


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply every migration not yet recorded, in order, under an advisory lock."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(CREATE_MIGRATIONS_TABLE)
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied


async def pending_migrations(conn: asyncpg.Connection) -> list[str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done = set()
    if exists:
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [v for v, _ in migration_files() if v not in done]


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True, slots=True)
class CompanyRow:
    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class UserRow:
    id: str
    company_id: str
    role: str
    status: str
    email: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class TokenRow:
    """A token as stored, plus its owner's current role and status (joined)."""

    id: UUID
    name: str
    prefix: str
    role: str | None
    scopes: list[str] | None
    user_id: str
    company_id: str
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    last_used_at: datetime | None
    last_used_ip: str | None
    revoked_at: datetime | None
    revoked_reason: str | None
    rotated_to: UUID | None
    owner_role: str
    owner_status: str


@dataclass(frozen=True, slots=True)
class EventRow:
    id: int
    token_id: UUID
    event: str
    actor: str
    at: datetime
    ip: str | None
    detail: dict[str, Any]


def _token(record: asyncpg.Record | None) -> TokenRow | None:
    if record is None:
        return None
    values = dict(record)
    if values["last_used_ip"] is not None:
        values["last_used_ip"] = str(values["last_used_ip"])
    return TokenRow(**values)


# ---------------------------------------------------------------------------------------------
# Companies and users

INSERT_COMPANY = "INSERT INTO companies (id, name) VALUES ($1, $2) RETURNING id, name, created_at"
SELECT_COMPANY = "SELECT id, name, created_at FROM companies WHERE id = $1"
USER_COLUMNS = "id, company_id, role, status, email, created_at, updated_at"
INSERT_USER = f"""
INSERT INTO users (id, company_id, role, email) VALUES ($1, $2, $3, $4) RETURNING {USER_COLUMNS}"""
SELECT_USER = f"SELECT {USER_COLUMNS} FROM users WHERE id = $1"
SELECT_USER_FOR_UPDATE = f"SELECT {USER_COLUMNS} FROM users WHERE id = $1 FOR UPDATE"
SELECT_COMPANY_USERS = f"SELECT {USER_COLUMNS} FROM users WHERE company_id = $1 ORDER BY id"
UPDATE_USER = f"""
UPDATE users SET role = $2, status = $3, email = $4, updated_at = now()
WHERE id = $1 RETURNING {USER_COLUMNS}"""


async def insert_company(conn: asyncpg.Connection, company_id: str, name: str) -> CompanyRow:
    return CompanyRow(**dict(await conn.fetchrow(INSERT_COMPANY, company_id, name)))


async def get_company(conn: asyncpg.Connection, company_id: str) -> CompanyRow | None:
    record = await conn.fetchrow(SELECT_COMPANY, company_id)
    return CompanyRow(**dict(record)) if record else None


async def insert_user(
    conn: asyncpg.Connection, user_id: str, company_id: str, role: str, email: str | None
) -> UserRow:
    return UserRow(**dict(await conn.fetchrow(INSERT_USER, user_id, company_id, role, email)))


async def get_user(
    conn: asyncpg.Connection, user_id: str, *, for_update: bool = False
) -> UserRow | None:
    record = await conn.fetchrow(SELECT_USER_FOR_UPDATE if for_update else SELECT_USER, user_id)
    return UserRow(**dict(record)) if record else None


async def company_users(conn: asyncpg.Connection, company_id: str) -> list[UserRow]:
    return [UserRow(**dict(r)) for r in await conn.fetch(SELECT_COMPANY_USERS, company_id)]


async def update_user(
    conn: asyncpg.Connection, user_id: str, role: str, status: str, email: str | None
) -> UserRow:
    return UserRow(**dict(await conn.fetchrow(UPDATE_USER, user_id, role, status, email)))


# ---------------------------------------------------------------------------------------------
# Tokens

TOKEN_COLUMNS = """
t.id, t.name, t.prefix, t.role, t.scopes, t.user_id, t.company_id, t.created_at, t.created_by,
t.expires_at, t.last_used_at, t.last_used_ip, t.revoked_at, t.revoked_reason, t.rotated_to,
u.role AS owner_role, u.status AS owner_status"""

INSERT_TOKEN = """
INSERT INTO tokens
    (id, name, prefix, hash, role, scopes, user_id, company_id, created_by, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"""
SELECT_TOKEN = (
    f"SELECT {TOKEN_COLUMNS} FROM tokens t JOIN users u ON u.id = t.user_id WHERE t.id = $1"
)
SELECT_TOKEN_FOR_UPDATE = SELECT_TOKEN + " FOR UPDATE OF t"
# The hot path's one indexed query: any of the token's digests (one per pepper).
SELECT_TOKEN_BY_HASH = f"""
SELECT {TOKEN_COLUMNS} FROM tokens t JOIN users u ON u.id = t.user_id
WHERE t.hash = ANY($1::bytea[])"""
SELECT_TOKENS = f"""
SELECT {TOKEN_COLUMNS} FROM tokens t JOIN users u ON u.id = t.user_id
WHERE ($1::text IS NULL OR t.user_id = $1)
  AND ($2::text IS NULL OR t.company_id = $2)
  AND ($3::text IS NULL OR CASE
        WHEN t.revoked_at IS NOT NULL THEN 'revoked'
        WHEN t.expires_at IS NOT NULL AND t.expires_at <= now() THEN 'expired'
        ELSE 'active' END = $3)
ORDER BY t.created_at, t.id"""
COUNT_ACTIVE_TOKENS = """
SELECT count(*) FROM tokens
WHERE user_id = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())"""
UPDATE_TOKEN_NAME = "UPDATE tokens SET name = $2 WHERE id = $1"
UPDATE_TOKEN_EXPIRY = "UPDATE tokens SET expires_at = $2 WHERE id = $1"
# "Still usable" includes a rotated token inside its grace period (revoked_at in the future).
REVOKE_TOKEN = """
UPDATE tokens SET revoked_at = now(), revoked_reason = $2
WHERE id = $1 AND (revoked_at IS NULL OR revoked_at > now())"""
REVOKE_USER_TOKENS = """
UPDATE tokens SET revoked_at = now(), revoked_reason = $2
WHERE user_id = $1 AND (revoked_at IS NULL OR revoked_at > now()) RETURNING id"""
MARK_ROTATED = """
UPDATE tokens SET revoked_at = $2, revoked_reason = 'rotated', rotated_to = $3
WHERE id = $1"""
# A token and every successor, following rotated_to; the still-usable ones are revoked
# (the token itself may still be inside its rotation grace).
REVOKE_CHAIN = """
WITH RECURSIVE chain (id) AS (
    SELECT $1::uuid
    UNION
    SELECT t.rotated_to FROM tokens t JOIN chain c ON t.id = c.id WHERE t.rotated_to IS NOT NULL
)
UPDATE tokens SET revoked_at = now(), revoked_reason = $2
WHERE id IN (SELECT id FROM chain) AND (revoked_at IS NULL OR revoked_at > now())
RETURNING id"""
REVOKE_TOKENS_BY_HASH = """
UPDATE tokens SET revoked_at = now(), revoked_reason = $2
WHERE hash = ANY($1::bytea[]) AND (revoked_at IS NULL OR revoked_at > now()) RETURNING id"""
SELECT_USER_TOKEN_IDS = """
SELECT id FROM tokens WHERE user_id = $1 AND (revoked_at IS NULL OR revoked_at > now())"""


async def insert_token(
    conn: asyncpg.Connection,
    *,
    token_id: UUID,
    name: str,
    prefix: str,
    digest: bytes,
    role: str | None,
    scopes: Sequence[str] | None,
    user_id: str,
    company_id: str,
    created_by: str,
    expires_at: datetime | None,
) -> None:
    await conn.execute(
        INSERT_TOKEN,
        token_id,
        name,
        prefix,
        digest,
        role,
        list(scopes) if scopes is not None else None,
        user_id,
        company_id,
        created_by,
        expires_at,
    )


async def get_token(
    conn: asyncpg.Connection, token_id: UUID, *, for_update: bool = False
) -> TokenRow | None:
    query = SELECT_TOKEN_FOR_UPDATE if for_update else SELECT_TOKEN
    return _token(await conn.fetchrow(query, token_id))


async def find_token_by_digest(conn: Any, digests: Sequence[bytes]) -> TokenRow | None:
    return _token(await conn.fetchrow(SELECT_TOKEN_BY_HASH, list(digests)))


async def list_tokens(
    conn: asyncpg.Connection,
    *,
    user_id: str | None = None,
    company_id: str | None = None,
    state: str | None = None,
) -> list[TokenRow]:
    records = await conn.fetch(SELECT_TOKENS, user_id, company_id, state)
    return [row for row in map(_token, records) if row is not None]


async def count_active_tokens(conn: asyncpg.Connection, user_id: str) -> int:
    return int(await conn.fetchval(COUNT_ACTIVE_TOKENS, user_id))


async def rename_token(conn: asyncpg.Connection, token_id: UUID, name: str) -> None:
    await conn.execute(UPDATE_TOKEN_NAME, token_id, name)


async def set_token_expiry(
    conn: asyncpg.Connection, token_id: UUID, expires_at: datetime | None
) -> None:
    await conn.execute(UPDATE_TOKEN_EXPIRY, token_id, expires_at)


async def revoke_token(conn: asyncpg.Connection, token_id: UUID, reason: str) -> bool:
    return str(await conn.execute(REVOKE_TOKEN, token_id, reason)) != "UPDATE 0"


async def revoke_user_tokens(conn: asyncpg.Connection, user_id: str, reason: str) -> list[UUID]:
    return [r["id"] for r in await conn.fetch(REVOKE_USER_TOKENS, user_id, reason)]


async def mark_rotated(
    conn: asyncpg.Connection, token_id: UUID, revoked_at: datetime, successor: UUID
) -> None:
    await conn.execute(MARK_ROTATED, token_id, revoked_at, successor)


async def revoke_chain(conn: asyncpg.Connection, token_id: UUID, reason: str) -> list[UUID]:
    return [r["id"] for r in await conn.fetch(REVOKE_CHAIN, token_id, reason)]


async def revoke_tokens_by_digest(
    conn: asyncpg.Connection, digests: Sequence[bytes], reason: str
) -> list[UUID]:
    """Revoke the still-usable tokens stored under ``digests``, in one statement; their ids."""
    return [r["id"] for r in await conn.fetch(REVOKE_TOKENS_BY_HASH, list(digests), reason)]


async def user_token_ids(conn: asyncpg.Connection, user_id: str) -> list[UUID]:
    return [r["id"] for r in await conn.fetch(SELECT_USER_TOKEN_IDS, user_id)]


# ---------------------------------------------------------------------------------------------
# Cache invalidation across replicas

INVALIDATION_CHANNEL = "patgate_invalidate"
NOTIFY = "SELECT pg_notify($1, $2)"
NOTIFY_BATCH = 100  # token ids per notice: well under PostgreSQL's 8000-byte payload limit


async def notify_invalidated(conn: asyncpg.Connection, token_ids: Sequence[str]) -> None:
    """Tell every replica (on commit) to forget these tokens: payload {"tokens": [...]}."""
    for start in range(0, len(token_ids), NOTIFY_BATCH):
        payload = orjson.dumps({"tokens": list(token_ids[start : start + NOTIFY_BATCH])})
        await conn.execute(NOTIFY, INVALIDATION_CHANNEL, payload.decode())


# ---------------------------------------------------------------------------------------------
# Audit events

INSERT_EVENT = """
INSERT INTO token_events (token_id, event, actor, ip, detail) VALUES ($1, $2, $3, $4, $5::jsonb)"""
SELECT_EVENTS = """
SELECT id, token_id, event, actor, at, ip, detail FROM token_events
WHERE token_id = $1 ORDER BY at, id"""


async def add_events(
    conn: asyncpg.Connection,
    token_ids: Iterable[UUID],
    event: str,
    *,
    actor: str,
    ip: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    payload = orjson.dumps(detail or {}).decode()
    await conn.executemany(INSERT_EVENT, [(t, event, actor, ip, payload) for t in token_ids])


async def token_events(conn: asyncpg.Connection, token_id: UUID) -> list[EventRow]:
    rows = []
    for record in await conn.fetch(SELECT_EVENTS, token_id):
        values = dict(record)
        values["ip"] = str(values["ip"]) if values["ip"] is not None else None
        values["detail"] = orjson.loads(values["detail"])
        rows.append(EventRow(**values))
    return rows
