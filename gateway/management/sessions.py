"""Session JWTs from the product's own login → Session, or InvalidSession.

Keys are compiled once from `management.sessions`: an HS256 secret and/or a JWKS file of
RS256 / ES256 public keys. The algorithm is pinned by the key, never chosen by the token:
HS256 is verified only with the configured secret (so an HS256 token "signed" with an RSA
public key is refused), RS256 / ES256 only with the JWK picked by `kid`, and `none` never.
Time claims are checked here against an injectable `now` with a small leeway; PyJWT checks
the signature, `iss` and `aud`. A client only ever learns "invalid or expired"; the reason
is kept on the exception (`why`) for logs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.types import Options

from gateway.config import Sessions
from gateway.errors import AuthError, ConfigError

MAX_TOKEN_LENGTH = 8192
LEEWAY = 30.0  # seconds of clock skew tolerated on exp, nbf and iat
MIN_HS256_SECRET_BYTES = 32  # RFC 7518 §3.2: a key at least as long as the hash output

_JWKS_KEY = "management.sessions.jwks_file"
_WHY: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.InvalidSignatureError, "bad signature"),  # before DecodeError, its base class
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.DecodeError, "malformed"),
)


@dataclass(frozen=True, slots=True)
class Session:
    """Who a valid session JWT speaks for; the JWT itself is not kept."""

    user_id: str
    company_id: str | None
    role: str | None
    mfa: bool  # amr names one of management.sessions.mfa_values
    expires_at: datetime


class InvalidSession(AuthError):
    reason = "invalid_session"

    def __init__(self, why: str = "invalid") -> None:
        super().__init__("The session is invalid or expired.")
        self.why = why  # for logs only; never contains token material


def _load_jwks(path: str) -> dict[str | None, jwt.PyJWK]:
    """The public keys of a JWKS file by kid; every problem raised at once as ConfigError."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{_JWKS_KEY}: cannot read {path}: {exc.strerror}"]) from None
    except ValueError:  # UnicodeDecodeError, JSONDecodeError
        raise ConfigError([f"{_JWKS_KEY}: {path} is not a JSON file"]) from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ConfigError([f'{_JWKS_KEY}: {path} must hold a JSON object {{"keys": [...]}}'])
    try:
        jwk_set = jwt.PyJWKSet(data["keys"])
    except jwt.PyJWTError as exc:  # PyJWKSetError messages name no key material
        raise ConfigError([f"{_JWKS_KEY}: {path}: {exc}"]) from None
    errors: list[str] = []
    if len(jwk_set.keys) != len(data["keys"]):
        unusable = len(data["keys"]) - len(jwk_set.keys)
        errors.append(f"{_JWKS_KEY}: {unusable} key(s) in {path} could not be loaded")
    keys: dict[str | None, jwt.PyJWK] = {}
    for jwk in jwk_set.keys:
        name = f"key {jwk.key_id!r}" if jwk.key_id is not None else "a key without kid"
        problem = _key_problem(jwk)
        if problem:
            errors.append(f"{_JWKS_KEY}: {name}: {problem}")
        elif jwk.key_id in keys:
            errors.append(f"{_JWKS_KEY}: {name}: appears twice")
        keys[jwk.key_id] = jwk
    if errors:
        raise ConfigError(errors)
    return keys


def _key_problem(jwk: jwt.PyJWK) -> str | None:
    if jwk.algorithm_name == "RS256" and isinstance(jwk.key, RSAPublicKey):
        return jwk.Algorithm.check_key_length(jwk.key)
    if jwk.algorithm_name == "ES256" and isinstance(jwk.key, EllipticCurvePublicKey):
        return None if isinstance(jwk.key.curve, SECP256R1) else "ES256 needs curve P-256"
    if jwk.algorithm_name in ("RS256", "ES256"):
        return "must be a public key"
    return f"algorithm {jwk.algorithm_name} is not accepted (RS256 or ES256 only)"


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidSession(f"claim {name} is not a number")
    return float(value)


def _optional_string(claims: dict[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidSession(f"claim {name} is not a non-empty string")
    return value


class SessionVerifier:
    """Verifies session JWTs with the keys of `management.sessions`, compiled once."""

    def __init__(self, cfg: Sessions) -> None:
        self._cfg = cfg
        secret = cfg.hs256_secret.encode()
        if secret and len(secret) < MIN_HS256_SECRET_BYTES:
            message = f"must be at least {MIN_HS256_SECRET_BYTES} bytes for HS256"
            raise ConfigError([f"management.sessions.hs256_secret: {message}"])
        self._secret = secret
        self._jwks = _load_jwks(cfg.jwks_file) if cfg.jwks_file else {}
        self._mfa_values = frozenset(cfg.mfa_values)
        self._options: Options = {
            "verify_signature": True,
            "verify_exp": False,  # exp, nbf and iat: checked by _times against `now`
            "verify_nbf": False,
            "verify_iat": False,
            "verify_iss": True,  # a no-op when no issuer is configured
            "verify_aud": cfg.audience is not None,  # otherwise a token's aud is accepted
            "verify_sub": False,  # the user claim is checked by verify
            "verify_jti": False,
            "enforce_minimum_key_length": True,
        }

    @property
    def enabled(self) -> bool:
        return bool(self._secret or self._jwks)

    def verify(self, token: str, *, now: datetime | None = None) -> Session:
        """The session a JWT speaks for at `now` (aware; default: the current time)."""
        if not self.enabled:
            raise InvalidSession("sessions are not configured")
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidSession("too long")
        try:
            key, algorithm = self._key_for(jwt.get_unverified_header(token))
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                options=self._options,
                audience=self._cfg.audience,
                issuer=self._cfg.issuer,
            )
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidSession(f"missing claim {exc.claim}") from None
        except jwt.PyJWTError as exc:
            why = next((why for kind, why in _WHY if isinstance(exc, kind)), type(exc).__name__)
            raise InvalidSession(why) from None
        return self._session(claims, (now or datetime.now(UTC)).timestamp())

    def _key_for(self, header: dict[str, Any]) -> tuple[bytes | jwt.PyJWK, str]:
        """The one key (and its one algorithm) a token may be verified with."""
        alg = header.get("alg")
        if alg == "HS256" and self._secret:
            return self._secret, alg
        if alg in ("RS256", "ES256") and self._jwks:
            kid = header.get("kid")
            if kid is None and len(self._jwks) == 1:
                jwk = next(iter(self._jwks.values()))
            elif isinstance(kid, str) and kid in self._jwks:
                jwk = self._jwks[kid]
            else:
                raise InvalidSession("unknown key id")
            if jwk.algorithm_name != alg:
                raise InvalidSession("algorithm does not match the key")
            return jwk, alg
        raise InvalidSession("algorithm not allowed")

    def _session(self, claims: dict[str, Any], now: float) -> Session:
        exp, nbf, iat = (_number(claims, name) for name in ("exp", "nbf", "iat"))
        if exp is None:
            raise InvalidSession("missing claim exp")
        if exp <= now - LEEWAY:
            raise InvalidSession("expired")
        if nbf is not None and nbf > now + LEEWAY:
            raise InvalidSession("not yet valid")
        if iat is not None and iat > now + LEEWAY:
            raise InvalidSession("issued in the future")
        try:
            expires_at = datetime.fromtimestamp(exp, UTC)
        except (OverflowError, OSError, ValueError):
            raise InvalidSession("claim exp out of range") from None
        names = self._cfg.claims
        user = claims.get(names.user)
        if user is None:
            raise InvalidSession(f"missing claim {names.user}")
        if not isinstance(user, str) or not user:
            raise InvalidSession(f"claim {names.user} is not a non-empty string")
        amr = claims.get("amr")
        if amr is None:
            amr = []
        if not isinstance(amr, list) or not all(isinstance(v, str) for v in amr):
            raise InvalidSession("claim amr is not a list of strings")
        return Session(
            user_id=user,
            company_id=_optional_string(claims, names.company),
            role=_optional_string(claims, names.role),
            mfa=not self._mfa_values.isdisjoint(amr),
            expires_at=expires_at,
        )
