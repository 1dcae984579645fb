"""The pure parts of authentication: the Authorization header, why a stored token may not
be used, and the identity (headers included) a valid one speaks for."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import pytest

from gateway.auth import bearer_token, failure_of, identity_of, rfc3339
from gateway.errors import (
    AuthError,
    MalformedToken,
    MissingToken,
    OwnerInactive,
    TokenExpired,
    TokenRevoked,
    UnknownToken,
)
from gateway.store import TokenRow

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)

ROLES: dict[str, frozenset[str]] = {
    "owner": frozenset({"*"}),
    "admin": frozenset({"jobs:*", "invoices:*", "tokens:admin", "tokens:create", "users:admin"}),
    "full_user": frozenset({"jobs:*", "invoices:read", "tokens:create"}),
    "field_user": frozenset({"jobs:read"}),
}


def token_row(**changes: Any) -> TokenRow:
    values: dict[str, Any] = {
        "id": UUID("0b6f3c1e-8d4a-4f3e-9a51-7c2d1e0f9a10"),
        "name": "ci",
        "prefix": "pat_3kF9",
        "role": None,
        "scopes": None,
        "user_id": "u-1",
        "company_id": "c-1",
        "created_at": NOW - timedelta(days=10),
        "created_by": "u-1",
        "expires_at": NOW + timedelta(days=30),
        "last_used_at": None,
        "last_used_ip": None,
        "revoked_at": None,
        "revoked_reason": None,
        "rotated_to": None,
        "owner_role": "full_user",
        "owner_status": "active",
    }
    values.update(changes)
    return TokenRow(**values)


# ---------------------------------------------------------------------------------------------
# bearer_token


@pytest.mark.parametrize("header", [None, ""])
def test_missing_header_is_missing_token_without_error_attribute(header: str | None) -> None:
    with pytest.raises(MissingToken) as caught:
        bearer_token(header)

    assert caught.value.reason == "missing"
    assert caught.value.headers() == {"WWW-Authenticate": 'Bearer realm="patgate"'}
    assert "error=" not in caught.value.headers()["WWW-Authenticate"]


@pytest.mark.parametrize(
    "header",
    [
        "Basic dXNlcjpwYXNz",
        "Token pat_abc",
        "Bearer",
        "Bearer ",
        "Bearer     ",
        "bearer",
        "Bearerpat_abc",
        "pat_abc",
        "Bearer\tpat_abc",  # RFC 6750: one or more spaces, not a tab
    ],
)
def test_wrong_scheme_or_empty_value_is_malformed(header: str) -> None:
    with pytest.raises(MalformedToken) as caught:
        bearer_token(header)

    assert caught.value.reason == "malformed"
    assert caught.value.headers() == {
        "WWW-Authenticate": 'Bearer realm="patgate", error="invalid_token"'
    }


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_scheme_is_case_insensitive(scheme: str) -> None:
    assert bearer_token(f"{scheme} pat_abc123") == "pat_abc123"


@pytest.mark.parametrize(
    "header",
    ["  Bearer pat_abc123", "Bearer pat_abc123  ", "Bearer    pat_abc123", " Bearer  pat_abc123 "],
)
def test_surrounding_spaces_are_ignored(header: str) -> None:
    assert bearer_token(header) == "pat_abc123"


def test_token_value_is_returned_unchanged() -> None:
    token = "pat_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"

    assert bearer_token(f"Bearer {token}") == token


def test_auth_errors_never_say_why_to_the_client() -> None:
    for error in (MalformedToken(), UnknownToken(), TokenExpired(), TokenRevoked()):
        assert error.detail == "The access token is invalid or expired."
        assert error.status == 401
    assert OwnerInactive().detail == UnknownToken().detail


# ---------------------------------------------------------------------------------------------
# failure_of


def test_no_row_is_unknown() -> None:
    assert failure_of(None, NOW) is UnknownToken


def test_active_token_of_active_owner_has_no_failure() -> None:
    assert failure_of(token_row(), NOW) is None
    assert failure_of(token_row(expires_at=None), NOW) is None
    assert failure_of(token_row(expires_at=NOW + timedelta(microseconds=1)), NOW) is None


def test_revoked_token_is_revoked() -> None:
    row = token_row(revoked_at=NOW - timedelta(hours=1), revoked_reason="user")

    assert failure_of(row, NOW) is TokenRevoked


def test_revoked_wins_over_expired_and_inactive_owner() -> None:
    row = token_row(
        revoked_at=NOW - timedelta(hours=1),
        revoked_reason="owner_deactivated",
        expires_at=NOW - timedelta(days=1),
        owner_status="deactivated",
    )

    assert failure_of(row, NOW) is TokenRevoked


@pytest.mark.parametrize("delta", [timedelta(0), timedelta(seconds=-1), timedelta(days=-400)])
def test_expiry_at_or_before_now_is_expired(delta: timedelta) -> None:
    assert failure_of(token_row(expires_at=NOW + delta), NOW) is TokenExpired


def test_expiry_is_compared_across_time_zones() -> None:
    plus_two = timezone(timedelta(hours=2))
    same_instant = NOW.astimezone(plus_two)

    assert failure_of(token_row(expires_at=same_instant), NOW) is TokenExpired
    later = (NOW + timedelta(seconds=1)).astimezone(plus_two)
    assert failure_of(token_row(expires_at=later), NOW) is None


def test_deactivated_owner_is_owner_inactive() -> None:
    assert failure_of(token_row(owner_status="deactivated"), NOW) is OwnerInactive


def test_every_failure_is_an_auth_error_with_its_reason() -> None:
    reasons = {
        UnknownToken: "unknown",
        TokenRevoked: "revoked",
        TokenExpired: "expired",
        OwnerInactive: "owner_inactive",
    }
    for failure, reason in reasons.items():
        assert issubclass(failure, AuthError)
        assert failure.reason == reason


# ---------------------------------------------------------------------------------------------
# identity_of


def test_identity_carries_the_row_ids() -> None:
    token_id = uuid4()
    identity = identity_of(token_row(id=token_id, user_id="u-9", company_id="c-9"), ROLES)

    assert identity.token_id == str(token_id)
    assert identity.user_id == "u-9"
    assert identity.company_id == "c-9"


def test_identities_share_what_they_repeat_instead_of_copying_it() -> None:
    """The cache holds up to 100,000 identities (SPEC §12 memory): tokens of one owner and
    role hold one copy of the ids, the role, the permission set and its header."""
    # Values made at run time, as a database driver makes them: equal, not the same objects.
    owner = "".join(["u-", "shared"])
    first, second = (
        identity_of(token_row(id=uuid4(), user_id="".join(["u-", "shared"])), ROLES)
        for _ in range(2)
    )
    assert first.token_id != second.token_id
    assert first.user_id == owner
    for name in ("user_id", "company_id", "role", "permissions", "permissions_header"):
        assert getattr(first, name) is getattr(second, name), name
    scoped = identity_of(token_row(id=uuid4(), scopes=["jobs:read"]), ROLES)
    assert scoped.permissions == frozenset({"jobs:read"})
    assert scoped.permissions is not first.permissions


def test_unscoped_token_has_the_owners_role_permissions() -> None:
    identity = identity_of(token_row(scopes=None, owner_role="full_user"), ROLES)

    assert identity.permissions == ROLES["full_user"]
    assert identity.permissions_header == "invoices:read jobs:* tokens:create"


def test_scoped_token_has_scopes_intersected_with_owner_role() -> None:
    row = token_row(
        role="admin",
        scopes=["jobs:*", "invoices:*", "users:admin"],
        owner_role="full_user",
    )

    identity = identity_of(row, ROLES)

    assert identity.permissions == frozenset({"jobs:*", "invoices:read"})
    assert identity.permissions_header == "invoices:read jobs:*"


def test_scoped_token_shrinks_with_the_owners_current_role() -> None:
    row = token_row(role="full_user", scopes=["jobs:*", "invoices:read"], owner_role="field_user")

    assert identity_of(row, ROLES).permissions == frozenset({"jobs:read"})


def test_scopes_never_exceed_an_owner_with_wildcard_role() -> None:
    row = token_row(role="field_user", scopes=["jobs:read"], owner_role="owner")

    assert identity_of(row, ROLES).permissions == frozenset({"jobs:read"})


def test_empty_scopes_grant_nothing() -> None:
    identity = identity_of(token_row(role="field_user", scopes=[], owner_role="owner"), ROLES)

    assert identity.permissions == frozenset()
    assert identity.permissions_header == ""


def test_unknown_owner_role_grants_nothing() -> None:
    for scopes in (None, ["jobs:read"]):
        identity = identity_of(token_row(scopes=scopes, owner_role="removed_role"), ROLES)
        assert identity.permissions == frozenset()
        assert identity.permissions_header == ""


def test_role_header_is_the_tokens_role_else_the_owners() -> None:
    scoped = token_row(role="field_user", scopes=["jobs:read"], owner_role="admin")
    unscoped = token_row(role=None, owner_role="admin")

    assert identity_of(scoped, ROLES).role == "field_user"
    assert identity_of(unscoped, ROLES).role == "admin"


def test_permissions_header_is_sorted_and_space_separated() -> None:
    identity = identity_of(token_row(owner_role="admin"), ROLES)

    assert identity.permissions_header == (
        "invoices:* jobs:* tokens:admin tokens:create users:admin"
    )


def test_expires_header_is_rfc3339_utc_with_z() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    identity = identity_of(token_row(expires_at=moment), ROLES)

    assert identity.expires_at == moment
    assert identity.expires_header == "2026-01-02T03:04:05Z"


def test_expires_header_of_an_offset_expiry_is_converted_to_utc() -> None:
    moment = datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))

    assert identity_of(token_row(expires_at=moment), ROLES).expires_header == (
        "2026-01-02T03:04:05Z"
    )


def test_token_without_expiry_has_no_expires_header() -> None:
    identity = identity_of(token_row(expires_at=None), ROLES)

    assert identity.expires_at is None
    assert identity.expires_header is None


def test_identity_is_immutable() -> None:
    identity = identity_of(token_row(), ROLES)

    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.user_id = "someone-else"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# rfc3339


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC), "2025-06-01T12:00:00Z"),
        (datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC), "2025-06-01T12:00:00.123456Z"),
        (
            datetime(2025, 6, 1, 0, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
            "2025-05-31T19:00:00Z",
        ),
        (
            datetime(2025, 12, 31, 20, 0, tzinfo=timezone(timedelta(hours=-5))),
            "2026-01-01T01:00:00Z",
        ),
    ],
)
def test_rfc3339_is_utc_with_z(moment: datetime, expected: str) -> None:
    text = rfc3339(moment)

    assert text == expected
    assert "+00:00" not in text
    assert datetime.fromisoformat(text) == moment
