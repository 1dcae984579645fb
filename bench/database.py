"""The run's PostgreSQL: embedded, seeded in bulk, and asked how many token lookups it did.

Seeding: one company, one user with the hot token (created through ``TokenService``, as
the CLI would), and ``count`` tokens spread over ``users`` users, written with one COPY.
Their digests come from ``gateway.tokens.TokenFormat``; only the random body is drawn with
``bytes.translate`` instead of ``secrets.choice`` per character, which would take seconds for
100,000 tokens (the body only needs to be unique here, not unbiased).

Counting: every token lookup is ``store.SELECT_TOKEN_BY_HASH``. After seeding, the server
logs every statement (``log_statement = all``, parameters left out), and the lookups are
counted in its log file - written synchronously by each backend, so a count is exact as soon
as the gateway has finished its requests. PostgreSQL's own counter, ``idx_scan`` of the
unique index ``tokens_hash_idx``, is not usable per scenario: a busy backend publishes it at
most once a second and then only after ten idle seconds. It is read once at the start and
once after every patgate process has exited (an exiting backend publishes at once), and the
two methods must agree over the whole run.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from gateway import embedded, store
from gateway.config import Config
from gateway.lifecycle import OPERATOR, Expiry, TokenService
from gateway.tokens import BASE62, BODY_LENGTH, TokenFormat, checksum

COMPANY = "bench"
ROLE = "full_user"
HOT_USER = "u-hot"
TOKEN_INDEX = "tokens_hash_idx"
INDEX_SCANS = "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = $1"
# The lookup's last line, as the statement log shows it (the SQL is logged as written).
LOOKUP_MARK = store.SELECT_TOKEN_BY_HASH.strip().splitlines()[-1].strip().encode()
LOG_EVERY_STATEMENT = (
    "ALTER SYSTEM SET log_statement = 'all'",
    "ALTER SYSTEM SET log_parameter_max_length = 0",  # no token digests in the log
    "SELECT pg_reload_conf()",
)
SETTLE_QUIET = 0.5  # seconds without a new lookup before a count is believed
SETTLE_LIMIT = 30.0
# every byte value → a base62 character (biased towards the first 8; fine for a benchmark)
_BODY_TABLE = bytes(ord(BASE62[i % len(BASE62)]) for i in range(256))


def fast_token(token_format: TokenFormat) -> str:
    body = secrets.token_bytes(BODY_LENGTH).translate(_BODY_TABLE).decode()
    return token_format.prefix + body + checksum(token_format.prefix + body)


def bad_checksum(token: str) -> str:
    """The same token with its last checksum character changed: refused before any lookup."""
    last = token[-1]
    return token[:-1] + BASE62[(BASE62.index(last) + 1) % len(BASE62)]


@dataclass
class Seeded:
    hot: str
    tokens: list[str]  # stored, never used yet; each maps to one cached identity once used
    unknown: list[str]  # well-formed, never stored
    bad_checksum: list[str]


class Database:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = embedded.start(root, delete_on_stop=True)
        self.url = self.server.url
        self._log_offset, self._log_tail, self._lookups = 0, b"", 0

    def postmaster_pid(self) -> int:
        return int((self.root / "pgdata" / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        self.server.stop()

    # -- seeding

    def seed(self, cfg: Config, *, count: int, users: int, invalid: int) -> Seeded:
        return asyncio.run(self._seed(cfg, count=count, users=users, invalid=invalid))

    async def _seed(self, cfg: Config, *, count: int, users: int, invalid: int) -> Seeded:
        token_format = TokenFormat(cfg.tokens.prefix, cfg.tokens.pepper)
        async with store.connect(self.url) as conn:
            await store.migrate(conn)
            await store.insert_company(conn, COMPANY, "Bench Plumbing")
            await store.insert_user(conn, HOT_USER, COMPANY, ROLE, None)
            hot = await TokenService(cfg, conn).create(
                OPERATOR, user_id=HOT_USER, name="bench hot", expiry=Expiry(never=True)
            )
            user_ids = [f"u-{i:05d}" for i in range(users)]
            await conn.copy_records_to_table(
                "users",
                records=[(user_id, COMPANY, ROLE) for user_id in user_ids],
                columns=["id", "company_id", "role"],
            )
            tokens = [fast_token(token_format) for _ in range(count)]
            await conn.copy_records_to_table(
                "tokens",
                records=_token_rows(token_format, tokens, user_ids),
                columns=["id", "name", "prefix", "hash", "user_id", "company_id", "created_by"],
            )
            await conn.execute("ANALYZE")
            for statement in LOG_EVERY_STATEMENT:
                await conn.execute(statement)
        unknown = [fast_token(token_format) for _ in range(invalid)]
        bad = [bad_checksum(t) for t in (fast_token(token_format) for _ in range(invalid))]
        assert all(token_format.is_well_formed(t) for t in (hot.plaintext, *tokens, *unknown))
        assert not any(token_format.is_well_formed(t) for t in bad)
        return Seeded(hot.plaintext, tokens, unknown, bad)

    # -- counting

    @property
    def log(self) -> Path:
        return self.root / "pgdata" / "log"  # where pgserver has pg_ctl write it

    def lookups(self) -> int:
        """Token lookups logged so far; waits until the gateway has stopped issuing them."""
        count, since = self._logged_lookups(), time.monotonic()
        deadline = since + SETTLE_LIMIT
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self._logged_lookups()
            if now != count:
                count, since = now, time.monotonic()
            elif time.monotonic() - since >= SETTLE_QUIET:
                break
        return count

    def _logged_lookups(self) -> int:
        """Reads only what the log gained since the last call."""
        with self.log.open("rb") as log:
            log.seek(self._log_offset)
            while chunk := log.read(1 << 20):
                self._log_offset += len(chunk)
                data = self._log_tail + chunk  # a mark may straddle two reads
                self._lookups += data.count(LOOKUP_MARK)
                self._log_tail = data[-(len(LOOKUP_MARK) - 1) :]  # too short to hold a mark
        return self._lookups

    def index_scans(self) -> int:
        """PostgreSQL's own count of lookups, as far as its backends have published it."""

        async def read() -> int:
            conn = await asyncpg.connect(self.url)
            try:
                value = await conn.fetchval(INDEX_SCANS, TOKEN_INDEX)
            finally:
                await conn.close()
            return int(value or 0)

        return asyncio.run(read())


def _token_rows(
    token_format: TokenFormat, tokens: list[str], user_ids: list[str]
) -> Iterator[tuple[object, ...]]:
    for i, token in enumerate(tokens):
        yield (
            uuid.uuid4(),
            f"bench {i}",
            token_format.display_prefix(token),
            token_format.digests(token)[0],
            user_ids[i % len(user_ids)],
            COMPANY,
            "cli",
        )


def write_list(path: Path, tokens: list[str]) -> Path:
    path.write_text("".join(f"{t}\n" for t in tokens))
    return path
