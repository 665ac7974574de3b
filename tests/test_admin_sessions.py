"""Admin browser sessions shared by replicas: log in on one gateway, act on the other.

Two real gateways on two ports share one database (a SQLite file, or PostgreSQL via
``tests/pg.py``). A login on A is valid on B for pages and for a CSRF-protected form; a
message flashed after B's redirect shows on A; logout on either ends the session on both,
even for a copy of the cookie kept by an attacker; a restart keeps sessions valid. The
cookies' Secure flag follows HTTPS, also behind a trusted reverse proxy.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from admin.sessions import SECRET_SETTING
from gateway.config import ConfigError, load_settings
from gateway.money import to_pico
from tests import pg
from tests.harness import ADMIN_TOKEN, FINANCE_TOKEN, Stack, test_env, write_config
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
    assert b.gw.budgets.limits.get(("tenant", "acme"), "monthly") == to_pico("12.5")
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


def login_cookies(stack: Stack, headers: dict[str, str]) -> list[str]:
    """The Set-Cookie headers of a login (and of a change that flashes a message)."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    conn.request("POST", "/admin/login", body=urlencode({"token": ADMIN_TOKEN, "next": "/admin"}),
                 headers={"Content-Type": "application/x-www-form-urlencoded", **headers})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 303
    cookies = resp.headers.get_all("Set-Cookie") or []
    session = next(c for c in cookies if c.startswith("costwall_admin="))
    value = session.split(";")[0]
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    conn.request("GET", "/admin/budget", headers={"Cookie": value})
    token = csrf_of(conn.getresponse().read())
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    conn.request("POST", "/admin/budget/caps", headers={
        "Cookie": value, "Content-Type": "application/x-www-form-urlencoded", **headers},
        body=urlencode({"scope": "tenant", "id": "acme", "monthly_usd": "9", "csrf": token}))
    changed = conn.getresponse()
    changed.read()
    conn.close()
    assert changed.status == 303
    flash = next(c for c in changed.headers.get_all("Set-Cookie") or []
                 if c.startswith("costwall_flash="))
    return [session, flash]


def test_secure_flag_follows_https_from_trusted_proxies_or_the_config(tmp_path: Path) -> None:
    https = {"X-Forwarded-Proto": "https"}
    stacks = []
    try:
        for name, admin in [("behind", {"trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]}),
                            ("plain", {}), ("forced", {"secure_cookies": True})]:
            stacks.append(Stack(tmp_path / name, budgets=BUDGETS, admin=admin))
        behind, plain, forced = stacks
        assert all("Secure" in c for c in login_cookies(behind, https))
        assert not any("Secure" in c for c in login_cookies(behind, {}))
        # anyone else saying "https" is not believed: the flag would be a lie on plain HTTP
        assert not any("Secure" in c for c in login_cookies(plain, https))
        assert all("Secure" in c for c in login_cookies(forced, {}))
    finally:
        for stack in stacks:
            stack.close()
    bad = write_config(tmp_path, "http://127.0.0.1:9/v1",
                       admin={"trusted_proxies": ["10.0.0.0/33", "proxy.local"],
                              "secure_cookies": "sometimes"})
    with pytest.raises(ConfigError) as problems:
        load_settings(bad, test_env())
    text = "\n".join(problems.value.problems)
    assert "'10.0.0.0/33' is not an IP address or network" in text
    assert "'proxy.local' is not an IP address" in text and "admin.secure_cookies" in text
