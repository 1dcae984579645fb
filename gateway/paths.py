"""The one canonical-path function, used by routing, permission checks and forwarding alike.

``canonical_path`` takes the request-target path exactly as received (still percent-encoded,
query already removed) and either returns the path the gateway routes on and the upstream
receives, or raises ``BadPath`` (400).

What it does:

- resolves literal ``.`` and ``..`` segments per RFC 3986 §5.2.4 (a trailing ``/.`` or
  ``/..`` leaves a trailing slash, as the RFC does); a ``..`` that would climb above ``/``
  is refused instead of being silently clamped;
- keeps repeated slashes as they are (``//a//b`` stays); a ``..`` right after repeated
  slashes is refused, since upstreams that merge slashes would resolve it differently;
- never decodes, re-encodes or re-cases a percent escape: the output is a substring-wise
  selection of the client's own segments.

What it refuses: a path not starting with ``/``; ``#``; ``;`` (path parameters); a literal
backslash; control characters (0x00-0x1f, 0x7f), raw or percent-encoded; ``%2F`` and
``%5C`` (encoded separators); ``%3B`` (a parameter once decoded); malformed escapes
(``%zz``, ``%4``); and any ``%2E`` at all.
Refusing every encoded dot, not only the encoded dot *segments* (``%2e``, ``.%2e``,
``%2e%2e``), is deliberate: it is simpler to reason about, and no legitimate client needs
to percent-encode an unreserved character.
"""

from __future__ import annotations

import re

from gateway.errors import BadPath

__all__ = ["canonical_path"]

# Anything that can need work: a segment starting with "." (a dot segment can only follow
# a "/"), an escape, or a character that is refused outright. A path without any of these
# (the common case, "/api/jobs/7" or "/static/app.js") is returned unchanged.
_NEEDS_WORK = re.compile(r"/\.|[%\\;#\x00-\x1f\x7f]")

# Characters refused outright, with the reason given back to the client.
_REFUSED_CHAR = re.compile(r"[\\;#\x00-\x1f\x7f]")

# "%" not followed by two hex digits.
_MALFORMED_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")

# Escapes that decode to ".", "/", ";", "\" or a control character.
_REFUSED_ESCAPE = re.compile(r"%(?:2[EeFf]|3[Bb]|5[Cc]|[01][0-9A-Fa-f]|7[Ff])")


def _char_reason(char: str) -> str:
    if char == "\\":
        return "a backslash is not allowed in the path"
    if char == ";":
        return "path parameters (';') are not allowed"
    if char == "#":
        return "a fragment ('#') is not allowed in the path"
    return "control characters are not allowed in the path"


def _escape_reason(escape: str) -> str:
    code = int(escape[1:], 16)
    if code == 0x2E:
        return "an encoded dot (%2E) is not allowed in the path"
    if code == 0x2F:
        return "an encoded slash (%2F) is not allowed in the path"
    if code == 0x5C:
        return "an encoded backslash (%5C) is not allowed in the path"
    if code == 0x3B:  # an upstream that decodes before stripping ;params reads a parameter
        return "an encoded semicolon (%3B) is not allowed in the path"
    return "encoded control characters are not allowed in the path"


def canonical_path(raw: str) -> str:
    """Return the canonical form of ``raw`` (see the module docstring) or raise ``BadPath``."""
    if not raw.startswith("/"):
        raise BadPath("the path must start with '/'")
    if _NEEDS_WORK.search(raw) is None:
        return raw

    refused = _REFUSED_CHAR.search(raw)
    if refused is not None:
        raise BadPath(_char_reason(refused.group()))
    if "%" in raw:
        if _MALFORMED_ESCAPE.search(raw) is not None:
            raise BadPath("the path contains a malformed percent escape")
        escape = _REFUSED_ESCAPE.search(raw)
        if escape is not None:
            raise BadPath(_escape_reason(escape.group()))
    if "/." not in raw:
        return raw
    return _remove_dot_segments(raw)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 over "/"-separated segments, empty ones included; refuse climbing."""
    segments = path.split("/")
    last = len(segments) - 1
    out: list[str] = []
    # segments[0] is the empty string before the leading "/".
    for index in range(1, last + 1):
        segment = segments[index]
        if segment == ".":
            if index == last:
                out.append("")
        elif segment == "..":
            if not out:
                raise BadPath("the path climbs above the root")
            if out[-1] == "":
                # "/a//../b": RFC 3986 pops the empty segment (→ /a/b), an upstream that
                # merges slashes first pops "a" (→ /b). Two readings: refuse.
                raise BadPath("'..' after repeated slashes is ambiguous")
            out.pop()
            if index == last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)
