"""The token lifecycle rules of SPEC §2, shared by the CLI and the management API.

Every function runs in one transaction and writes an audit event for each token it
touches. The caller is an ``Actor``: the operator CLI (no company boundary, every power) or
a signed-in user (their company, their permissions).
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from gateway import store
from gateway.config import Config
from gateway.errors import Conflict, Forbidden, InvalidInput, NotFound
from gateway.policy import allows, excess, intersect
from gateway.store import TokenRow, UserRow
from gateway.tokens import TokenFormat
from gateway.views import (
    TOKEN_STATES,
    iso,
    token_json,
    token_permissions,
    token_state,
)

MAX_NAME_LENGTH = 100
MAX_LIFETIME_DAYS = 100 * 366  # beyond this "never expires" is the honest choice
MIN_LIFETIME = timedelta(minutes=1)  # a token born expired is a mistake, not a request
TOKEN_MANAGING_PERMISSIONS = ("tokens:create", "tokens:admin")
USER_STATUSES = ("active", "deactivated")
# Changes that can shrink what a token may do: caches must forget the token at once.
INVALIDATING_EVENTS = frozenset({"revoked", "refreshed", "rotated", "owner_role_changed"})


class _Unset:
    """Marks an optional field the caller did not send (distinct from an explicit null)."""


UNSET = _Unset()


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


class TokenService:
    def __init__(
        self,
        cfg: Config,
        pool: Any,
        *,
        now: Callable[[], datetime] | None = None,
        invalidate: Callable[[Collection[str]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.policy = cfg.tokens
        self.roles: Mapping[str, frozenset[str]] = cfg.roles
        self.format = TokenFormat(cfg.tokens.prefix, cfg.tokens.pepper)
        self.pool = pool
        self._now = now or (lambda: datetime.now(UTC))
        self.invalidate = invalidate

    def now(self) -> datetime:
        result: datetime = self._now()
        return result

    # -- presentation ------------------------------------------------------------------------

    def permissions(self, row: TokenRow) -> frozenset[str]:
        return token_permissions(row, self.roles)

    def token_json(self, row: TokenRow) -> dict[str, Any]:
        return token_json(row, self.roles, self.now())

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
            if at < now + MIN_LIFETIME:
                raise InvalidInput("the expiry date must be at least a minute in the future")
        elif expiry.in_days is not None:
            if not 0 < expiry.in_days <= MAX_LIFETIME_DAYS:
                raise InvalidInput(f"the lifetime must be 1 to {MAX_LIFETIME_DAYS} days")
            at = now + timedelta(days=expiry.in_days)
            if at < now + MIN_LIFETIME:
                raise InvalidInput("the lifetime must be at least a minute")
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
        self._check_may_create(actor, owner_id)
        expires_at = self.resolve_expiry(expiry)
        async with self._tx() as tx:
            conn = tx.conn
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
            await self._check_limit(conn, owner.id)
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
            detail = {"name": name, "role": role, "expires_at": iso(expires_at)}
            if dropped:
                detail["dropped_permissions"] = sorted(dropped)  # type: ignore[assignment]
            await self._events(tx, actor, [token_id], "created", detail)
            row = await store.get_token(conn, token_id)
        assert row is not None
        return Created(row, new.plaintext, tuple(sorted(dropped)))

    async def _claim_slot(self, conn: Any, user_id: str) -> None:
        """An expired token about to become active again (refresh) or to have an active
        successor (rotate): lock the owner, as create does, and check the limit."""
        await store.get_user(conn, user_id, for_update=True)  # serialise with create
        await self._check_limit(conn, user_id)

    async def _check_limit(self, conn: Any, user_id: str) -> None:
        """``tokens.max_active_per_user``: the caller holds the user's row lock."""
        limit = self.policy.max_active_per_user
        if limit is not None and await store.count_active_tokens(conn, user_id) >= limit:
            raise Conflict(
                "A token is already created for this user; revoke it before creating another"
                if limit == 1
                else f"This user already has {limit} active tokens; revoke one first"
            )

    def _check_may_create(self, actor: Actor, owner_id: str) -> None:
        if owner_id != actor.user_id and not allows(actor.permissions, "tokens:admin"):
            raise Forbidden("creating tokens for another user needs tokens:admin")
        if owner_id == actor.user_id and not any(
            allows(actor.permissions, p) for p in TOKEN_MANAGING_PERMISSIONS
        ):
            raise Forbidden("your role may not generate personal access tokens")

    async def get(self, actor: Actor, token_id: str) -> TokenRow:
        async with self._tx() as tx:
            conn = tx.conn
            return await self._token(conn, token_id, actor)

    async def list(
        self,
        actor: Actor,
        *,
        user_id: str | None = None,
        company_id: str | None = None,
        state: str | None = None,
        all_users: bool = False,
    ) -> builtins.list[TokenRow]:
        """A user sees their own tokens; with tokens:admin, any user's of their company
        (``all_users`` for everyone's). The operator sees what the filters select."""
        if state is not None and state not in TOKEN_STATES:
            raise InvalidInput("state must be one of " + ", ".join(TOKEN_STATES))
        if actor.company_id is not None:
            company_id = actor.company_id
            if all_users or (user_id is not None and user_id != actor.user_id):
                self._require(actor, "tokens:admin")
            elif user_id is None:
                user_id = actor.user_id
        async with self._tx() as tx:
            conn = tx.conn
            return await store.list_tokens(
                conn, user_id=user_id, company_id=company_id, state=state
            )

    async def rename(self, actor: Actor, token_id: str, name: str) -> TokenRow:
        name = _clean_name(name)
        async with self._tx() as tx:
            conn = tx.conn
            row = await self._token(conn, token_id, actor)
            await store.rename_token(conn, row.id, name)
            await self._events(tx, actor, [row.id], "renamed", {"from": row.name, "to": name})
            return await self._reload(conn, row.id)

    async def refresh(self, actor: Actor, token_id: str) -> TokenRow:
        """Extend the expiry to now + refresh_extends; an expired token becomes active again."""
        async with self._tx() as tx:
            conn = tx.conn
            row = await self._token(conn, token_id, actor)
            if row.revoked_at is not None:
                raise Conflict("a revoked token cannot be refreshed; create a new one")
            if token_state(row, self.now()) == "expired":  # becomes active: it needs a slot
                await self._claim_slot(conn, row.user_id)
            extend = self.policy.refresh_extends
            if self.policy.max_ttl is not None:
                extend = min(extend, self.policy.max_ttl)
            expires_at = self.now() + timedelta(seconds=extend)
            await store.set_token_expiry(conn, row.id, expires_at)
            await self._events(
                tx,
                actor,
                [row.id],
                "refreshed",
                {"from": iso(row.expires_at), "to": iso(expires_at)},
            )
            return await self._reload(conn, row.id)

    async def revoke(self, actor: Actor, token_id: str, *, reason: str | None = None) -> TokenRow:
        async with self._tx() as tx:
            conn = tx.conn
            row = await self._token(conn, token_id, actor)
            if reason is None:
                reason = "user" if row.user_id == actor.user_id else "admin"
            if await store.revoke_token(conn, row.id, reason):
                await self._events(tx, actor, [row.id], "revoked", {"reason": reason})
            return await self._reload(conn, row.id)

    async def rotate(self, actor: Actor, token_id: str) -> Created:
        """A new token with the same name, role and lifetime; the old one is revoked
        (``rotated``, ``rotated_to``) after ``tokens.rotation_grace``.

        Rotating a token that was already rotated or revoked means an old secret is in
        someone's hands: every successor in its chain is revoked (``leaked``) and the call
        answers 409.
        """
        async with self._tx() as tx:
            conn = tx.conn
            row = await self._token(conn, token_id, actor)
            self._check_may_create(actor, row.user_id)
            reused = row.revoked_at is not None or row.rotated_to is not None
            if reused:
                chain = await store.revoke_chain(conn, row.id, "leaked")
                await self._events(
                    tx, actor, chain, "revoked", {"reason": "leaked", "reused": str(row.id)}
                )
        if reused:  # outside the transaction: the chain revocation must commit
            raise Conflict(
                "this token was already rotated or revoked; as a precaution every token "
                "rotated from it has been revoked"
            )
        now = self.now()
        expires_at = None
        if row.expires_at is not None:
            lifetime = row.expires_at - row.created_at
            if self.policy.max_ttl is not None:
                lifetime = min(lifetime, timedelta(seconds=self.policy.max_ttl))
            expires_at = now + lifetime
        new = self.format.generate()
        successor = uuid4()
        async with self._tx() as tx:
            conn = tx.conn
            row = await self._token(conn, token_id, actor)
            if row.revoked_at is not None or row.rotated_to is not None:
                raise Conflict("this token was rotated or revoked meanwhile")
            if token_state(row, now) == "expired":  # frees no slot for its successor
                await self._claim_slot(conn, row.user_id)
            await store.insert_token(
                conn,
                token_id=successor,
                name=row.name,
                prefix=new.display_prefix,
                digest=new.digest,
                role=row.role,
                scopes=row.scopes,
                user_id=row.user_id,
                company_id=row.company_id,
                created_by=actor.name,
                expires_at=expires_at,
            )
            ends = now + timedelta(seconds=self.policy.rotation_grace)
            await store.mark_rotated(conn, row.id, ends, successor)
            await self._events(
                tx,
                actor,
                [row.id],
                "rotated",
                {"rotated_to": str(successor), "valid_until": iso(ends)},
            )
            await self._events(
                tx, actor, [successor], "created", {"name": row.name, "rotated_from": str(row.id)}
            )
            created = await self._reload(conn, successor)
        return Created(created, new.plaintext, ())

    async def events(self, actor: Actor, token_id: str) -> builtins.list[store.EventRow]:
        async with self._tx() as tx:
            conn = tx.conn
            row = await self._token(conn, token_id, actor)
            return await store.token_events(conn, row.id)

    async def revoke_leaked(self, plaintexts: Sequence[str], *, ip: str | None) -> int:
        """Revoke (``leaked``) those of ``plaintexts`` that are real tokens; how many were."""
        digests = [
            digest
            for text in plaintexts
            if self.format.is_well_formed(text)
            for digest in self.format.digests(text)
        ]
        if not digests:
            return 0
        reporter = Actor(user_id="leak-report", company_id=None, permissions=frozenset(), ip=ip)
        async with self._tx() as tx:
            conn = tx.conn
            revoked = await store.revoke_tokens_by_digest(conn, digests, "leaked")
            await self._events(tx, reporter, revoked, "revoked", {"reason": "leaked"})
        return len(revoked)

    async def _reload(self, conn: Any, token_id: UUID) -> TokenRow:
        row = await store.get_token(conn, token_id)
        assert row is not None
        return row

    # -- owners ------------------------------------------------------------------------------

    def _require(self, actor: Actor, permission: str) -> None:
        if not allows(actor.permissions, permission):
            raise Forbidden(f"this needs the {permission} permission")

    async def list_users(self, actor: Actor) -> builtins.list[UserRow]:
        self._require(actor, "users:admin")
        if actor.company_id is None:
            raise InvalidInput("the operator lists users per company")
        async with self._tx() as tx:
            conn = tx.conn
            return await store.company_users(conn, actor.company_id)

    async def put_user(
        self,
        actor: Actor,
        user_id: str,
        *,
        company_id: str,
        role: str,
        email: str | None = None,
        status: str = "active",
    ) -> tuple[UserRow, bool]:
        """Create or replace a user of the actor's company; (user, created)."""
        self._require(actor, "users:admin")
        self.role_permissions(role)
        if not self._visible(actor, company_id):
            raise Forbidden("users can only be managed within your own company")
        async with self._tx() as tx:
            conn = tx.conn
            existing = await store.get_user(conn, user_id, for_update=True)
            if existing is None:
                if await store.get_company(conn, company_id) is None:
                    raise NotFound(f"no company {company_id!r}")
                user = await store.insert_user(conn, user_id, company_id, role, email)
                if status != "active":
                    user = await self._change(
                        tx, actor, user_id, role=None, status=status, email=UNSET
                    )
                return user, True
            if existing.company_id != company_id:
                raise Conflict("a user cannot move to another company")
            user = await self._change(tx, actor, user_id, role=role, status=status, email=email)
            return user, False

    async def change_user(
        self,
        actor: Actor,
        user_id: str,
        *,
        role: str | None = None,
        status: str | None = None,
        email: str | _Unset | None = UNSET,
    ) -> UserRow:
        self._require(actor, "users:admin")
        async with self._tx() as tx:
            return await self._change(tx, actor, user_id, role=role, status=status, email=email)

    async def set_role(self, actor: Actor, user_id: str, role: str) -> UserRow:
        return await self.change_user(actor, user_id, role=role)

    async def set_status(self, actor: Actor, user_id: str, status: str) -> UserRow:
        return await self.change_user(actor, user_id, status=status)

    async def _change(
        self,
        tx: Tx,
        actor: Actor,
        user_id: str,
        *,
        role: str | None,
        status: str | None,
        email: str | _Unset | None,
    ) -> UserRow:
        """Apply a user change and its effects on their tokens, in the caller's transaction.

        A role change shrinks the tokens' effective permissions at once (they are computed
        from the owner's current role) and, with ``revoke_on_downgrade``, revokes them when
        the new role can neither create nor administer tokens. Deactivation revokes every
        token for good (``owner_deactivated``); activating again does not bring them back.
        """
        if status is not None and status not in USER_STATUSES:
            raise InvalidInput("status must be active or deactivated")
        new_perms = self.role_permissions(role) if role is not None else None
        conn = tx.conn
        user = await self._user(conn, user_id, actor, lock=True)
        updated = await store.update_user(
            conn,
            user.id,
            role or user.role,
            status or user.status,
            user.email if isinstance(email, _Unset) else email,
        )
        if new_perms is not None and role != user.role:
            tokens = await store.user_token_ids(conn, user.id)
            await self._events(
                tx, actor, tokens, "owner_role_changed", {"from": user.role, "to": role}
            )
            can_hold = any(allows(new_perms, p) for p in TOKEN_MANAGING_PERMISSIONS)
            if self.policy.revoke_on_downgrade and not can_hold:
                await self._revoke_user(tx, actor, user.id, "owner_downgraded")
        if status == "deactivated" and user.status != "deactivated":
            await self._revoke_user(tx, actor, user.id, "owner_deactivated")
        return updated

    async def _revoke_user(self, tx: Tx, actor: Actor, user_id: str, reason: str) -> None:
        revoked = await store.revoke_user_tokens(tx.conn, user_id, reason)
        await self._events(tx, actor, revoked, "revoked", {"reason": reason})

    async def _events(
        self, tx: Tx, actor: Actor, tokens: Sequence[UUID], event: str, detail: dict[str, Any]
    ) -> None:
        """Audit ``event`` for each token; events that can shrink access invalidate caches."""
        await store.add_events(tx.conn, tokens, event, actor=actor.name, ip=actor.ip, detail=detail)
        if event in INVALIDATING_EVENTS:
            tx.invalidated.update(str(t) for t in tokens)

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Tx]:
        """A transaction that tells every replica which tokens it made stale.

        The NOTIFY is sent inside the transaction (PostgreSQL delivers it on commit); the
        local hook runs after the commit, so a request cannot re-cache the old row.
        """
        tx = Tx()
        async with store.transaction(self.pool) as conn:
            tx.conn = conn
            yield tx
            if tx.invalidated:
                await store.notify_invalidated(conn, sorted(tx.invalidated))
        if tx.invalidated and self.invalidate is not None:
            self.invalidate(tx.invalidated)


class Tx:
    """One transaction's connection and the tokens it changed."""

    __slots__ = ("conn", "invalidated")

    def __init__(self) -> None:
        self.conn: Any = None
        self.invalidated: set[str] = set()


def _clean_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(f"the token name must be 1 to {MAX_NAME_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidInput("the token name may not contain control characters")
    return name
