from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.errors import BadPath
from gateway.paths import canonical_path

ACCEPTED = [
    ("/", "/"),
    ("/api/jobs/7", "/api/jobs/7"),
    ("/static/app.min.js", "/static/app.min.js"),
    ("/a/./b", "/a/b"),
    ("/a/b/../c", "/a/c"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/.", "/"),
    ("/a/..", "/"),
    ("/a/../", "/"),
    ("/./a", "/a"),
    ("/a/b/c/../../d", "/a/d"),
    # repeated slashes are kept; ".." pops exactly one segment, empty ones included
    ("//a//b", "//a//b"),
    ("/a//b/../c", "/a//c"),
    ("/a/", "/a/"),
    # dots that are not whole segments are ordinary characters
    ("/a/.../b", "/a/.../b"),
    ("/a/..b/.c", "/a/..b/.c"),
    ("/a/b../c.", "/a/b../c."),
    # escapes are passed through exactly as sent: no decoding, no re-casing
    ("/a%20b/%7euser/%C3%A9", "/a%20b/%7euser/%C3%A9"),
    ("/x/%252e%252e/y", "/x/%252e%252e/y"),
    ("/a/%41/../b", "/a/b"),
    ("/q%3Fx", "/q%3Fx"),
]

REJECTED = [
    "/admin%3bx",  # an encoded ";": a parameter to upstreams that decode first
    "/a%3B/b",
    # ".." after repeated slashes: RFC 3986 and slash-merging upstreams disagree
    "/a//../c",
    "//..",
    "/public//../admin",
    "",
    "api/jobs",
    "*",
    "http://example.com/a",
    "/a#frag",
    "/a%2Fb",
    "/a%2fb",
    "/a%5Cb",
    "/a%5cb",
    "/a%00b",
    "/a\\b",
    "/a\\..\\b",
    "/%2e%2e/etc/passwd",
    "/a/%2E%2E/b",
    "/a/.%2e/b",
    "/a/%2e./b",
    "/a/%2e/b",
    "/a/x%2ey",  # any encoded dot, documented
    "/a\x00b",
    "/a\x01b",
    "/a\nb",
    "/a\rb",
    "/a\tb",
    "/a\x1fb",
    "/a\x7fb",
    "/a%01b",
    "/a%0Ab",
    "/a%0db",
    "/a%1Fb",
    "/a%7fb",
    "/a;jsessionid=1",
    "/a;/b",
    "/a%zzb",
    "/a%4",
    "/a%",
    "/a%g1",
    "/..",
    "/../a",
    "/a/../..",
    "/a/b/../../../c",
    "/./..",
]


@pytest.mark.parametrize(("raw", "expected"), ACCEPTED)
def test_accepted(raw: str, expected: str) -> None:
    assert canonical_path(raw) == expected


@pytest.mark.parametrize("raw", REJECTED)
def test_rejected(raw: str) -> None:
    with pytest.raises(BadPath):
        canonical_path(raw)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("/a%2Fb", "encoded slash"),
        ("/a%2eb", "encoded dot"),
        ("/a;b", "path parameters"),
        ("/../a", "climbs above"),
        ("/a%zz", "malformed"),
        ("a", "must start"),
    ],
)
def test_reason_is_given(raw: str, words: str) -> None:
    with pytest.raises(BadPath) as caught:
        canonical_path(raw)
    assert words in caught.value.detail
    assert caught.value.status == 400


def test_fast_path_returns_input_unchanged() -> None:
    raw = "/API/Jobs//7/"
    assert canonical_path(raw) is raw


def _rfc_remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, transcribed step by step, as an oracle."""
    out = ""
    while path:
        if path.startswith("../"):
            path = path[3:]
        elif path.startswith("./"):
            path = path[2:]
        elif path.startswith("/./"):
            path = "/" + path[3:]
        elif path == "/.":
            path = "/"
        elif path.startswith("/../") or path == "/..":
            path = "/" + path[4:] if path.startswith("/../") else "/"
            out = out[: max(out.rfind("/"), 0)]
        elif path in (".", ".."):
            path = ""
        else:
            start = 1 if path.startswith("/") else 0
            end = path.find("/", start)
            end = len(path) if end < 0 else end
            out += path[:end]
            path = path[end:]
    return out


# An alphabet that hits every rule often: separators, dots, escapes, refused characters.
_PIECES = st.sampled_from([*"///..abeEfF5cC0174%;#\\é~ \n\x00\x1f\x7f", "..", "%41", "%2e", "%2F"])
_PATHS = st.one_of(
    st.lists(_PIECES, max_size=24).map(lambda parts: "/" + "".join(parts)),
    st.lists(_PIECES, max_size=24).map("".join),
    st.text(max_size=40),
)

_REFUSED_ESCAPE = re.compile(r"%(2[EeFf]|5[Cc]|[01][0-9A-Fa-f]|7[Ff])")
_MALFORMED_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


@settings(max_examples=2000)
@given(_PATHS)
@example("/a/b/../../..")
@example("//../..")
def test_properties(raw: str) -> None:
    try:
        out = canonical_path(raw)
    except BadPath:
        return
    assert out.startswith("/")
    segments = out.split("/")
    assert "." not in segments
    assert ".." not in segments
    assert canonical_path(out) == out
    # nothing that would have been refused survives into the output
    assert not any(char in out for char in "#;\\")
    assert not any(ord(char) < 0x20 or ord(char) == 0x7F for char in out)
    assert _REFUSED_ESCAPE.search(out) is None
    assert _MALFORMED_ESCAPE.search(out) is None
    # and it agrees with the RFC wherever the RFC does not clamp a climb above "/"
    assert out == _rfc_remove_dot_segments(raw)


@settings(max_examples=1000)
@given(_PATHS)
def test_refused_input_is_refused(raw: str) -> None:
    refused = (
        not raw.startswith("/")
        or any(char in raw for char in "#;\\")
        or any(ord(char) < 0x20 or ord(char) == 0x7F for char in raw)
        or _REFUSED_ESCAPE.search(raw) is not None
        or _MALFORMED_ESCAPE.search(raw) is not None
    )
    if refused:
        with pytest.raises(BadPath):
            canonical_path(raw)
