"""Routing: the configured routes compiled once into an immutable ``RouteTable``.

``RouteTable(routes).match(host, method, path)`` returns the most specific ``Route`` for a
canonical path (see ``gateway.paths``), or raises ``NotFound`` (no route for the path) or
``MethodNotAllowed`` (routes for the path, none for the method; ``allow`` is the union of
their methods). HEAD is not implied by GET: a route allows exactly the methods it lists.

Most specific wins, compared in this order:

1. a route with ``match.host`` over one without: a host-specific route is a deliberate
   override for that virtual host, so it beats any host-less route, even an exact path;
2. ``match.path`` (exact) over ``match.prefix``;
3. a longer prefix over a shorter one (prefixes are segment-aware: ``/api/jobs`` matches
   ``/api/jobs``, ``/api/jobs/`` and ``/api/jobs/7``, not ``/api/jobsx``; ``/`` matches all);
4. a route with ``match.methods`` over one without;
5. file order.

Matching costs O(number of path segments) dictionary lookups: candidates are indexed by host
and by exact path / prefix, each list pre-sorted by rules 4-5.

Paths are compared after percent-encoding normalization (RFC 3986 §6.2.2.2): an escape of an
unreserved character is decoded and the hex digits of any other escape are upper-cased, on
both the configured paths and the request path. Otherwise ``/%61dmin`` would miss the
``/admin`` route, fall through to a laxer one (say a public ``/``), and still reach the
upstream's ``/admin`` handler after it decodes the path. The upstream receives the path as
the client sent it; only the comparison is normalized.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

from gateway.config import Route
from gateway.errors import BadRequest, MethodNotAllowed, NotFound

__all__ = ["RouteTable", "normalize_host", "split_upstream"]

_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _normalize_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group()[1:], 16))
    return char if char in _UNRESERVED else match.group().upper()


def _route_key(path: str) -> str:
    """The form a path is compared in: escapes of unreserved characters decoded, and runs of
    slashes merged — many upstreams (nginx, Tomcat, Apache) serve ``//admin`` as ``/admin``,
    so ``//admin`` must be authorized as ``/admin``. Only the comparison merges: the path is
    forwarded as the client sent it."""
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if "%" not in path:
        return path
    return _ESCAPE.sub(_normalize_escape, path)


# A host name (letters, digits, "-", "_", dots, optional trailing dot) or a bracketed IPv6
# address, and an optional port: anything else in Host is refused, because upstreams and
# libraries read malformed values differently (``a.example:80:80``, ``evil@a.example``).
_VALID_HOST = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?"
    r"|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?"
)
_SLASHES = re.compile(r"/{2,}")


def normalize_host(host: str) -> str:
    """``Example.COM.:8080`` → ``example.com``; ``[::1]:8080`` → ``::1``; port-less as is.

    Raises ``BadRequest`` for a value that is not a host name or bracketed IPv6 address with
    an optional port.
    """
    if _VALID_HOST.fullmatch(host) is None:
        raise BadRequest("the Host header is not a valid host")
    host = host[1 : host.find("]")] if host.startswith("[") else host.partition(":")[0]
    return host.rstrip(".").lower()


@lru_cache(maxsize=1024)
def _normalized_or_none(host: str) -> str | None:
    try:
        return normalize_host(host)
    except BadRequest:
        return None


def _known_host(host: str) -> str:
    """``normalize_host``, remembered for the Host values seen most recently."""
    name = _normalized_or_none(host)
    if name is None:
        raise BadRequest("the Host header is not a valid host")
    return name


def _configured_host(host: str) -> str:
    """A route's ``match.host`` (validated by the config): brackets and trailing dot off."""
    return host.strip("[]").rstrip(".").lower()


def split_upstream(upstream: str) -> tuple[str, str]:
    """``http://h:1/base/`` → (``http://h:1``, ``/base``): the origin and the base path."""
    parts = urlsplit(upstream)
    return f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/")


def _strip_prefix(prefix: str, path: str) -> str:
    """Drop the segments of ``prefix`` from ``path`` (which matched it); "" becomes "/".

    Counting segments rather than characters keeps this right when the path was matched
    after escape normalization (``/%61pi/x`` under prefix ``/api`` → ``/x``).
    """
    if prefix == "/":
        return path
    wanted = prefix.count("/")  # the prefix's segments (it has no empty ones)
    segments = path.split("/")
    for index, segment in enumerate(segments[1:], start=1):
        if segment:  # empty segments (repeated slashes) were merged when matching
            wanted -= 1
            if wanted == 0:
                rest = "/".join(segments[index + 1 :])
                return "/" + rest if index + 1 < len(segments) else "/"
    return "/"


@dataclass(frozen=True, slots=True)
class _Entry:
    route: Route
    methods: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class _Forward:
    strip: str | None  # the prefix to strip, or None
    origin: str  # scheme://host:port of the upstream
    base: str  # the upstream's base path, "" for none


@dataclass(frozen=True, slots=True)
class _Index:
    """The routes of one host (or of no host), by exact path and by prefix."""

    exact: dict[str, tuple[_Entry, ...]]
    prefix: dict[str, tuple[_Entry, ...]]

    def candidates(self, key: str) -> Iterator[tuple[_Entry, ...]]:
        """Entry lists for ``key``, most specific first: exact, then longest prefix first."""
        entries = self.exact.get(key)
        if entries is not None:
            yield entries
        prefixes = self.prefix
        if not prefixes:
            return
        entries = prefixes.get(key)
        if entries is not None:
            yield entries
        cut = key.rfind("/")
        while cut > 1:
            entries = prefixes.get(key[:cut])
            if entries is not None:
                yield entries
            cut = key.rfind("/", 0, cut)
        if key != "/":
            entries = prefixes.get("/")
            if entries is not None:
                yield entries


def _build_index(entries: list[tuple[int, Route]]) -> _Index:
    exact: dict[str, list[tuple[int, Route]]] = {}
    prefix: dict[str, list[tuple[int, Route]]] = {}
    for order, route in entries:
        if route.match.path is not None:
            exact.setdefault(_route_key(route.match.path), []).append((order, route))
        else:
            key = _route_key(route.match.prefix or "/")
            prefix.setdefault(key, []).append((order, route))

    def ranked(found: list[tuple[int, Route]]) -> tuple[_Entry, ...]:
        found.sort(key=lambda item: (item[1].match.methods is None, item[0]))
        return tuple(_Entry(route, route.match.methods) for _, route in found)

    return _Index(
        exact={key: ranked(found) for key, found in exact.items()},
        prefix={key: ranked(found) for key, found in prefix.items()},
    )


class RouteTable:
    """Routes compiled once, matched per request; immutable after construction."""

    __slots__ = ("_any_host", "_by_host", "_forward", "routes")

    routes: tuple[Route, ...]
    _by_host: dict[str, _Index]
    _any_host: _Index
    _forward: dict[str, _Forward]

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        by_host: dict[str, list[tuple[int, Route]]] = {}
        any_host: list[tuple[int, Route]] = []
        for order, route in enumerate(self.routes):
            if route.match.host:
                by_host.setdefault(_configured_host(route.match.host), []).append((order, route))
            else:
                any_host.append((order, route))
        self._by_host = {host: _build_index(found) for host, found in by_host.items()}
        self._any_host = _build_index(any_host)
        self._forward = {
            route.name: _Forward(
                route.match.prefix if route.strip_prefix and route.match.prefix else None,
                *split_upstream(route.upstream),
            )
            for route in self.routes
        }

    @classmethod
    def compile(cls, routes: Sequence[Route]) -> RouteTable:
        return cls(routes)

    def __len__(self) -> int:
        return len(self.routes)

    def __repr__(self) -> str:
        return f"RouteTable({len(self.routes)} routes)"

    def _indexes(self, host: str | None) -> tuple[_Index, ...]:
        if host:
            name = _known_host(host)  # validates every request's Host, used or not
            index = self._by_host.get(name) if self._by_host else None
            if index is not None:
                return (index, self._any_host)
        return (self._any_host,)

    def match(self, host: str | None, method: str, path: str) -> Route:
        """The most specific route for ``host`` (a Host header value, port allowed), the
        upper-case ``method`` and the canonical ``path``; ``NotFound`` / ``MethodNotAllowed``.
        """
        key = _route_key(path)
        indexes = self._indexes(host)
        for index in indexes:
            for entries in index.candidates(key):
                for entry in entries:
                    if entry.methods is None or method in entry.methods:
                        return entry.route
        # Nothing matched: every candidate lists its methods (else it would have matched).
        allow: set[str] = set()
        for index in indexes:
            for entries in index.candidates(key):
                for entry in entries:
                    allow.update(entry.methods or ())
        if allow:
            raise MethodNotAllowed(sorted(allow))
        raise NotFound()

    def forward_path(self, route: Route, path: str) -> str:
        """The path sent upstream for a canonical ``path`` that matched ``route``.

        With ``strip_prefix`` the matched prefix is removed first (``/api/jobs/7`` under
        prefix ``/api/jobs`` → ``/7``; the bare prefix → ``/``); then the upstream's base path
        is put in front (upstream ``http://h:1/base``: ``/7`` → ``/base/7``, ``/`` →
        ``/base/``).
        """
        forward = self._forward[route.name]
        if forward.strip is not None:
            path = _strip_prefix(forward.strip, path)
        return forward.base + path

    def upstream_url(self, route: Route, path: str, query: str) -> str:
        """The full upstream URL, still percent-encoded exactly as the client sent it."""
        return self.origin(route) + self.upstream_target(route, path, query)

    def origin(self, route: Route) -> str:
        """``scheme://host:port`` of the route's upstream."""
        return self._forward[route.name].origin

    def upstream_target(self, route: Route, path: str, query: str) -> str:
        """The request target sent upstream: ``forward_path`` and the client's query."""
        target = self.forward_path(route, path)
        return f"{target}?{query}" if query else target
