"""Header hygiene (SPEC §4): strip what a client could spoof or that is hop-by-hop, then the
forwarder injects its own identity and ``X-Forwarded-*`` headers.

Header names are compared *normalized*: lower-cased with ``_`` turned into ``-``, because
many backends (CGI/WSGI, nginx with ``underscores_in_headers``) fold ``X_Auth_User_Id`` into
the same variable as ``X-Auth-User-Id``.

Pure functions over multidicts; the names to strip are compiled once into a ``HeaderPolicy``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from multidict import CIMultiDict, MultiMapping

from gateway.config import HOP_BY_HOP, IdentityHeaders, IPNetwork, is_hop_by_hop, normalize_name

__all__ = [
    "FORWARDING",
    "HOP_BY_HOP",
    "HeaderPolicy",
    "HeaderSource",
    "clean_request_headers",
    "clean_response_headers",
    "client_ip",
    "forwarded_headers",
    "is_hop_by_hop",
    "is_trusted",
    "is_websocket_upgrade",
    "normalize_name",
    "request_client_ip",
    "request_header_items",
    "response_header_items",
]

# Anything that yields (name, value) pairs: aiohttp's request.headers, a CIMultiDict, a list.
HeaderSource = Mapping[str, str] | Iterable[tuple[str, str]]

# Client-supplied forwarding information: the forwarder sets its own (see forwarded_headers).
# Beyond X-Forwarded-For/-Proto/-Host and Forwarded, every other X-Forwarded-* (-Port,
# -Prefix, -Client-Cert, ...) and X-Real-IP go too: backends trust them just the same.
FORWARDING: frozenset[str] = frozenset({"forwarded", "x-real-ip"})
_FORWARDING_PREFIX = "x-forwarded-"
_SPOOFABLE_PREFIX = "x-auth-"

# HeaderPolicy.verdict: what clean_request_headers does with a name
_KEEP, _DROP, _UPGRADE, _REQUEST_ID, _AUTHORIZATION = range(5)
_VERDICTS_MAX = 4096  # distinct spellings remembered per policy: a client could invent more

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def _items(headers: HeaderSource) -> Iterable[tuple[str, str]]:
    if isinstance(headers, Mapping):
        return headers.items()
    return headers


def _connection_tokens(values: Iterable[str]) -> set[str]:
    """The normalized names nominated by ``Connection`` values (comma lists, empties skipped)."""
    tokens: set[str] = set()
    for value in values:
        for token in value.split(","):
            token = token.strip(" \t")
            if token:
                tokens.add(normalize_name(token))
    return tokens


def _nominated(items: list[tuple[str, str]]) -> set[str]:
    """What the ``Connection`` headers among ``items`` nominate (usually nothing)."""
    # "connection" has no "-" for an "_" to stand in for: its length and case are the test.
    values = [value for name, value in items if len(name) == 10 and name.lower() == "connection"]
    return _connection_tokens(values) if values else set()


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    """What to strip as spoofable, compiled once from the configured identity header names.

    Spoofable: every configured identity header (the assertion's included) except the
    request id, and any name starting with ``x-auth-``. The request id is not spoofable: a
    sane client value is kept.
    """

    identity: IdentityHeaders = field(default_factory=IdentityHeaders)
    spoofable: frozenset[str] = field(init=False)
    request_id_name: str = field(init=False)  # normalized
    _always_drop: frozenset[str] = field(init=False, repr=False)
    # name as spelled → _KEEP/_DROP/...: what clean_request_headers does with it before
    # looking at the request's own Connection header and the route's removals
    _verdicts: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        identity = self.identity
        names = [name for key, name in identity.names().items() if key != "request_id"]
        spoofable = frozenset(normalize_name(name) for name in names)
        object.__setattr__(self, "spoofable", spoofable)
        object.__setattr__(self, "request_id_name", normalize_name(identity.request_id))
        object.__setattr__(
            self, "_always_drop", spoofable | HOP_BY_HOP | FORWARDING | frozenset({"host"})
        )
        object.__setattr__(self, "_verdicts", {})

    def verdict(self, name: str) -> int:
        """The request header rule that applies to ``name``, remembered per spelling."""
        verdict = self._verdicts.get(name)
        if verdict is not None:
            return verdict
        normalized = normalize_name(name)
        if normalized == "upgrade":
            verdict = _UPGRADE
        elif normalized in self._always_drop or normalized.startswith("proxy-"):
            verdict = _DROP
        elif normalized == self.request_id_name:
            verdict = _REQUEST_ID
        elif normalized.startswith(_SPOOFABLE_PREFIX) or normalized.startswith(_FORWARDING_PREFIX):
            verdict = _DROP
        elif normalized == "authorization":
            verdict = _AUTHORIZATION
        else:
            verdict = _KEEP
        if len(self._verdicts) < _VERDICTS_MAX:
            self._verdicts[name] = verdict
        return verdict

    def is_spoofable(self, normalized: str) -> bool:
        return normalized in self.spoofable or normalized.startswith(_SPOOFABLE_PREFIX)

    def request_id(self, headers: HeaderSource) -> str | None:
        """The client's request id if sane (1-128 of ``[A-Za-z0-9._:@/+=-]``), else None.

        Only the first header spelled exactly as configured (any case, no ``_`` variant) counts.
        """
        wanted = self.request_id_name
        verdicts = self._verdicts
        for name, value in _items(headers):
            verdict = verdicts.get(name)
            if verdict is None:
                verdict = self.verdict(name)
            if verdict == _REQUEST_ID and name.lower() == wanted:
                return value if _SANE_REQUEST_ID.fullmatch(value) else None
        return None


def is_websocket_upgrade(headers: HeaderSource) -> bool:
    """A WebSocket handshake: ``Connection`` nominates ``upgrade`` and there is exactly one
    ``Upgrade`` header, whose value is ``websocket`` (any case). Anything else (``h2c``,
    several protocols) is not proxied as an upgrade.
    """
    connection: list[str] = []
    upgrade: list[str] = []
    for name, value in _items(headers):
        normalized = normalize_name(name)
        if normalized == "connection":
            connection.append(value)
        elif normalized == "upgrade":
            upgrade.append(value)
    return (
        len(upgrade) == 1
        and upgrade[0].strip(" \t").lower() == "websocket"
        and "upgrade" in _connection_tokens(connection)
    )


def clean_request_headers(
    headers: HeaderSource,
    policy: HeaderPolicy,
    *,
    websocket: bool,
    keep_authorization: bool,
    remove: Iterable[str] = (),
) -> CIMultiDict[str]:
    """A new header set for the upstream request, the client's order and duplicates kept.

    Removed: spoofable names (see ``HeaderPolicy``); hop-by-hop headers (any ``proxy-*``
    included) and every name any ``Connection`` header nominates; ``Host``; ``Forwarded``,
    ``X-Real-IP`` and every ``X-Forwarded-*``; ``Authorization`` unless ``keep_authorization``;
    the names in ``remove``; request-id headers other than the first sane one spelled as
    configured. With ``websocket`` (the route proxies WebSockets) and a WebSocket handshake
    (``is_websocket_upgrade``), ``Upgrade: websocket`` is kept and ``Connection: Upgrade`` set.
    """
    return CIMultiDict(
        request_header_items(
            headers,
            policy,
            websocket=websocket,
            keep_authorization=keep_authorization,
            remove=remove,
        )
    )


def request_header_items(
    headers: HeaderSource,
    policy: HeaderPolicy,
    *,
    websocket: bool,
    keep_authorization: bool,
    remove: Iterable[str] = (),
) -> list[tuple[str, str]]:
    """``clean_request_headers`` as a list."""
    items = headers if isinstance(headers, list) else list(_items(headers))
    nominated = _nominated(items)
    upgrade = websocket and "upgrade" in nominated and is_websocket_upgrade(items)
    # What the request itself names (its Connection header, the route's removals) drops
    # names the policy would keep.
    named = nominated | {normalize_name(name) for name in remove} if nominated or remove else None
    verdicts = policy._verdicts
    rid_name = policy.request_id_name
    rid_kept = False

    out: list[tuple[str, str]] = []
    for name, value in items:
        verdict = verdicts.get(name)
        if verdict is None:
            verdict = policy.verdict(name)
        if verdict == _DROP:
            continue
        if verdict == _UPGRADE:
            if upgrade:
                out.append((name, value))
            continue
        if named is not None and normalize_name(name) in named:
            continue
        if verdict == _REQUEST_ID:
            if rid_kept or name.lower() != rid_name or not _SANE_REQUEST_ID.fullmatch(value):
                continue
            rid_kept = True
        elif verdict == _AUTHORIZATION and not keep_authorization:
            continue
        out.append((name, value))
    if upgrade:
        out.append(("Connection", "Upgrade"))
    return out


def clean_response_headers(headers: HeaderSource) -> CIMultiDict[str]:
    """An upstream response's headers without hop-by-hop and ``Connection``-nominated ones.

    ``Content-Length`` stays; ``Transfer-Encoding`` goes (the server re-frames the body).
    """
    return CIMultiDict(response_header_items(headers))


def response_header_items(headers: HeaderSource) -> list[tuple[str, str]]:
    """``clean_response_headers`` as a list, in the upstream's order."""
    items = headers if isinstance(headers, list) else list(_items(headers))
    nominated = _nominated(items)
    if nominated:
        return [
            (name, value)
            for name, value in items
            if not _hop(name) and normalize_name(name) not in nominated
        ]
    return [(name, value) for name, value in items if not _hop(name)]


_HOP_VERDICTS: dict[str, bool] = {}


def _hop(name: str) -> bool:
    """``is_hop_by_hop(normalize_name(name))``, remembered per spelling."""
    verdict = _HOP_VERDICTS.get(name)
    if verdict is None:
        verdict = is_hop_by_hop(normalize_name(name))
        if len(_HOP_VERDICTS) < _VERDICTS_MAX:
            _HOP_VERDICTS[name] = verdict
    return verdict


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, trusted: tuple[IPNetwork, ...]
) -> bool:
    return any(address in network for network in trusted)


def is_trusted(peer: str, trusted: tuple[IPNetwork, ...]) -> bool:
    """Whether the socket peer is one of ``trusted_proxies``."""
    if not trusted:
        return False
    address = _parse_ip(peer)
    return address is not None and _trusted(address, trusted)


def client_ip(peer: str, forwarded_for: Sequence[str], trusted: tuple[IPNetwork, ...]) -> str:
    """The client's address: the socket ``peer``, unless the peer is a trusted proxy.

    Then the ``X-Forwarded-For`` values (all of them, in order, comma lists joined) are
    walked from right to left, skipping trusted addresses; the first untrusted one is the
    client. Strict: an entry that is not a bare IP address (garbage, a port, brackets) ends
    the walk, and the last trusted hop seen is returned, since nothing left of it can be
    believed. Empty list elements are skipped. If every entry is trusted, the left-most wins.
    IPv4-mapped IPv6 addresses are compared as IPv4. Addresses from the list are returned in
    their canonical text form.
    """
    if not trusted:
        return peer
    address = _parse_ip(peer)
    if address is None or not _trusted(address, trusted):
        return peer
    last = peer
    for value in reversed(forwarded_for):
        for entry in reversed(value.split(",")):
            entry = entry.strip(" \t")
            if not entry:
                continue
            address = _parse_ip(entry)
            if address is None:
                return last
            if not _trusted(address, trusted):
                return str(address)
            last = str(address)
    return last


def request_client_ip(
    remote: str | None, headers: MultiMapping[str], trusted: tuple[IPNetwork, ...]
) -> str:
    """``client_ip`` for a request: its socket peer and its ``X-Forwarded-For`` headers."""
    peer = remote or ""
    if not trusted:
        return peer
    return client_ip(peer, headers.getall("X-Forwarded-For", ()), trusted)


def forwarded_headers(
    request_headers: MultiMapping[str], *, peer: str, proto: str, host: str, trusted_peer: bool
) -> list[tuple[str, str]]:
    """The ``X-Forwarded-*`` headers to send upstream (``clean_request_headers`` removed the
    client's).

    - ``X-Forwarded-For``: the socket ``peer`` appended to the incoming chain when the peer is
      a trusted proxy; just the peer otherwise (an untrusted client's chain is dropped).
    - ``X-Forwarded-Proto`` / ``X-Forwarded-Host``: a trusted peer's own values when it sent
      them (the first of each), else what the gateway saw (``proto``, the ``host`` header).
    """
    chain = peer
    forwarded_proto = proto
    forwarded_host = host
    if trusted_peer:
        prior = [v.strip(" \t,") for v in request_headers.getall("X-Forwarded-For", ())]
        prior = [v for v in prior if v]
        if prior:
            chain = ", ".join([*prior, peer])
        forwarded_proto = request_headers.get("X-Forwarded-Proto") or proto
        forwarded_host = request_headers.get("X-Forwarded-Host") or host
    return [
        ("X-Forwarded-For", chain),
        ("X-Forwarded-Proto", forwarded_proto),
        ("X-Forwarded-Host", forwarded_host),
    ]
