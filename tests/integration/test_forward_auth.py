"""Forward-auth mode: /_patgate/auth answers for an ingress that proxies by itself."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import GatewayFactory, RecordingUpstream, Seeder, gateway_config

AUTH = "/_patgate/auth"


@pytest.fixture
async def seed(db: Any, upstream: RecordingUpstream) -> Seeder:
    return Seeder(gateway_config(upstream.url), db)


def nginx(uri: str, method: str = "GET", **extra: str) -> dict[str, str]:
    return {"X-Original-URI": uri, "X-Original-Method": method, **extra}


def traefik(uri: str, method: str = "GET", host: str = "app.example") -> dict[str, str]:
    return {"X-Forwarded-Uri": uri, "X-Forwarded-Method": method, "X-Forwarded-Host": host}


def trusting(upstream: RecordingUpstream, **overrides: Any) -> Any:
    return gateway_config(upstream.url, trusted_proxies=["127.0.0.1/32"], **overrides)


async def test_valid_token_gets_200_with_the_identity_headers(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    user_id, token, token_id = await seed.user_with_token("full_user")
    client = await make_gateway(trusting(upstream))

    response = await client.get(
        AUTH, headers={**nginx("/api/jobs/7?x=1"), "Authorization": f"Bearer {token}"}
    )

    assert response.status == 200
    assert response.headers["X-Auth-User-Id"] == user_id
    assert response.headers["X-Auth-Token-Id"] == token_id
    assert response.headers["X-Auth-Role"] == "full_user"
    assert response.headers["X-Auth-Permissions"] == "invoices:read jobs:* tokens:create"
    assert "X-Auth-Token-Expires-At" in response.headers
    assert upstream.received == []  # forward-auth never proxies


async def test_traefik_headers_and_host_routing(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    _, token, _ = await seed.user_with_token("field_user")
    cfg = trusting(
        upstream,
        routes=[
            {
                "name": "other-host",
                "match": {"host": "admin.example", "prefix": "/"},
                "upstream": upstream.url,
                "require": ["users:admin"],
            },
            {
                "name": "app",
                "match": {"prefix": "/"},
                "upstream": upstream.url,
                "require": ["jobs:read"],
            },
        ],
    )
    client = await make_gateway(cfg)
    bearer = {"Authorization": f"Bearer {token}"}

    allowed = await client.get(AUTH, headers={**traefik("/jobs", host="App.Example."), **bearer})
    denied = await client.get(AUTH, headers={**traefik("/jobs", host="ADMIN.example."), **bearer})

    assert allowed.status == 200
    assert denied.status == 403
    assert denied.headers["WWW-Authenticate"].endswith('error="insufficient_scope"')


async def test_missing_or_bad_token_is_401_and_wrong_permission_403(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    _, token, _ = await seed.user_with_token("field_user")
    client = await make_gateway(trusting(upstream))

    missing = await client.get(AUTH, headers=nginx("/api/jobs/1"))
    bad = await client.get(
        AUTH, headers={**nginx("/api/jobs/1"), "Authorization": "Bearer pat_nope"}
    )
    forbidden = await client.get(
        AUTH, headers={**nginx("/api/jobs", "POST"), "Authorization": f"Bearer {token}"}
    )

    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="patgate"'
    assert bad.status == 401
    assert forbidden.status == 403
    assert forbidden.headers["Content-Type"] == "application/problem+json"


async def test_public_route_is_200_without_identity(
    make_gateway: GatewayFactory, upstream: RecordingUpstream
) -> None:
    client = await make_gateway(trusting(upstream))
    response = await client.get(AUTH, headers=nginx("/public/page"))
    assert response.status == 200
    assert not any(name.lower().startswith("x-auth-") for name in response.headers)


@pytest.mark.parametrize(
    ("uri", "method", "code"),
    [
        ("/nowhere", "GET", "not_found"),
        ("/api/invoices/1", "DELETE", "method_not_allowed"),
        ("/public/%2e%2e/api/jobs", "GET", "bad_path"),
        ("/public/..%2Fapi/jobs", "GET", "bad_path"),
    ],
)
async def test_what_cannot_be_routed_is_403_naming_the_reason(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, uri: str, method: str, code: str
) -> None:
    """nginx understands only 2xx, 401 and 403 from auth_request."""
    client = await make_gateway(trusting(upstream))
    response = await client.get(AUTH, headers=nginx(uri, method))
    assert response.status == 403
    body = await response.json(content_type=None)
    assert body["type"] == f"urn:patgate:error:{code}"


async def test_original_request_headers_are_required(
    make_gateway: GatewayFactory, upstream: RecordingUpstream
) -> None:
    client = await make_gateway(trusting(upstream))
    response = await client.get(AUTH, headers={"X-Original-URI": "/public/x"})
    assert response.status == 400


async def test_an_untrusted_peer_is_not_believed(
    make_gateway: GatewayFactory, upstream: RecordingUpstream, seed: Seeder
) -> None:
    """Without trusted_proxies anyone could ask "may I?" about any path: refused outright."""
    _, token, _ = await seed.user_with_token()
    client = await make_gateway(gateway_config(upstream.url))
    response = await client.get(
        AUTH, headers={**nginx("/api/jobs/1"), "Authorization": f"Bearer {token}"}
    )
    assert response.status == 403
    assert "X-Auth-User-Id" not in response.headers
