"""Signed identity: a short-lived ES256 JWT beside the identity headers (optional).

An upstream that verifies it (keys at ``/_patgate/.well-known/jwks.json``) can refuse any
request that did not come through the gateway. Claims: ``sub`` (user), ``company``,
``token_id``, ``permissions``, ``aud`` (the route's name), ``iat``, ``exp``.

Keys come from PEM files of EC P-256 private keys: the first signs, all are published, so
a new key can be added first and the old one dropped once upstreams have fetched both.
``kid`` is the key's RFC 7638 thumbprint. Signing costs tens of microseconds, so a signed
assertion is reused for the same token and route until half its lifetime has passed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.auth import Identity
from gateway.config import Assertion
from gateway.errors import ConfigError

MAX_CACHED = 10_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    numbers = key.public_numbers()
    jwk = {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64(numbers.x.to_bytes(32, "big")),
        "y": _b64(numbers.y.to_bytes(32, "big")),
    }
    canonical = json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode()
    return {**jwk, "kid": _b64(hashlib.sha256(canonical).digest()), "use": "sig", "alg": "ES256"}


def load_keys(files: tuple[str, ...], path: str) -> list[ec.EllipticCurvePrivateKey]:
    keys, errors = [], []
    for i, name in enumerate(files):
        try:
            key = serialization.load_pem_private_key(Path(name).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            errors.append(f"{path}[{i}]: cannot load {name}: {type(exc).__name__}")
            continue
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            errors.append(f"{path}[{i}]: {name} is not an EC P-256 private key")
            continue
        keys.append(key)
    if errors:
        raise ConfigError(errors)
    return keys


class AssertionSigner:
    def __init__(self, cfg: Assertion, *, clock: Any = time.time) -> None:
        self.header = cfg.header
        self.ttl = cfg.ttl
        self.clock = clock
        keys = load_keys(cfg.key_files, "identity_headers.assertion.key_files")
        self._key = keys[0]
        self._jwks = {"keys": [public_jwk(k.public_key()) for k in keys]}
        self._kid = self._jwks["keys"][0]["kid"]
        # (token, route, permissions) → (expires, jwt): a role change is a new key
        self._issued: dict[tuple[str, str, str], tuple[float, str]] = {}

    def __repr__(self) -> str:
        return f"AssertionSigner(kid={self._kid!r}, ttl={self.ttl:g})"

    def jwks(self) -> dict[str, Any]:
        return self._jwks

    def sign(self, identity: Identity, audience: str) -> str:
        now = self.clock()
        key = (identity.token_id, audience, identity.permissions_header)
        issued = self._issued.get(key)
        if issued is not None and issued[0] - now > self.ttl / 2:
            return issued[1]
        expires = now + self.ttl
        claims = {
            "sub": identity.user_id,
            "company": identity.company_id,
            "token_id": identity.token_id,
            "permissions": sorted(identity.permissions),
            "aud": audience,
            "iat": int(now),
            "exp": int(expires),
        }
        token = jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self._kid})
        if len(self._issued) >= MAX_CACHED:
            self._issued.clear()
        self._issued[key] = (expires, token)
        return token
