"""The token lifecycle rules of SPEC §2, shared by the CLI and the management API.

Every function runs in one transaction and writes an audit event for each token it
touches. The caller is an ``Actor``: the operator CLI (no company boundary, every power) or
a signed-in user (their company, their permissions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from gateway import store
from gateway.auth import rfc3339
from gateway.config import Config
from gateway.errors import Conflict, Forbidden, InvalidInput, NotFound
from gateway.policy import allows, effective_permissions, excess, intersect
from gateway.store import TokenRow, UserRow
from gateway.tokens import TokenFormat

MAX_NAME_LENGTH = 100
TOKEN_MANAGING_PERMISSIONS = ("tokens:create", "tokens:admin")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks. ``user_id=None`` is the operator CLI."""

    user_id: str | None
    company_id: str | None
    permissions: frozenset[str]
    ip: str | None = None

    @property
    def name(self) -> str:
        return self.user_id or "cli"


OPERATOR = Actor(user_id=None, company_id=None, permissions=frozenset({"*"}))


@dataclass(frozen=True, slots=True)
class Expiry:
    """What the caller asked for; ``resolve`` turns it into a date under the policy."""

    in_days: float | None = None
    at: datetime | None = None
    never: bool = False


@dataclass(frozen=True, slots=True)
class Created:
    token: TokenRow
    plaintext: str
    dropped_permissions: tuple[str, ...]


def token_state(row: TokenRow, now: datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"


def _iso(moment: datetime | None) -> str | None:
    return rfc3339(moment) if moment is not None else None


class TokenService:
    def __init__(self, cfg: Config, pool: Any, *, now: Any = None) -> None:
        self.cfg = cfg
        self.policy = cfg.tokens
        self.roles: Mapping[str, frozenset[str]] = cfg.roles
        self.format = TokenFormat(cfg.tokens.prefix, cfg.tokens.pepper)
        self.pool = pool
        self._now = now or (lambda: datetime.now(UTC))

    def now(self) -> datetime:
        result: datetime = self._now()
        return result

    # -- presentation ------------------------------------------------------------------------

    def permissions(self, row: TokenRow) -> frozenset[str]:
        scopes = frozenset(row.scopes) if row.scopes is not None else None
        return effective_permissions(scopes, self.roles.get(row.owner_role, frozenset()))

    def token_json(self, row: TokenRow) -> dict[str, Any]:
        return {
            "id": str(row.id),
            "name": row.name,
            "prefix": row.prefix,
            "state": token_state(row, self.now()),
            "role": row.role,
            "permissions": sorted(self.permissions(row)),
            "user_id": row.user_id,
            "company_id": row.company_id,
            "created_at": _iso(row.created_at),
            "created_by": row.created_by,
            "expires_at": _iso(row.expires_at),
            "last_used_at": _iso(row.last_used_at),
            "last_used_ip": row.last_used_ip,
            "revoked_at": _iso(row.revoked_at),
            "revoked_reason": row.revoked_reason,
            "rotated_to": str(row.rotated_to) if row.rotated_to else None,
        }

    # -- checks ------------------------------------------------------------------------------

    def role_permissions(self, role: str) -> frozenset[str]:
        if role not in self.roles:
            known = ", ".join(sorted(self.roles)) or "none configured"
            raise InvalidInput(f"unknown role {role!r} (known roles: {known})")
        return self.roles[role]

    def _visible(self, actor: Actor, company_id: str) -> bool:
        return actor.company_id is None or actor.company_id == company_id

    async def _user(self, conn: Any, user_id: str, actor: Actor, *, lock: bool = False) -> UserRow:
        user = await store.get_user(conn, user_id, for_update=lock)
        if user is None or not self._visible(actor, user.company_id):
            raise NotFound(f"no user {user_id!r}")
        return user

    async def _token(self, conn: Any, token_id: str, actor: Actor) -> TokenRow:
        try:
            uid = UUID(token_id)
        except ValueError:
            raise NotFound(f"no token {token_id!r}") from None
        row = await store.get_token(conn, uid, for_update=True)
        if row is None or not self._visible(actor, row.company_id):
            raise NotFound(f"no token {token_id!r}")
        if row.user_id != actor.user_id and not allows(actor.permissions, "tokens:admin"):
            raise NotFound(f"no token {token_id!r}")
        return row

    def resolve_expiry(self, expiry: Expiry) -> datetime | None:
        now = self.now()
        cap = self.policy.max_ttl
        if expiry.never:
            if not self.policy.allow_no_expiry or cap is not None:
                raise InvalidInput("tokens without expiry are not allowed here")
            return None
        if expiry.at is not None:
            at = expiry.at if expiry.at.tzinfo else expiry.at.replace(tzinfo=UTC)
            if at <= now:
                raise InvalidInput("the expiry date must be in the future")
        elif expiry.in_days is not None:
            if expiry.in_days <= 0:
                raise InvalidInput("the lifetime must be a positive number of days")
            at = now + timedelta(days=expiry.in_days)
        elif self.policy.default_ttl is None:
            return None
        else:
            at = now + timedelta(seconds=self.policy.default_ttl)
        if cap is not None and at > now + timedelta(seconds=cap):
            raise InvalidInput(f"the lifetime may not exceed {cap / 86400:g} days")
        return at

    # -- lifecycle ---------------------------------------------------------------------------

    async def create(
        self,
        actor: Actor,
        *,
        name: str,
        user_id: str | None = None,
        expiry: Expiry = Expiry(),
        role: str | None = None,
    ) -> Created:
        name = _clean_name(name)
        owner_id = user_id or actor.user_id
        if owner_id is None:
            raise InvalidInput("user_id is required")
        if owner_id != actor.user_id and not allows(actor.permissions, "tokens:admin"):
            raise Forbidden("creating tokens for another user needs tokens:admin")
        if owner_id == actor.user_id and not any(
            allows(actor.permissions, p) for p in TOKEN_MANAGING_PERMISSIONS
        ):
            raise Forbidden("your role may not generate personal access tokens")
        expires_at = self.resolve_expiry(expiry)
        async with store.transaction(self.pool) as conn:
            owner = await self._user(conn, owner_id, actor, lock=True)
            if owner.status != "active":
                raise Conflict(f"user {owner.id!r} is deactivated")
            # An admin (or the operator) may create a token for a user whose role could not
            # create one itself (Factbird: "Select the User the token will belong to").
            owner_perms = self.roles.get(owner.role, frozenset())
            scopes, dropped = None, frozenset[str]()
            if role is not None:
                wanted = self.role_permissions(role)
                ceiling = intersect(owner_perms, actor.permissions)
                dropped = excess(wanted, ceiling)
                if dropped and self.policy.on_excess_role == "refuse":
                    raise Forbidden(
                        "the role grants permissions you or the owner lack: "
                        + ", ".join(sorted(dropped))
                    )
                scopes = intersect(wanted, ceiling)
            limit = self.policy.max_active_per_user
            if limit is not None and await store.count_active_tokens(conn, owner.id) >= limit:
                raise Conflict(
                    "A token is already created for this user"
                    if limit == 1
                    else f"this user already has {limit} active tokens"
                    + "; revoke one before creating another"
                )
            new = self.format.generate()
            token_id = uuid4()
            await store.insert_token(
                conn,
                token_id=token_id,
                name=name,
                prefix=new.display_prefix,
                digest=new.digest,
                role=role,
                scopes=sorted(scopes) if scopes is not None else None,
                user_id=owner.id,
                company_id=owner.company_id,
                created_by=actor.name,
                expires_at=expires_at,
            )
            detail = {"name": name, "role": role, "expires_at": _iso(expires_at)}
            if dropped:
                detail["dropped_permissions"] = sorted(dropped)  # type: ignore[assignment]
            await store.add_events(
                conn, [token_id], "created", actor=actor.name, ip=actor.ip, detail=detail
            )
            row = await store.get_token(conn, token_id)
        assert row is not None
        return Created(row, new.plaintext, tuple(sorted(dropped)))

    async def get(self, actor: Actor, token_id: str) -> TokenRow:
        async with store.transaction(self.pool) as conn:
            return await self._token(conn, token_id, actor)

    async def list(
        self,
        actor: Actor,
        *,
        user_id: str | None = None,
        company_id: str | None = None,
        state: str | None = None,
    ) -> list[TokenRow]:
        if state is not None and state not in ("active", "expired", "revoked"):
            raise InvalidInput("state must be one of active, expired, revoked")
        async with store.transaction(self.pool) as conn:
            return await store.list_tokens(
                conn, user_id=user_id, company_id=company_id, state=state
            )

    async def rename(self, actor: Actor, token_id: str, name: str) -> TokenRow:
        name = _clean_name(name)
        async with store.transaction(self.pool) as conn:
            row = await self._token(conn, token_id, actor)
            await store.rename_token(conn, row.id, name)
            await store.add_events(
                conn,
                [row.id],
                "renamed",
                actor=actor.name,
                ip=actor.ip,
                detail={"from": row.name, "to": name},
            )
            return await self._reload(conn, row.id)

    async def refresh(self, actor: Actor, token_id: str) -> TokenRow:
        """Extend the expiry to now + refresh_extends; an expired token becomes active again."""
        async with store.transaction(self.pool) as conn:
            row = await self._token(conn, token_id, actor)
            if row.revoked_at is not None:
                raise Conflict("a revoked token cannot be refreshed; create a new one")
            extend = self.policy.refresh_extends
            if self.policy.max_ttl is not None:
                extend = min(extend, self.policy.max_ttl)
            expires_at = self.now() + timedelta(seconds=extend)
            await store.set_token_expiry(conn, row.id, expires_at)
            await store.add_events(
                conn,
                [row.id],
                "refreshed",
                actor=actor.name,
                ip=actor.ip,
                detail={"from": _iso(row.expires_at), "to": _iso(expires_at)},
            )
            return await self._reload(conn, row.id)

    async def revoke(self, actor: Actor, token_id: str, *, reason: str | None = None) -> TokenRow:
        async with store.transaction(self.pool) as conn:
            row = await self._token(conn, token_id, actor)
            if reason is None:
                reason = "user" if row.user_id == actor.user_id else "admin"
            if await store.revoke_token(conn, row.id, reason):
                await store.add_events(
                    conn,
                    [row.id],
                    "revoked",
                    actor=actor.name,
                    ip=actor.ip,
                    detail={"reason": reason},
                )
            return await self._reload(conn, row.id)

    async def _reload(self, conn: Any, token_id: UUID) -> TokenRow:
        row = await store.get_token(conn, token_id)
        assert row is not None
        return row

    # -- owners ------------------------------------------------------------------------------

    async def set_role(self, actor: Actor, user_id: str, role: str) -> UserRow:
        new_perms = self.role_permissions(role)
        async with store.transaction(self.pool) as conn:
            user = await self._user(conn, user_id, actor, lock=True)
            updated = await store.update_user(conn, user.id, role, user.status, user.email)
            tokens = await store.user_token_ids(conn, user.id)
            await store.add_events(
                conn,
                tokens,
                "owner_role_changed",
                actor=actor.name,
                ip=actor.ip,
                detail={"from": user.role, "to": role},
            )
            can_hold = any(allows(new_perms, p) for p in TOKEN_MANAGING_PERMISSIONS)
            if self.policy.revoke_on_downgrade and not can_hold:
                revoked = await store.revoke_user_tokens(conn, user.id, "owner_downgraded")
                await store.add_events(
                    conn,
                    revoked,
                    "revoked",
                    actor=actor.name,
                    ip=actor.ip,
                    detail={"reason": "owner_downgraded"},
                )
            return updated

    async def set_status(self, actor: Actor, user_id: str, status: str) -> UserRow:
        """Deactivation revokes every token of the user for good (``owner_deactivated``)."""
        if status not in ("active", "deactivated"):
            raise InvalidInput("status must be active or deactivated")
        async with store.transaction(self.pool) as conn:
            user = await self._user(conn, user_id, actor, lock=True)
            updated = await store.update_user(conn, user.id, user.role, status, user.email)
            if status == "deactivated" and user.status != "deactivated":
                revoked = await store.revoke_user_tokens(conn, user.id, "owner_deactivated")
                await store.add_events(
                    conn,
                    revoked,
                    "revoked",
                    actor=actor.name,
                    ip=actor.ip,
                    detail={"reason": "owner_deactivated"},
                )
            return updated


def _clean_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(f"the token name must be 1 to {MAX_NAME_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidInput("the token name may not contain control characters")
    return name
