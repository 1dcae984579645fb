"""Token format, checksum and digests (SPEC §2), checked against independent computations."""

from __future__ import annotations

import hashlib
import hmac
import re
import zlib

import pytest

from gateway.errors import MalformedToken
from gateway.tokens import NewToken, TokenFormat, checksum

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def expected_checksum(text: str) -> str:
    """CRC32 of ``text`` in 6 base62 digits, most significant first (written independently)."""
    number = zlib.crc32(text.encode("ascii"))
    digits = ""
    for _ in range(6):
        number, rest = divmod(number, 62)
        digits = ALPHABET[rest] + digits
    assert number == 0, "62**6 > 2**32: six digits always suffice"
    return digits


def well_formed(prefix: str, body: str) -> str:
    return prefix + body + expected_checksum(prefix + body)


@pytest.fixture
def fmt() -> TokenFormat:
    return TokenFormat()


@pytest.fixture
def token(fmt: TokenFormat) -> str:
    return fmt.generate().plaintext


# ---------------------------------------------------------------------------------------------
# Format


def test_generated_token_has_the_default_format(token: str) -> None:
    assert re.fullmatch(r"pat_[0-9A-Za-z]{38}", token)


def test_custom_prefix_is_used() -> None:
    token = TokenFormat("fdp_").generate().plaintext

    assert re.fullmatch(r"fdp_[0-9A-Za-z]{38}", token)
    assert TokenFormat("fdp_").is_well_formed(token)
    assert not TokenFormat().is_well_formed(token)


@pytest.mark.parametrize("prefix", ["pat_", "fdp_"])
def test_checksum_is_crc32_of_prefix_and_body_in_base62(prefix: str) -> None:
    token = TokenFormat(prefix).generate().plaintext
    body = token[len(prefix) : -6]

    assert len(body) == 32
    assert token[-6:] == expected_checksum(prefix + body)


@pytest.mark.parametrize(
    "text", ["", "pat_", "pat_" + "0" * 32, "fdp_" + "z" * 32, "pat_Hello1234567890"]
)
def test_checksum_function_matches_an_independent_crc32(text: str) -> None:
    assert checksum(text) == expected_checksum(text)


def test_checksum_is_zero_padded_to_six_digits() -> None:
    assert zlib.crc32(b"") == 0
    assert checksum("") == "000000"
    # The standard CRC32 check value 0xCBF43926, written in base62 by hand.
    assert zlib.crc32(b"123456789") == 0xCBF43926
    assert checksum("123456789") == "3jZRME"


def test_generate_1000_tokens_all_distinct_and_well_formed(fmt: TokenFormat) -> None:
    tokens = [fmt.generate() for _ in range(1000)]
    plaintexts = {t.plaintext for t in tokens}

    assert len(plaintexts) == 1000
    assert all(fmt.is_well_formed(p) for p in plaintexts)
    assert len({t.digest for t in tokens}) == 1000


def test_generated_bodies_use_the_whole_alphabet(fmt: TokenFormat) -> None:
    seen = set("".join(fmt.generate().plaintext[4:-6] for _ in range(200)))

    assert seen == set(ALPHABET)  # 6400 draws: missing a char has probability ~1e-43


# ---------------------------------------------------------------------------------------------
# Well-formedness


def test_valid_token_is_well_formed_and_passes_check(fmt: TokenFormat, token: str) -> None:
    assert fmt.is_well_formed(token)
    fmt.check(token)  # does not raise
    assert fmt.is_well_formed(well_formed("pat_", "a" * 32))


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param(well_formed("pat", "x" * 33), id="prefix-without-underscore"),
        pytest.param(well_formed("fdp_", "a" * 32), id="other-prefix"),
        pytest.param(well_formed("PAT_", "a" * 32), id="prefix-case"),
        pytest.param(well_formed("pat_", "a" * 31), id="body-too-short"),
        pytest.param(well_formed("pat_", "a" * 33), id="body-too-long"),
        pytest.param(well_formed("pat_", "a" * 32)[:-1], id="checksum-too-short"),
        pytest.param(well_formed("pat_", "a" * 32) + "0", id="trailing-char"),
        pytest.param(" " + well_formed("pat_", "a" * 32)[1:], id="leading-space"),
        pytest.param(well_formed("pat_", "a" * 31 + "-"), id="dash-in-body"),
        pytest.param(well_formed("pat_", "a" * 31 + "_"), id="underscore-in-body"),
        pytest.param(well_formed("pat_", "a" * 31 + " "), id="space-in-body"),
        pytest.param(well_formed("pat_", "a" * 31 + "="), id="padding-in-body"),
        pytest.param("pat_" + "a" * 31 + "é" + "AAAAAA", id="non-ascii-in-body"),
    ],
)
def test_malformed_values_are_refused(fmt: TokenFormat, value: str) -> None:
    assert not fmt.is_well_formed(value)
    with pytest.raises(MalformedToken):
        fmt.check(value)


def test_every_single_character_change_is_caught(fmt: TokenFormat, token: str) -> None:
    """Changing any one character (prefix, body or checksum) to any other base62 character or
    to a stray ASCII one never yields a well-formed token: CRC32 catches every single-byte
    error, the prefix and alphabet checks catch the rest."""
    replacements = ALPHABET + "_-+/=. "
    for position, original in enumerate(token):
        for replacement in replacements:
            if replacement == original:
                continue
            changed = token[:position] + replacement + token[position + 1 :]
            assert not fmt.is_well_formed(changed), (position, replacement)


@pytest.mark.parametrize("replacement", ["é", "\u2603", "\udcc3"])
def test_non_ascii_in_the_checksum_is_malformed_not_a_crash(
    fmt: TokenFormat, token: str, replacement: str
) -> None:
    changed = token[:-1] + replacement

    assert not fmt.is_well_formed(changed)
    with pytest.raises(MalformedToken):
        fmt.check(changed)


# ---------------------------------------------------------------------------------------------
# Digests


def test_digest_without_pepper_is_sha256(fmt: TokenFormat, token: str) -> None:
    assert fmt.digests(token) == (hashlib.sha256(token.encode()).digest(),)


def test_generated_digest_is_the_current_digest_of_the_plaintext() -> None:
    for fmt in (TokenFormat(), TokenFormat(peppers=("new", "old"))):
        new = fmt.generate()
        assert new.digest == fmt.digests(new.plaintext)[0]


def test_digests_with_peppers_are_hmac_sha256_newest_first(token: str) -> None:
    fmt = TokenFormat(peppers=("pepper-2025", "pepper-2024"))

    assert fmt.digests(token) == (
        hmac.new(b"pepper-2025", token.encode(), hashlib.sha256).digest(),
        hmac.new(b"pepper-2024", token.encode(), hashlib.sha256).digest(),
    )
    assert hashlib.sha256(token.encode()).digest() not in fmt.digests(token)


def test_a_pepper_changes_the_digest(token: str) -> None:
    plain = TokenFormat().digests(token)[0]
    one = TokenFormat(peppers=("one",)).digests(token)[0]
    two = TokenFormat(peppers=("two",)).digests(token)[0]

    assert len({plain, one, two}) == 3


def test_two_tokens_never_share_a_digest() -> None:
    for fmt in (TokenFormat(), TokenFormat(peppers=("p",))):
        a, b = fmt.generate(), fmt.generate()
        assert a.digest != b.digest
        assert set(fmt.digests(a.plaintext)).isdisjoint(fmt.digests(b.plaintext))
    body = "A" * 32
    near = [well_formed("pat_", body), well_formed("pat_", body[:-1] + "B")]
    assert TokenFormat().digests(near[0]) != TokenFormat().digests(near[1])


# ---------------------------------------------------------------------------------------------
# Display prefix and secrecy


@pytest.mark.parametrize("prefix", ["pat_", "fdp_", "glpat_"])
def test_display_prefix_is_prefix_plus_four_body_chars(prefix: str) -> None:
    fmt = TokenFormat(prefix)
    new = fmt.generate()

    assert new.display_prefix == new.plaintext[: len(prefix) + 4]
    assert fmt.display_prefix(new.plaintext) == new.display_prefix
    assert len(new.display_prefix) == len(prefix) + 4


def test_new_token_repr_and_str_hide_the_secret() -> None:
    new = TokenFormat().generate()
    assert isinstance(new, NewToken)
    body = new.plaintext[4:-6]

    for shown in (repr(new), str(new), f"{new}", f"{new!r}", repr([new])):
        assert new.plaintext not in shown
        assert body not in shown
        assert body[4:] not in shown  # no part of the body beyond the display prefix
        assert new.digest.hex() not in shown
        assert repr(new.digest) not in shown
        assert new.display_prefix in shown


def test_token_format_repr_hides_peppers() -> None:
    fmt = TokenFormat("fdp_", peppers=("s3cret-pepper-new", "s3cret-pepper-old"))

    shown = repr(fmt) + str(fmt)
    assert "s3cret" not in shown
    assert "pepper-new" not in shown
    assert "fdp_" in shown
