"""Security tests: path and header attacks against the real gateway, over raw sockets.

Shared here: how upstreams interpret a path they receive (the references every attack is
judged by), and starting the real gateway as a server on 127.0.0.1.

Two references, both written independently of ``gateway.paths``:

- ``rfc_view``: percent-decode once, then RFC 3986 §5.2.4 ``remove_dot_segments`` literally
  (empty segments are segments; climbing above the root is clamped, as the RFC does). What an
  upstream that follows the RFC (aiohttp, Starlette, Go's ``url.Parse``) resolves.
- ``lenient_view``: the union of the extra liberties common upstreams take: percent-decode
  once, ``\\`` as a separator (IIS, Windows), ``;params`` dropped from every segment (Tomcat,
  Jetty), repeated slashes merged (nginx ``merge_slashes on``, Tomcat, Apache), dot segments
  resolved and clamped. "Nothing reached /admin" is judged by this one: a gateway is only safe
  if *no* plausible upstream reads a forwarded path as protected.
- ``merged_view``: percent-decode once, merge repeated slashes, then RFC 3986 dot segments:
  the one liberty of ``lenient_view`` the gateway mirrors in its decision (``//admin`` is
  authorized as ``/admin``), and the reason it refuses a ``..`` after repeated slashes
  (``/a//../b`` is ``/a/b`` to the RFC and ``/b`` here).

And for a ``Host`` (or ``X-Forwarded-Host``) value, ``host_readings``: the names real readers
take from it (nginx's ``ngx_http_validate_host`` and Express's ``req.hostname`` cut at the first
``:``, Express first at a ``,``; Python's ``urlsplit(...).hostname`` drops userinfo and path).
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import Config
from tests.servers import GatewayTestServer

__all__ = [
    "host_readings",
    "is_under",
    "lenient_view",
    "merged_view",
    "remove_dot_segments",
    "rfc_view",
    "start_gateway",
]

_SLASHES = re.compile(r"/{2,}")


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, step by step as the RFC writes it (input buffer → output buffer)."""
    source = path
    output: list[str] = []
    while source:
        if source.startswith("../"):
            source = source[3:]
        elif source.startswith("./"):
            source = source[2:]
        elif source.startswith("/./"):
            source = "/" + source[3:]
        elif source == "/.":
            source = "/"
        elif source.startswith("/../") or source == "/..":
            source = "/" + source[4:]
            if output:
                output.pop()
        elif source in (".", ".."):
            source = ""
        else:
            end = source.find("/", 1)
            if end < 0:
                end = len(source)
            output.append(source[:end])
            source = source[end:]
    return "".join(output)


def rfc_view(path: str) -> str:
    """The resource an RFC-following upstream resolves ``path`` (query removed) to."""
    return remove_dot_segments(unquote(path))


def lenient_view(path: str) -> str:
    """The resource a lenient upstream resolves ``path`` (query removed) to."""
    decoded = unquote(path).replace("\\", "/")
    segments = [segment.partition(";")[0] for segment in decoded.split("/")]
    merged = _SLASHES.sub("/", "/".join(segments))
    return remove_dot_segments(merged if merged.startswith("/") else "/" + merged)


def merged_view(path: str) -> str:
    """The resource an upstream that merges repeated slashes (nginx ``merge_slashes on``)
    resolves ``path`` (query removed) to."""
    return remove_dot_segments(_SLASHES.sub("/", unquote(path)))


def is_under(path: str, prefix: str) -> bool:
    """Segment-aware: ``/admin`` and ``/admin/x`` are under ``/admin``, ``/adminx`` is not."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def host_readings(value: str) -> set[str]:
    """Every host name a lenient reader takes ``value`` for, lower-cased, trailing dots gone."""
    first_colon = value.split(":", 1)[0]
    first_comma = value.split(",", 1)[0].strip().split(":", 1)[0]
    try:
        parsed = urlsplit("http://" + value).hostname or ""
    except ValueError:
        parsed = ""
    return {name.strip().rstrip(".").lower() for name in (first_colon, first_comma, parsed)}


async def start_gateway(cfg: Config, database_url: str) -> TestServer:
    """The real gateway app as a real server on 127.0.0.1 (close it when done)."""
    server = GatewayTestServer(create_app(cfg, database_url), host="127.0.0.1")
    await server.start_server()
    return server
