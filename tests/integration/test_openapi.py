"""The management API's OpenAPI document: valid, in step with the routes, served as is, and
true of the live API — schemathesis fuzzes every operation of the real gateway app."""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass, field, replace
from typing import Any

import jsonschema_rs
import jwt
import pytest
import requests
import schemathesis
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from yarl import URL

from gateway.management import api
from gateway.management.api import PREFIX, ManagementApi
from gateway.management.openapi import openapi_document
from gateway.management.sessions import SessionVerifier
from tests.conftest import GatewayFactory, RecordingUpstream, Seeder, gateway_config

SECRET = "s" * 40
EXAMPLES_PER_STRATEGY = 25  # positive and negative; {id} operations also aim at a real id
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
SCHEMA = schemathesis.openapi.from_dict(copy.deepcopy(openapi_document()))


def operations() -> dict[str, APIOperation[Any, Any, Any, Any]]:
    found = {}
    for result in SCHEMA.get_all_operations():
        if isinstance(result, Err):  # an operation schemathesis cannot use: a broken document
            raise result.err()
        found[result.ok().label] = result.ok()
    return found


OPERATIONS = operations()


def config(upstream_url: str) -> Any:
    return gateway_config(upstream_url, management={"sessions": {"hs256_secret": SECRET}})


def session_jwt(user_id: str) -> str:
    claims = {"sub": user_id, "exp": int(time.time()) + 3600, "amr": ["mfa"]}
    return jwt.encode(claims, SECRET, algorithm="HS256")


# ---------------------------------------------------------------------------------------------
# The document itself


def test_the_document_is_valid_openapi_3_1() -> None:
    document = openapi_document()
    assert document["openapi"] == "3.1.0"
    assert document["servers"] == [{"url": PREFIX}]
    SCHEMA.validate()  # the OpenAPI 3.1 meta-schema; raises on the first error
    for name, schema in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name  # JSON Schema 2020-12
    assert len(OPERATIONS) == 15


def test_openapi_spec_validator_accepts_the_document() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(copy.deepcopy(openapi_document()))


def test_the_document_knows_the_api_limits() -> None:
    """Constants the document cannot import (api imports it) must agree with the API's."""
    leak_report = openapi_document()["components"]["schemas"]["LeakReport"]
    assert leak_report["properties"]["tokens"]["maxItems"] == api.MAX_LEAKED_TOKENS


def test_every_route_is_documented_and_every_documented_route_exists(
    upstream: RecordingUpstream,
) -> None:
    cfg = config(upstream.url)
    app = ManagementApi(cfg, SessionVerifier(cfg.management.sessions)).app()
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"  # aiohttp adds HEAD to GET
    }
    documented = {
        (method, path)
        for path, item in openapi_document()["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert routes == documented


async def test_the_gateway_serves_the_document_without_sign_in(
    make_gateway: GatewayFactory, upstream: RecordingUpstream
) -> None:
    client = await make_gateway(config(upstream.url))

    response = await client.get(f"{PREFIX}/openapi.json")

    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert await response.json() == openapi_document()


# ---------------------------------------------------------------------------------------------
# Fuzzing the live API


@dataclass
class Target:
    """The live gateway, the admin signed in, and ids that exist."""

    client: TestClient[Any, Any]
    base_url: str
    headers: dict[str, str]
    company: str
    token: str  # one of the admin's tokens
    user: str  # another user of the admin's company (full_user: no users:admin)
    user_bearer: str
    statuses: list[int] = field(default_factory=list)


@pytest.fixture
async def target(make_gateway: GatewayFactory, upstream: RecordingUpstream, db: Any) -> Target:
    cfg = config(upstream.url)
    seed = Seeder(cfg, db)
    company = await seed.company()
    admin = await seed.user(company, "admin")
    _, token = await seed.token(admin)
    client = await make_gateway(cfg)
    user = await seed.user(company, "full_user")
    return Target(
        client=client,
        base_url=str(client.make_url(PREFIX)),
        headers={"Authorization": f"Bearer {session_jwt(admin)}"},
        company=company,
        token=token,
        user=user,
        user_bearer=f"Bearer {session_jwt(user)}",
    )


def fuzz(operation: Any, target: Target) -> None:
    """Hypothesis-generated cases, positive and negative, each sent and checked."""
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    strategies = [operation.as_strategy(generation_mode=mode) for mode in modes]
    if "{id}" in operation.path:  # random ids are 404s: aim at one that exists as well
        existing = target.token if operation.path.startswith("/tokens") else target.user
        strategies += [
            operation.as_strategy(generation_mode=mode, path_parameters={"id": existing})
            for mode in modes
        ]
    http = requests.Session()

    @settings(
        max_examples=EXAMPLES_PER_STRATEGY * len(strategies),
        deadline=None,
        derandomize=True,  # the same inputs on every run
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies))
    def check(case: Any) -> None:
        headers = dict(target.headers)  # call() adds requests' defaults to the dict it gets
        response = case.call(base_url=target.base_url, session=http, headers=headers)
        target.statuses.append(response.status_code)
        case.validate_response(response, checks=CHECKS, headers=headers)

    try:
        check()
    finally:
        http.close()


@pytest.mark.parametrize("label", sorted(OPERATIONS))
async def test_the_live_api_conforms_to_the_document(label: str, target: Target) -> None:
    await asyncio.to_thread(fuzz, OPERATIONS[label], target)  # the loop keeps serving

    assert target.statuses  # (an operation without inputs has just one case)
    assert all(status < 500 for status in target.statuses)


# ---------------------------------------------------------------------------------------------
# Every documented answer the fuzzer cannot reach alone, reached on purpose and checked


def send(target: Target, http: requests.Session, label: str, **parts: Any) -> Any:
    """One request built by schemathesis from ``parts``, checked against the document."""
    case = OPERATIONS[label].Case(**parts)
    headers = dict(target.headers)
    response = case.call(base_url=target.base_url, session=http, headers=headers)
    case.validate_response(response, checks=CHECKS, headers=headers)
    return response


def expect(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_each_documented_success_answer_conforms(target: Target) -> None:
    def run(http: requests.Session) -> None:
        def call(label: str, status: int, **parts: Any) -> dict[str, Any]:
            return expect(send(target, http, label, **parts), status)

        call("GET /openapi.json", 200)
        call("GET /me", 200)
        call("GET /tokens", 200, query={"all": "true", "state": "active"})
        created = call("POST /tokens", 201, body={"name": "ci", "expires_in_days": 30})
        token = {"path_parameters": {"id": created["id"]}}
        call("GET /tokens/{id}", 200, **token)
        call("PATCH /tokens/{id}", 200, body={"name": "ci 2"}, **token)
        call("POST /tokens/{id}/refresh", 200, **token)
        successor = call("POST /tokens/{id}/rotate", 201, **token)
        call("POST /tokens/{id}/rotate", 409, **token)  # a rotated token again: reuse
        call("GET /tokens/{id}/events", 200, **token)
        call("DELETE /tokens/{id}", 200, path_parameters={"id": successor["id"]})
        call("POST /tokens/revoke-leaked", 202, body={"tokens": [created["token"]]})
        call("GET /users", 200)
        new_user = {"path_parameters": {"id": "u-new"}}
        body = {"company_id": target.company, "role": "field_user"}
        call("PUT /users/{id}", 201, body=body, **new_user)
        call("PUT /users/{id}", 200, body={**body, "email": None}, **new_user)
        call("PATCH /users/{id}", 200, body={"status": "deactivated"}, **new_user)

    with requests.Session() as http:
        await asyncio.to_thread(run, http)


async def test_documented_problem_answers_conform(target: Target) -> None:
    """401, 403 and 429 carry the headers the document promises (WWW-Authenticate, …)."""

    def run(http: requests.Session) -> list[dict[str, Any]]:
        unknown = {"path_parameters": {"id": "00000000-0000-0000-0000-000000000000"}}
        anonymous = replace(target, headers={})
        problems = [
            expect(send(anonymous, http, "GET /me"), 401),
            expect(send(target, http, "GET /tokens/{id}", **unknown), 404),
            expect(send(target, http, "POST /tokens", body={"name": " "}), 422),
        ]
        as_user = replace(target, headers={"Authorization": target.user_bearer})
        problems.append(expect(send(as_user, http, "GET /users"), 403))
        leak = [send(target, http, "POST /tokens/revoke-leaked") for _ in range(11)]
        problems.append(expect(leak[-1], 429))
        return problems

    with requests.Session() as http:
        problems = await asyncio.to_thread(run, http)

    assert [p["status"] for p in problems] == [401, 404, 422, 403, 429]


# ---------------------------------------------------------------------------------------------
# Inputs the fuzzer rarely finds: NUL (PostgreSQL text cannot hold it) and dates that
# overflow in UTC were 500s until store.transaction mapped asyncpg's DataError to 422


NUL = "\u0000"


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/tokens?user=%00", None, 422),
        ("GET", "/tokens/%00", None, 404),  # not a UUID
        ("POST", "/tokens", {"name": "x", "user_id": NUL}, 422),
        ("POST", "/tokens", {"name": "x", "role": NUL}, 422),
        ("POST", "/tokens/revoke-leaked", {"tokens": [NUL]}, 202),
        ("PATCH", "/users/%00", {"email": "x"}, 422),
        ("PATCH", "/users/{user}", {"email": f"a{NUL}"}, 422),
        ("POST", "/tokens", {"name": "x", "expires_at": "9999-12-31T23:59:59-23:59"}, 422),
        ("POST", "/tokens", {"name": "x", "expires_at": "0001-01-01T00:00:00+23:59"}, 422),
        ("POST", "/tokens", {"name": "x", "expires_at": "9999-12-31T23:59:59Z"}, 201),
    ],
)
async def test_nul_and_out_of_range_inputs_are_client_errors(
    target: Target, method: str, path: str, body: dict[str, Any] | None, status: int
) -> None:
    url = URL(PREFIX + path.replace("{user}", target.user), encoded=True)

    response = await target.client.request(method, url, headers=target.headers, json=body)

    assert response.status == status, await response.text()
    if status >= 400:
        assert response.headers["Content-Type"] == "application/problem+json"


async def test_a_session_naming_a_nul_user_is_401(target: Target) -> None:
    jwt_of_nul_user = session_jwt(f"u-{NUL}")
    headers = {"Authorization": f"Bearer {jwt_of_nul_user}"}

    response = await target.client.get(f"{PREFIX}/me", headers=headers)

    assert response.status == 401, await response.text()
