"""The self-service token page at /_patgate/ui/ in a real Chromium against the real gateway
and PostgreSQL: the seed flows (Fergus' "Generate PAT" and its menu, Factbird's "New token"
form, fDeploy's table and "Show all users"), its security, keyboard use and narrow screens.

Two screenshots are taken here: docs/token-list.png and docs/token-dialog.png."""

from __future__ import annotations

import os
import re
import uuid
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest
from playwright.async_api import Locator, Page, ViewportSize, expect

from gateway import store
from gateway.lifecycle import OPERATOR, Expiry
from tests.browser.conftest import (
    HAVE_CHROMIUM,
    NO_CHROMIUM,
    SESSION_KEY,
    UI,
    Site,
    SiteFactory,
    session_jwt,
)

pytestmark = pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM)

DOCS = Path(__file__).resolve().parents[2] / "docs"
WARNING = "This token will not be shown again"
NARROW = ViewportSize(width=375, height=812)
PLAINTEXT = re.compile(r"^pat_[0-9A-Za-z]{38}$")  # prefix, 32 body and 6 checksum chars


# ---------------------------------------------------------------------------------------------
# Helpers: the page as a user sees it


def row(page: Page, name: str) -> Locator:
    """The list's row (or card) of the token called ``name``."""
    return page.locator("#token-rows tr").filter(
        has=page.get_by_role("rowheader", name=name, exact=True)
    )


async def token_action(page: Page, name: str, action: str) -> None:
    """The token's "⋯" menu, then one of its items."""
    await page.get_by_role("button", name=f"Actions for {name}", exact=True).click()
    await page.get_by_role("button", name=action).click()


async def generate(
    page: Page,
    name: str,
    *,
    expiry: str = "90",
    role: str | None = None,
    owner: str | None = None,
    date: str | None = None,
) -> Locator:
    """Fill and send the Generate dialog; the dialog itself (it stays open on an error)."""
    await page.get_by_role("button", name="Generate token").click()
    dialog = page.get_by_role("dialog", name="Generate a token")
    await dialog.get_by_label("Name").fill(name)
    await dialog.get_by_label("Expiration").select_option(expiry)
    if date is not None:
        await dialog.get_by_label("Expires on").fill(date)
    if role is not None:
        await dialog.get_by_label("Role").select_option(role)
    if owner is not None:
        await dialog.get_by_label("Owner").select_option(owner)
    await dialog.get_by_role("button", name="Generate", exact=True).click()
    return dialog


async def shown_token(page: Page) -> str:
    """The plaintext in the one-time dialog, once it is open."""
    dialog = page.get_by_role("dialog", name="Copy your new token")
    await expect(dialog).to_be_visible()
    await expect(dialog).to_contain_text(WARNING)
    field = dialog.locator("#token-value")
    await expect(field).to_have_value(PLAINTEXT)
    return await field.input_value()


async def everything_the_page_holds(page: Page) -> str:
    """The DOM, every field's value, both storages and the URL: where a secret could hide."""
    held: str = await page.evaluate(
        """() => [
            document.documentElement.outerHTML,
            ...Array.from(document.querySelectorAll('input, textarea, select'), (f) => f.value),
            JSON.stringify(Object.entries(sessionStorage)),
            JSON.stringify(Object.entries(localStorage)),
            window.location.href,
        ].join('\\n')"""
    )
    return held


async def seeded(
    site: Site,
    user: str,
    name: str,
    *,
    expiry: Expiry = Expiry(in_days=90),
    role: str | None = None,
) -> tuple[str, str]:
    """(plaintext, token id) of a token made by the operator, as the CLI would."""
    created = await site.seed.service.create(
        OPERATOR, user_id=user, name=name, expiry=expiry, role=role
    )
    return created.plaintext, str(created.token.id)


async def team(site: Site, *roles: str) -> list[str]:
    company = await site.seed.company()
    return [await site.seed.user(company, role) for role in roles]


async def scroll_width(page: Page) -> int:
    width: int = await page.evaluate("document.documentElement.scrollWidth")
    return width


# ---------------------------------------------------------------------------------------------
# The seed flows


async def test_generate_copy_use_reload_rename_revoke(site: SiteFactory) -> None:
    gateway = await site()
    (user,) = await team(gateway, "full_user")
    session = session_jwt(user)
    page = await gateway.open(user, session=session)

    # Signed in by the fragment, which is gone from the URL; the session is per tab only.
    assert page.url == f"{gateway.base}{UI}"
    assert await page.evaluate(f"sessionStorage.getItem('{SESSION_KEY}')") == session
    assert await page.evaluate("localStorage.length") == 0
    await expect(page.locator("#whoami")).to_contain_text(user)
    await expect(page.get_by_text("No tokens yet")).to_be_visible()

    await generate(page, "Zapier", expiry="90")
    plaintext = await shown_token(page)
    await page.get_by_role("button", name="Copy", exact=True).click()
    await expect(page.get_by_role("button", name="Copied", exact=True)).to_be_visible()
    assert await page.evaluate("navigator.clipboard.readText()") == plaintext

    assert await gateway.proxy_status(plaintext) == 200  # the token works through the proxy

    await page.get_by_role("button", name="Done").click()
    await expect(page.get_by_role("dialog", name="Copy your new token")).to_be_hidden()
    assert plaintext not in await everything_the_page_holds(page)
    await page.reload()
    await expect(row(page, "Zapier")).to_contain_text(f"{plaintext[:8]}…")
    await expect(row(page, "Zapier").locator(".badge")).to_have_text(["Active"])
    assert plaintext not in await everything_the_page_holds(page)
    assert await page.evaluate("localStorage.length") == 0

    await token_action(page, "Zapier", "Rename")
    rename = page.get_by_role("dialog", name="Rename token")
    await expect(rename.get_by_label("Name")).to_have_value("Zapier")
    await rename.get_by_label("Name").fill("Zapier (sales)")
    await rename.get_by_role("button", name="Save").click()
    await expect(row(page, "Zapier (sales)")).to_contain_text(plaintext[:8])
    await expect(row(page, "Zapier")).to_have_count(0)

    await token_action(page, "Zapier (sales)", "Revoke")
    confirm = page.get_by_role("dialog", name="Revoke token?")
    await expect(confirm).to_contain_text("Zapier (sales)")
    await confirm.get_by_role("button", name="Revoke token").click()
    await expect(row(page, "Zapier (sales)").locator(".badge")).to_have_text(["Revoked"])
    await expect(page.get_by_role("button", name="Actions for Zapier (sales)")).to_have_count(0)

    assert await gateway.proxy_status(plaintext) == 401
    names = await gateway.seed.conn.fetch("SELECT name FROM tokens WHERE user_id = $1", user)
    assert [r["name"] for r in names] == ["Zapier (sales)"]


async def test_one_token_per_user_is_explained(site: SiteFactory) -> None:
    gateway = await site(max_active_per_user=1)
    (user,) = await team(gateway, "full_user")
    await seeded(gateway, user, "Existing integration")
    page = await gateway.open(user)

    dialog = await generate(page, "Second one")

    await expect(dialog.get_by_role("alert")).to_have_text(
        "A token is already created for this user; revoke it before creating another."
    )
    await expect(dialog).to_be_visible()
    await expect(page.get_by_role("dialog", name="Copy your new token")).to_be_hidden()
    await expect(page.locator("#token-rows tr")).to_have_count(1)


async def test_an_expired_token_is_refreshed_back_to_active(site: SiteFactory) -> None:
    gateway = await site()
    (user,) = await team(gateway, "full_user")
    plaintext, token_id = await seeded(gateway, user, "Nightly export")
    await gateway.seed.conn.execute(
        "UPDATE tokens SET expires_at = now() - interval '2 days' WHERE id = $1",
        uuid.UUID(token_id),
    )
    assert await gateway.proxy_status(plaintext) == 401
    page = await gateway.open(user)
    await expect(row(page, "Nightly export").locator(".badge")).to_have_text(["Expired"])

    await token_action(page, "Nightly export", "Refresh")

    await expect(row(page, "Nightly export").locator(".badge")).to_have_text(["Active"])
    await expect(page.get_by_role("status").first).to_contain_text("refreshed")
    expires_at = await gateway.seed.conn.fetchval(
        "SELECT expires_at FROM tokens WHERE id = $1", uuid.UUID(token_id)
    )
    assert expires_at > datetime.now(UTC) + timedelta(days=364)  # refresh_extends: 365d
    assert await gateway.proxy_status(plaintext) == 200


async def test_admin_generates_for_another_user_without_expiry_and_sees_all_tokens(
    site: SiteFactory,
) -> None:
    gateway = await site()
    admin, colleague = await team(gateway, "admin", "full_user")
    await seeded(gateway, colleague, "Colleague's CI")
    page = await gateway.open(admin)
    await expect(page.get_by_text("No tokens yet")).to_be_visible()  # only mine at first

    await page.get_by_label("Show all users").check()
    await expect(row(page, "Colleague's CI")).to_contain_text(colleague)
    await expect(page.get_by_role("columnheader", name="Owner")).to_be_visible()

    await generate(page, "Nightly export", expiry="never", owner=colleague)
    await shown_token(page)
    await page.get_by_role("button", name="Done").click()

    created = row(page, "Nightly export")
    await expect(created.locator(".expires-cell")).to_have_text("Never")
    await expect(created.locator(".owner-cell")).to_have_text(colleague)
    await expect(page.locator("#token-rows tr")).to_have_count(2)
    stored = await gateway.seed.conn.fetch(
        "SELECT user_id, expires_at FROM tokens WHERE created_by = $1", admin
    )
    assert [(r["user_id"], r["expires_at"]) for r in stored] == [(colleague, None)]
    # The roles an admin may grant: every role but "owner" ("*" is more than an admin has).
    roles = await page.locator("#g-role option").all_text_contents()
    assert roles == ["Same as owner", "admin", "full_user", "field_user"]


async def test_a_non_admin_sees_no_toggle_and_no_one_elses_tokens(site: SiteFactory) -> None:
    gateway = await site()
    user, colleague = await team(gateway, "full_user", "full_user")
    await seeded(gateway, user, "My script")
    await seeded(gateway, colleague, "Their script")
    page = await gateway.open(user)

    await expect(row(page, "My script")).to_be_visible()
    await expect(page.locator("#token-rows tr")).to_have_count(1)
    await expect(page.get_by_text("Their script")).to_have_count(0)
    await expect(page.get_by_label("Show all users")).to_be_hidden()
    await expect(page.get_by_role("columnheader", name="Owner")).to_be_hidden()

    await page.get_by_role("button", name="Generate token").click()
    dialog = page.get_by_role("dialog", name="Generate a token")
    await expect(dialog.get_by_label("Owner")).to_be_hidden()
    roles = await dialog.get_by_label("Role").locator("option").all_text_contents()
    assert roles == ["Same as owner", "full_user", "field_user"]


async def test_a_user_who_may_not_create_is_told_why(site: SiteFactory) -> None:
    gateway = await site()
    (user,) = await team(gateway, "field_user")
    await seeded(gateway, user, "Made by an admin")
    page = await gateway.open(user)

    await expect(row(page, "Made by an admin")).to_be_visible()
    await expect(page.get_by_role("button", name="Generate token")).to_be_hidden()
    await expect(page.get_by_text("Your role may not generate tokens")).to_be_visible()


async def test_rotate_shows_the_new_token_once_and_retires_the_old(site: SiteFactory) -> None:
    gateway = await site()
    (user,) = await team(gateway, "full_user")
    old, _ = await seeded(gateway, user, "Deploy bot")
    page = await gateway.open(user)

    await token_action(page, "Deploy bot", "Rotate")
    await (
        page.get_by_role("dialog", name="Rotate token?")
        .get_by_role("button", name="Rotate token")
        .click()
    )
    new = await shown_token(page)
    await page.keyboard.press("Escape")  # closing the dialog forgets the token

    await expect(page.get_by_role("dialog", name="Copy your new token")).to_be_hidden()
    assert new != old
    assert new not in await everything_the_page_holds(page)
    badges = page.locator("#token-rows tr .badge")
    await expect(badges).to_have_text(["Active", "Revoked"])
    await expect(page.locator("#token-rows tr").nth(1)).to_contain_text("rotated")
    assert await gateway.proxy_status(old) == 401
    assert await gateway.proxy_status(new) == 200


async def test_creating_without_a_second_factor_says_so(site: SiteFactory) -> None:
    gateway = await site()
    (user,) = await team(gateway, "full_user")
    page = await gateway.open(user, mfa=False)

    dialog = await generate(page, "No 2FA")

    await expect(dialog.get_by_role("alert")).to_have_text(
        "Sign in with two-factor authentication to create tokens."
    )


async def test_the_httponly_cookie_session_works_with_the_csrf_header(site: SiteFactory) -> None:
    gateway = await site()
    (user,) = await team(gateway, "full_user")
    page = await gateway.new_page()
    await page.context.add_cookies(
        [
            {
                "name": "patgate_session",
                "value": session_jwt(user),
                "url": gateway.base,
                "httpOnly": True,
                "sameSite": "Strict",
            }
        ]
    )
    await page.goto(f"{gateway.base}{UI}")
    await expect(page.locator("#whoami")).to_contain_text(user)
    assert await page.evaluate("document.cookie") == ""  # the page never sees the session

    day = (datetime.now(UTC) + timedelta(days=45)).date()

    # A change: same-origin Origin and X-Patgate-Csrf. (And Factbird's "Expiration date".)
    await generate(page, "Cookie made", expiry="date", date=day.isoformat())

    await shown_token(page)
    await page.get_by_role("button", name="Done").click()
    await expect(row(page, "Cookie made")).to_be_visible()
    expires_at = await gateway.seed.conn.fetchval(
        "SELECT expires_at FROM tokens WHERE user_id = $1", user
    )
    assert expires_at == datetime.combine(day, time(23, 59, 59), UTC)  # that day's end (UTC page)
    assert await page.evaluate(f"sessionStorage.getItem('{SESSION_KEY}')") is None
    refused = await page.evaluate(
        """async () => (await fetch('/_patgate/api/v1/tokens', {
            method: 'POST', headers: {'Content-Type': 'application/json'},
            body: JSON.stringify({name: 'forged'})})).status"""
    )
    assert refused == 403  # the same call without the header: what a forged form could send


async def test_without_a_valid_session_the_page_says_how_to_sign_in(site: SiteFactory) -> None:
    gateway = await site()
    (user,) = await team(gateway, "full_user")
    page = await gateway.new_page()

    await page.goto(f"{gateway.base}{UI}#session={session_jwt(user, expires_in=-3600)}")

    await expect(page.get_by_role("alert")).to_contain_text("You are not signed in")
    assert await page.evaluate(f"sessionStorage.getItem('{SESSION_KEY}')") is None  # dropped
    await expect(page.get_by_role("button", name="Generate token")).to_be_hidden()
    await expect(page.locator("#tokens")).to_be_hidden()


# ---------------------------------------------------------------------------------------------
# Security, keyboard, narrow screens


async def test_the_page_runs_under_a_strict_csp_with_no_inline_script(site: SiteFactory) -> None:
    gateway = await site()
    (user,) = await team(gateway, "full_user")
    page = await gateway.new_page()

    response = await page.goto(f"{gateway.base}{UI}#session={session_jwt(user)}")
    assert response is not None
    headers = response.headers
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self';" in csp
    assert "'unsafe-inline'" not in csp
    assert headers["x-frame-options"] == "DENY"
    await expect(page.locator("#whoami")).to_contain_text(user)  # app.js ran under the CSP
    inline: dict[str, int] = await page.evaluate(
        """() => ({
            scripts: Array.from(document.scripts).filter((s) => !s.src || s.text.trim()).length,
            styles: document.querySelectorAll('style, [style]').length,
            handlers: Array.from(document.querySelectorAll('*')).filter((e) =>
                Array.from(e.attributes).some((a) => a.name.startsWith('on'))).length,
        })"""
    )
    assert inline == {"scripts": 0, "styles": 0, "handlers": 0}
    await generate(page, "Under CSP")
    await shown_token(page)
    assert gateway.problems == []  # no CSP violation reported (checked again at teardown)

    # The policy is enforced, and a violation would have been seen: an injected inline
    # script does not run, and Chromium reports it.
    async with page.expect_console_message(lambda m: "Content Security Policy" in m.text):
        ran = await page.evaluate(
            """() => {
                const script = document.createElement('script');
                script.textContent = 'window.inlineRan = true';
                document.body.append(script);
                return window.inlineRan === true;
            }"""
        )
    assert ran is False
    assert any("inline script" in problem for problem in gateway.problems), gateway.problems
    gateway.problems.clear()  # the one violation this test caused on purpose


async def test_dialogs_and_the_menu_are_keyboard_usable(site: SiteFactory) -> None:
    gateway = await site()
    (user,) = await team(gateway, "full_user")
    await seeded(gateway, user, "Keyboard")
    page = await gateway.open(user)
    create = page.get_by_role("button", name="Generate token")

    await create.focus()
    await page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog", name="Generate a token")
    await expect(dialog.get_by_label("Name")).to_be_focused()
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()
    await expect(create).to_be_focused()

    menu = page.get_by_role("button", name="Actions for Keyboard")
    await menu.focus()
    await page.keyboard.press("Enter")
    await expect(menu).to_have_attribute("aria-expanded", "true")
    await expect(page.get_by_role("button", name="Rename")).to_be_focused()
    await page.keyboard.press("ArrowDown")
    await expect(page.get_by_role("button", name="Refresh")).to_be_focused()
    await page.keyboard.press("Escape")
    await expect(menu).to_have_attribute("aria-expanded", "false")
    await expect(menu).to_be_focused()

    await page.keyboard.press("Enter")
    await page.keyboard.press("Enter")  # Rename
    rename = page.get_by_role("dialog", name="Rename token")
    await expect(rename.get_by_label("Name")).to_be_focused()
    await page.keyboard.press("Escape")
    await expect(rename).to_be_hidden()
    await expect(menu).to_be_focused()


async def test_readable_at_375_px_without_horizontal_scrolling(site: SiteFactory) -> None:
    gateway = await site()
    admin, colleague = await team(gateway, "admin", "full_user")
    await seeded(gateway, admin, "A rather long token name for the quarterly reporting sync job")
    await seeded(gateway, admin, "Expiring", expiry=Expiry(in_days=3))
    _, revoked = await seeded(gateway, colleague, "Retired")
    await gateway.seed.service.revoke(OPERATOR, revoked)
    page = await gateway.open(admin, viewport=NARROW)
    await page.get_by_label("Show all users").check()
    await expect(page.locator("#token-rows tr")).to_have_count(3)

    assert await scroll_width(page) <= NARROW["width"]
    expiring = row(page, "Expiring").locator(".badge")
    await expect(expiring).to_have_text(["Active", "Expires soon"])
    card = await row(page, "Expiring").bounding_box()
    assert card is not None
    assert card["width"] <= NARROW["width"]
    assert card["height"] > 150  # a stacked card, one field a line, not a squeezed table row

    await page.get_by_role("button", name="Actions for Expiring").click()
    await expect(page.get_by_role("button", name="Revoke")).to_be_visible()
    assert await scroll_width(page) <= NARROW["width"]
    await page.keyboard.press("Escape")

    await generate(page, "Phone-sized")
    await shown_token(page)
    assert await scroll_width(page) <= NARROW["width"]


# ---------------------------------------------------------------------------------------------
# The README's screenshots, from a small, believable dataset


async def test_screenshots_of_the_list_and_the_one_time_dialog(
    site: SiteFactory, tmp_path: Path
) -> None:
    """Taken on every run; written to docs/ (the README's pictures) only when
    PATGATE_UPDATE_SCREENSHOTS=1, so an ordinary test run leaves the tree clean."""
    folder = DOCS if os.environ.get("PATGATE_UPDATE_SCREENSHOTS") == "1" else tmp_path
    gateway = await site()
    conn = gateway.seed.conn
    # Fixed ids are safe: this module's database is fresh and the other tests' ids are random.
    await store.insert_company(conn, "acme", "Acme Plumbing")
    ids = {name: f"u-{name}" for name in ("alice", "bob", "carol")}
    for name, role in (("alice", "admin"), ("bob", "full_user"), ("carol", "field_user")):
        await store.insert_user(conn, ids[name], "acme", role, f"{name}@acme.example")

    async def used(token_id: str, ago: str, ip: str) -> None:
        await conn.execute(
            "UPDATE tokens SET last_used_at = now() - $2::text::interval,"
            " last_used_ip = $3::text::inet WHERE id = $1",
            uuid.UUID(token_id),
            ago,
            ip,
        )

    _, zapier = await seeded(gateway, ids["alice"], "Zapier", role="field_user")
    await used(zapier, "2 hours", "203.0.113.7")
    _, power_bi = await seeded(gateway, ids["alice"], "Power BI report", expiry=Expiry(in_days=365))
    await used(power_bi, "1 day", "198.51.100.23")
    _, ci = await seeded(gateway, ids["bob"], "CI pipeline", expiry=Expiry(in_days=3))
    await used(ci, "12 minutes", "192.0.2.44")
    await seeded(gateway, ids["carol"], "Nightly export", expiry=Expiry(never=True))
    _, staging = await seeded(gateway, ids["alice"], "Staging sync")
    await conn.execute(
        "UPDATE tokens SET expires_at = now() - interval '3 days' WHERE id = $1",
        uuid.UUID(staging),
    )
    _, old = await seeded(gateway, ids["bob"], "Old laptop script")
    await gateway.seed.service.revoke(OPERATOR, old)

    page = await gateway.open(ids["alice"], viewport=ViewportSize(width=1200, height=640))
    await page.get_by_label("Show all users").check()
    await expect(page.locator("#token-rows tr")).to_have_count(6)
    await expect(page.locator("#tokens")).to_contain_text("Expires soon")
    await expect(row(page, "Nightly export").locator(".expires-cell")).to_have_text("Never")
    await expect(row(page, "CI pipeline")).to_contain_text("from 192.0.2.44")
    folder.mkdir(exist_ok=True)
    await page.screenshot(path=folder / "token-list.png", full_page=True)

    # Alice (admin) makes a full_user token for Carol, a field_user: Carol lacks most of it.
    await generate(page, "Make.com scenario", role="full_user", owner=ids["carol"])
    await shown_token(page)
    dropped = page.get_by_role("dialog", name="Copy your new token").locator("#dropped-list li")
    await expect(dropped).to_have_text(["invoices:read", "jobs:*", "tokens:create"])
    await expect(page.locator("#kept")).to_have_text("What it may do: jobs:read.")
    await expect(page.get_by_label(re.compile("for carol@acme.example"))).to_have_value(PLAINTEXT)
    await page.get_by_role("button", name="Copy", exact=True).click()
    await expect(page.get_by_role("button", name="Copied", exact=True)).to_be_visible()
    await page.screenshot(path=folder / "token-dialog.png")

    for name in ("token-list.png", "token-dialog.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
