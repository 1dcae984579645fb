"""Property tests: the one canonical path is what the decision is made on and what is sent.

Pure properties of ``gateway.paths.canonical_path`` and of the route decision, judged by the
independent references in ``tests.security``; then end to end: raw paths sent over a socket
to the real gateway, with the upstream's record as the verdict. Deterministic
(``derandomize=True``) and bounded, so the module runs in seconds.
"""

from __future__ import annotations

import re
import string
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from gateway.config import Config
from gateway.errors import BadPath
from gateway.paths import canonical_path
from gateway.routing import RouteTable
from tests.conftest import RecordingUpstream, gateway_config
from tests.security import is_under, lenient_view, merged_view, rfc_view, start_gateway
from tests.security.rawhttp import request

PROTECTED_PREFIX = "/admin"

# ---------------------------------------------------------------------------------------------
# Strategies: paths assembled from segments that are words, dot segments, escapes of any
# byte (either case of hex digit), and the characters path-confusion attacks are made of.

WORD_CHARS = string.ascii_letters + string.digits + "._~-"
TRICKS = [
    ".",
    "..",
    "admin",
    "public",
    ";",
    ";x=1",
    "\\",
    "#",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "%00",
    "%25",
    "%252e",
    "%61",
    "%41",
    "%",
    "%4",
    "%zz",
]


def _escape(byte: int, upper: bool) -> str:
    text = f"%{byte:02X}"
    return text if upper else text.lower()


escapes = st.builds(_escape, st.integers(0, 255), st.booleans())
atoms = st.one_of(
    st.text(WORD_CHARS, min_size=1, max_size=6),
    st.sampled_from(TRICKS),
    escapes,
)
# A segment: empty (so "//" happens), or one to three atoms run together ("..%2f", ".%2e").
segments = st.one_of(st.just(""), st.lists(atoms, min_size=1, max_size=3).map("".join))
# Often aimed at (or from) the protected prefix, so both decisions are exercised.
starts = st.sampled_from(["", "", "/admin", "/public", "/admin/..", "/public/.."])
paths = st.builds(
    lambda start, parts: start + "/" + "/".join(parts), starts, st.lists(segments, max_size=6)
)

# What canonical_path may never return, whatever it is given.
REFUSED_IN_OUTPUT = re.compile(
    r"[\\;#\x00-\x1f\x7f]|%(?:2[EeFf]|3[Bb]|5[Cc]|[01][0-9A-Fa-f]|7[Ff])"
)
# Why canonical_path may refuse: one of these (a refused character, a refused escape or a
# malformed one: "%", "%4", "%zz"), a ".." that climbs above the root, or a ".." that pops an
# empty segment (see ``pops_an_empty_segment``).
REFUSAL_REASONS = re.compile(
    r"[\\;#\x00-\x1f\x7f]|%(?:2[EeFf]|3[Bb]|5[Cc]|[01][0-9A-Fa-f]|7[Ff])|%(?![0-9A-Fa-f]{2})"
)

PURE = settings(derandomize=True, max_examples=1000, deadline=None)


def climbs_above_root(path: str) -> bool:
    depth = 0
    segments = path.split("/")[1:]
    for segment in segments:
        if segment == "..":
            if depth == 0:
                return True
            depth -= 1
        elif segment != ".":
            depth += 1
    return False


def pops_an_empty_segment(path: str) -> bool:
    """A ".." that, resolved per RFC 3986, removes an empty segment ("/a//../b", "//..",
    "/a//b/../.."): the RFC reads "/a//../b" as "/a/b", an upstream that merges slashes first
    as "/b". Two readings of one path, so canonical_path may refuse it."""
    kept: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if kept and kept.pop() == "":
                return True
        elif segment != ".":
            kept.append(segment)
    return False


@PURE
@given(paths)
@example("/public//../admin")
@example("/public/%252e%252e/admin")
@example("//..")
@example("/a/b/..")
@example("/a//b/../..")
@example("/a//./../b")
@example("/public/..//admin")
@example("/a/%zz/..")
def test_canonical_path_means_what_the_raw_path_means(raw: str) -> None:
    try:
        canonical = canonical_path(raw)
    except BadPath:
        assert (
            REFUSAL_REASONS.search(raw) or climbs_above_root(raw) or pops_an_empty_segment(raw)
        ), "refused for no reason"
        return
    note(f"canonical: {canonical!r}")
    assert canonical.startswith("/")
    assert not {".", ".."} & set(canonical.split("/")[1:])
    assert REFUSED_IN_OUTPUT.search(canonical) is None
    assert REFUSAL_REASONS.search(raw) is None, "accepted with a refused character or escape"
    assert canonical_path(canonical) == canonical
    # the gateway, an RFC 3986 upstream and one that merges slashes agree on the resource
    assert rfc_view(canonical) == rfc_view(raw)
    assert merged_view(canonical) == merged_view(raw)
    # and no escape was decoded or re-cased on the way: only whole segments were dropped
    assert set(re.findall(r"%[0-9A-Fa-f]{2}", canonical)) <= set(re.findall(r"%..", raw))


def decision_config(upstream_url: str) -> Config:
    """A public catch-all ``/`` and a protected ``/admin``: what escapes one lands on the other."""
    routes = [
        {"name": "site", "match": {"prefix": "/"}, "upstream": upstream_url, "public": True},
        {
            "name": "admin",
            "match": {"prefix": PROTECTED_PREFIX},
            "upstream": upstream_url,
            "require": ["users:admin"],
        },
    ]
    return gateway_config(upstream_url, routes=routes)


TABLE = RouteTable(decision_config("http://127.0.0.1:9").routes)


def decided_route(raw: str) -> tuple[str, str] | None:
    """(canonical path, route name), or None when the path is refused."""
    try:
        canonical = canonical_path(raw)
    except BadPath:
        return None
    return canonical, TABLE.match("127.0.0.1", "GET", canonical).name


def reads_as_admin(canonical: str) -> bool:
    """An RFC upstream, or one that merges slashes, serves ``canonical`` from /admin."""
    return any(is_under(view(canonical), PROTECTED_PREFIX) for view in (rfc_view, merged_view))


@PURE
@given(paths)
@example("/%61dmin")
@example("/ad%6Din/x")
@example("/public/../admin")
@example("//admin")
@example("///ad%6din//x")
@example("/public/..//admin")
@example("/x//admin")
def test_every_path_an_rfc_upstream_reads_as_admin_is_decided_as_admin(raw: str) -> None:
    """Both ways: what either reading serves from /admin is decided as admin, and nothing else
    is (``/x//admin`` stays public, merged or not)."""
    decided = decided_route(raw)
    if decided is not None:
        canonical, route = decided
        assert (route == "admin") == reads_as_admin(canonical), f"{canonical!r} on {route!r}"


@PURE
@given(paths)
@example("//admin")
@example("/public/..//admin")
@example("///admin/x")
def test_every_path_a_lenient_upstream_reads_as_admin_is_decided_as_admin(raw: str) -> None:
    decided = decided_route(raw)
    if decided is not None:
        canonical, route = decided
        if is_under(lenient_view(canonical), PROTECTED_PREFIX):
            assert route == "admin", f"{canonical!r} is decided on {route!r}"


# ---------------------------------------------------------------------------------------------
# End to end: the live gateway, anonymous requests, the upstream's record as the verdict.

queries = st.sampled_from(["", "?x=1", "?next=/../admin", "?a=%2e%2e%2f&b=%00", "?"])


@pytest.fixture
async def live(database_url: str, upstream: RecordingUpstream) -> AsyncIterator[int]:
    server = await start_gateway(decision_config(upstream.url), database_url)
    assert server.port is not None
    yield server.port
    await server.close()


@settings(
    derandomize=True,
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # one gateway for all
)
@given(raw=paths, query=queries)
@example(raw="/public//../admin", query="")
@example(raw="/public/%252e%252e/admin", query="?x=1")
@example(raw="/%61dmin", query="")
@example(raw="/public/..\\admin", query="")
@example(raw="//admin", query="?x=1")
@example(raw="/public/..//admin", query="")
@example(raw="//public//x", query="?")
@example(raw="/public/%0a", query="")
@example(raw="/a/%zz", query="")
async def test_the_forwarded_path_is_the_canonical_path_or_the_request_is_refused(
    live: int, upstream: RecordingUpstream, raw: str, query: str
) -> None:
    before = len(upstream.received)

    response = await request(live, "GET", raw + query)

    arrived = upstream.received[before:]
    note(f"status {response.status}, upstream received {[r.raw_path for r in arrived]}")
    try:
        canonical = canonical_path(raw)
    except BadPath:
        assert response.status == 400
        assert arrived == []
        return
    if reads_as_admin(canonical) or is_under(lenient_view(canonical), PROTECTED_PREFIX):
        assert response.status == 401
        assert arrived == []
    elif 400 <= response.status < 500:  # only the HTTP parser may refuse a target here
        assert response.status == 400
        assert response.header("Content-Type") != "application/problem+json"
        assert arrived == []
    else:
        assert response.status == 200
        sent_query = query if query != "?" else ""  # an empty query is an absent one
        assert [r.raw_path for r in arrived] == [canonical + sent_query]


def test_the_strategy_reaches_every_outcome() -> None:
    """Guard: the strategy yields refused, public and protected decisions, each often enough."""
    outcomes: dict[str, int] = {"refused": 0, "forwarded": 0, "admin": 0}

    @settings(derandomize=True, max_examples=300, deadline=None)
    @given(paths)
    def sample(raw: str) -> None:
        decided = decided_route(raw)
        if decided is None:
            outcomes["refused"] += 1
        elif decided[1] == "admin":
            outcomes["admin"] += 1
        else:
            outcomes["forwarded"] += 1

    sample()
    assert all(count >= 10 for count in outcomes.values()), outcomes
