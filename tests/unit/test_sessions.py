"""Session JWTs (SPEC §5 management.sessions, §9): keys pinned per algorithm, claims mapped,
and every failure an InvalidSession that tells the client nothing more."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.config import SessionClaims, Sessions
from gateway.errors import AuthError, ConfigError
from gateway.management.sessions import (
    MAX_TOKEN_LENGTH,
    InvalidSession,
    Session,
    SessionVerifier,
)

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
T = int(NOW.timestamp())
SECRET = "unit-test-session-secret-of-32-bytes+"


def claims(**changes: Any) -> dict[str, Any]:
    """A valid payload; a change to None removes that claim."""
    values: dict[str, Any] = {
        "sub": "user-1",
        "company_id": "company-1",
        "role": "admin",
        "amr": ["pwd", "mfa"],
        "iat": T - 60,
        "exp": T + 3600,
    }
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


def hs256(payload: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def verifier(**changes: Any) -> SessionVerifier:
    return SessionVerifier(Sessions(**{"hs256_secret": SECRET, **changes}))


def refused(v: SessionVerifier, token: str) -> InvalidSession:
    with pytest.raises(InvalidSession) as info:
        v.verify(token, now=NOW)
    return info.value


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(payload: dict[str, Any]) -> str:
    """An alg=none JWT, as an attacker would send it (empty signature)."""
    header = {"alg": "none", "typ": "JWT"}
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}."


# Keys and JWKS files ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key_2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, **extra: Any) -> Any:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, **extra}


def jwks_file(tmp_path: Path, *keys: dict[str, Any]) -> str:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": list(keys)}), encoding="utf-8")
    return str(path)


# HS256 -----------------------------------------------------------------------------------


def test_valid_hs256_token_maps_claims() -> None:
    session = verifier().verify(hs256(claims()), now=NOW)
    assert session == Session(
        user_id="user-1",
        company_id="company-1",
        role="admin",
        mfa=True,
        expires_at=NOW + timedelta(hours=1),
    )
    assert "eyJ" not in repr(session)


def test_custom_claim_mapping() -> None:
    v = verifier(claims=SessionClaims(user="uid", company="org", role="grade"))
    token = hs256(claims(sub="someone-else", uid="u-7", org="acme", grade="field_user"))
    session = v.verify(token, now=NOW)
    assert (session.user_id, session.company_id, session.role) == ("u-7", "acme", "field_user")


def test_company_and_role_are_optional() -> None:
    session = verifier().verify(hs256(claims(company_id=None, role=None)), now=NOW)
    assert session.user_id == "user-1"
    assert (session.company_id, session.role) == (None, None)


def test_failure_tells_the_client_nothing() -> None:
    exc = refused(verifier(), hs256(claims(exp=T - 3600)))
    assert isinstance(exc, AuthError)
    assert exc.status == 401
    assert exc.reason == "invalid_session"
    assert exc.detail == "The session is invalid or expired."
    assert exc.why == "expired"


@pytest.mark.parametrize(
    ("offset", "valid"), [(3600, True), (-10, True), (-29, True), (-31, False), (-3600, False)]
)
def test_expiry_with_leeway(offset: int, valid: bool) -> None:
    token = hs256(claims(exp=T + offset, iat=T - 7200))
    if valid:
        assert verifier().verify(token, now=NOW).expires_at == NOW + timedelta(seconds=offset)
    else:
        assert refused(verifier(), token).why == "expired"


def test_expiry_uses_the_real_clock_by_default() -> None:
    now = int(datetime.now(UTC).timestamp())
    assert verifier().verify(hs256(claims(iat=now, exp=now + 60))).user_id == "user-1"
    assert refused_now(hs256(claims(iat=now - 7200, exp=now - 3600))).why == "expired"


def refused_now(token: str) -> InvalidSession:
    with pytest.raises(InvalidSession) as info:
        verifier().verify(token)
    return info.value


@pytest.mark.parametrize("exp", [None, "2030-01-01", True, [T + 60]])
def test_exp_is_required_and_numeric(exp: Any) -> None:
    exc = refused(verifier(), hs256(claims(exp=exp)))
    assert exc.why == ("missing claim exp" if exp is None else "claim exp is not a number")


def test_not_yet_valid() -> None:
    assert refused(verifier(), hs256(claims(nbf=T + 600))).why == "not yet valid"
    assert verifier().verify(hs256(claims(nbf=T + 10)), now=NOW).user_id == "user-1"
    assert refused(verifier(), hs256(claims(iat=T + 600))).why == "issued in the future"


def test_bad_signature() -> None:
    token = hs256(claims(), secret="another-secret-that-is-32-bytes-long")
    assert refused(verifier(), token).why == "bad signature"
    header, _, signature = hs256(claims()).split(".")
    forged = b64(json.dumps(claims(sub="admin-user")).encode())
    assert refused(verifier(), f"{header}.{forged}.{signature}").why == "bad signature"


def test_issuer_checked_when_configured() -> None:
    v = verifier(issuer="https://login.example.com")
    assert v.verify(hs256(claims(iss="https://login.example.com")), now=NOW).user_id == "user-1"
    assert refused(v, hs256(claims(iss="https://evil.example.com"))).why == "wrong issuer"
    assert refused(v, hs256(claims())).why == "missing claim iss"
    assert verifier().verify(hs256(claims(iss="anyone")), now=NOW).user_id == "user-1"


def test_audience_checked_when_configured() -> None:
    v = verifier(audience="patgate")
    assert v.verify(hs256(claims(aud="patgate")), now=NOW).user_id == "user-1"
    assert v.verify(hs256(claims(aud=["other", "patgate"])), now=NOW).user_id == "user-1"
    assert refused(v, hs256(claims(aud="billing"))).why == "wrong audience"
    assert refused(v, hs256(claims())).why == "missing claim aud"


def test_audience_not_configured_accepts_any_aud() -> None:
    assert verifier().verify(hs256(claims(aud="billing")), now=NOW).user_id == "user-1"


def test_user_claim_required_and_a_non_empty_string() -> None:
    assert refused(verifier(), hs256(claims(sub=None))).why == "missing claim sub"
    for bad in (42, "", ["user-1"], {"id": "user-1"}):
        exc = refused(verifier(), hs256(claims(sub=bad)))
        assert exc.why == "claim sub is not a non-empty string"
    v = verifier(claims=SessionClaims(user="uid"))
    assert refused(v, hs256(claims())).why == "missing claim uid"


@pytest.mark.parametrize("claim", ["company_id", "role"])
@pytest.mark.parametrize("value", [7, True, ["admin"], ""])
def test_company_and_role_of_the_wrong_type(claim: str, value: Any) -> None:
    exc = refused(verifier(), hs256(claims(**{claim: value})))
    assert exc.why == f"claim {claim} is not a non-empty string"


@pytest.mark.parametrize(
    ("amr", "mfa"),
    [(["pwd", "mfa"], True), (["otp"], True), (["hwk", "x"], True), (["pwd"], False), ([], False)],
)
def test_mfa_from_amr(amr: list[str], mfa: bool) -> None:
    assert verifier().verify(hs256(claims(amr=amr)), now=NOW).mfa is mfa


def test_no_amr_means_no_mfa() -> None:
    assert verifier().verify(hs256(claims(amr=None)), now=NOW).mfa is False


def test_mfa_values_come_from_config() -> None:
    v = verifier(mfa_values=("hwk",))
    assert v.verify(hs256(claims(amr=["mfa"])), now=NOW).mfa is False
    assert v.verify(hs256(claims(amr=["hwk"])), now=NOW).mfa is True


@pytest.mark.parametrize("amr", ["mfa", ["mfa", 1], {"mfa": True}])
def test_amr_must_be_a_list_of_strings(amr: Any) -> None:
    assert refused(verifier(), hs256(claims(amr=amr))).why == "claim amr is not a list of strings"


def test_alg_none_refused() -> None:
    assert refused(verifier(), unsigned(claims())).why == "algorithm not allowed"
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    signature = hs256(claims()).split(".")[2]
    mixed = f"{header}.{b64(json.dumps(claims()).encode())}.{signature}"
    assert refused(verifier(), mixed).why == "algorithm not allowed"


@pytest.mark.parametrize("alg", ["HS384", "HS512", "RS256"])
def test_other_algorithms_refused_with_only_a_secret(alg: str) -> None:
    header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims()).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = b64(hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest())
    assert refused(verifier(), f"{header}.{payload}.{signature}").why == "algorithm not allowed"


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30.!!!"])
def test_malformed_tokens_refused(token: str) -> None:
    assert isinstance(refused(verifier(), token), InvalidSession)


def test_oversize_token_refused_without_decoding() -> None:
    token = hs256(claims(padding="x" * MAX_TOKEN_LENGTH))
    assert len(token) > MAX_TOKEN_LENGTH
    assert refused(verifier(), token).why == "too long"
    assert verifier().verify(hs256(claims(padding="x" * 4000)), now=NOW).user_id == "user-1"


def test_short_secret_is_a_config_error_that_hides_it() -> None:
    with pytest.raises(ConfigError) as info:
        SessionVerifier(Sessions(hs256_secret="too-short-secret"))
    assert info.value.errors[0].startswith("management.sessions.hs256_secret: ")
    assert "too-short-secret" not in str(info.value)


def test_disabled_without_keys() -> None:
    v = SessionVerifier(Sessions())
    assert v.enabled is False
    assert refused(v, hs256(claims())).why == "sessions are not configured"
    assert verifier().enabled is True


# RS256 / ES256 from a JWKS file ----------------------------------------------------------


def test_rs256_from_jwks(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    v = SessionVerifier(Sessions(jwks_file=jwks_file(tmp_path, public_jwk(rsa_key, kid="r1"))))
    assert v.enabled is True
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "r1"})
    assert v.verify(token, now=NOW).user_id == "user-1"
    # The only key of the set is used when the token names none.
    assert v.verify(jwt.encode(claims(), rsa_key, algorithm="RS256"), now=NOW).mfa is True


def test_es256_from_jwks(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    v = SessionVerifier(Sessions(jwks_file=jwks_file(tmp_path, public_jwk(ec_key, kid="e1"))))
    token = jwt.encode(claims(role="owner"), ec_key, algorithm="ES256", headers={"kid": "e1"})
    assert v.verify(token, now=NOW).role == "owner"
    other = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(claims(), other, algorithm="ES256", headers={"kid": "e1"})
    assert refused(v, forged).why == "bad signature"


def test_kid_selects_among_keys(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, rsa_key_2: rsa.RSAPrivateKey
) -> None:
    path = jwks_file(tmp_path, public_jwk(rsa_key, kid="old"), public_jwk(rsa_key_2, kid="new"))
    v = SessionVerifier(Sessions(jwks_file=path))
    for key, kid in ((rsa_key, "old"), (rsa_key_2, "new")):
        token = jwt.encode(claims(sub=kid), key, algorithm="RS256", headers={"kid": kid})
        assert v.verify(token, now=NOW).user_id == kid
    swapped = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "new"})
    assert refused(v, swapped).why == "bad signature"
    no_kid = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert refused(v, no_kid).why == "unknown key id"


def test_unknown_kid_refused(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    v = SessionVerifier(Sessions(jwks_file=jwks_file(tmp_path, public_jwk(rsa_key, kid="r1"))))
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "r2"})
    assert refused(v, token).why == "unknown key id"


def test_token_alg_must_match_the_key(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    path = jwks_file(tmp_path, public_jwk(rsa_key, kid="r1"), public_jwk(ec_key, kid="e1"))
    v = SessionVerifier(Sessions(jwks_file=path))
    token = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "r1"})
    assert refused(v, token).why == "algorithm does not match the key"


@pytest.mark.parametrize("with_secret", [False, True])
@pytest.mark.parametrize(
    "public_form", ["pem", "jwk"], ids=["secret=pem-public-key", "secret=jwk-json"]
)
def test_hs256_signed_with_the_public_key_refused(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, with_secret: bool, public_form: str
) -> None:
    """Algorithm confusion: the attacker knows the public key and uses it as an HMAC secret."""
    jwk = public_jwk(rsa_key, kid="r1")
    v = SessionVerifier(
        Sessions(jwks_file=jwks_file(tmp_path, jwk), hs256_secret=SECRET if with_secret else "")
    )
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public = pem if public_form == "pem" else json.dumps(jwk).encode()
    for kid in ("r1", None):
        header = {"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid else {})
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"
        signature = b64(hmac.new(public, signing_input.encode(), hashlib.sha256).digest())
        exc = refused(v, f"{signing_input}.{signature}")
        assert exc.why == ("bad signature" if with_secret else "algorithm not allowed")


def test_secret_and_jwks_together(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    v = SessionVerifier(
        Sessions(hs256_secret=SECRET, jwks_file=jwks_file(tmp_path, public_jwk(rsa_key)))
    )
    assert v.verify(hs256(claims(sub="from-hs")), now=NOW).user_id == "from-hs"
    rs = jwt.encode(claims(sub="from-rs"), rsa_key, algorithm="RS256")
    assert v.verify(rs, now=NOW).user_id == "from-rs"


def test_missing_jwks_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as info:
        SessionVerifier(Sessions(jwks_file=str(missing)))
    (error,) = info.value.errors
    assert error.startswith("management.sessions.jwks_file: ")
    assert str(missing) in error


@pytest.mark.parametrize(
    "content", ["{not json", '["a list"]', '{"keys": "none"}', '{"keys": []}', "\xff"]
)
def test_invalid_jwks_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        SessionVerifier(Sessions(jwks_file=str(path)))
    assert all(e.startswith("management.sessions.jwks_file: ") for e in info.value.errors)


def test_jwks_refuses_private_symmetric_and_weak_keys(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    private = {**RSAAlgorithm.to_jwk(rsa_key, as_dict=True), "kid": "private"}
    symmetric = {"kty": "oct", "k": b64(b"x" * 32), "kid": "sym"}
    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    weak = public_jwk(weak_key, kid="weak")
    with pytest.raises(ConfigError) as info:
        SessionVerifier(Sessions(jwks_file=jwks_file(tmp_path, private, symmetric, weak)))
    errors = info.value.errors
    assert len(errors) == 3
    assert "'private': must be a public key" in errors[0]
    assert "'sym': algorithm HS256 is not accepted" in errors[1]
    assert "'weak': " in errors[2]
    assert private["d"] not in str(info.value)


def test_jwks_refuses_duplicate_kids(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    jwk = public_jwk(rsa_key, kid="same")
    with pytest.raises(ConfigError, match="'same': appears twice"):
        SessionVerifier(Sessions(jwks_file=jwks_file(tmp_path, jwk, jwk)))
