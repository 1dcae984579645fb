"""forward(): one request to its upstream and the answer back, streamed both ways.

Upstream faults are translated here: refused/reset → 502, route ``timeout`` of silence →
504. Redirects are passed through, never followed; bodies are never decompressed; no
cookie is ever kept between requests (the client session has a dummy cookie jar).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.auth import Identity
from gateway.config import IdentityHeaders, IPNetwork, Route
from gateway.errors import PayloadTooLarge, UpstreamTimeout, UpstreamUnavailable
from gateway.headers import (
    HeaderPolicy,
    clean_request_headers,
    clean_response_headers,
    forwarded_headers,
    is_trusted,
)

TOKEN_EXPIRES_HEADER = "X-Auth-Token-Expires-At"
# Headers aiohttp's client would invent when the client did not send them.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
READ_CHUNK = 64 * 1024


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=SKIP_AUTO_HEADERS,
        trust_env=False,
    )


async def _limited(body: web.Request, limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in body.content.iter_chunked(READ_CHUNK):
        seen += len(chunk)
        if seen > limit:
            raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
        yield chunk


class Forwarder:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        names: IdentityHeaders,
        trusted_proxies: tuple[IPNetwork, ...],
    ) -> None:
        self.session = session
        self.names = names
        self.policy = HeaderPolicy(names)
        self.trusted = trusted_proxies

    def request_headers(
        self, request: web.Request, route: Route, identity: Identity | None, request_id: str
    ) -> CIMultiDict[str]:
        """Strip what a client could spoof or that belongs to this hop, then inject ours."""
        headers = clean_request_headers(
            request.headers,
            self.policy,
            websocket=False,
            keep_authorization=route.forward_authorization,
            remove=route.remove_request_headers,
        )
        for name, value in route.set_request_headers:
            headers[name] = value
        peer = request.remote or ""
        headers.extend(
            forwarded_headers(
                request.headers,
                peer=peer,
                proto=request.scheme,
                host=request.host,
                trusted_peer=is_trusted(peer, self.trusted),
            )
        )
        if route.preserve_host:
            headers["Host"] = request.host
        names = self.names
        if identity is not None:
            headers[names.user_id] = identity.user_id
            headers[names.company_id] = identity.company_id
            headers[names.token_id] = identity.token_id
            headers[names.role] = identity.role
            headers[names.permissions] = identity.permissions_header
        headers[names.request_id] = request_id
        return headers

    async def forward(
        self,
        request: web.Request,
        route: Route,
        url: str,
        identity: Identity | None,
        request_id: str,
    ) -> web.StreamResponse:
        headers = self.request_headers(request, route, identity, request_id)
        data: object = None
        if request.body_exists:
            length = request.content_length
            if route.max_body is not None:
                if length is not None and length > route.max_body:
                    raise PayloadTooLarge(f"the request body exceeds {route.max_body} bytes")
                data = _limited(request, route.max_body)
            else:
                data = request.content
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=route.connect_timeout, sock_read=route.timeout
        )
        response: web.StreamResponse | None = None
        try:
            async with self.session.request(
                request.method,
                URL(url, encoded=True),  # exactly the canonical path, never re-quoted
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=timeout,
            ) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                response.headers.extend(clean_response_headers(upstream.headers))
                if identity is not None and identity.expires_header is not None:
                    response.headers[TOKEN_EXPIRES_HEADER] = identity.expires_header
                response.headers[self.names.request_id] = request_id
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except PayloadTooLarge:
            if response is not None and response.prepared:
                return _abort(request, response)
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            if response is not None and response.prepared:
                return _abort(request, response)
            raise UpstreamTimeout(f"the upstream did not answer within {route.timeout:g}s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            if response is not None and response.prepared:
                return _abort(request, response)
            raise UpstreamUnavailable("the upstream refused or reset the connection") from exc


def _abort(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """The answer has started: the only honest signal left is to cut the connection."""
    if request.transport is not None:
        request.transport.abort()
    response.force_close()
    return response
