"""Every behaviour the four seed help pages describe (Fergus, Factbird, fDeploy and the
PAT/roles page), end to end: session JWTs against the management API at /_patgate/api/v1 of
the real gateway app, and the proxy routes for "the token works" / "the token is refused"."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import asyncpg
import jwt
import pytest
from aiohttp.test_utils import TestClient

from gateway.app import POOL, USAGE
from gateway.config import Config
from gateway.management import api as management_api
from tests.conftest import ROLES, GatewayFactory, RecordingUpstream, Seeder, bearer, gateway_config

SECRET = "x" * 40
API = "/_patgate/api/v1"
JOBS = "/api/jobs/1"
DAY = timedelta(days=1)
YEAR = timedelta(days=365)
FULL_USER_PERMISSIONS = "invoices:read jobs:* tokens:create"


def config(
    upstream_url: str,
    *,
    tokens: dict[str, Any] | None = None,
    allow_pat: bool = False,
    require_mfa_for_create: bool = True,
    **overrides: Any,
) -> Config:
    """The gateway's test routes plus a management API that accepts HS256 sessions."""
    sessions = {"hs256_secret": SECRET, "require_mfa_for_create": require_mfa_for_create}
    return gateway_config(
        upstream_url,
        tokens=tokens or {},
        management={"allow_pat": allow_pat, "sessions": sessions},
        **overrides,
    )


def session_jwt(user_id: str, *, mfa: bool = True, expires_in: float = 600) -> str:
    claims: dict[str, Any] = {"sub": user_id, "exp": int(time.time() + expires_in)}
    if mfa:
        claims["amr"] = ["mfa"]
    return jwt.encode(claims, SECRET, algorithm="HS256")


@dataclass
class Answer:
    status: int
    body: Any
    headers: Any

    @property
    def problem_type(self) -> str:
        assert self.headers["Content-Type"] == "application/problem+json"
        kind: str = self.body["type"]
        return kind


class Gateway:
    """The real gateway app as the tests use it: the management API as one signed-in user
    (a session JWT with amr=["mfa"] unless told otherwise), and the proxy with a PAT."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client

    async def call(
        self,
        method: str,
        path: str,
        user: str | None,
        body: Any = None,
        *,
        mfa: bool = True,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sent = {**(bearer(session_jwt(user, mfa=mfa)) if user else {}), **(headers or {})}
        response = await self.client.request(method, API + path, json=body, headers=sent)
        data = await response.json(content_type=None)
        return Answer(response.status, data, response.headers)

    async def create(self, user: str, **body: Any) -> dict[str, Any]:
        """POST /tokens that must succeed: the flat create answer (with `token`)."""
        body.setdefault("name", "integration")
        answer = await self.call("POST", "/tokens", user, body)
        assert answer.status == 201, answer.body
        created: dict[str, Any] = answer.body
        return created

    async def token(self, user: str, token_id: str) -> dict[str, Any]:
        answer = await self.call("GET", f"/tokens/{token_id}", user)
        assert answer.status == 200, answer.body
        data: dict[str, Any] = answer.body
        return data

    async def items(self, user: str, query: str = "") -> list[dict[str, Any]]:
        answer = await self.call("GET", f"/tokens{query}", user)
        assert answer.status == 200, answer.body
        items: list[dict[str, Any]] = answer.body["items"]
        return items

    async def proxy(self, token: str, method: str = "GET", path: str = JOBS) -> int:
        response = await self.client.request(method, path, headers=bearer(token))
        await response.read()
        return response.status


@dataclass
class Team:
    """One company and one user of each role of the test config."""

    company: str
    owner: str
    admin: str
    full: str
    field: str


@pytest.fixture
async def seed(db: asyncpg.Connection, upstream: RecordingUpstream) -> Seeder:
    return Seeder(gateway_config(upstream.url), db)


async def new_team(seed: Seeder) -> Team:
    company = await seed.company()
    users = [
        await seed.user(company, role) for role in ("owner", "admin", "full_user", "field_user")
    ]
    return Team(company, *users)


@pytest.fixture
async def team(seed: Seeder) -> Team:
    return await new_team(seed)


@pytest.fixture
def start(make_gateway: GatewayFactory, upstream: RecordingUpstream) -> Any:
    """start(tokens={...}, **management or gateway overrides) → a running Gateway."""

    async def run(**kwargs: Any) -> Gateway:
        return Gateway(await make_gateway(config(upstream.url, **kwargs)))

    return run


def moment(text: str | None) -> datetime:
    assert text is not None
    assert text.endswith("Z")
    return datetime.fromisoformat(text)


# ---------------------------------------------------------------------------------------------
# Fergus


async def test_fergus_one_active_token_per_user(start: Any, team: Team) -> None:
    gw = await start(tokens={"max_active_per_user": 1})
    first = await gw.create(team.full, name="crm")

    second = await gw.call("POST", "/tokens", team.full, {"name": "zapier"})
    assert second.status == 409
    assert second.problem_type == "urn:patgate:error:conflict"
    assert second.body["detail"].startswith("A token is already created for this user")
    # "different eligible users can each generate their own token"
    await gw.create(team.admin, name="zapier")

    assert (await gw.call("DELETE", f"/tokens/{first['id']}", team.full)).status == 200
    replacement = await gw.create(team.full, name="zapier")
    assert replacement["id"] != first["id"]
    active = await gw.items(team.full, "?state=active")
    assert [t["id"] for t in active] == [replacement["id"]]


async def test_fergus_refresh_cannot_exceed_one_active_token(
    start: Any, team: Team, db: asyncpg.Connection
) -> None:
    gw = await start(tokens={"max_active_per_user": 1})
    old = await gw.create(team.full, name="old")
    await db.execute(
        "UPDATE tokens SET expires_at = now() - interval '1 day' WHERE id = $1::uuid", old["id"]
    )
    await gw.create(team.full, name="new")  # the expired one does not count

    refreshed = await gw.call("POST", f"/tokens/{old['id']}/refresh", team.full)

    assert len(await gw.items(team.full, "?state=active")) <= 1
    assert refreshed.status == 409


async def test_fergus_token_shown_once(start: Any, team: Team, db: asyncpg.Connection) -> None:
    gw = await start()
    created = await gw.create(team.full, name="crm")
    plaintext = created["token"]
    assert plaintext.startswith("pat_")
    assert created["prefix"] == plaintext[:8]

    one = await gw.call("GET", f"/tokens/{created['id']}", team.full)
    listed = await gw.call("GET", "/tokens", team.full)
    for answer in (one, listed):
        assert answer.status == 200
        assert plaintext not in str(answer.body)
        assert plaintext[8:] not in str(answer.body)
    assert "token" not in one.body
    assert "token" not in listed.body["items"][0]
    assert listed.body["items"][0]["id"] == created["id"]

    body = plaintext[4:-6]
    for table in ("tokens", "token_events", "users", "companies"):
        dump = "\n".join(r[0] for r in await db.fetch(f"SELECT x::text FROM {table} x"))  # noqa: S608
        assert body[4:] not in dump, table
    stored = await db.fetchval("SELECT hash FROM tokens WHERE id = $1::uuid", created["id"])
    assert stored == hashlib.sha256(plaintext.encode()).digest()  # fDeploy: SHA-256 digest


async def test_fergus_rename_refresh_delete_from_the_menu(
    start: Any, team: Team, db: asyncpg.Connection
) -> None:
    gw = await start()
    created = await gw.create(team.full, name="crm")
    token_id, plaintext = created["id"], created["token"]
    await db.execute(
        "UPDATE tokens SET expires_at = now() + interval '10 days' WHERE id = $1::uuid", token_id
    )

    renamed = await gw.call("PATCH", f"/tokens/{token_id}", team.full, {"name": "  reports  "})
    assert renamed.status == 200
    assert renamed.body["name"] == "reports"
    assert (await gw.token(team.full, token_id))["name"] == "reports"

    warm = await gw.client.get(JOBS, headers=bearer(plaintext))  # cached with the old expiry
    assert moment(warm.headers["X-Auth-Token-Expires-At"]) < datetime.now(UTC) + 11 * DAY

    before = datetime.now(UTC)
    refreshed = await gw.call("POST", f"/tokens/{token_id}/refresh", team.full)
    after = datetime.now(UTC)
    assert refreshed.status == 200
    expires = moment(refreshed.body["expires_at"])
    assert before + YEAR - timedelta(seconds=1) <= expires <= after + YEAR
    response = await gw.client.get(JOBS, headers=bearer(plaintext))
    assert response.status == 200
    assert moment(response.headers["X-Auth-Token-Expires-At"]) == expires

    deleted = await gw.call("DELETE", f"/tokens/{token_id}", team.full)
    assert deleted.status == 200
    assert deleted.body["state"] == "revoked"
    assert deleted.body["revoked_reason"] == "user"
    assert (await gw.token(team.full, token_id))["state"] == "revoked"  # soft: the row stays
    assert await gw.proxy(plaintext) == 401


async def test_fergus_refresh_reactivates_expired(
    start: Any, team: Team, db: asyncpg.Connection
) -> None:
    gw = await start()
    created = await gw.create(team.full)
    await db.execute(
        "UPDATE tokens SET expires_at = now() - interval '1 second' WHERE id = $1::uuid",
        created["id"],
    )
    assert (await gw.token(team.full, created["id"]))["state"] == "expired"
    assert await gw.proxy(created["token"]) == 401  # also remembered by the negative cache

    refreshed = await gw.call("POST", f"/tokens/{created['id']}/refresh", team.full)

    assert refreshed.status == 200
    assert refreshed.body["state"] == "active"
    assert moment(refreshed.body["expires_at"]) > datetime.now(UTC) + YEAR - DAY
    assert await gw.proxy(created["token"]) == 200


async def test_fergus_only_admin_and_full_user_generate(start: Any, team: Team) -> None:
    gw = await start()

    refused = await gw.call("POST", "/tokens", team.field, {"name": "mine"})
    assert refused.status == 403
    assert refused.problem_type == "urn:patgate:error:insufficient_scope"
    assert await gw.items(team.field) == []

    for user in (team.full, team.admin):
        created = await gw.create(user, name="mine")
        assert created["user_id"] == user
        assert created["created_by"] == user


async def test_fergus_token_uses_user_permissions(
    start: Any, team: Team, upstream: RecordingUpstream
) -> None:
    gw = await start()
    full = await gw.create(team.full)
    field = await gw.create(team.admin, user_id=team.field)

    assert await gw.proxy(full["token"], "POST", "/api/jobs") == 200
    got = upstream.last
    assert got.header("X-Auth-User-Id") == team.full  # actions are attributed to the user
    assert got.header("X-Auth-Company-Id") == team.company
    assert got.header("X-Auth-Token-Id") == full["id"]
    assert got.header("X-Auth-Role") == "full_user"
    assert got.header("X-Auth-Permissions") == FULL_USER_PERMISSIONS
    assert full["permissions"] == FULL_USER_PERMISSIONS.split()

    assert await gw.proxy(field["token"]) == 200
    assert upstream.last.header("X-Auth-Permissions") == "jobs:read"
    assert await gw.proxy(field["token"], "POST", "/api/jobs") == 403
    assert await gw.proxy(field["token"], "GET", "/api/invoices/1") == 403


async def test_fergus_missing_or_invalid_authorization_is_401(start: Any, team: Team) -> None:
    gw = await start()
    created = await gw.create(team.full)

    missing = await gw.client.get(JOBS)
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="patgate"'
    token = created["token"]
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert await gw.proxy(tampered) == 401  # the checksum no longer matches
    assert await gw.proxy("definitely-not-a-token") == 401
    assert await gw.proxy(created["token"]) == 200


async def test_fergus_company_specific(
    start: Any, team: Team, seed: Seeder, upstream: RecordingUpstream
) -> None:
    other = await new_team(seed)
    gw = await start()
    mine = await gw.create(team.admin)
    theirs = await gw.create(other.admin)
    their_user = await gw.create(other.admin, user_id=other.full)

    for method, suffix, body in [
        ("GET", "", None),
        ("PATCH", "", {"name": "stolen"}),
        ("POST", "/refresh", None),
        ("POST", "/rotate", None),
        ("GET", "/events", None),
        ("DELETE", "", None),
    ]:
        answer = await gw.call(method, f"/tokens/{theirs['id']}{suffix}", team.admin, body)
        assert answer.status == 404, (method, suffix)
        assert answer.problem_type == "urn:patgate:error:not_found"
    crossing = await gw.call("POST", "/tokens", team.admin, {"name": "x", "user_id": other.full})
    assert crossing.status == 404

    everything = await gw.items(team.admin, "?all=true")
    assert [t["id"] for t in everything] == [mine["id"]]
    assert {t["company_id"] for t in everything} == {team.company}
    assert await gw.items(team.admin, f"?user={other.full}") == []

    theirs_now = await gw.token(other.admin, theirs["id"])
    assert theirs_now["state"] == "active"
    assert theirs_now["name"] == "integration"
    assert await gw.proxy(theirs["token"]) == 200
    assert upstream.last.header("X-Auth-Company-Id") == other.company
    assert await gw.proxy(their_user["token"]) == 200
    assert await gw.proxy(mine["token"]) == 200
    assert upstream.last.header("X-Auth-Company-Id") == team.company


async def test_owner_removed_disables_token(start: Any, team: Team) -> None:
    gw = await start()
    created = await gw.create(team.full)
    assert await gw.proxy(created["token"]) == 200  # cached from here on

    removed = await gw.call("PATCH", f"/users/{team.full}", team.admin, {"status": "deactivated"})

    assert removed.status == 200
    assert removed.body["status"] == "deactivated"
    assert await gw.proxy(created["token"]) == 401  # at once, in this process
    data = await gw.token(team.admin, created["id"])
    assert data["state"] == "revoked"
    assert data["revoked_reason"] == "owner_deactivated"
    signed_out = await gw.call("GET", "/tokens", team.full)
    assert signed_out.status == 401  # the removed user's session is refused too

    back = await gw.call("PATCH", f"/users/{team.full}", team.admin, {"status": "active"})
    assert back.status == 200
    assert (await gw.token(team.admin, created["id"]))["revoked_reason"] == "owner_deactivated"
    assert await gw.proxy(created["token"]) == 401


async def test_owner_downgraded_disables_token(
    start: Any, team: Team, seed: Seeder, upstream: RecordingUpstream
) -> None:
    gw = await start()
    created = await gw.create(team.full)
    assert await gw.proxy(created["token"]) == 200

    changed = await gw.call("PATCH", f"/users/{team.full}", team.admin, {"role": "field_user"})

    assert changed.status == 200
    assert changed.body["role"] == "field_user"
    assert await gw.proxy(created["token"]) == 401
    data = await gw.token(team.admin, created["id"])
    assert data["state"] == "revoked"
    assert data["revoked_reason"] == "owner_downgraded"

    other = await new_team(seed)
    kept = await start(tokens={"revoke_on_downgrade": False})
    token = (await kept.create(other.full))["token"]
    assert await kept.proxy(token) == 200
    assert upstream.last.header("X-Auth-Permissions") == FULL_USER_PERMISSIONS

    changed = await kept.call("PATCH", f"/users/{other.full}", other.admin, {"role": "field_user"})

    assert changed.status == 200
    assert await kept.proxy(token) == 200  # still works, with what the owner has now
    assert upstream.last.header("X-Auth-Permissions") == "jobs:read"
    assert upstream.last.header("X-Auth-Role") == "field_user"
    assert await kept.proxy(token, "POST", "/api/jobs") == 403


# ---------------------------------------------------------------------------------------------
# Factbird


async def test_factbird_admin_creates_token_for_user_without_expiry(
    start: Any, team: Team, upstream: RecordingUpstream
) -> None:
    gw = await start()

    created = await gw.create(team.admin, name="line 4", user_id=team.field, no_expiry=True)

    assert created["expires_at"] is None
    assert created["user_id"] == team.field
    assert created["created_by"] == team.admin
    assert created["state"] == "active"
    response = await gw.client.get(JOBS, headers=bearer(created["token"]))
    assert response.status == 200
    assert "X-Auth-Token-Expires-At" not in response.headers
    assert upstream.last.header("X-Auth-User-Id") == team.field
    assert created["id"] in [t["id"] for t in await gw.items(team.admin, "?all=true")]
    assert [t["id"] for t in await gw.items(team.field)] == [created["id"]]
    # only an administrator picks the owner
    denied = await gw.call("POST", "/tokens", team.full, {"name": "x", "user_id": team.field})
    assert denied.status == 403


async def test_factbird_admin_picks_expiry_date(start: Any, team: Team) -> None:
    gw = await start()
    chosen = (datetime.now(UTC) + 30 * DAY).replace(microsecond=0)

    created = await gw.create(team.admin, user_id=team.full, expires_at=chosen.isoformat())

    assert moment(created["expires_at"]) == chosen
    assert moment((await gw.token(team.admin, created["id"]))["expires_at"]) == chosen
    response = await gw.client.get(JOBS, headers=bearer(created["token"]))
    assert moment(response.headers["X-Auth-Token-Expires-At"]) == chosen

    past = (datetime.now(UTC) - DAY).isoformat()
    refused = await gw.call("POST", "/tokens", team.admin, {"name": "x", "expires_at": past})
    assert refused.status == 422
    assert refused.problem_type == "urn:patgate:error:invalid_input"
    garbage = await gw.call("POST", "/tokens", team.admin, {"name": "x", "expires_at": "soon"})
    assert garbage.status == 422
    assert len(await gw.items(team.admin, "?all=true")) == 1


# ---------------------------------------------------------------------------------------------
# fDeploy


async def test_fdeploy_list_shows_prefix_status_last_used_ip(start: Any, team: Team) -> None:
    gw = await start()
    before = datetime.now(UTC)
    created = await gw.create(team.full, name="deploy", expires_in_days=30)
    [listed] = await gw.items(team.full)
    assert listed["last_used_at"] is None
    assert listed["last_used_ip"] is None

    assert await gw.proxy(created["token"]) == 200
    await gw.client.app[USAGE].flush(gw.client.app[POOL])
    after = datetime.now(UTC)

    [listed] = await gw.items(team.full)
    assert listed["name"] == "deploy"
    assert listed["prefix"] == created["token"][:8]
    assert listed["state"] == "active"
    assert before <= moment(listed["created_at"]) <= after
    assert moment(listed["expires_at"]) == moment(created["expires_at"])
    assert before <= moment(listed["last_used_at"]) <= after
    assert listed["last_used_ip"] == "127.0.0.1"


async def test_fdeploy_token_without_expiry_stays_valid(
    start: Any, team: Team, db: asyncpg.Connection
) -> None:
    gw = await start()
    created = await gw.create(team.full, no_expiry=True)
    await db.execute(  # ten years old and still valid: only a revocation ends it
        "UPDATE tokens SET created_at = now() - interval '10 years' WHERE id = $1::uuid",
        created["id"],
    )

    assert await gw.proxy(created["token"]) == 200
    data = await gw.token(team.full, created["id"])
    assert data["expires_at"] is None
    assert data["state"] == "active"
    assert [t["id"] for t in await gw.items(team.full, "?state=active")] == [created["id"]]

    await gw.call("DELETE", f"/tokens/{created['id']}", team.full)
    assert await gw.proxy(created["token"]) == 401


async def test_fdeploy_custom_prefix(start: Any, team: Team) -> None:
    gw = await start(tokens={"prefix": "fdp_"})
    created = await gw.create(team.full)
    assert created["token"].startswith("fdp_")
    assert created["prefix"] == created["token"][:8]
    assert await gw.proxy(created["token"]) == 200


async def test_fdeploy_admin_sees_all_users_tokens(start: Any, team: Team, seed: Seeder) -> None:
    other = await new_team(seed)
    gw = await start()
    admin_token = await gw.create(team.admin)
    full_token = await gw.create(team.full)
    field_token = await gw.create(team.admin, user_id=team.field)
    await gw.create(other.admin)

    everyone = await gw.items(team.admin, "?all=true")
    assert {t["id"] for t in everyone} == {admin_token["id"], full_token["id"], field_token["id"]}
    assert {t["user_id"] for t in everyone} == {team.admin, team.full, team.field}
    assert [t["id"] for t in await gw.items(team.admin)] == [admin_token["id"]]
    assert [t["id"] for t in await gw.items(team.admin, f"?user={team.full}")] == [full_token["id"]]

    refused = await gw.call("GET", "/tokens?all=true", team.full)
    assert refused.status == 403
    assert (await gw.call("GET", f"/tokens?user={team.admin}", team.full)).status == 403
    assert [t["id"] for t in await gw.items(team.full)] == [full_token["id"]]
    assert [t["id"] for t in await gw.items(team.full, f"?user={team.full}")] == [full_token["id"]]
    hidden = await gw.call("GET", f"/tokens/{admin_token['id']}", team.full)
    assert hidden.status == 404


async def test_fdeploy_admin_revokes_any_users_token(start: Any, team: Team) -> None:
    gw = await start()
    by_admin = await gw.create(team.full, name="one")
    by_user = await gw.create(team.full, name="two")
    assert await gw.proxy(by_admin["token"]) == 200

    # a user cannot revoke a colleague's token
    other = await gw.call("DELETE", f"/tokens/{by_admin['id']}", team.field)
    assert other.status == 404
    revoked = await gw.call("DELETE", f"/tokens/{by_admin['id']}", team.admin)
    assert revoked.status == 200
    assert revoked.body["state"] == "revoked"
    assert revoked.body["revoked_reason"] == "admin"
    own = await gw.call("DELETE", f"/tokens/{by_user['id']}", team.full)
    assert own.body["revoked_reason"] == "user"

    for token in (by_admin, by_user):
        assert await gw.proxy(token["token"]) == 401
        refresh = await gw.call("POST", f"/tokens/{token['id']}/refresh", team.admin)
        assert refresh.status == 409
        assert refresh.problem_type == "urn:patgate:error:conflict"
        assert (await gw.token(team.full, token["id"]))["state"] == "revoked"
    again = await gw.call("DELETE", f"/tokens/{by_admin['id']}", team.admin)
    assert again.body["revoked_reason"] == "admin"  # revoking twice changes nothing


async def test_fdeploy_states_active_expired_revoked(
    start: Any, team: Team, db: asyncpg.Connection
) -> None:
    gw = await start()
    active = await gw.create(team.full, name="active")
    expired = await gw.create(team.full, name="expired")
    revoked = await gw.create(team.full, name="revoked")
    await db.execute(
        "UPDATE tokens SET expires_at = now() - interval '1 second' WHERE id = $1::uuid",
        expired["id"],
    )
    await gw.call("DELETE", f"/tokens/{revoked['id']}", team.full)

    for state, token in [("active", active), ("expired", expired), ("revoked", revoked)]:
        items = await gw.items(team.full, f"?state={state}")
        assert [(t["id"], t["state"]) for t in items] == [(token["id"], state)]
    assert {t["state"] for t in await gw.items(team.full)} == {"active", "expired", "revoked"}
    assert await gw.proxy(active["token"]) == 200
    assert await gw.proxy(expired["token"]) == 401
    assert await gw.proxy(revoked["token"]) == 401
    bogus = await gw.call("GET", "/tokens?state=sleeping", team.full)
    assert bogus.status == 422


# ---------------------------------------------------------------------------------------------
# PATs and roles (seed 003)


async def test_pat_role_never_exceeds_creator(
    start: Any, team: Team, upstream: RecordingUpstream
) -> None:
    gw = await start()
    full_user = set(ROLES["full_user"])

    owner_role = await gw.create(team.full, role="owner")
    assert owner_role["role"] == "owner"
    assert owner_role["dropped_permissions"] == ["*"]
    assert set(owner_role["permissions"]) <= full_user

    admin_role = await gw.create(team.full, role="admin")
    assert admin_role["dropped_permissions"] == ["invoices:*", "tokens:admin", "users:admin"]
    assert set(admin_role["permissions"]) <= full_user
    assert await gw.proxy(admin_role["token"], "GET", "/api/invoices/1") == 200
    assert upstream.last.header("X-Auth-Permissions") == FULL_USER_PERMISSIONS

    narrow = await gw.create(team.full, role="field_user")
    assert narrow["dropped_permissions"] == []
    assert narrow["permissions"] == ["jobs:read"]

    # an admin making a token for a field user: never more than the owner has either
    for_field = await gw.create(team.admin, user_id=team.field, role="admin")
    assert for_field["permissions"] == ["jobs:read"]
    assert "jobs:*" in for_field["dropped_permissions"]

    strict = await start(tokens={"on_excess_role": "refuse"})
    refused = await strict.call("POST", "/tokens", team.admin, {"name": "x", "role": "owner"})
    assert refused.status == 403
    assert "*" in refused.body["detail"]
    refused = await strict.call("POST", "/tokens", team.full, {"name": "x", "role": "admin"})
    assert refused.status == 403
    for permission in ("invoices:*", "tokens:admin", "users:admin"):
        assert permission in refused.body["detail"]
    assert "jobs:*" not in refused.body["detail"]
    assert len(await strict.items(team.full)) == 3  # nothing was created by the refusals


async def test_pat_role_limits_scope(start: Any, team: Team, upstream: RecordingUpstream) -> None:
    gw = await start()
    created = await gw.create(team.admin, role="field_user")

    assert await gw.proxy(created["token"]) == 200
    assert upstream.last.header("X-Auth-Role") == "field_user"
    assert upstream.last.header("X-Auth-Permissions") == "jobs:read"
    assert await gw.proxy(created["token"], "POST", "/api/jobs") == 403
    assert await gw.proxy(created["token"], "GET", "/api/invoices/1") == 403
    assert [r.method for r in upstream.received] == ["GET"]


async def test_pat_without_expiry_by_default_when_default_ttl_is_null(
    start: Any, team: Team
) -> None:
    gw = await start(tokens={"default_ttl": None})
    created = await gw.create(team.full)
    assert created["expires_at"] is None
    assert await gw.proxy(created["token"]) == 200


async def test_create_requires_mfa_session(start: Any, team: Team) -> None:
    gw = await start()

    refused = await gw.call("POST", "/tokens", team.full, {"name": "x"}, mfa=False)
    assert refused.status == 403
    assert refused.problem_type == "urn:patgate:error:mfa_required"
    assert await gw.items(team.full) == []
    created = await gw.create(team.full)
    rotate = await gw.call("POST", f"/tokens/{created['id']}/rotate", team.full, mfa=False)
    assert rotate.status == 403
    assert rotate.problem_type == "urn:patgate:error:mfa_required"
    # reading and revoking need no second factor
    assert (await gw.call("GET", "/tokens", team.full, mfa=False)).status == 200

    relaxed = await start(require_mfa_for_create=False)
    answer = await relaxed.call("POST", "/tokens", team.admin, {"name": "x"}, mfa=False)
    assert answer.status == 201


async def test_session_for_unknown_or_deactivated_user_is_401(
    start: Any, team: Team, db: asyncpg.Connection
) -> None:
    gw = await start()

    unknown = await gw.call("GET", "/tokens", "u-nobody")
    assert unknown.status == 401
    assert unknown.problem_type == "urn:patgate:error:unauthorized"

    await db.execute("UPDATE users SET status = 'deactivated' WHERE id = $1", team.full)
    deactivated = await gw.call("POST", "/tokens", team.full, {"name": "x"})
    assert deactivated.status == 401

    forged = jwt.encode(
        {"sub": team.admin, "exp": int(time.time()) + 600, "amr": ["mfa"]},
        "y" * 40,
        algorithm="HS256",
    )
    response = await gw.client.get(f"{API}/tokens", headers=bearer(forged))
    assert response.status == 401
    assert (await gw.client.get(f"{API}/tokens")).status == 401
    assert (await gw.call("GET", "/tokens", team.admin)).status == 200


async def test_expired_session_is_401(start: Any, team: Team) -> None:
    gw = await start()
    stale = session_jwt(team.admin, expires_in=-120)  # past the 30 s leeway
    response = await gw.client.get(f"{API}/tokens", headers=bearer(stale))
    assert response.status == 401
    assert response.headers["Content-Type"] == "application/problem+json"
    fresh = await gw.client.get(f"{API}/tokens", headers=bearer(session_jwt(team.admin)))
    assert fresh.status == 200


async def test_pat_cannot_manage_unless_allowed(start: Any, team: Team) -> None:
    closed = await start()
    admin_pat = (await closed.create(team.admin))["token"]
    field_pat = (await closed.create(team.admin, user_id=team.field))["token"]

    refused = await closed.client.get(f"{API}/tokens", headers=bearer(admin_pat))
    assert refused.status == 403

    open_ = await start(allow_pat=True)
    allowed = await open_.client.get(f"{API}/tokens", headers=bearer(admin_pat))
    assert allowed.status == 200
    assert {t["user_id"] for t in (await allowed.json())["items"]} == {team.admin}
    no_tokens_permission = await open_.client.get(f"{API}/tokens", headers=bearer(field_pat))
    assert no_tokens_permission.status == 403
    # seed 003: a previously created PAT may authorise creating a PAT
    created = await open_.client.post(
        f"{API}/tokens", json={"name": "from a pat"}, headers=bearer(admin_pat)
    )
    assert created.status == 201
    assert (await created.json())["created_by"] == team.admin


async def test_rotate_issues_new_token_and_revokes_old(start: Any, team: Team) -> None:
    gw = await start()
    old = await gw.create(team.full, name="ci", role="field_user", expires_in_days=30)
    assert await gw.proxy(old["token"]) == 200

    rotated = await gw.call("POST", f"/tokens/{old['id']}/rotate", team.full)

    assert rotated.status == 201
    new = rotated.body
    assert new["token"] != old["token"]
    assert new["id"] != old["id"]
    assert (new["name"], new["role"], new["permissions"]) == ("ci", "field_user", ["jobs:read"])
    lifetime = moment(new["expires_at"]) - moment(new["created_at"])
    assert abs(lifetime - 30 * DAY) < timedelta(seconds=5)
    before = await gw.token(team.full, old["id"])
    assert before["state"] == "revoked"
    assert before["revoked_reason"] == "rotated"
    assert before["rotated_to"] == new["id"]
    assert await gw.proxy(old["token"]) == 401  # at once
    assert await gw.proxy(new["token"]) == 200

    reused = await gw.call("POST", f"/tokens/{old['id']}/rotate", team.full)
    assert reused.status == 409
    assert (await gw.token(team.full, new["id"]))["state"] == "revoked"  # the whole chain
    assert await gw.proxy(new["token"]) == 401

    graceful = await start(tokens={"rotation_grace": "1h"})
    first = await graceful.create(team.admin)
    assert await graceful.proxy(first["token"]) == 200
    second = (await graceful.call("POST", f"/tokens/{first['id']}/rotate", team.admin)).body
    assert await graceful.proxy(first["token"]) == 200  # still inside the grace period
    assert await graceful.proxy(second["token"]) == 200
    data = await graceful.token(team.admin, first["id"])
    assert data["rotated_to"] == second["id"]
    assert moment(data["revoked_at"]) > datetime.now(UTC) + timedelta(minutes=59)


async def test_rotation_reuse_inside_the_grace_period_revokes_the_reused_token_too(
    start: Any, team: Team
) -> None:
    gw = await start(tokens={"rotation_grace": "1h"})
    first = await gw.create(team.admin)
    second = (await gw.call("POST", f"/tokens/{first['id']}/rotate", team.admin)).body

    reused = await gw.call("POST", f"/tokens/{first['id']}/rotate", team.admin)

    assert reused.status == 409
    assert await gw.proxy(second["token"]) == 401
    assert await gw.proxy(first["token"]) == 401


async def test_audit_events_record_actor_and_ip(start: Any, team: Team) -> None:
    gw = await start()
    created = await gw.create(team.full, name="crm")
    token_id = created["id"]
    await gw.call("PATCH", f"/tokens/{token_id}", team.full, {"name": "reports"})
    await gw.call("POST", f"/tokens/{token_id}/refresh", team.full)
    await gw.call("DELETE", f"/tokens/{token_id}", team.full)
    admin_made = await gw.create(team.admin, user_id=team.full)
    await gw.call("DELETE", f"/tokens/{admin_made['id']}", team.admin)

    answer = await gw.call("GET", f"/tokens/{token_id}/events", team.full)

    assert answer.status == 200
    events = answer.body["items"]
    assert [e["event"] for e in events] == ["created", "renamed", "refreshed", "revoked"]
    assert {e["actor"] for e in events} == {team.full}
    assert {e["ip"] for e in events} == {"127.0.0.1"}
    assert {e["token_id"] for e in events} == {token_id}
    assert events[1]["detail"] == {"from": "crm", "to": "reports"}
    assert events[3]["detail"] == {"reason": "user"}
    times = [moment(e["at"]) for e in events]
    assert times == sorted(times)
    assert created["token"] not in str(events)

    by_admin = (await gw.call("GET", f"/tokens/{admin_made['id']}/events", team.full)).body
    assert [(e["event"], e["actor"]) for e in by_admin["items"]] == [
        ("created", team.admin),
        ("revoked", team.admin),
    ]


async def test_revoke_leaked_always_202(
    start: Any, team: Team, seed: Seeder, monkeypatch: pytest.MonkeyPatch
) -> None:
    minute = [100.0]  # the rate limiter's clock, so no minute boundary falls inside the test
    monkeypatch.setattr(management_api, "time", SimpleNamespace(monotonic=lambda: minute[0]))
    gw = await start()
    real = await gw.create(team.full)
    bystander = await gw.create(team.admin)
    assert await gw.proxy(real["token"]) == 200
    random_token = seed.service.format.generate().plaintext

    reported = await gw.client.post(
        f"{API}/tokens/revoke-leaked",
        json={"tokens": [real["token"], random_token, "garbage"]},
    )

    assert reported.status == 202
    assert await gw.proxy(real["token"]) == 401  # at once
    data = await gw.token(team.full, real["id"])
    assert data["state"] == "revoked"
    assert data["revoked_reason"] == "leaked"
    assert await gw.proxy(bystander["token"]) == 200
    events = (await gw.call("GET", f"/tokens/{real['id']}/events", team.full)).body["items"]
    assert events[-1]["event"] == "revoked"
    assert events[-1]["ip"] == "127.0.0.1"

    nothing = await gw.client.post(f"{API}/tokens/revoke-leaked", json={"tokens": [random_token]})
    assert nothing.status == 202  # no oracle: the same answer when nothing matched
    assert await nothing.json() == await reported.json()
    for _ in range(8):  # reports 3 to 10 of this minute
        again = await gw.client.post(f"{API}/tokens/revoke-leaked", json={"tokens": []})
        assert again.status == 202
    limited = await gw.client.post(f"{API}/tokens/revoke-leaked", json={"tokens": []})
    assert limited.status == 429
    assert limited.headers["Retry-After"] == "60"
    assert (await limited.json())["type"] == "urn:patgate:error:rate_limited"

    minute[0] += 60
    assert (await gw.client.post(f"{API}/tokens/revoke-leaked", json={})).status == 202


async def test_users_api(start: Any, team: Team, seed: Seeder) -> None:
    other = await new_team(seed)
    gw = await start()

    assert (await gw.call("GET", "/users", team.full)).status == 403
    listed = await gw.call("GET", "/users", team.admin)
    assert listed.status == 200
    assert {u["id"] for u in listed.body["items"]} == {
        team.owner,
        team.admin,
        team.full,
        team.field,
    }
    assert {u["company_id"] for u in listed.body["items"]} == {team.company}

    body = {"company_id": team.company, "role": "field_user", "email": "new@example.com"}
    created = await gw.call("PUT", "/users/u-newcomer", team.admin, body)
    assert created.status == 201
    assert created.body["role"] == "field_user"
    assert created.body["status"] == "active"
    updated = await gw.call("PUT", "/users/u-newcomer", team.admin, {**body, "role": "full_user"})
    assert updated.status == 200
    assert updated.body["role"] == "full_user"
    assert (await gw.create("u-newcomer"))["user_id"] == "u-newcomer"  # may now generate

    foreign = {"company_id": other.company, "role": "admin"}
    refused = await gw.call("PUT", "/users/u-intruder", team.admin, foreign)
    assert refused.status == 403
    assert "u-intruder" not in {
        u["id"] for u in (await gw.call("GET", "/users", other.admin)).body["items"]
    }
    assert (await gw.call("PUT", "/users/u-x", team.full, body)).status == 403

    patched = await gw.call("PATCH", "/users/u-newcomer", team.admin, {"email": "me@example.com"})
    assert patched.status == 200
    assert patched.body["email"] == "me@example.com"
    assert patched.body["role"] == "full_user"
    across = await gw.call("PATCH", f"/users/{other.full}", team.admin, {"role": "owner"})
    assert across.status == 404
    bad = await gw.call("PATCH", "/users/u-newcomer", team.admin, {"role": "emperor"})
    assert bad.status == 422

    me = await gw.call("GET", "/me", "u-newcomer")
    assert me.body["user_id"] == "u-newcomer"
    assert me.body["company_id"] == team.company
    assert me.body["email"] == "me@example.com"
    assert me.body["permissions"] == sorted(ROLES["full_user"])


async def test_cookie_session_needs_csrf_for_changes(start: Any, team: Team) -> None:
    gw = await start()
    origin = str(gw.client.make_url("")).rstrip("/")
    cookie = {"Cookie": f"patgate_session={session_jwt(team.full)}"}

    listed = await gw.client.get(f"{API}/tokens", headers=cookie)
    assert listed.status == 200

    for extra in (
        {},
        {"Origin": origin},
        {"X-Patgate-Csrf": "1"},
        {"Origin": "https://evil.example", "X-Patgate-Csrf": "1"},
    ):
        response = await gw.client.post(
            f"{API}/tokens", json={"name": "x"}, headers={**cookie, **extra}
        )
        assert response.status == 403, extra
    assert (await gw.client.get(f"{API}/tokens", headers=cookie)).status == 200
    assert await gw.items(team.full) == []

    same_origin = {**cookie, "Origin": origin, "X-Patgate-Csrf": "1"}
    created = await gw.client.post(f"{API}/tokens", json={"name": "x"}, headers=same_origin)
    assert created.status == 201
    token_id = (await created.json())["id"]
    deleted = await gw.client.delete(f"{API}/tokens/{token_id}", headers=cookie)
    assert deleted.status == 403
    assert (await gw.token(team.full, token_id))["state"] == "active"


@pytest.mark.parametrize(("trusted", "status"), [(True, 201), (False, 403)])
async def test_cookie_session_behind_a_tls_proxy_checks_the_origin_the_proxy_serves(
    start: Any, team: Team, trusted: bool, status: int
) -> None:
    """The browser is on https://gw.example; the proxy speaks plain HTTP to patgate."""
    gw = await start(trusted_proxies=["127.0.0.1/32"] if trusted else [])
    headers = {
        "Cookie": f"patgate_session={session_jwt(team.full)}",
        "Origin": "https://gw.example",
        "X-Patgate-Csrf": "1",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "gw.example",
    }
    created = await gw.client.post(f"{API}/tokens", json={"name": "x"}, headers=headers)
    assert created.status == status


async def test_token_created_through_api_works_at_once_and_delete_refuses_at_once(
    start: Any, team: Team, upstream: RecordingUpstream
) -> None:
    gw = await start(cache={"ttl": "1h", "negative_ttl": "1h"})
    created = await gw.create(team.full)

    assert await gw.proxy(created["token"]) == 200
    assert upstream.last.header("X-Auth-Token-Id") == created["id"]
    assert await gw.proxy(created["token"]) == 200  # from the cache now

    assert (await gw.call("DELETE", f"/tokens/{created['id']}", team.full)).status == 200

    assert await gw.proxy(created["token"]) == 401
    assert len(upstream.received) == 2


async def test_audit_ip_is_the_client_behind_a_trusted_proxy(start: Any, team: Team) -> None:
    gw = await start(trusted_proxies=["127.0.0.1/32"])
    forwarded = {"X-Forwarded-For": "203.0.113.7"}
    created = await gw.call("POST", "/tokens", team.full, {"name": "x"}, headers=forwarded)
    assert created.status == 201

    events = (await gw.call("GET", f"/tokens/{created.body['id']}/events", team.full)).body

    assert events["items"][0]["ip"] == "203.0.113.7"


async def test_a_reload_changes_the_roles_the_api_and_the_proxy_use(
    make_gateway: Any, upstream: RecordingUpstream, db: Any
) -> None:
    """SIGHUP semantics (gateway.app.reload): the management API sees new roles at once."""
    from gateway.app import reload

    seed = Seeder(gateway_config(upstream.url), db)
    user = await seed.user(await seed.company(), "field_user")
    cfg = gateway_config(upstream.url, management={"sessions": {"hs256_secret": SECRET}})
    client = await make_gateway(cfg)
    headers = {"Authorization": f"Bearer {session_jwt(user)}"}
    before = await (await client.get(f"{API}/me", headers=headers)).json()

    roles = {**cfg.roles, "field_user": frozenset({"jobs:read", "invoices:read"})}
    reload(client.app, dataclasses.replace(cfg, roles=roles))
    after = await (await client.get(f"{API}/me", headers=headers)).json()

    assert before["permissions"] == ["jobs:read"]
    assert after["permissions"] == ["invoices:read", "jobs:read"]


async def test_a_body_that_arrives_in_pieces_is_read_whole(start: Any, team: Team) -> None:
    """Not a seed behaviour, but the API every seed flow goes through."""
    gateway = await start()

    async def pieces() -> AsyncIterator[bytes]:
        yield b'{"name": "in'
        await asyncio.sleep(0.05)  # the handler is reading by now: the rest comes later
        yield b' pieces"}'

    headers = {**bearer(session_jwt(team.full)), "Content-Type": "application/json"}
    response = await gateway.client.post(f"{API}/tokens", data=pieces(), headers=headers)
    assert response.status == 201, await response.text()
    assert (await response.json())["name"] == "in pieces"
