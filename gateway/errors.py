"""The exception tree of patgate, and its one mapping to HTTP (problem+json, RFC 9457).

    PatgateError                      status  code
    ├── BadRequest                     400    bad_request
    │   ├── BadPath                    400    bad_path
    │   └── InvalidInput               422    invalid_input
    ├── AuthError                      401    unauthorized      .reason for logs and metrics
    │   ├── MissingToken                      reason=missing
    │   ├── MalformedToken                    reason=malformed
    │   ├── UnknownToken                      reason=unknown
    │   ├── TokenExpired                      reason=expired
    │   ├── TokenRevoked                      reason=revoked
    │   └── OwnerInactive                     reason=owner_inactive
    ├── Forbidden                      403    insufficient_scope
    │   ├── MfaRequired                    mfa_required
    │   └── ForwardAuthDenied                     the cause's code (forward-auth: nginx)
    ├── NotFound                       404    not_found
    ├── MethodNotAllowed               405    method_not_allowed .allow
    ├── Conflict                       409    conflict
    ├── PayloadTooLarge                413    payload_too_large
    ├── TooManyRequests                429    rate_limited     (Retry-After)
    ├── UpstreamUnavailable            502    bad_gateway
    ├── DatabaseUnavailable            503    database_unavailable  (Retry-After)
    └── UpstreamTimeout                504    gateway_timeout

    ConfigError                        not HTTP: every problem of a config file, with key paths

A client-facing 401 never says *why* a token failed beyond "invalid or expired": the
reason lives on the exception for logs and metrics only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import orjson
from aiohttp import web

PROBLEM_JSON = "application/problem+json"
WWW_AUTHENTICATE = 'Bearer realm="patgate"'


class PatgateError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title

    def headers(self) -> dict[str, str]:
        return {}

    def problem(self, request_id: str | None = None) -> dict[str, object]:
        body: dict[str, object] = {
            "type": f"urn:patgate:error:{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if request_id:
            body["request_id"] = request_id
        return body

    def body(self, request_id: str | None = None) -> bytes:
        return orjson.dumps(self.problem(request_id))


class BadRequest(PatgateError):
    status = 400
    code = "bad_request"
    title = "Bad request"


class BadPath(BadRequest):
    code = "bad_path"
    title = "Bad request path"


class InvalidInput(BadRequest):
    status = 422
    code = "invalid_input"
    title = "Invalid input"


class AuthError(PatgateError):
    status = 401
    code = "unauthorized"
    title = "Unauthorized"
    reason: ClassVar[str] = "invalid"
    # RFC 6750: no error attribute when the request carried no credentials at all.
    token_given: ClassVar[bool] = True

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or "The access token is invalid or expired.")

    def headers(self) -> dict[str, str]:
        if not self.token_given:
            return {"WWW-Authenticate": WWW_AUTHENTICATE}
        return {"WWW-Authenticate": f'{WWW_AUTHENTICATE}, error="invalid_token"'}


class MissingToken(AuthError):
    reason = "missing"
    token_given = False

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or "A bearer token is required.")


class MalformedToken(AuthError):
    reason = "malformed"


class UnknownToken(AuthError):
    reason = "unknown"


class TokenExpired(AuthError):
    reason = "expired"


class TokenRevoked(AuthError):
    reason = "revoked"


class OwnerInactive(AuthError):
    reason = "owner_inactive"


class Forbidden(PatgateError):
    status = 403
    code = "insufficient_scope"
    title = "Forbidden"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": f'{WWW_AUTHENTICATE}, error="insufficient_scope"'}


class MfaRequired(Forbidden):
    code = "mfa_required"
    title = "Multi-factor session required"


class ForwardAuthDenied(Forbidden):
    """A forward-auth refusal nginx understands (403), whose ``type`` keeps the real reason."""

    def __init__(self, cause: PatgateError) -> None:
        super().__init__(cause.detail)
        self.cause_code = cause.code

    def headers(self) -> dict[str, str]:
        return {}

    def problem(self, request_id: str | None = None) -> dict[str, object]:
        return {**super().problem(request_id), "type": f"urn:patgate:error:{self.cause_code}"}


class NotFound(PatgateError):
    status = 404
    code = "not_found"
    title = "Not found"


class MethodNotAllowed(PatgateError):
    status = 405
    code = "method_not_allowed"
    title = "Method not allowed"

    def __init__(self, allow: Sequence[str], detail: str | None = None) -> None:
        super().__init__(detail)
        self.allow = tuple(sorted(set(allow)))

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allow)}


class Conflict(PatgateError):
    status = 409
    code = "conflict"
    title = "Conflict"


class TooManyRequests(PatgateError):
    status = 429
    code = "rate_limited"
    title = "Too many requests"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "60"}


class PayloadTooLarge(PatgateError):
    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class UpstreamUnavailable(PatgateError):
    status = 502
    code = "bad_gateway"
    title = "Bad gateway"


class DatabaseUnavailable(PatgateError):
    status = 503
    code = "database_unavailable"
    title = "Service unavailable"
    retry_after: ClassVar[int] = 2

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or "The token store is unreachable; try again shortly.")

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class UpstreamTimeout(PatgateError):
    status = 504
    code = "gateway_timeout"
    title = "Gateway timeout"


class ConfigError(Exception):
    """Every problem found in a configuration, each one naming its key path."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(self.errors))


def problem_response(error: PatgateError, request_id: str, request_id_header: str) -> web.Response:
    """The one mapping of a gateway error to HTTP: problem+json, its headers, the request id."""
    response = web.Response(
        status=error.status, body=error.body(request_id), content_type=PROBLEM_JSON
    )
    response.headers.update(error.headers())
    response.headers[request_id_header] = request_id
    return response
