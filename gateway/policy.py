"""Permissions: wildcards, coverage, intersection, and the route requirement check.

A permission is one of:

- ``*`` — covers every permission;
- ``ns:*`` — covers every permission starting with ``ns:``, deeper ones included
  (``jobs:*`` covers ``jobs:read`` and ``jobs:a:b``; ``a:*`` covers ``a:b:*``);
- anything else — a literal, covering only itself (a ``*`` elsewhere, as in ``jo*``, is
  just a character).

What a set covers is the union of what its members cover. Because two permissions either
cover nested or disjoint sets, every check is a few set lookups: ``allows`` tries the needed
permission itself, then each wildcard above it (``a:b:*``, ``a:*``, ``*``) — O(number of
``:`` in it), never a scan of the granted set.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

__all__ = [
    "WILDCARD",
    "allows",
    "authorize",
    "covers",
    "effective_permissions",
    "excess",
    "header_value",
    "intersect",
]

WILDCARD = "*"


def _wildcards_above(permission: str) -> Iterator[str]:
    """The wildcards that cover ``permission``, narrowest first, excluding itself."""
    cut = permission.rfind(":")
    while cut >= 0:
        wildcard = permission[: cut + 1] + WILDCARD
        if wildcard != permission:
            yield wildcard
        cut = permission.rfind(":", 0, cut)
    if permission != WILDCARD:
        yield WILDCARD


def covers(granted: str, needed: str) -> bool:
    """Whether the single permission ``granted`` covers ``needed``."""
    if granted in (needed, WILDCARD):
        return True
    return granted.endswith(":*") and needed.startswith(granted[:-1])


def allows(granted: frozenset[str], needed: str) -> bool:
    """Whether the set ``granted`` covers ``needed``."""
    if needed in granted:
        return True
    return any(wildcard in granted for wildcard in _wildcards_above(needed))


def _covered_by_another(permissions: frozenset[str], permission: str) -> bool:
    return any(wildcard in permissions for wildcard in _wildcards_above(permission))


def _minimal(permissions: set[str]) -> frozenset[str]:
    """Drop every member covered by another member."""
    frozen = frozenset(permissions)
    return frozenset(p for p in frozen if not _covered_by_another(frozen, p))


def intersect(a: frozenset[str], b: frozenset[str]) -> frozenset[str]:
    """The minimal set covering exactly what both ``a`` and ``b`` cover.

    ``{"*"} ∩ {"jobs:*"} = {"jobs:*"}``; ``{"jobs:*"} ∩ {"jobs:read", "invoices:read"} =
    {"jobs:read"}``. Covered sets are nested or disjoint, so the answer is the members of
    each side that the other side covers, minimized.
    """
    if a == b:
        return _minimal(set(a))
    found = {p for p in a if allows(b, p)}
    found.update(p for p in b if allows(a, p))
    return _minimal(found)


def excess(wanted: frozenset[str], allowed: frozenset[str]) -> frozenset[str]:
    """The members of ``wanted`` that ``allowed`` does not cover (what gets stripped)."""
    return frozenset(p for p in wanted if not allows(allowed, p))


@lru_cache(maxsize=4096)
def authorize(
    effective: frozenset[str], require: tuple[str, ...], require_any: tuple[str, ...]
) -> bool:
    """Every permission of ``require``, and one of ``require_any`` when it is not empty.

    Remembered: there are as many distinct arguments as roles (and role-scoped token sets)
    times routes, and the answer for them never changes.
    """
    for needed in require:
        if not allows(effective, needed):
            return False
    if require_any:
        return any(allows(effective, needed) for needed in require_any)
    return True


def effective_permissions(
    scopes: frozenset[str] | None, owner_role_perms: frozenset[str]
) -> frozenset[str]:
    """A token's permissions now: its scopes ∩ its owner's current role, or the role's when
    the token has no scopes of its own."""
    if scopes is None:
        return owner_role_perms
    return intersect(scopes, owner_role_perms)


def header_value(permissions: frozenset[str]) -> str:
    """The ``X-Auth-Permissions`` value: space-separated, sorted."""
    return " ".join(sorted(permissions))
