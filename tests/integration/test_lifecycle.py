"""The token lifecycle rules of SPEC §2 against a real PostgreSQL: limits, expiry policy,
refresh, role-scoped tokens, company boundaries, owner changes, audit events, and that
the plaintext is stored nowhere."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest

from gateway import store
from gateway.config import Config
from gateway.errors import Conflict, Forbidden, InvalidInput, NotFound
from gateway.lifecycle import OPERATOR, Actor, Expiry, TokenService
from gateway.store import EventRow, TokenRow
from tests.conftest import TOKEN_FIELDS, Seeder, gateway_config

DAY = timedelta(days=1)


class Clock:
    """The service's notion of now, moved by the test (the database keeps its own now())."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def config(**tokens: Any) -> Config:
    return gateway_config(upstream_url="http://127.0.0.1:9", tokens=tokens)


class World:
    """One company per test, its users, and a TokenService under the test's token policy."""

    def __init__(self, db: asyncpg.Connection, cfg: Config, clock: Clock) -> None:
        self.db = db
        self.cfg = cfg
        self.clock = clock
        self.service = TokenService(cfg, db, now=clock)
        self.seed = Seeder(cfg, db)
        self.company = ""

    async def start(self) -> World:
        self.company = await self.seed.company()
        return self

    async def user(self, role: str = "full_user", company: str | None = None) -> str:
        return await self.seed.user(company or self.company, role)

    async def actor(self, role: str, company: str | None = None, **kwargs: Any) -> Actor:
        company = company or self.company
        user_id = await self.user(role, company)
        return Actor(user_id, company, self.cfg.roles[role], **kwargs)

    async def create(self, user_id: str, **kwargs: Any) -> TokenRow:
        kwargs.setdefault("name", "ci")
        return (await self.service.create(OPERATOR, user_id=user_id, **kwargs)).token

    async def get(self, token: TokenRow | UUID) -> TokenRow:
        row = await store.get_token(self.db, token.id if isinstance(token, TokenRow) else token)
        assert row is not None
        return row

    async def expire(self, token: TokenRow) -> None:
        """Move a token's expiry into the past, as time passing would."""
        past = self.clock.now - timedelta(seconds=1)
        await self.db.execute("UPDATE tokens SET expires_at = $2 WHERE id = $1", token.id, past)

    async def events(self, token: TokenRow) -> list[EventRow]:
        return await store.token_events(self.db, token.id)

    def json(self, row: TokenRow) -> dict[str, Any]:
        return self.service.token_json(row)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def world_with(db: asyncpg.Connection, clock: Clock) -> Any:
    async def make(**tokens: Any) -> World:
        return await World(db, config(**tokens), clock).start()

    return make


@pytest.fixture
async def world(world_with: Any) -> World:
    made: World = await world_with()
    return made


# ---------------------------------------------------------------------------------------------
# Per-user limit


async def test_one_token_per_user_refuses_a_second_with_409(world_with: Any) -> None:
    world = await world_with(max_active_per_user=1)
    user = await world.user()
    await world.create(user)

    with pytest.raises(Conflict) as caught:
        await world.create(user)

    assert caught.value.status == 409
    assert caught.value.detail.startswith("A token is already created for this user")
    assert len(await world.service.list(OPERATOR, user_id=user)) == 1


async def test_one_token_per_user_message_says_to_revoke_the_first(world_with: Any) -> None:
    world = await world_with(max_active_per_user=1)
    user = await world.user()
    await world.create(user)

    with pytest.raises(Conflict) as caught:
        await world.create(user)

    assert "revoke" in caught.value.detail.lower()


async def test_a_higher_limit_counts_active_tokens(world_with: Any) -> None:
    world = await world_with(max_active_per_user=2)
    user = await world.user()
    await world.create(user)
    await world.create(user)

    with pytest.raises(Conflict) as caught:
        await world.create(user)

    assert "2 active tokens" in caught.value.detail
    assert "revoke" in caught.value.detail


async def test_the_limit_is_per_user(world_with: Any) -> None:
    world = await world_with(max_active_per_user=1)
    await world.create(await world.user())

    await world.create(await world.user())  # another user of the same company: allowed


async def test_revoking_the_first_allows_a_new_one(world_with: Any) -> None:
    world = await world_with(max_active_per_user=1)
    user = await world.user()
    first = await world.create(user)
    await world.service.revoke(OPERATOR, str(first.id))

    second = await world.create(user)

    assert second.id != first.id
    assert world.json(await world.get(first))["state"] == "revoked"
    assert world.json(second)["state"] == "active"


async def test_an_expired_token_does_not_count_as_active(world_with: Any) -> None:
    world = await world_with(max_active_per_user=1)
    user = await world.user()
    first = await world.create(user)
    await world.expire(first)

    second = await world.create(user)

    assert world.json(await world.get(first))["state"] == "expired"
    assert world.json(second)["state"] == "active"


async def test_rotating_an_expired_token_needs_a_free_slot(world_with: Any) -> None:
    """Its successor is active: like a refresh, it must not give the user a second token."""
    world = await world_with(max_active_per_user=1)
    user = await world.user()
    first = await world.create(user)
    await world.expire(first)
    second = await world.create(user)  # the expired one freed the slot

    with pytest.raises(Conflict):
        await world.service.rotate(OPERATOR, str(first.id))

    active = await world.service.list(OPERATOR, user_id=user, state="active")
    assert [t.id for t in active] == [second.id]


# ---------------------------------------------------------------------------------------------
# Expiry policy


async def test_default_expiry_is_default_ttl(world_with: Any, clock: Clock) -> None:
    default = await world_with()
    seven = await world_with(default_ttl="7d")

    assert (await default.create(await default.user())).expires_at == clock.now + 365 * DAY
    assert (await seven.create(await seven.user())).expires_at == clock.now + 7 * DAY


async def test_default_ttl_null_means_no_expiry(world_with: Any) -> None:
    world = await world_with(default_ttl=None)

    token = await world.create(await world.user())

    assert token.expires_at is None
    assert world.json(token)["expires_at"] is None
    assert world.json(token)["state"] == "active"


async def test_requested_lifetime_in_days_and_at_a_date(world: World, clock: Clock) -> None:
    user = await world.user()
    at = clock.now + 10 * DAY

    in_days = await world.create(user, expiry=Expiry(in_days=90))
    dated = await world.create(user, expiry=Expiry(at=at))

    assert in_days.expires_at == clock.now + 90 * DAY
    assert dated.expires_at == at


async def test_max_ttl_caps_requested_lifetimes(world_with: Any, clock: Clock) -> None:
    world = await world_with(max_ttl="30d", default_ttl="7d")
    user = await world.user()

    assert (await world.create(user, expiry=Expiry(in_days=30))).expires_at == clock.now + 30 * DAY
    for expiry in (
        Expiry(in_days=31),
        Expiry(in_days=30.001),
        Expiry(at=clock.now + 30 * DAY + timedelta(seconds=1)),
    ):
        with pytest.raises(InvalidInput, match="30 days"):
            await world.create(user, expiry=expiry)
    assert len(await world.service.list(OPERATOR, user_id=user)) == 1


async def test_no_expiry_is_allowed_by_default(world: World) -> None:
    token = await world.create(await world.user(), expiry=Expiry(never=True))

    assert token.expires_at is None


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param({"allow_no_expiry": False}, id="allow_no_expiry-false"),
        pytest.param({"max_ttl": "90d", "default_ttl": "30d"}, id="max_ttl-set"),
    ],
)
async def test_no_expiry_is_refused_by_policy(world_with: Any, policy: dict[str, Any]) -> None:
    world = await world_with(**policy)
    user = await world.user()

    with pytest.raises(InvalidInput, match="without expiry"):
        await world.create(user, expiry=Expiry(never=True))

    assert await world.service.list(OPERATOR, user_id=user) == []


@pytest.mark.parametrize(
    "expiry",
    [
        pytest.param(lambda now: Expiry(at=now - DAY), id="yesterday"),
        pytest.param(lambda now: Expiry(at=now), id="now"),
        pytest.param(lambda now: Expiry(in_days=0), id="zero-days"),
        pytest.param(lambda now: Expiry(in_days=-3), id="negative-days"),
    ],
)
async def test_expiry_in_the_past_is_refused(world: World, clock: Clock, expiry: Any) -> None:
    user = await world.user()

    with pytest.raises(InvalidInput):
        await world.create(user, expiry=expiry(clock.now))

    assert await world.service.list(OPERATOR, user_id=user) == []


async def test_naive_expiry_date_is_taken_as_utc(world: World, clock: Clock) -> None:
    at = (clock.now + 5 * DAY).replace(tzinfo=None)

    token = await world.create(await world.user(), expiry=Expiry(at=at))

    assert token.expires_at == at.replace(tzinfo=UTC)


async def test_an_absurd_lifetime_is_invalid_input_not_a_crash(world: World) -> None:
    with pytest.raises(InvalidInput):
        await world.create(await world.user(), expiry=Expiry(in_days=10**7))


# ---------------------------------------------------------------------------------------------
# Refresh


async def test_refresh_extends_to_now_plus_refresh_extends(world: World, clock: Clock) -> None:
    token = await world.create(await world.user(), expiry=Expiry(in_days=10))
    clock.advance(3 * DAY)

    refreshed = await world.service.refresh(OPERATOR, str(token.id))

    assert refreshed.expires_at == clock.now + 365 * DAY
    assert (await world.get(token)).expires_at == clock.now + 365 * DAY


async def test_refresh_extends_is_configurable(world_with: Any, clock: Clock) -> None:
    world = await world_with(refresh_extends="90d")
    token = await world.create(await world.user())

    refreshed = await world.service.refresh(OPERATOR, str(token.id))

    assert refreshed.expires_at == clock.now + 90 * DAY


async def test_refresh_is_capped_by_max_ttl(world_with: Any, clock: Clock) -> None:
    world = await world_with(max_ttl="30d", default_ttl="7d", refresh_extends="365d")
    token = await world.create(await world.user())

    refreshed = await world.service.refresh(OPERATOR, str(token.id))

    assert refreshed.expires_at == clock.now + 30 * DAY


async def test_refresh_reactivates_an_expired_token(world_with: Any, clock: Clock) -> None:
    world = await world_with(max_active_per_user=1)
    user = await world.user()
    token = await world.create(user)
    await world.expire(token)
    assert world.json(await world.get(token))["state"] == "expired"

    refreshed = await world.service.refresh(OPERATOR, str(token.id))

    assert world.json(refreshed)["state"] == "active"
    assert refreshed.expires_at == clock.now + 365 * DAY
    assert [t.id for t in await world.service.list(OPERATOR, user_id=user, state="active")] == [
        token.id
    ]


async def test_refresh_of_a_token_without_expiry_gives_it_one(world: World, clock: Clock) -> None:
    token = await world.create(await world.user(), expiry=Expiry(never=True))

    refreshed = await world.service.refresh(OPERATOR, str(token.id))

    assert refreshed.expires_at == clock.now + 365 * DAY


async def test_a_revoked_token_cannot_be_refreshed(world: World) -> None:
    token = await world.create(await world.user())
    await world.service.revoke(OPERATOR, str(token.id))

    with pytest.raises(Conflict):
        await world.service.refresh(OPERATOR, str(token.id))

    after = await world.get(token)
    assert after.expires_at == token.expires_at
    assert world.json(after)["state"] == "revoked"
    assert [e.event for e in await world.events(token)] == ["created", "revoked"]


# ---------------------------------------------------------------------------------------------
# Role-scoped tokens


async def test_admin_creating_an_owner_token_for_a_full_user_strips_to_the_owner(
    world: World,
) -> None:
    admin = await world.actor("admin")
    owner = await world.user("full_user")

    created = await world.service.create(admin, user_id=owner, name="ci", role="owner")

    assert created.dropped_permissions == ("*",)
    assert created.token.role == "owner"
    assert created.token.created_by == admin.user_id
    assert world.json(created.token)["permissions"] == ["invoices:read", "jobs:*", "tokens:create"]


async def test_role_token_permissions_are_role_creator_and_owner_intersected(
    world: World,
) -> None:
    admin = await world.actor("admin")
    owner = await world.user("full_user")

    created = await world.service.create(admin, user_id=owner, name="ci", role="admin")

    assert created.dropped_permissions == ("invoices:*", "tokens:admin", "users:admin")
    assert sorted(created.token.scopes or []) == ["invoices:read", "jobs:*", "tokens:create"]
    assert world.json(created.token)["permissions"] == ["invoices:read", "jobs:*", "tokens:create"]
    detail = (await world.events(created.token))[0].detail
    assert detail["dropped_permissions"] == ["invoices:*", "tokens:admin", "users:admin"]


async def test_a_narrower_role_drops_nothing(world: World) -> None:
    admin = await world.actor("admin")
    owner = await world.user("full_user")

    created = await world.service.create(admin, user_id=owner, name="ro", role="field_user")

    assert created.dropped_permissions == ()
    assert world.json(created.token)["permissions"] == ["jobs:read"]
    assert world.json(created.token)["role"] == "field_user"


async def test_on_excess_role_refuse_answers_403_naming_the_permissions(
    world_with: Any,
) -> None:
    world = await world_with(on_excess_role="refuse")
    admin = await world.actor("admin")
    owner = await world.user("full_user")

    with pytest.raises(Forbidden) as caught:
        await world.service.create(admin, user_id=owner, name="ci", role="admin")

    assert caught.value.status == 403
    for permission in ("invoices:*", "tokens:admin", "users:admin"):
        assert permission in caught.value.detail
    assert "jobs:*" not in caught.value.detail
    assert await world.service.list(OPERATOR, user_id=owner) == []


async def test_an_unknown_role_is_invalid_input(world: World) -> None:
    with pytest.raises(InvalidInput, match="unknown role"):
        await world.create(await world.user(), role="superuser")


# ---------------------------------------------------------------------------------------------
# Who may do what


async def test_without_tokens_admin_no_token_for_another_user(world: World) -> None:
    actor = await world.actor("full_user")
    colleague = await world.user("full_user")

    with pytest.raises(Forbidden):
        await world.service.create(actor, user_id=colleague, name="ci")

    assert await world.service.list(OPERATOR, user_id=colleague) == []


async def test_full_user_creates_for_itself(world: World) -> None:
    actor = await world.actor("full_user")

    created = await world.service.create(actor, name="mine")

    assert created.token.user_id == actor.user_id
    assert created.token.company_id == world.company
    assert created.token.created_by == actor.user_id


async def test_field_user_may_not_create_for_itself(world: World) -> None:
    actor = await world.actor("field_user")

    with pytest.raises(Forbidden):
        await world.service.create(actor, name="mine")

    assert await world.service.list(OPERATOR, user_id=actor.user_id) == []


async def test_admin_creates_for_a_field_user_of_its_company(world: World) -> None:
    admin = await world.actor("admin")
    field = await world.user("field_user")

    created = await world.service.create(admin, user_id=field, name="tablet")

    assert created.token.user_id == field
    assert world.json(created.token)["permissions"] == ["jobs:read"]


async def test_nobody_sees_another_companys_tokens(world: World) -> None:
    other_company = await world.seed.company("Other")
    foreign = await world.create(await world.user("full_user", other_company))
    admin = await world.actor("admin")
    member = await world.actor("full_user")

    for actor in (admin, member):
        with pytest.raises(NotFound):
            await world.service.get(actor, str(foreign.id))
        with pytest.raises(NotFound):
            await world.service.revoke(actor, str(foreign.id))
        with pytest.raises(NotFound):
            await world.service.rename(actor, str(foreign.id), "mine now")
    assert (await world.get(foreign)).revoked_at is None
    assert (await world.get(foreign)).name == "ci"


async def test_an_admin_cannot_create_across_companies(world: World) -> None:
    other_company = await world.seed.company("Other")
    foreign_user = await world.user("full_user", other_company)
    admin = await world.actor("admin")

    with pytest.raises(NotFound):
        await world.service.create(admin, user_id=foreign_user, name="ci")


async def test_without_tokens_admin_a_colleagues_token_is_not_found(world: World) -> None:
    member = await world.actor("full_user")
    colleague_token = await world.create(await world.user("full_user"))
    admin = await world.actor("admin")

    with pytest.raises(NotFound):
        await world.service.get(member, str(colleague_token.id))
    with pytest.raises(NotFound):
        await world.service.revoke(member, str(colleague_token.id))
    assert (await world.service.get(admin, str(colleague_token.id))).id == colleague_token.id


async def test_listing_never_crosses_a_company_boundary(world: World) -> None:
    other_company = await world.seed.company("Other")
    foreign = await world.create(await world.user("full_user", other_company))
    admin = await world.actor("admin")

    listed = await world.service.list(admin)
    asked = await world.service.list(admin, company_id=other_company)

    assert foreign.id not in {t.id for t in listed}
    assert asked == []


async def test_changing_users_needs_users_admin(world: World) -> None:
    member = await world.actor("full_user")

    with pytest.raises(Forbidden):
        await world.service.set_role(member, member.user_id or "", "owner")


async def test_revoke_reason_is_user_for_own_and_admin_for_others(world: World) -> None:
    member = await world.actor("full_user")
    admin = await world.actor("admin")
    own = (await world.service.create(member, name="own")).token
    other = (await world.service.create(member, name="other")).token

    assert (await world.service.revoke(member, str(own.id))).revoked_reason == "user"
    assert (await world.service.revoke(admin, str(other.id))).revoked_reason == "admin"


async def test_a_malformed_token_id_is_not_found(world: World) -> None:
    with pytest.raises(NotFound):
        await world.service.get(OPERATOR, "not-a-uuid")
    with pytest.raises(NotFound):
        await world.service.get(OPERATOR, "00000000-0000-0000-0000-000000000000")


# ---------------------------------------------------------------------------------------------
# Owner changes


async def test_deactivation_revokes_every_token_for_good(world: World) -> None:
    user = await world.user("full_user")
    earlier = await world.create(user)
    await world.service.revoke(OPERATOR, str(earlier.id), reason="user")
    tokens = [await world.create(user) for _ in range(2)]
    expired = await world.create(user)
    await world.expire(expired)

    await world.service.set_status(OPERATOR, user, "deactivated")

    for token in [*tokens, expired]:
        row = await world.get(token)
        assert row.revoked_reason == "owner_deactivated"
        assert world.json(row)["state"] == "revoked"
        assert (await world.events(token))[-1].detail == {"reason": "owner_deactivated"}
    assert (await world.get(earlier)).revoked_reason == "user"  # untouched

    await world.service.set_status(OPERATOR, user, "active")

    for token in tokens:
        row = await world.get(token)
        assert row.revoked_reason == "owner_deactivated"
        assert row.owner_status == "active"
        assert world.json(row)["state"] == "revoked"


async def test_no_token_for_a_deactivated_user(world: World) -> None:
    user = await world.user()
    await world.service.set_status(OPERATOR, user, "deactivated")

    with pytest.raises(Conflict):
        await world.create(user)


async def test_an_unknown_status_is_invalid_input(world: World) -> None:
    with pytest.raises(InvalidInput):
        await world.service.set_status(OPERATOR, await world.user(), "suspended")


async def test_downgrade_revokes_tokens_when_configured(world: World) -> None:
    user = await world.user("full_user")
    token = await world.create(user)

    updated = await world.service.set_role(OPERATOR, user, "field_user")

    assert updated.role == "field_user"
    row = await world.get(token)
    assert row.revoked_reason == "owner_downgraded"
    assert world.json(row)["state"] == "revoked"
    assert [e.event for e in await world.events(token)] == [
        "created",
        "owner_role_changed",
        "revoked",
    ]


async def test_a_role_change_reaches_a_rotated_token_still_in_its_grace(world_with: Any) -> None:
    """Its old secret still authenticates until the grace ends: caches must forget it too."""
    world = await world_with(rotation_grace="1h")
    user = await world.user("admin")
    old = await world.create(user)
    await world.service.rotate(OPERATOR, str(old.id))

    await world.service.set_role(OPERATOR, user, "full_user")

    row = await world.get(old)
    assert row.revoked_at is not None
    assert row.revoked_at > world.clock.now  # still authenticates: rotation_grace
    assert "owner_role_changed" in [e.event for e in await world.events(old)]


async def test_a_role_change_that_keeps_tokens_create_revokes_nothing(world: World) -> None:
    user = await world.user("admin")
    token = await world.create(user)

    await world.service.set_role(OPERATOR, user, "full_user")

    row = await world.get(token)
    assert row.revoked_at is None
    assert world.json(row)["permissions"] == ["invoices:read", "jobs:*", "tokens:create"]


async def test_without_revoke_on_downgrade_permissions_shrink(world_with: Any) -> None:
    world = await world_with(revoke_on_downgrade=False)
    admin = await world.actor("admin")
    user = await world.user("full_user")
    plain = await world.create(user)
    scoped = (
        await world.service.create(admin, user_id=user, name="scoped", role="full_user")
    ).token
    assert world.json(plain)["permissions"] == ["invoices:read", "jobs:*", "tokens:create"]

    await world.service.set_role(OPERATOR, user, "field_user")

    for token in (plain, scoped):
        row = await world.get(token)
        assert row.revoked_at is None
        assert world.json(row)["state"] == "active"
        assert world.json(row)["permissions"] == ["jobs:read"]


async def test_role_change_to_an_unknown_role_is_refused(world: World) -> None:
    user = await world.user("full_user")

    with pytest.raises(InvalidInput, match="unknown role"):
        await world.service.set_role(OPERATOR, user, "superuser")

    assert (await store.get_user(world.db, user)).role == "full_user"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# Audit events


async def test_every_change_writes_an_event_with_actor_and_detail(
    world: World, clock: Clock
) -> None:
    admin = await world.actor("admin", ip="203.0.113.7")
    user = await world.user("full_user")
    created = await world.service.create(admin, user_id=user, name="ci", role="field_user")
    token = created.token
    await world.service.rename(admin, str(token.id), "deploy")
    clock.advance(DAY)
    await world.service.refresh(admin, str(token.id))
    await world.service.set_role(admin, user, "admin")
    await world.service.revoke(admin, str(token.id))

    events = await world.events(token)

    assert [e.event for e in events] == [
        "created",
        "renamed",
        "refreshed",
        "owner_role_changed",
        "revoked",
    ]
    assert {e.actor for e in events} == {admin.user_id}
    assert {e.ip for e in events} == {"203.0.113.7"}
    assert {e.token_id for e in events} == {token.id}
    created_event, renamed, refreshed, role_changed, revoked = (e.detail for e in events)
    assert created_event == {
        "name": "ci",
        "role": "field_user",
        "expires_at": world.json(token)["expires_at"],
    }
    assert renamed == {"from": "ci", "to": "deploy"}
    assert refreshed == {
        "from": world.json(token)["expires_at"],
        "to": world.json(await world.get(token))["expires_at"],
    }
    assert refreshed["from"] != refreshed["to"]
    assert role_changed == {"from": "full_user", "to": "admin"}
    assert revoked == {"reason": "admin"}


async def test_operator_events_are_by_cli(world: World) -> None:
    token = await world.create(await world.user())
    await world.service.revoke(OPERATOR, str(token.id))

    events = await world.events(token)

    assert [(e.event, e.actor, e.ip) for e in events] == [
        ("created", "cli", None),
        ("revoked", "cli", None),
    ]
    assert token.created_by == "cli"


async def test_revoking_twice_writes_one_event(world: World) -> None:
    token = await world.create(await world.user())
    first = await world.service.revoke(OPERATOR, str(token.id))

    again = await world.service.revoke(OPERATOR, str(token.id), reason="leaked")

    assert again.revoked_at == first.revoked_at
    assert again.revoked_reason == first.revoked_reason == "admin"  # the operator is no owner
    assert [e.event for e in await world.events(token)] == ["created", "revoked"]


# ---------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("x" * 101, id="101-chars"),
        pytest.param("line\nbreak", id="newline"),
        pytest.param("tab\there", id="tab"),
        pytest.param("nul\x00", id="nul"),
        pytest.param("esc\x1b[31m", id="escape"),
        pytest.param("del\x7f", id="del"),
    ],
)
async def test_invalid_names_are_refused(world: World, name: str) -> None:
    user = await world.user()
    token = await world.create(user)

    with pytest.raises(InvalidInput):
        await world.service.rename(OPERATOR, str(token.id), name)
    with pytest.raises(InvalidInput):
        await world.create(user, name=name)

    assert (await world.get(token)).name == "ci"
    assert [e.event for e in await world.events(token)] == ["created"]


async def test_names_are_trimmed_and_may_be_100_chars_of_unicode(world: World) -> None:
    token = await world.create(await world.user(), name="  build bot  ")
    assert token.name == "build bot"

    long_name = "é" * 100
    renamed = await world.service.rename(OPERATOR, str(token.id), long_name)

    assert renamed.name == long_name


# ---------------------------------------------------------------------------------------------
# Token JSON


async def test_token_json_has_exactly_the_spec_fields(world: World, clock: Clock) -> None:
    user = await world.user("full_user")
    created = await world.service.create(OPERATOR, user_id=user, name="ci")

    data = world.json(created.token)

    assert set(data) == TOKEN_FIELDS
    assert data["id"] == str(created.token.id)
    assert data["name"] == "ci"
    assert data["prefix"] == created.plaintext[:8]
    assert data["state"] == "active"
    assert data["role"] is None
    assert data["permissions"] == ["invoices:read", "jobs:*", "tokens:create"]
    assert data["user_id"] == user
    assert data["company_id"] == world.company
    assert data["created_by"] == "cli"
    assert data["expires_at"] == (clock.now + 365 * DAY).isoformat().replace("+00:00", "Z")
    assert data["created_at"].endswith("Z")
    assert data["last_used_at"] is None
    assert data["last_used_ip"] is None
    assert data["revoked_at"] is None
    assert data["revoked_reason"] is None
    assert data["rotated_to"] is None


async def test_token_json_state_is_derived(world: World, clock: Clock) -> None:
    user = await world.user()
    token = await world.create(user, expiry=Expiry(in_days=1))
    assert world.json(token)["state"] == "active"

    clock.advance(DAY - timedelta(microseconds=1))
    assert world.json(token)["state"] == "active"
    clock.advance(timedelta(microseconds=1))  # expires_at == now counts as expired
    assert world.json(token)["state"] == "expired"

    revoked = await world.service.revoke(OPERATOR, str(token.id))
    data = world.json(revoked)
    assert data["state"] == "revoked"  # revoked wins over expired
    assert data["revoked_reason"] == "admin"
    assert data["revoked_at"] is not None
    assert data["revoked_at"].endswith("Z")


# ---------------------------------------------------------------------------------------------
# Secrets


async def test_the_database_holds_the_plaintext_nowhere(world: World, db: Any) -> None:
    admin = await world.actor("admin")
    user = await world.user("full_user")
    created = [
        await world.service.create(admin, user_id=user, name="one", role="admin"),
        await world.service.create(OPERATOR, user_id=user, name="two"),
    ]
    for c in created:
        await world.service.rename(admin, str(c.token.id), "renamed")
        await world.service.refresh(admin, str(c.token.id))
    await world.service.revoke(admin, str(created[0].token.id))

    token_rows = [r[0] for r in await db.fetch("SELECT t::text FROM tokens t")]
    event_rows = [r[0] for r in await db.fetch("SELECT e::text FROM token_events e")]
    dump = "\n".join(token_rows + event_rows)

    assert len(token_rows) >= 2
    assert len(event_rows) >= 8
    for c in created:
        body = c.plaintext[4:-6]
        assert c.plaintext not in dump
        assert body not in dump
        assert body[4:] not in dump  # not even the part after the display prefix
        assert c.plaintext.encode().hex() not in dump  # nor as bytea hex
        assert c.token.prefix in dump  # the display prefix is stored, and looked for here


async def test_the_stored_hash_is_the_digest_of_the_plaintext(world_with: Any, db: Any) -> None:
    plain = await world_with()
    peppered = await world_with(pepper=["new-pepper", "old-pepper"])

    for world in (plain, peppered):
        created = await world.service.create(OPERATOR, user_id=await world.user(), name="ci")
        stored = await db.fetchval("SELECT hash FROM tokens WHERE id = $1", created.token.id)
        data = created.plaintext.encode()
        if world is plain:
            assert stored == hashlib.sha256(data).digest()
        else:
            assert stored == hmac.new(b"new-pepper", data, hashlib.sha256).digest()
        found = await store.find_token_by_digest(
            db, world.service.format.digests(created.plaintext)
        )
        assert found is not None
        assert found.id == created.token.id


async def test_a_deadlock_between_two_changes_is_a_409_to_retry(
    db: asyncpg.Connection, database_url: str
) -> None:
    """Two transactions taking the same two rows in opposite orders: PostgreSQL aborts one
    of them. That caller gets a 409 to retry, not a 500."""
    ids = [f"c-{uuid4().hex[:8]}" for _ in range(2)]
    for company_id in ids:
        await store.insert_company(db, company_id, "deadlock")
    other = await asyncpg.connect(database_url)
    first_locked, second_locked = asyncio.Event(), asyncio.Event()

    async def lock(conn: Any, mine: str, theirs: str, locked: asyncio.Event, wait: Any) -> None:
        async with store.transaction(conn) as tx:
            await tx.execute("SELECT 1 FROM companies WHERE id = $1 FOR UPDATE", mine)
            locked.set()
            await wait.wait()
            await tx.execute("SELECT 1 FROM companies WHERE id = $1 FOR UPDATE", theirs)

    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                lock(db, ids[0], ids[1], first_locked, second_locked),
                lock(other, ids[1], ids[0], second_locked, first_locked),
                return_exceptions=True,
            ),
            30,
        )
    finally:
        await other.close()
    assert sorted(type(o).__name__ for o in outcomes) == ["Conflict", "NoneType"]
