"""The operator CLI as a user runs it: `python -m gateway ...` in a subprocess, against the
module's PostgreSQL database, with --json (parsed) and human output."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.support import (
    REPO,
    ROLES,
    TOKEN,
    TOKEN_FIELDS,
    Cli,
    clean_env,
    fresh_database,
    no_traceback,
    parse_json,
    pg_dump_binary,
    run_sql,
    write_config,
)

MIGRATIONS = sorted(p.stem for p in (REPO / "gateway" / "migrations").glob("*.sql"))
SLACK = timedelta(minutes=5)  # between the command's now() and the test's


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose config/gateway.yaml (the default path) reads the database URL."""
    cwd = tmp_path_factory.mktemp("cli")
    write_config(
        cwd / "config" / "gateway.yaml",
        {"database": {"url": "${PATGATE_DATABASE_URL}"}, "roles": ROLES},
    )
    return cwd


@pytest.fixture(scope="module")
def cli(workspace: Path, database_url: str) -> Cli:
    return Cli(workspace, clean_env(PATGATE_DATABASE_URL=database_url))


def unique(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:8]}"


def new_company(cli: Cli) -> str:
    company_id = unique("c")
    assert cli.json("company", "add", "Company", "--id", company_id)["id"] == company_id
    return company_id


def new_user(cli: Cli, role: str = "admin", company_id: str | None = None) -> str:
    user_id = unique("u")
    company_id = company_id or new_company(cli)
    cli.json("user", "add", user_id, "--company", company_id, "--role", role)
    return user_id


def new_token(cli: Cli, user_id: str, *args: str) -> dict[str, Any]:
    created: dict[str, Any] = cli.json("token", "create", "--user", user_id, "--name", "t", *args)
    return created


def show(cli: Cli, token_id: str) -> dict[str, Any]:
    shown: dict[str, Any] = cli.json("token", "show", token_id)
    return shown


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


def about(text: str | None, delta: timedelta) -> bool:
    assert text is not None
    return abs(moment(text) - (datetime.now(UTC) + delta)) < SLACK


# ---------------------------------------------------------------------------------------------
# Companies and users


def test_company_add_derives_the_id_from_the_name(cli: Cli) -> None:
    company = cli.json("company", "add", "Acme Plumbing")
    assert company["id"] == "acme-plumbing"
    assert company["name"] == "Acme Plumbing"
    assert moment(company["created_at"]) <= datetime.now(UTC) + SLACK


def test_company_add_with_an_id_then_a_duplicate_fails_cleanly(cli: Cli) -> None:
    result = cli("company", "add", "X", "--id", "c1")
    assert result.returncode == 0, result.stderr
    assert "c1" in result.stdout

    line = cli.fails("company", "add", "Another", "--id", "c1")

    assert "c1" in line
    assert "already exists" in line
    rows = run_sql(cli.env["PATGATE_DATABASE_URL"], "SELECT name FROM companies WHERE id = 'c1'")
    assert [r["name"] for r in rows] == ["X"]


def test_user_add(cli: Cli) -> None:
    company_id = new_company(cli)
    user = cli.json(
        "user", "add", "u1", "--company", company_id, "--role", "admin", "--email", "a@x"
    )
    assert user["id"] == "u1"
    assert user["company_id"] == company_id
    assert user["role"] == "admin"
    assert user["status"] == "active"
    assert user["email"] == "a@x"


def test_user_add_with_an_unknown_role_names_the_known_ones(cli: Cli) -> None:
    company_id = new_company(cli)
    line = cli.fails("user", "add", unique("u"), "--company", company_id, "--role", "wizard")
    assert "wizard" in line
    for role in ROLES:
        assert role in line


def test_user_add_to_an_unknown_company_fails(cli: Cli) -> None:
    user_id = unique("u")
    line = cli.fails("user", "add", user_id, "--company", "no-such-company", "--role", "admin")
    assert "no-such-company" in line
    assert (
        run_sql(cli.env["PATGATE_DATABASE_URL"], "SELECT 1 FROM users WHERE id = $1", user_id) == []
    )


# ---------------------------------------------------------------------------------------------
# Creating tokens


def test_token_create_json(cli: Cli) -> None:
    user_id = new_user(cli, "admin")

    created = cli.json("token", "create", "--user", user_id, "--name", "CI")

    assert TOKEN.fullmatch(created["token"])
    assert uuid.UUID(created["id"])
    assert created["prefix"] == created["token"][:8]
    assert created["name"] == "CI"
    assert created["user_id"] == user_id
    assert created["created_by"] == "cli"
    assert created["state"] == "active"
    assert created["dropped_permissions"] == []
    assert about(created["expires_at"], timedelta(days=365))


def test_token_create_lifetimes(cli: Cli) -> None:
    user_id = new_user(cli, "full_user")

    assert about(new_token(cli, user_id, "--expires-in", "90d")["expires_at"], timedelta(days=90))
    at = new_token(cli, user_id, "--expires-at", "2031-01-01")["expires_at"]
    assert moment(at) == datetime(2031, 1, 1, tzinfo=UTC)
    never = new_token(cli, user_id, "--no-expiry")
    assert never["expires_at"] is None
    assert never["state"] == "active"


def test_token_scoped_to_a_smaller_role(cli: Cli) -> None:
    user_id = new_user(cli, "admin")

    created = new_token(cli, user_id, "--role", "field_user")

    assert created["role"] == "field_user"
    assert created["permissions"] == ["jobs:read"]
    assert created["dropped_permissions"] == []


def test_token_scoped_to_a_larger_role_is_stripped(cli: Cli) -> None:
    user_id = new_user(cli, "full_user")

    created = new_token(cli, user_id, "--role", "admin")

    assert {"tokens:admin", "users:admin"} <= set(created["dropped_permissions"])
    assert "tokens:admin" not in created["permissions"]
    assert "jobs:*" in created["permissions"]


def test_token_create_human_output_shows_the_token_once(cli: Cli) -> None:
    user_id = new_user(cli, "admin")

    result = cli("token", "create", "--user", user_id, "--name", "laptop")

    assert result.returncode == 0, result.stderr
    tokens = TOKEN.findall(result.stdout)
    assert len(tokens) == 1
    assert result.stdout.count(tokens[0]) == 1
    assert "will not be shown again" in result.stdout
    listed = cli.json("token", "list", "--user", user_id)
    assert [t["prefix"] for t in listed] == [tokens[0][:8]]


# ---------------------------------------------------------------------------------------------
# Listing and managing tokens


def test_token_list_filters_and_never_shows_secrets(cli: Cli) -> None:
    company_id = new_company(cli)
    alice, bob = new_user(cli, "admin", company_id), new_user(cli, "full_user", company_id)
    outsider = new_user(cli, "admin")
    a1, a2, b1, o1 = (new_token(cli, u) for u in (alice, alice, bob, outsider))
    cli.json("token", "revoke", a2["id"])

    result = cli("token", "list", "--json")
    everything = parse_json(result)
    by_user = cli.json("token", "list", "--user", alice)
    by_company = cli.json("token", "list", "--company", company_id)
    revoked = cli.json("token", "list", "--company", company_id, "--state", "revoked")
    active = cli.json("token", "list", "--company", company_id, "--state", "active")

    assert isinstance(everything, list)
    assert {a1["id"], a2["id"], b1["id"], o1["id"]} <= {t["id"] for t in everything}
    for item in everything:
        assert set(item) == TOKEN_FIELDS
    for created in (a1, a2, b1, o1):
        assert created["token"] not in result.stdout
    assert {t["id"] for t in by_user} == {a1["id"], a2["id"]}
    assert {t["id"] for t in by_company} == {a1["id"], a2["id"], b1["id"]}
    assert [t["id"] for t in revoked] == [a2["id"]]
    assert {t["id"] for t in active} == {a1["id"], b1["id"]}


def test_token_list_human_table_shows_prefixes_only(cli: Cli) -> None:
    user_id = new_user(cli, "admin")
    created = new_token(cli, user_id)

    result = cli("token", "list", "--user", user_id)

    assert result.returncode == 0, result.stderr
    assert created["prefix"] in result.stdout
    assert created["id"] in result.stdout
    assert created["token"] not in result.stdout
    assert created["token"][8:] not in result.stdout


def test_token_show_and_rename(cli: Cli) -> None:
    created = new_token(cli, new_user(cli))

    shown = show(cli, created["id"])
    renamed = cli.json("token", "rename", created["id"], "deploy bot")

    assert set(shown) == TOKEN_FIELDS
    assert shown["id"] == created["id"]
    assert shown["prefix"] == created["prefix"]
    assert renamed["name"] == "deploy bot"
    assert show(cli, created["id"])["name"] == "deploy bot"


def test_token_show_of_an_unknown_id_fails(cli: Cli) -> None:
    missing = str(uuid.uuid4())
    assert missing in cli.fails("token", "show", missing)


def test_refresh_reactivates_an_expired_token(cli: Cli) -> None:
    user_id = new_user(cli)
    created = new_token(cli, user_id, "--expires-in", "1d")
    run_sql(
        cli.env["PATGATE_DATABASE_URL"],
        "UPDATE tokens SET expires_at = now() - interval '1 hour' WHERE id = $1",
        uuid.UUID(created["id"]),
    )
    assert show(cli, created["id"])["state"] == "expired"
    expired = cli.json("token", "list", "--user", user_id, "--state", "expired")
    assert [t["id"] for t in expired] == [created["id"]]

    refreshed = cli.json("token", "refresh", created["id"])

    assert refreshed["state"] == "active"
    assert about(refreshed["expires_at"], timedelta(days=365))
    assert show(cli, created["id"])["state"] == "active"


def test_revoke_then_refresh_fails(cli: Cli) -> None:
    created = new_token(cli, new_user(cli))

    revoked = cli.json("token", "revoke", created["id"])

    assert revoked["state"] == "revoked"
    assert revoked["revoked_reason"] == "admin"
    assert revoked["revoked_at"] is not None
    line = cli.fails("token", "refresh", created["id"])
    assert "revoked" in line
    assert show(cli, created["id"])["state"] == "revoked"


def test_rotate_replaces_a_token_and_reuse_revokes_the_chain(cli: Cli) -> None:
    user_id = new_user(cli, "admin")
    old = new_token(cli, user_id, "--expires-in", "30d")

    rotated = cli.json("token", "rotate", old["id"])
    before = show(cli, old["id"])
    reused = cli.fails("token", "rotate", old["id"])  # the old secret is in someone's hands

    assert TOKEN.fullmatch(rotated["token"])
    assert rotated["token"] != old["token"]
    assert rotated["id"] != old["id"]
    assert rotated["name"] == old["name"]
    assert about(rotated["expires_at"], timedelta(days=30))
    assert before["state"] == "revoked"
    assert before["revoked_reason"] == "rotated"
    assert before["rotated_to"] == rotated["id"]
    assert old["token"] not in reused
    successor = show(cli, rotated["id"])
    assert successor["state"] == "revoked"
    assert successor["revoked_reason"] == "leaked"


def test_tokens_cannot_be_created_for_a_deactivated_user_or_in_the_past(cli: Cli) -> None:
    active, gone = new_user(cli), new_user(cli)
    cli.json("user", "deactivate", gone)

    assert gone in cli.fails("token", "create", "--user", gone, "--name", "x")
    cli.fails("token", "create", "--user", active, "--name", "x", "--expires-at", "2020-01-01")
    assert "wizard" in cli.fails("user", "set-role", active, "wizard")
    assert cli.json("token", "list", "--user", gone) == []
    assert cli.json("token", "list", "--user", active) == []


def test_deactivating_a_user_revokes_their_tokens_for_good(cli: Cli) -> None:
    user_id = new_user(cli, "admin")
    first, second, earlier = (new_token(cli, user_id) for _ in range(3))
    cli.json("token", "revoke", earlier["id"])

    deactivated = cli.json("user", "deactivate", user_id)
    reasons = {t["id"]: t["revoked_reason"] for t in cli.json("token", "list", "--user", user_id)}
    activated = cli.json("user", "activate", user_id)
    after = cli.json("token", "list", "--user", user_id)

    assert deactivated["status"] == "deactivated"
    assert reasons == {
        first["id"]: "owner_deactivated",
        second["id"]: "owner_deactivated",
        earlier["id"]: "admin",
    }
    assert activated["status"] == "active"
    assert {t["state"] for t in after} == {"revoked"}


def test_downgrading_a_user_revokes_their_tokens(cli: Cli) -> None:
    company_id = new_company(cli)
    u2 = new_user(cli, "full_user", company_id)
    promoted = new_user(cli, "full_user", company_id)
    token, kept = new_token(cli, u2), new_token(cli, promoted)

    changed = cli.json("user", "set-role", u2, "field_user")
    cli.json("user", "set-role", promoted, "admin")

    assert changed["role"] == "field_user"
    downgraded = show(cli, token["id"])
    assert downgraded["state"] == "revoked"
    assert downgraded["revoked_reason"] == "owner_downgraded"
    still = show(cli, kept["id"])
    assert still["state"] == "active"
    assert "tokens:admin" in still["permissions"]  # the owner's current role counts


def test_every_change_is_an_audit_event_by_cli(cli: Cli) -> None:
    created = new_token(cli, new_user(cli))
    cli.json("token", "rename", created["id"], "renamed")
    cli.json("token", "refresh", created["id"])
    cli.json("token", "revoke", created["id"])

    rows = run_sql(
        cli.env["PATGATE_DATABASE_URL"],
        "SELECT event, actor, detail::text AS detail FROM token_events WHERE token_id = $1"
        " ORDER BY id",
        uuid.UUID(created["id"]),
    )

    assert [r["event"] for r in rows] == ["created", "renamed", "refreshed", "revoked"]
    assert {r["actor"] for r in rows} == {"cli"}
    assert not any(created["token"] in r["detail"] for r in rows)


def test_json_before_the_subcommand(cli: Cli) -> None:
    user_id = new_user(cli)
    created = new_token(cli, user_id)

    listed = parse_json(cli("--json", "token", "list", "--user", user_id))

    assert [t["id"] for t in listed] == [created["id"]]


@pytest.mark.parametrize(
    "args",
    [
        ["token", "create", "--name", "no owner"],
        ["frobnicate"],
        ["token"],
        ["token", "create", "--user", "u", "--name", "n", "--expires-in", "soon"],
        ["token", "create", "--user", "u", "--name", "n", "--no-expiry", "--expires-in", "9d"],
        ["token", "list", "--state", "sleeping"],
    ],
)
def test_usage_errors_exit_2(cli: Cli, args: list[str]) -> None:
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert "usage: patgate" in result.stderr
    no_traceback(result)


def test_an_unreachable_database_is_one_error_line_without_the_password(
    workspace: Path, unused_tcp_port: int
) -> None:
    url = f"postgresql://patgate:s3cret-pw@127.0.0.1:{unused_tcp_port}/patgate"
    down = Cli(workspace, clean_env(PATGATE_DATABASE_URL=url))

    for args in (["token", "list"], ["migrate"]):
        line = down.fails(*args)
        assert "postgres" in line.lower()
        assert "s3cret-pw" not in line


# ---------------------------------------------------------------------------------------------
# Migrations


@pytest.fixture
async def empty_database(postgres_url: str) -> AsyncIterator[str]:
    async with fresh_database(postgres_url) as url:
        yield url


def test_migrate_on_a_migrated_database_applies_nothing(cli: Cli) -> None:
    assert cli.json("migrate") == {"applied": []}
    result = cli("migrate")
    assert result.returncode == 0, result.stderr
    assert "001_init" not in result.stdout  # nothing applied


def test_migrate_a_new_database(workspace: Path, empty_database: str) -> None:
    fresh = Cli(workspace, clean_env(PATGATE_DATABASE_URL=empty_database))

    refused = fresh.fails("token", "list")
    applied = fresh.json("migrate")
    listed = fresh.json("token", "list")

    assert "patgate migrate" in refused
    assert "001_init" in MIGRATIONS
    assert applied == {"applied": MIGRATIONS}
    assert listed == []
    assert fresh.json("migrate") == {"applied": []}


# ---------------------------------------------------------------------------------------------
# What the database keeps


def test_pg_dump_holds_no_plaintext_token(cli: Cli, database_url: str) -> None:
    user_id = new_user(cli, "admin")
    created = [new_token(cli, user_id, *extra) for extra in ([], ["--role", "field_user"], [])]

    dump = subprocess.run(
        [pg_dump_binary(), "--dbname", database_url, "--no-owner"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert dump.returncode == 0, dump.stderr
    for token in created:
        plaintext = token["token"]
        assert plaintext not in dump.stdout
        assert plaintext[4:36] not in dump.stdout  # the random body alone
        assert token["prefix"] in dump.stdout  # the rows are in the dump
        assert token["id"] in dump.stdout
