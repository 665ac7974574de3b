"""Admin browser sessions shared by replicas: log in on one gateway, act on the other.

Two real gateways on two ports share one database (a SQLite file, or PostgreSQL via
``tests/pg.py``). A login on A is valid on B for pages and for a CSRF-protected form; a
message flashed after B's redirect shows on A; logout on either ends the session on both,
even for a copy of the cookie kept by an attacker; a restart keeps sessions valid.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from admin.sessions import SECRET_SETTING
from gateway.money import to_pico
from tests import pg
from tests.harness import ADMIN_TOKEN, FINANCE_TOKEN, Stack
from tests.test_admin_api import Browser

BUDGETS = {"tenants": {"acme": {"monthly_usd": "50"}}}


def pair(tmp_path: Path, database: str) -> tuple[Stack, Stack]:
    a = Stack(tmp_path / "a", database=database, budgets=BUDGETS)
    try:
        b = Stack(tmp_path / "b", database=database, budgets=BUDGETS)
    except BaseException:
        a.close()
        raise
    return a, b


@pytest.fixture(params=["sqlite", "postgresql"])
def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Stack, Stack]]:
    if request.param == "sqlite":
        a, b = pair(tmp_path, f"sqlite:///{tmp_path / 'shared.db'}")
        try:
            yield a, b
        finally:
            a.close()
            b.close()
        return
    pg.require()
    with pg.temp_database() as url:
        a, b = pair(tmp_path, url)
        try:
            yield a, b
        finally:
            a.close()
            b.close()


def on(stack: Stack, browser: Browser) -> Browser:
    """The same browser (its cookies) pointed at another replica."""
    other = Browser(stack.url)
    other.cookies = browser.cookies
    other.set_cookie_headers = browser.set_cookie_headers
    return other


def csrf_of(html: bytes) -> str:
    match = re.search(rb'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1).decode()


def test_a_login_on_one_replica_works_on_the_other(replicas: tuple[Stack, Stack]) -> None:
    a, b = replicas
    on_a = Browser(a.url)
    assert on_a.login(ADMIN_TOKEN).status == 303
    cookie = on_a.cookies["costwall_admin"]
    assert ADMIN_TOKEN not in cookie and cookie.startswith("v1.admin.")
    on_b = on(b, on_a)
    page = on_b.get("/admin/budget")
    assert page.status == 200 and b"Turn override on" in page.body
    # the CSRF token is the same on both replicas: derived from the session, not stored
    token = csrf_of(page.body)
    assert csrf_of(on_a.get("/admin/budget").body) == token
    saved = on_b.post("/admin/budget/caps", {"scope": "tenant", "id": "acme",
                                             "monthly_usd": "12.5", "csrf": token})
    assert saved.status == 303, saved.body
    assert b.gw.budgets.limits[("tenant", "acme")] == to_pico("12.5")
    assert "costwall_flash" in on_b.cookies  # the message travels with the browser ...
    shown = on_a.get("/admin/budget")  # ... so replica A shows what B confirmed, once
    assert b"Cap for tenant &#39;acme&#39; set to $12.5" in shown.body
    assert "costwall_flash" not in on_a.cookies
    assert b"set to $12.5" not in on_a.get("/admin/budget").body
    forged = on_b.post("/admin/budget/caps", {"scope": "tenant", "id": "acme",
                                              "monthly_usd": "99", "csrf": token[:-2] + "xx"})
    assert forged.status == 403
    # one secret for the database, created by whichever replica asked first
    assert a.call(lambda gw: gw.ledger.get_setting(SECRET_SETTING)) is not None
    assert a.call(lambda gw: gw.ledger.get_setting(SECRET_SETTING)) == b.call(
        lambda gw: gw.ledger.get_setting(SECRET_SETTING))


def test_logout_on_one_replica_ends_the_session_on_both(replicas: tuple[Stack, Stack]) -> None:
    a, b = replicas
    browser = Browser(a.url)
    assert browser.login(FINANCE_TOKEN).status == 303
    stolen = browser.cookies["costwall_admin"]  # a copy someone kept
    on_b = on(b, browser)
    assert on_b.get("/admin/logs").status == 200
    token = csrf_of(on_b.get("/admin/logs").body)
    assert on_b.post("/admin/logout", {"csrf": token}).status == 303
    assert "costwall_admin" not in browser.cookies
    for stack in (a, b):
        replay = Browser(stack.url)
        replay.cookies = {"costwall_admin": stolen}
        assert replay.get("/admin/logs").status == 303, stack.url  # back to the login page
        assert replay.get("/admin/login").status == 200  # not taken for a live session
    # a new login works again, and survives a restart of the replica that issued it
    fresh = Browser(b.url)
    assert fresh.login(ADMIN_TOKEN).status == 303
    b.restart()
    assert on(b, fresh).get("/admin").status == 200
    assert on(a, fresh).get("/admin").status == 200
