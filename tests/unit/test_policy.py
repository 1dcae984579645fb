from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy import (
    allows,
    authorize,
    covers,
    effective_permissions,
    excess,
    header_value,
    intersect,
)


@pytest.mark.parametrize(
    ("granted", "needed", "expected"),
    [
        ("*", "jobs:read", True),
        ("*", "*", True),
        ("*", "anything", True),
        ("jobs:*", "jobs:read", True),
        ("jobs:*", "jobs:a:b", True),
        ("jobs:*", "jobs:*", True),
        ("jobs:*", "jobs:a:*", True),
        ("jobs:*", "jobs", False),
        ("jobs:*", "jobsx:read", False),
        ("jobs:*", "invoices:read", False),
        ("jobs:*", "*", False),
        ("jobs:a:*", "jobs:*", False),
        ("jobs:a:*", "jobs:a:b", True),
        ("jobs:a:*", "jobs:ab", False),
        ("jobs:read", "jobs:read", True),
        ("jobs:read", "jobs:write", False),
        ("jobs:read", "jobs:*", False),
        ("jo*", "jobs", False),  # a "*" not after ":" is a plain character
    ],
)
def test_covers(granted: str, needed: str, expected: bool) -> None:
    assert covers(granted, needed) is expected
    assert allows(frozenset({granted}), needed) is expected


def test_allows_sets() -> None:
    granted = frozenset({"jobs:*", "invoices:read"})
    assert allows(granted, "jobs:delete")
    assert allows(granted, "invoices:read")
    assert not allows(granted, "invoices:write")
    assert not allows(frozenset(), "jobs:read")
    assert allows(frozenset({"*"}), "tokens:admin")


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ({"*"}, {"jobs:*"}, {"jobs:*"}),
        ({"jobs:*"}, {"jobs:read", "invoices:read"}, {"jobs:read"}),
        ({"jobs:*"}, {"jobs:*"}, {"jobs:*"}),
        ({"*"}, {"*"}, {"*"}),
        ({"jobs:*", "jobs:read"}, {"*"}, {"jobs:*"}),
        ({"a:*"}, {"a:b:*", "a:c"}, {"a:b:*", "a:c"}),
        ({"a:b:*"}, {"a:*"}, {"a:b:*"}),
        ({"jobs:read"}, {"jobs:write"}, set()),
        ({"jobs:*"}, set(), set()),
        (
            {"jobs:*", "invoices:read", "tokens:create"},
            {"jobs:read", "invoices:*", "users:admin"},
            {"jobs:read", "invoices:read"},
        ),
    ],
)
def test_intersect(a: set[str], b: set[str], expected: set[str]) -> None:
    assert intersect(frozenset(a), frozenset(b)) == frozenset(expected)
    assert intersect(frozenset(b), frozenset(a)) == frozenset(expected)


_PERMISSIONS = st.sampled_from(
    ["*", "a:*", "a:b:*", "a:b", "a:c", "a:b:c", "b:*", "b:a", "ab:*", "ab:c", "a", "c"]
)
_SETS = st.frozensets(_PERMISSIONS, max_size=6)
_PROBES = ["a:b", "a:c", "a:b:c", "a:b:d", "a:x", "b:a", "b:x", "ab:c", "a", "c", "z:z"]
_PROBES += ["*", "a:*", "a:b:*", "b:*", "ab:*"]


@settings(max_examples=500)
@given(_SETS, _SETS)
def test_intersect_covers_exactly_what_both_cover_and_is_minimal(
    a: frozenset[str], b: frozenset[str]
) -> None:
    both = intersect(a, b)
    for probe in _PROBES:
        assert allows(both, probe) == (allows(a, probe) and allows(b, probe)), probe
    for p in both:
        assert not any(covers(q, p) for q in both if q != p), (p, both)
    assert both == intersect(b, a)


@settings(max_examples=300)
@given(_SETS, st.sampled_from(_PROBES))
def test_allows_is_any_covers(granted: frozenset[str], needed: str) -> None:
    assert allows(granted, needed) == any(covers(g, needed) for g in granted)


def test_excess() -> None:
    wanted = frozenset({"jobs:*", "invoices:read", "users:admin", "tokens:create"})
    allowed = frozenset({"jobs:*", "invoices:*", "tokens:create"})
    assert excess(wanted, allowed) == {"users:admin"}
    assert excess(frozenset({"jobs:*"}), frozenset({"jobs:read"})) == {"jobs:*"}
    assert excess(frozenset({"*"}), frozenset({"*"})) == frozenset()


def test_authorize() -> None:
    effective = frozenset({"jobs:*", "invoices:read"})
    assert authorize(effective, (), ())
    assert authorize(effective, ("jobs:read", "jobs:write"), ())
    assert not authorize(effective, ("jobs:read", "invoices:write"), ())
    assert authorize(effective, (), ("invoices:write", "invoices:read"))
    assert not authorize(effective, (), ("invoices:write", "users:admin"))
    assert not authorize(effective, ("users:admin",), ("jobs:read",))
    assert authorize(effective, ("jobs:read",), ("invoices:read",))
    assert not authorize(frozenset(), ("jobs:read",), ())


def test_effective_permissions() -> None:
    owner = frozenset({"jobs:*", "invoices:read"})
    assert effective_permissions(None, owner) == owner
    assert effective_permissions(frozenset({"jobs:read", "users:admin"}), owner) == {"jobs:read"}
    # owner downgraded: scopes fixed at creation shrink to what the owner has now
    assert effective_permissions(frozenset({"*"}), frozenset({"jobs:read"})) == {"jobs:read"}
    assert effective_permissions(frozenset({"jobs:*"}), frozenset()) == frozenset()


def test_header_value() -> None:
    assert header_value(frozenset({"jobs:read", "*", "invoices:*"})) == "* invoices:* jobs:read"
    assert header_value(frozenset()) == ""
