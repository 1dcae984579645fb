"""Token format, checksum and digest. Pure: no I/O.

A token is ``<prefix><body><checksum>``: ``body`` is 32 base62 characters from ``secrets``
(about 190 bits), ``checksum`` is the CRC32 of prefix+body written as 6 base62 characters.
The checksum lets the gateway refuse a mistyped or random string without touching the
cache or the database, and lets secret scanners recognise a real token.

Only a digest is ever stored: SHA-256 of the token, or HMAC-SHA256 under a server-side
pepper. Peppers are a list, newest first, so one can be rotated: a lookup tries all of them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import zlib
from dataclasses import dataclass, field

from gateway.errors import MalformedToken

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BODY_LENGTH = 32
CHECKSUM_LENGTH = 6
DISPLAY_BODY_CHARS = 4
_BASE62_SET = frozenset(BASE62)


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, rest = divmod(number, 62)
        digits.append(BASE62[rest])
    return "".join(reversed(digits))


def checksum(text: str) -> str:
    """CRC32 of ``text`` as 6 base62 characters (62**6 > 2**32, so no information is lost)."""
    return _base62(zlib.crc32(text.encode("ascii")), CHECKSUM_LENGTH)


@dataclass(frozen=True, slots=True)
class NewToken:
    """A freshly generated token. The plaintext leaves the process once, in the create answer."""

    plaintext: str = field(repr=False)
    digest: bytes = field(repr=False)
    display_prefix: str

    def __repr__(self) -> str:
        return f"NewToken(display_prefix={self.display_prefix!r})"


class TokenFormat:
    """The token rules of one configuration: prefix and peppers."""

    __slots__ = ("_length", "_peppers", "prefix")

    def __init__(self, prefix: str = "pat_", peppers: tuple[str, ...] = ()) -> None:
        self.prefix = prefix
        self._peppers = tuple(p.encode() for p in peppers)
        self._length = len(prefix) + BODY_LENGTH + CHECKSUM_LENGTH

    def __repr__(self) -> str:
        return f"TokenFormat(prefix={self.prefix!r}, peppers={len(self._peppers)})"

    @property
    def length(self) -> int:
        """The length of every token of this format."""
        return self._length

    def generate(self) -> NewToken:
        body = "".join(secrets.choice(BASE62) for _ in range(BODY_LENGTH))
        plaintext = self.prefix + body + checksum(self.prefix + body)
        return NewToken(plaintext, self.digests(plaintext)[0], self.display_prefix(plaintext))

    def is_well_formed(self, value: str) -> bool:
        """Prefix, length, alphabet and checksum: everything that can be checked without state."""
        if len(value) != self._length or not value.startswith(self.prefix):
            return False
        if not _BASE62_SET.issuperset(value[len(self.prefix) :]):  # body and checksum
            return False
        expected = checksum(value[:-CHECKSUM_LENGTH])
        return hmac.compare_digest(value[-CHECKSUM_LENGTH:], expected)

    def check(self, value: str) -> None:
        if not self.is_well_formed(value):
            raise MalformedToken()

    def digest(self, plaintext: str) -> bytes:
        """The current digest: the cache's key."""
        data = plaintext.encode()
        if not self._peppers:
            return hashlib.sha256(data).digest()
        return hmac.new(self._peppers[0], data, hashlib.sha256).digest()

    def digests(self, plaintext: str) -> tuple[bytes, ...]:
        """Every digest the token may be stored under, the current one first."""
        data = plaintext.encode()
        if not self._peppers:
            return (hashlib.sha256(data).digest(),)
        return tuple(hmac.new(p, data, hashlib.sha256).digest() for p in self._peppers)

    def display_prefix(self, plaintext: str) -> str:
        return plaintext[: len(self.prefix) + DISPLAY_BODY_CHARS]
