"""The self-service token page at ``/_patgate/ui/``: plain HTML, CSS and JavaScript shipped in
the package (``static/``), no build step, nothing loaded from other hosts.

Every answer carries a strict Content-Security-Policy (no inline script or style, no other
origin), ``X-Frame-Options: DENY`` and ``no-store``; the page talks to the management API
on the same origin.
"""

from __future__ import annotations

import mimetypes
from importlib import resources
from importlib.resources.abc import Traversable

from aiohttp import web

from gateway.errors import NotFound

PREFIX = "/_patgate/ui/"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}
TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".svg": "image/svg+xml",
}


class StaticPage:
    """Serves the files of ``static/`` (read once) by their exact names; nothing else."""

    def __init__(self) -> None:
        folder = resources.files("gateway.management") / "static"
        self.files = {
            entry.name: (entry.read_bytes(), _content_type(entry))
            for entry in folder.iterdir()
            if entry.is_file() and not entry.name.startswith(".")
        }

    def serve(self, path: str) -> web.Response:
        """``path`` is the canonical request path, under ``PREFIX``."""
        name = path.removeprefix(PREFIX) or "index.html"
        found = self.files.get(name)
        if found is None:
            raise NotFound("no such page")
        body, content_type = found
        return web.Response(body=body, content_type=content_type, headers=SECURITY_HEADERS)


def _content_type(entry: Traversable) -> str:
    suffix = "." + entry.name.rpartition(".")[2]
    return TYPES.get(suffix) or mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
