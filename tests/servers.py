"""The gateway application as a test server, served as ``patgate serve`` serves it."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

from gateway.front import GatewayRunner


class GatewayTestServer(TestServer):
    """aiohttp's ``TestServer`` with the gateway's runner: requests meet the front end
    (``gateway.front``) first, and what it hands over goes to aiohttp, as in production."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return GatewayRunner(self.app, **kwargs)
