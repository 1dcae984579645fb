"""Signed identity: an ES256 assertion an upstream can verify against the published JWKS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.app import reload
from gateway.assertion import AssertionSigner
from gateway.auth import Identity
from gateway.config import Assertion, Config
from gateway.errors import ConfigError
from gateway.headers import HeaderPolicy, clean_request_headers
from gateway.keys import LIVE
from tests.conftest import GatewayFactory, RecordingUpstream, Seeder, gateway_config

JWKS = "/_patgate/.well-known/jwks.json"


def pem_key(folder: Path, name: str, key: Any | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    path = folder / name
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(path)


@pytest.fixture
def keys(tmp_path: Path) -> list[str]:
    return [pem_key(tmp_path, "new.pem"), pem_key(tmp_path, "old.pem")]


def signing_config(upstream: RecordingUpstream, keys: list[str], **assertion: Any) -> Config:
    return gateway_config(
        upstream.url,
        trusted_proxies=["127.0.0.1/32"],
        identity_headers={"assertion": {"key_files": keys, "ttl": "2m", **assertion}},
    )


@pytest.fixture
async def seed(db: Any, upstream: RecordingUpstream) -> Seeder:
    return Seeder(gateway_config(upstream.url), db)


async def test_forward_auth_assertion_verifies_against_the_published_jwks(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder, keys: list[str]
) -> None:
    user_id, token, token_id = await seed.user_with_token("full_user")
    client = await make_gateway(signing_config(upstream, keys))

    jwks = await (await client.get(JWKS)).json()
    response = await client.get(
        "/_patgate/auth",
        headers={
            "X-Original-URI": "/api/jobs/1",
            "X-Original-Method": "GET",
            "Authorization": f"Bearer {token}",
        },
    )

    assert response.status == 200
    assertion = response.headers["X-Auth-Assertion"]
    assert len(jwks["keys"]) == 2  # both keys published during a rotation
    signing_key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(assertion)["kid"]]
    assert signing_key.key_id == jwks["keys"][0]["kid"]  # the first key signs
    claims = jwt.decode(assertion, signing_key.key, algorithms=["ES256"], audience="jobs-read")
    assert claims["sub"] == user_id
    assert claims["token_id"] == token_id
    assert claims["company"] == response.headers["X-Auth-Company-Id"]
    assert claims["permissions"] == ["invoices:read", "jobs:*", "tokens:create"]
    assert claims["exp"] - claims["iat"] == 120
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(assertion, signing_key.key, algorithms=["ES256"], audience="jobs-write")


async def test_jwks_is_not_served_when_assertions_are_off(
    make_gateway: GatewayFactory, upstream: RecordingUpstream
) -> None:
    client = await make_gateway(gateway_config(upstream.url))
    assert (await client.get(JWKS)).status == 404


def test_a_client_cannot_send_its_own_assertion(keys: list[str]) -> None:
    custom = Assertion(header="X-Gateway-Proof", key_files=tuple(keys))
    cfg = gateway_config(
        "http://127.0.0.1:9",
        identity_headers={"assertion": {"header": "X-Gateway-Proof", "key_files": keys}},
    )
    policy = HeaderPolicy(cfg.identity_headers)
    cleaned = clean_request_headers(
        [("X-Gateway-Proof", "forged"), ("x_gateway_proof", "forged"), ("X-Kept", "1")],
        policy,
        websocket=False,
        keep_authorization=False,
    )
    assert list(cleaned.items()) == [("X-Kept", "1")]
    assert custom.header == cfg.identity_headers.names()["assertion"]


def test_an_assertion_is_reused_until_half_its_lifetime_then_renewed(keys: list[str]) -> None:
    now = [1_000_000.0]
    signer = AssertionSigner(Assertion(key_files=tuple(keys), ttl=60), clock=lambda: now[0])
    identity = Identity("t1", "u1", "c1", "admin", frozenset({"jobs:*"}), "jobs:*", None, None)

    first = signer.sign(identity, "jobs")
    now[0] += 29
    assert signer.sign(identity, "jobs") == first
    assert signer.sign(identity, "invoices") != first  # another audience, another assertion
    now[0] += 2
    assert signer.sign(identity, "jobs") != first


def test_key_files_must_be_ec_p256_private_keys(tmp_path: Path) -> None:
    rsa_key = pem_key(tmp_path, "rsa.pem", rsa.generate_private_key(65537, 2048))
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError) as caught:
        AssertionSigner(Assertion(key_files=(rsa_key, missing)))
    assert caught.value.errors == (
        f"identity_headers.assertion.key_files[0]: {rsa_key} is not an EC P-256 private key",
        f"identity_headers.assertion.key_files[1]: cannot load {missing}: FileNotFoundError",
    )


def test_assertion_needs_a_key_file() -> None:
    with pytest.raises(ConfigError) as caught:
        gateway_config("http://127.0.0.1:9", identity_headers={"assertion": {"ttl": "1m"}})
    assert any(e.startswith("identity_headers.assertion.key_files:") for e in caught.value.errors)


async def test_proxied_requests_carry_an_assertion_for_their_route(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder, keys: list[str]
) -> None:
    user_id, token, _ = await seed.user_with_token("full_user")
    client = await make_gateway(signing_config(upstream, keys))
    jwks = jwt.PyJWKSet.from_dict(await (await client.get(JWKS)).json())

    response = await client.get(
        "/api/jobs/1", headers={"Authorization": f"Bearer {token}", "X-Auth-Assertion": "x"}
    )

    assert response.status == 200
    [assertion] = upstream.last.all("X-Auth-Assertion")  # the client's own never arrives
    key = jwks[jwt.get_unverified_header(assertion)["kid"]].key
    claims = jwt.decode(assertion, key, algorithms=["ES256"], audience="jobs-read")
    assert claims["sub"] == user_id
    public = await client.get("/public/page")
    assert public.status == 200
    assert upstream.last.header("X-Auth-Assertion") is None  # no identity, no assertion


async def test_a_reload_renaming_the_assertion_header_signs_under_the_new_name(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder, keys: list[str]
) -> None:
    """The new name is stripped from clients from the reload on: the signer must use it too,
    or clients could send their own assertion under it."""
    _, token, _ = await seed.user_with_token("full_user")
    client = await make_gateway(signing_config(upstream, keys))

    reload(client.app, signing_config(upstream, keys, header="X-Auth-Signed"))
    response = await client.get(
        "/api/jobs/1", headers={"Authorization": f"Bearer {token}", "X-Auth-Signed": "forged"}
    )

    assert response.status == 200
    [assertion] = upstream.last.all("X-Auth-Signed")
    assert assertion != "forged"
    assert jwt.get_unverified_header(assertion)["alg"] == "ES256"
    assert upstream.last.all("X-Auth-Assertion") == []


async def test_a_reload_whose_key_file_is_gone_changes_nothing(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, keys: list[str], tmp_path: Path
) -> None:
    client = await make_gateway(signing_config(upstream, keys))
    before = client.app[LIVE].runtime

    with pytest.raises(ConfigError):
        reload(client.app, signing_config(upstream, [str(tmp_path / "gone.pem")]))

    assert client.app[LIVE].runtime is before
