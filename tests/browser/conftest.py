"""A real Chromium (Debian's, at /usr/bin/chromium) driven by Playwright's async API, in the
same event loop as the gateway's TestServer; the token page signed in with session JWTs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Error,
    Page,
    ViewportSize,
    async_playwright,
    expect,
)

from gateway.config import Config
from tests.conftest import GatewayFactory, RecordingUpstream, Seeder, gateway_config

CHROMIUM = Path("/usr/bin/chromium")
NO_CHROMIUM = (
    f"the browser tests drive Debian's Chromium and {CHROMIUM} is missing "
    "(apt-get install chromium)"
)
HAVE_CHROMIUM = CHROMIUM.exists()

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SECRET = "b" * 40
UI = "/_patgate/ui/"
SESSION_KEY = "patgate.session"  # the sessionStorage key of app.js
WIDE = ViewportSize(width=1280, height=800)

expect.set_options(timeout=10_000)


def session_jwt(user_id: str, *, mfa: bool = True, expires_in: float = 3600) -> str:
    claims: dict[str, Any] = {"sub": user_id, "exp": int(time.time() + expires_in)}
    if mfa:
        claims["amr"] = ["mfa"]
    return jwt.encode(claims, SECRET, algorithm="HS256")


def page_config(upstream_url: str, **tokens: Any) -> Config:
    """The SPEC's roles and the test routes, HS256 sessions, and ``tokens`` settings."""
    sessions = {"hs256_secret": SECRET}
    return gateway_config(upstream_url, tokens=tokens, management={"sessions": sessions})


@dataclass
class Site:
    """The real gateway on 127.0.0.1, and a way to open its token page in Chromium."""

    client: TestClient[Any, Any]
    base: str
    browser: Browser
    seed: Seeder
    problems: list[str] = field(default_factory=list)  # CSP violations, uncaught exceptions

    async def open(
        self,
        user: str,
        *,
        mfa: bool = True,
        viewport: ViewportSize | None = None,
        session: str | None = None,
    ) -> Page:
        """A fresh browser context signed in by the URL fragment, the list loaded."""
        page = await self.new_page(viewport=viewport)
        await page.goto(f"{self.base}{UI}#session={session or session_jwt(user, mfa=mfa)}")
        await loaded(page)
        return page

    async def new_page(self, *, viewport: ViewportSize | None = None) -> Page:
        context = await self.browser.new_context(
            locale="en-GB",
            timezone_id="UTC",
            viewport=viewport or WIDE,
        )
        await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=self.base)
        page = await context.new_page()
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        return page

    def _console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text or "Content-Security-Policy" in message.text:
            self.problems.append(message.text)

    async def proxy_status(self, token: str) -> int:
        """A protected route through the gateway (jobs:read) with ``token``."""
        response = await self.client.get(
            "/api/jobs/1", headers={"Authorization": f"Bearer {token}"}
        )
        await response.read()
        return response.status


async def loaded(page: Page) -> None:
    await expect(page.locator("#loading")).to_be_hidden()


SiteFactory = Callable[..., Awaitable[Site]]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        pytest.skip(NO_CHROMIUM)
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            with contextlib.suppress(Error):  # already gone: nothing left to close
                await chromium.close()


@pytest.fixture
async def site(
    make_gateway: GatewayFactory,
    upstream: RecordingUpstream,
    db: asyncpg.Connection,
    browser: Browser,
) -> AsyncIterator[SiteFactory]:
    """``await site(**tokens_settings)``: the gateway started; no CSP violation or uncaught
    exception may happen on any page the test opens."""
    started: list[Site] = []

    async def start(**tokens: Any) -> Site:
        cfg = page_config(upstream.url, **tokens)
        client = await make_gateway(cfg)
        base = str(client.make_url("")).rstrip("/")
        started.append(Site(client, base, browser, Seeder(cfg, db)))
        return started[-1]

    yield start
    for running in started:
        assert running.problems == [], running.problems
