from __future__ import annotations

import ipaddress

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import IdentityHeaders, IPNetwork
from gateway.headers import (
    HOP_BY_HOP,
    HeaderPolicy,
    clean_request_headers,
    clean_response_headers,
    client_ip,
    forwarded_headers,
    is_websocket_upgrade,
    normalize_name,
)

POLICY = HeaderPolicy(IdentityHeaders())


def clean(
    headers: list[tuple[str, str]],
    *,
    policy: HeaderPolicy = POLICY,
    websocket: bool = False,
    keep_authorization: bool = False,
    remove: tuple[str, ...] = (),
) -> list[tuple[str, str]]:
    out = clean_request_headers(
        CIMultiDictProxy(CIMultiDict(headers)),
        policy,
        websocket=websocket,
        keep_authorization=keep_authorization,
        remove=remove,
    )
    assert isinstance(out, CIMultiDict)
    return list(out.items())


def test_normalize_name() -> None:
    assert normalize_name("X_Auth_User_Id") == "x-auth-user-id"
    assert normalize_name("Content-Type") == "content-type"


def test_hop_by_hop_set() -> None:
    assert {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    } <= HOP_BY_HOP
    assert all(name == name.lower() for name in HOP_BY_HOP)


@pytest.mark.parametrize(
    "name",
    [
        "X-Auth-User-Id",
        "x-auth-user-id",
        "X_AUTH_USER_ID",
        "X_Auth-User_Id",
        "X-Auth-Permissions",
        "X-Auth-Anything-Else",
        "x_auth_new",
        "X-Auth-Token-Expires-At",
    ],
)
def test_spoofable_identity_headers_are_stripped_in_every_spelling(name: str) -> None:
    assert clean([("Accept", "*/*"), (name, "forged")]) == [("Accept", "*/*")]


def test_is_spoofable() -> None:
    policy = HeaderPolicy(IdentityHeaders(user_id="Remote-User"))
    assert policy.is_spoofable("remote-user")
    assert policy.is_spoofable("x-auth-whatever")
    assert not policy.is_spoofable("x-request-id")
    assert not policy.is_spoofable("x-authorization")
    assert not policy.is_spoofable("content-type")


def test_configured_identity_names_are_stripped_in_every_spelling() -> None:
    policy = HeaderPolicy(IdentityHeaders(user_id="Remote-User", permissions="X-Perms"))
    assert policy.spoofable >= {"remote-user", "x-perms"}
    headers = [("remote_user", "admin"), ("REMOTE-USER", "admin"), ("X_Perms", "*"), ("A", "1")]
    assert clean(headers, policy=policy) == [("A", "1")]
    # the default X-Auth-* names are still stripped after renaming: they start with x-auth-
    assert clean([("X-Auth-User-Id", "u")], policy=policy) == []


def test_hop_by_hop_headers_are_stripped() -> None:
    headers = [
        ("Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic eA=="),
        ("Proxy-Anything", "x"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Transfer-Encoding", "chunked"),
        ("Transfer_Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("Content-Length", "5"),
    ]
    assert clean(headers) == [("Content-Length", "5")]


def test_connection_nominated_headers_are_stripped() -> None:
    headers = [
        ("Connection", ""),  # an empty first one
        ("X-Secret", "1"),
        ("Connection", " x-secret ,,X_Other,\tCOOKIE , "),
        ("x-other", "2"),
        ("Cookie", "a=b"),
        ("Connection", "X-Third"),
        ("X-Third", "3"),
        ("X-Kept", "4"),
    ]
    assert clean(headers) == [("X-Kept", "4")]


def test_connection_may_nominate_end_to_end_headers_too() -> None:
    out = clean([("Connection", "Content-Type"), ("Content-Type", "text/plain"), ("A", "1")])
    assert out == [("A", "1")]


def test_authorization_is_removed_unless_kept() -> None:
    headers = [("Authorization", "Bearer pat_x"), ("Accept", "a")]
    assert clean(headers) == [("Accept", "a")]
    assert clean(headers, keep_authorization=True) == headers


def test_remove_list_uses_normalized_names() -> None:
    headers = [("Cookie", "a"), ("X_Internal", "b"), ("x-internal", "c"), ("Keep", "d")]
    assert clean(headers, remove=("cookie", "X-Internal")) == [("Keep", "d")]


def test_host_and_forwarding_headers_are_removed() -> None:
    headers = [
        ("Host", "evil"),
        ("X-Forwarded-For", "1.2.3.4"),
        ("X_Forwarded_For", "1.2.3.4"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil"),
        ("X-Forwarded-Port", "443"),
        ("X-Forwarded-Client-Cert", "forged"),
        ("Forwarded", "for=1.2.3.4"),
        ("X-Real-IP", "1.2.3.4"),
        ("Accept", "a"),
    ]
    assert clean(headers) == [("Accept", "a")]


def test_order_and_duplicates_are_preserved() -> None:
    headers = [("B", "1"), ("A", "2"), ("b", "3"), ("X-Auth-Role", "x"), ("C", "4"), ("A", "5")]
    assert clean(headers) == [("B", "1"), ("A", "2"), ("b", "3"), ("C", "4"), ("A", "5")]


WS = [
    ("Host", "h"),
    ("Connection", "keep-alive, Upgrade"),
    ("Upgrade", "websocket"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
]


def test_websocket_upgrade_is_kept_only_when_the_route_allows_it() -> None:
    assert is_websocket_upgrade(WS)
    allowed = clean(WS, websocket=True)
    assert ("Upgrade", "websocket") in allowed
    assert [value for name, value in allowed if name.lower() == "connection"] == ["Upgrade"]
    assert ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==") in allowed

    refused = clean(WS, websocket=False)
    assert all(name.lower() not in {"upgrade", "connection"} for name, _ in refused)


@pytest.mark.parametrize(
    "headers",
    [
        [("Connection", "Upgrade"), ("Upgrade", "h2c")],
        [("Connection", "keep-alive"), ("Upgrade", "websocket")],
        [("Upgrade", "websocket")],
        [("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Upgrade", "h2c")],
        [("Connection", "Upgrade"), ("Upgrade", "websocket, h2c")],
    ],
)
def test_not_a_websocket_handshake_drops_upgrade(headers: list[tuple[str, str]]) -> None:
    assert not is_websocket_upgrade(headers)
    assert clean(headers, websocket=True) == []


def test_websocket_connection_still_drops_other_nominated_headers() -> None:
    headers = [*WS, ("Connection", "X-Drop"), ("X-Drop", "1")]
    out = clean(headers, websocket=True)
    assert all(name != "X-Drop" for name, _ in out)
    assert ("Upgrade", "websocket") in out


def test_request_id() -> None:
    assert POLICY.request_id([("X-Request-Id", "abc-123:x@y/z+=.")]) == "abc-123:x@y/z+=."
    assert POLICY.request_id(CIMultiDict({"x-request-id": "r1"})) == "r1"
    assert POLICY.request_id([("X-Request-Id", "bad value")]) is None
    assert POLICY.request_id([("X-Request-Id", "")]) is None
    assert POLICY.request_id([("X-Request-Id", "a" * 129)]) is None
    assert POLICY.request_id([("X-Request-Id", "a" * 128)]) == "a" * 128
    assert POLICY.request_id([("X_Request_Id", "r1")]) is None
    assert POLICY.request_id([]) is None
    custom = HeaderPolicy(IdentityHeaders(request_id="X-Correlation-Id"))
    assert custom.request_id([("X-Request-Id", "a"), ("x-correlation-id", "b")]) == "b"


def test_request_id_is_not_spoofable_but_only_one_sane_copy_passes() -> None:
    assert "x-request-id" not in POLICY.spoofable
    headers = [
        ("X_Request_Id", "variant"),
        ("X-Request-Id", "bad value"),
        ("X-Request-Id", "good"),
        ("X-Request-Id", "second"),
    ]
    assert clean(headers) == [("X-Request-Id", "good")]


def test_response_headers() -> None:
    headers = [
        ("Content-Type", "text/plain"),
        ("Content-Length", "12"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "close, X-Hop"),
        ("Connection", "Keep-Alive"),
        ("Keep-Alive", "timeout=5"),
        ("X-Hop", "1"),
        ("Proxy-Authenticate", "Basic"),
        ("Upgrade", "h2c"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]
    out = clean_response_headers(CIMultiDict(headers))
    assert list(out.items()) == [
        ("Content-Type", "text/plain"),
        ("Content-Length", "12"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]


def nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


TRUSTED = nets("10.0.0.0/8", "fd00::/8")


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "expected"),
    [
        # untrusted peer: its XFF is ignored
        ("203.0.113.9", ["1.2.3.4"], TRUSTED, "203.0.113.9"),
        ("203.0.113.9", ["1.2.3.4"], (), "203.0.113.9"),
        # trusted peer: right-most untrusted address
        ("10.0.0.1", ["1.2.3.4"], TRUSTED, "1.2.3.4"),
        ("10.0.0.1", ["6.6.6.6, 1.2.3.4, 10.0.0.2"], TRUSTED, "1.2.3.4"),
        ("10.0.0.1", ["6.6.6.6", "1.2.3.4,10.0.0.2", "10.0.0.3"], TRUSTED, "1.2.3.4"),
        ("fd00::1", ["2001:db8::7"], TRUSTED, "2001:db8::7"),
        ("::ffff:10.0.0.1", ["1.2.3.4"], TRUSTED, "1.2.3.4"),
        # all trusted: the left-most
        ("10.0.0.1", ["10.0.0.5, 10.0.0.2"], TRUSTED, "10.0.0.5"),
        # nothing sent: the peer
        ("10.0.0.1", [], TRUSTED, "10.0.0.1"),
        ("10.0.0.1", ["", " , "], TRUSTED, "10.0.0.1"),
        # garbage stops the walk at the last trusted hop
        ("10.0.0.1", ["1.2.3.4, garbage, 10.0.0.2"], TRUSTED, "10.0.0.2"),
        ("10.0.0.1", ["1.2.3.4, 5.6.7.8:80"], TRUSTED, "10.0.0.1"),
        ("10.0.0.1", ["[2001:db8::1]"], TRUSTED, "10.0.0.1"),
        # a peer that is not an address is returned as is
        ("unix", ["1.2.3.4"], TRUSTED, "unix"),
    ],
)
def test_client_ip(
    peer: str, xff: list[str], trusted: tuple[IPNetwork, ...], expected: str
) -> None:
    assert client_ip(peer, xff, trusted) == expected


def test_forwarded_headers_untrusted_peer_ignores_the_client_chain() -> None:
    sent = CIMultiDictProxy(
        CIMultiDict(
            [
                ("X-Forwarded-For", "6.6.6.6"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "evil"),
            ]
        )
    )
    out = forwarded_headers(
        sent, peer="203.0.113.9", proto="http", host="gw:8080", trusted_peer=False
    )
    assert out == [
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "gw:8080"),
    ]


def test_forwarded_headers_trusted_peer_extends_its_chain() -> None:
    sent = CIMultiDict(
        [
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-For", "5.6.7.8, "),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "api.example.com"),
        ]
    )
    out = forwarded_headers(sent, peer="10.0.0.1", proto="http", host="gw:8080", trusted_peer=True)
    assert out == [
        ("X-Forwarded-For", "1.2.3.4, 5.6.7.8, 10.0.0.1"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "api.example.com"),
    ]
    bare = forwarded_headers(
        CIMultiDict(), peer="10.0.0.1", proto="http", host="gw:8080", trusted_peer=True
    )
    assert bare == [
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "gw:8080"),
    ]
