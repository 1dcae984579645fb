"""Authorization header → Identity, or an AuthError with a reason.

The order is cheapest first: parse the header, check the token's checksum (a random or
mistyped string stops here, touching neither cache nor database), then the cache, then one
indexed query shared by every concurrent request for the same token.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from gateway import store
from gateway.cache import IdentityCache
from gateway.config import IdentityHeaders
from gateway.errors import (
    AuthError,
    DatabaseUnavailable,
    MalformedToken,
    MissingToken,
    OwnerInactive,
    TokenExpired,
    TokenRevoked,
    UnknownToken,
)
from gateway.policy import allows, header_value
from gateway.store import TokenRow
from gateway.tokens import TokenFormat
from gateway.views import rfc3339, token_permissions

Failure = type[AuthError]
__all__ = ["Authenticator", "Identity", "bearer_token", "failure_of", "identity_of", "rfc3339"]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a valid token speaks for, with its header values computed once per cache fill."""

    token_id: str
    user_id: str
    company_id: str
    role: str
    permissions: frozenset[str]
    permissions_header: str
    expires_at: datetime | None
    expires_header: str | None


def identity_headers(names: IdentityHeaders, identity: Identity) -> list[tuple[str, str]]:
    """The trusted headers that tell an upstream who is calling."""
    return [
        (names.user_id, identity.user_id),
        (names.company_id, identity.company_id),
        (names.token_id, identity.token_id),
        (names.role, identity.role),
        (names.permissions, identity.permissions_header),
    ]


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise MissingToken()
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise MalformedToken()
    return value.strip()


def failure_of(row: TokenRow | None, now: datetime) -> Failure | None:
    """Why a stored token may not be used now, or None when it may."""
    if row is None:
        return UnknownToken
    if row.revoked_at is not None and row.revoked_at <= now:  # later: a rotation's grace
        return TokenRevoked
    if row.expires_at is not None and row.expires_at <= now:
        return TokenExpired
    if row.owner_status != "active":
        return OwnerInactive
    return None


_SHARED_MAX: Final = 4096  # distinct permission sets kept shared: tokens scoped every which way
_shared_permissions: dict[frozenset[str], tuple[frozenset[str], str]] = {}


def _shared(permissions: frozenset[str]) -> tuple[frozenset[str], str]:
    """One set and one header value for every identity with these permissions: the cache
    holds up to ``cache.max_entries`` identities, and most share their role's set."""
    shared = _shared_permissions.get(permissions)
    if shared is None:
        if len(_shared_permissions) >= _SHARED_MAX:
            _shared_permissions.clear()
        shared = _shared_permissions[permissions] = (permissions, header_value(permissions))
    return shared


def identity_of(row: TokenRow, roles: Mapping[str, frozenset[str]]) -> Identity:
    """The identity of a stored token. Values that many identities repeat (the owner, the
    company, the role, the permissions) are shared, not copied per token."""
    permissions, permissions_header = _shared(token_permissions(row, roles))
    # The token's role names it only when the token really has all of that role's
    # permissions; a role stripped down to fit its owner is reported as the owner's role.
    role = row.owner_role
    if row.role is not None and all(
        allows(permissions, p) for p in roles.get(row.role, frozenset())
    ):
        role = row.role
    return Identity(
        token_id=str(row.id),
        user_id=sys.intern(row.user_id),
        company_id=sys.intern(row.company_id),
        role=sys.intern(role),
        permissions=permissions,
        permissions_header=permissions_header,
        expires_at=row.expires_at,
        expires_header=rfc3339(row.expires_at) if row.expires_at is not None else None,
    )


class Authenticator:
    def __init__(
        self,
        token_format: TokenFormat,
        cache: IdentityCache[Identity, Failure],
        pool: Any,
        roles: Mapping[str, frozenset[str]],
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.token_format = token_format
        self.cache = cache
        self.pool = pool
        self.roles = roles
        self.now = now

    def cached(self, authorization: str | None) -> Identity | None:
        """The identity if the cache knows it, None when only the database can tell.

        Raises the ``AuthError`` of a missing, malformed or badly checksummed token, or of a
        cached failure: all of that without a query and without awaiting.
        """
        token = bearer_token(authorization)
        tokens = self.token_format
        if len(token) != tokens.length:
            tokens.check(token)  # raises: no digest of arbitrary input
        cached = self.cache.get(tokens.digest(token))
        if isinstance(cached, Identity):
            return cached  # only a well-formed token was ever cached: its checksum held
        tokens.check(token)
        if cached is None:
            return None
        raise cached()

    def key(self, authorization: str | None) -> bytes:
        """The cache key of the token in ``authorization``, for ``cached_key``; raises the
        ``AuthError`` of a missing, malformed or badly checksummed token."""
        token = bearer_token(authorization)
        tokens = self.token_format
        tokens.check(token)
        return tokens.digest(token)

    def cached_key(self, key: bytes) -> Identity | None:
        """``cached`` for a token whose ``key`` the caller kept (it sends it again)."""
        cached = self.cache.get(key)
        if isinstance(cached, Identity):
            return cached
        if cached is None:
            return None
        raise cached()

    async def authenticate(self, authorization: str | None) -> Identity:
        return self.cached(authorization) or await self.load(authorization)

    async def load(self, authorization: str | None) -> Identity:
        """After ``cached`` returned None (the token is well-formed): ask PostgreSQL, once
        for all concurrent callers."""
        digests = self.token_format.digests(bearer_token(authorization))
        key = digests[0]
        try:
            loaded = await self.cache.get_or_load(key, lambda: self._load(key, digests))
        except DatabaseUnavailable:
            stale = self.cache.stale(key)  # cache.stale_if_error
            if stale is None:
                raise
            return stale
        if isinstance(loaded, Identity):
            return loaded
        raise loaded()

    async def _load(self, key: bytes, digests: tuple[bytes, ...]) -> Identity | Failure:
        since = self.cache.generation  # an invalidation during the query: do not keep it
        try:
            row = await store.find_token_by_digest(self.pool, digests)
        except store.UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable() from exc
        now = self.now()
        failure = failure_of(row, now)
        if row is None or failure is not None:
            token_id = str(row.id) if row is not None else None
            failure = failure or UnknownToken
            self.cache.put_negative(key, failure, token_id=token_id, since=since)
            return failure
        identity = identity_of(row, self.roles)
        ends = [t for t in (row.expires_at, row.revoked_at) if t is not None]
        lifetime = (min(ends) - now).total_seconds() if ends else None
        self.cache.put(
            key,
            identity,
            token_id=identity.token_id,
            user_id=identity.user_id,
            lifetime=lifetime,
            since=since,
        )
        return identity
