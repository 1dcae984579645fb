"""How tokens, users and audit events look to the outside: the JSON of SPEC §9, shared by
the HTTP API and the CLI's --json, and the derived token state and permissions."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from gateway.policy import effective_permissions
from gateway.store import EventRow, TokenRow, UserRow

TOKEN_STATES = ("active", "expired", "revoked")


def rfc3339(moment: datetime) -> str:
    """RFC 3339 in UTC with a Z (what X-Auth-Token-Expires-At and the JSON carry)."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def iso(moment: datetime | None) -> str | None:
    return rfc3339(moment) if moment is not None else None


def token_state(row: TokenRow, now: datetime) -> str:
    """Derived, never stored: revoked if revoked_at is set, else expired past expires_at."""
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"


def token_permissions(row: TokenRow, roles: Mapping[str, frozenset[str]]) -> frozenset[str]:
    """The token's scopes (or its owner's role) within the owner's current role."""
    scopes = frozenset(row.scopes) if row.scopes is not None else None
    return effective_permissions(scopes, roles.get(row.owner_role, frozenset()))


def token_json(row: TokenRow, roles: Mapping[str, frozenset[str]], now: datetime) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "name": row.name,
        "prefix": row.prefix,
        "state": token_state(row, now),
        "role": row.role,
        "permissions": sorted(token_permissions(row, roles)),
        "user_id": row.user_id,
        "company_id": row.company_id,
        "created_at": iso(row.created_at),
        "created_by": row.created_by,
        "expires_at": iso(row.expires_at),
        "last_used_at": iso(row.last_used_at),
        "last_used_ip": row.last_used_ip,
        "revoked_at": iso(row.revoked_at),
        "revoked_reason": row.revoked_reason,
        "rotated_to": str(row.rotated_to) if row.rotated_to else None,
    }


def user_json(row: UserRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "company_id": row.company_id,
        "role": row.role,
        "status": row.status,
        "email": row.email,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }


def event_json(row: EventRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "token_id": str(row.token_id),
        "event": row.event,
        "actor": row.actor,
        "at": iso(row.at),
        "ip": row.ip,
        "detail": row.detail,
    }
