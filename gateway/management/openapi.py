"""The OpenAPI 3.1 document of the management API (SPEC §9), built once at import.

It follows ``gateway.management.api`` route for route and field for field: request bodies
accept exactly what ``read_json`` lets through, responses carry exactly the fields of
``token_json``, ``user_json`` and ``event_json``. ``tests/integration/test_openapi.py``
checks that routes cannot drift and fuzzes the live API against this document.
"""

from __future__ import annotations

from typing import Any

from gateway.config import Sessions
from gateway.errors import PROBLEM_JSON
from gateway.lifecycle import MAX_LIFETIME_DAYS, MAX_NAME_LENGTH, USER_STATUSES
from gateway.views import TOKEN_STATES

Schema = dict[str, Any]

MAX_LEAKED_TOKENS = 100  # the most tokens one leak report may list (the API enforces it)
REVOKED_REASONS = ("user", "admin", "owner_deactivated", "owner_downgraded", "rotated", "leaked")

# Problem responses: status → (component name, description, headers always sent).
ERRORS: dict[int, tuple[str, str, tuple[str, ...]]] = {
    400: ("BadRequest", "The body is not JSON, or exceeds 64 KiB.", ()),
    401: ("Unauthorized", "No credentials, or invalid or expired ones.", ("WWW-Authenticate",)),
    403: ("Forbidden", "Authenticated, but not allowed to do this.", ("WWW-Authenticate",)),
    404: ("NotFound", "No such resource in the caller's reach.", ()),
    405: ("MethodNotAllowed", "The path exists, the method does not.", ("Allow",)),
    409: ("Conflict", "The resource's state forbids the change.", ()),
    422: ("InvalidInput", "A field, parameter or body is invalid.", ()),
    429: ("TooManyRequests", "Rate limited.", ("Retry-After",)),
    503: ("Unavailable", "The token store is unreachable.", ("Retry-After",)),
}
SIGNED_IN = {401, 403, 503}


# -- schema helpers ----------------------------------------------------------------------------


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def string(fmt: str | None = None, *, nullable: bool = False, **extra: Any) -> Schema:
    schema: Schema = {"type": ["string", "null"] if nullable else "string", **extra}
    if fmt:
        schema["format"] = fmt
    return schema


def enum(values: tuple[str, ...]) -> Schema:
    return {"type": "string", "enum": list(values)}


def array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def obj(required: tuple[str, ...] | None = None, /, **properties: Schema) -> Schema:
    """A closed object; every property required unless ``required`` names a subset."""
    names = list(properties if required is None else required)
    return {
        "type": "object",
        "properties": properties,
        "required": names,
        "additionalProperties": False,
    }


STR, OPT_STR, UUID = string(), string(nullable=True), string("uuid")
TIME, OPT_TIME = string("date-time"), string("date-time", nullable=True)
INT, BOOL, STRINGS = {"type": "integer"}, {"type": "boolean"}, array(string())

TOKEN: dict[str, Schema] = {
    "id": UUID,
    "name": STR,
    "prefix": string(description="The display prefix; the plaintext is never shown again."),
    "state": enum(TOKEN_STATES),
    "role": string(nullable=True, description="The scope role, when the token has one."),
    "permissions": array(STR, description="Effective: the scopes ∩ the owner's current role."),
    "user_id": STR,
    "company_id": STR,
    "created_at": TIME,
    "created_by": STR,
    "expires_at": OPT_TIME,
    "last_used_at": OPT_TIME,
    "last_used_ip": OPT_STR,
    "revoked_at": OPT_TIME,
    "revoked_reason": {"enum": [*REVOKED_REASONS, None]},
    "rotated_to": string("uuid", nullable=True),
}
PLAINTEXT = string(description="The token itself: shown this once, never stored.")
NAME = string(minLength=1, maxLength=MAX_NAME_LENGTH, description="Trimmed; no control chars.")
DAYS = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_LIFETIME_DAYS}
STATUS_ = enum(USER_STATUSES)

SCHEMAS: dict[str, Schema] = {
    "Token": obj(**TOKEN),
    "CreatedToken": obj(**TOKEN, token=PLAINTEXT, dropped_permissions=STRINGS),
    "RotatedToken": obj(**TOKEN, token=PLAINTEXT),
    "TokenList": obj(items=array(ref("Token"))),
    "Event": obj(
        id=INT, token_id=UUID, event=STR, actor=STR, at=TIME, ip=OPT_STR, detail={"type": "object"}
    ),
    "EventList": obj(items=array(ref("Event"))),
    "User": obj(
        id=STR,
        company_id=STR,
        role=STR,
        status=STATUS_,
        email=OPT_STR,
        created_at=TIME,
        updated_at=TIME,
    ),
    "UserList": obj(items=array(ref("User"))),
    "Role": obj(name=STR, permissions=STRINGS),
    "RoleList": obj(items=array(ref("Role"))),
    "Me": obj(
        user_id=STR,
        company_id=STR,
        role=OPT_STR,
        email=OPT_STR,
        permissions=STRINGS,
        mfa=BOOL,
        auth=enum(("bearer", "cookie", "pat")),
    ),
    "LeakReportAccepted": obj(status={"const": "accepted"}),
    "Problem": obj(type=string("uri"), title=STR, status=INT, detail=STR, request_id=STR),
    "CreateToken": obj(
        ("name",),
        name=NAME,
        expires_in_days=DAYS,
        expires_at=OPT_TIME,
        no_expiry=BOOL,
        role=string(nullable=True, description="Scope the token to this role."),
        user_id=string(nullable=True, description="Another user's token (tokens:admin)."),
    ),
    "RenameToken": obj(name=NAME),
    "LeakReport": obj((), tokens=array(STR, maxItems=MAX_LEAKED_TOKENS)),
    "PutUser": obj(("company_id", "role"), company_id=STR, role=STR, email=OPT_STR, status=STATUS_),
    "PatchUser": obj((), role=STR, email=OPT_STR, status=STATUS_),
}


# -- operation helpers -------------------------------------------------------------------------


def headers(*names: str) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in ("X-Request-Id", *names)}


def op(
    operation_id: str,
    summary: str,
    ok: str | None,
    *errors: int,
    status: tuple[int, ...] = (200,),
    body: str | None = None,
    body_required: bool = True,
    parameters: list[Schema] | None = None,
    public: bool = False,
) -> Schema:
    """One operation: its answers, its problems (a body adds 400 and 422; signing in adds
    401, 403 and 503), its body, and ``security: []`` when anyone may call it."""
    schema = ref(ok) if ok else {"type": "object"}
    answer = {"headers": headers(), "content": {"application/json": {"schema": schema}}}
    responses: dict[str, Any] = {str(s): {"description": STATUS[s], **answer} for s in status}
    problems = set(errors) | ({400, 422} if body else set()) | (set() if public else SIGNED_IN)
    for code in sorted(problems):
        responses[str(code)] = {"$ref": f"#/components/responses/{ERRORS[code][0]}"}
    result: Schema = {"operationId": operation_id, "summary": summary, "responses": responses}
    if parameters:
        result["parameters"] = parameters
    if body:
        content = {"application/json": {"schema": ref(body)}}
        result["requestBody"] = {"required": body_required, "content": content}
    if public:
        result["security"] = []
    return result


def parameter(name: str, where: str, schema: Schema, text: str) -> Schema:
    required = where == "path"
    return {"name": name, "in": where, "required": required, "schema": schema, "description": text}


STATUS = {200: "OK", 201: "Created", 202: "Accepted"}
TOKEN_ID = [parameter("id", "path", string(), "The token's id (a UUID; anything else is 404).")]
USER_ID = [parameter("id", "path", string(), "The user's id (the product's own).")]
TOKEN_FILTERS = [
    parameter("all", "query", {"type": "boolean"}, "Every user's in the company (tokens:admin)."),
    parameter("user", "query", string(), "This user's tokens (tokens:admin for another's)."),
    parameter("state", "query", enum(TOKEN_STATES), "Only tokens in this state."),
]

PATHS: dict[str, Schema] = {
    "/openapi.json": {"get": op("openapi", "This document", None, public=True)},
    "/me": {"get": op("me", "The caller: user, company, role, permissions", "Me")},
    "/tokens": {
        "get": op("listTokens", "The caller's tokens", "TokenList", 422, parameters=TOKEN_FILTERS),
        "post": op(
            "createToken",
            "Create a token; the answer holds its plaintext, this once",
            "CreatedToken",
            404,
            409,
            status=(201,),
            body="CreateToken",
        ),
    },
    "/tokens/revoke-leaked": {
        "post": op(
            "revokeLeaked",
            "Report leaked tokens: those that exist are revoked; 202 whatever matched",
            "LeakReportAccepted",
            429,
            503,
            status=(202,),
            body="LeakReport",
            body_required=False,
            public=True,
        )
    },
    "/tokens/{id}": {
        "parameters": TOKEN_ID,
        "get": op("getToken", "One token (never its plaintext)", "Token", 404),
        "patch": op("renameToken", "Rename a token", "Token", 404, body="RenameToken"),
        "delete": op("revokeToken", "Revoke a token (the row stays for audit)", "Token", 404),
    },
    "/tokens/{id}/refresh": {
        "parameters": TOKEN_ID,
        "post": op("refreshToken", "Extend the expiry; reactivate if expired", "Token", 404, 409),
    },
    "/tokens/{id}/rotate": {
        "parameters": TOKEN_ID,
        "post": op(
            "rotateToken", "A successor token, this once", "RotatedToken", 404, 409, status=(201,)
        ),
    },
    "/tokens/{id}/events": {
        "parameters": TOKEN_ID,
        "get": op("tokenEvents", "A token's audit trail", "EventList", 404),
    },
    "/roles": {
        "get": op(
            "listRoles",
            "The roles the caller may give a token: every permission of each is the caller's",
            "RoleList",
        )
    },
    "/users": {"get": op("listUsers", "The company's users (users:admin)", "UserList")},
    "/users/{id}": {
        "parameters": USER_ID,
        "put": op(
            "putUser",
            "Create (201) or replace (200) a user of the company (users:admin)",
            "User",
            404,
            409,
            status=(200, 201),
            body="PutUser",
        ),
        "patch": op(
            "patchUser",
            "Change a user's role, email or status (users:admin)",
            "User",
            404,
            body="PatchUser",
            body_required=False,
        ),
    },
}


def _problem_response(description: str, names: tuple[str, ...]) -> Schema:
    content = {PROBLEM_JSON: {"schema": ref("Problem")}}
    return {"description": description, "headers": headers(*names), "content": content}


def _header(description: str) -> Schema:
    return {"description": description, "required": True, "schema": string()}


DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "patgate management API",
        "version": "1",
        "description": (
            "Personal access tokens and their owners. Sign in with a session JWT (bearer or "
            "the UI's cookie; cookie requests that change state need a same-origin `Origin` "
            "and `X-Patgate-Csrf: 1`) or, when `management.allow_pat`, a PAT. Every error is "
            "`application/problem+json`; an undocumented method on a documented path is 405."
        ),
    },
    "servers": [{"url": "/_patgate/api/v1"}],
    "security": [{"session": []}, {"sessionCookie": []}, {"pat": []}],
    "paths": PATHS,
    "components": {
        "securitySchemes": {
            "session": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "sessionCookie": {"type": "apiKey", "in": "cookie", "name": Sessions().cookie},
            "pat": {
                "type": "http",
                "scheme": "bearer",
                "description": "A PAT with a tokens: permission, when management.allow_pat.",
            },
        },
        "schemas": SCHEMAS,
        "responses": {
            name: _problem_response(description, names)
            for name, description, names in ERRORS.values()
        },
        "headers": {
            "X-Request-Id": _header("The request id (also in a problem's `request_id`)."),
            "WWW-Authenticate": _header("The bearer challenge (RFC 6750)."),
            "Allow": _header("The methods the path accepts."),
            "Retry-After": _header("Seconds to wait before trying again."),
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """The document, built once: shared, so deep-copy it before changing anything."""
    return DOCUMENT
