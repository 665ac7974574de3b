"""The admin JSON API and the admin pages over real HTTP: roles, sessions, CSRF, bad input.

Every test runs the real gateway (simulator upstream, SQLite ledger) and checks effects where
they land: the next proxied request through the official SDK, the ledger, the audit trail, a
restart. The browser-level checks (JavaScript, dialogs) are in ``test_admin_browser.py``.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import re
from decimal import Decimal
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import openai
import pytest

from admin.auth import FailureLimiter
from admin.sessions import SessionSigner
from gateway.config import hash_key
from gateway.money import format_usd, to_pico
from tests.harness import ADMIN_TOKEN, FINANCE_TOKEN, KEYS, Response, Stack

MSG = [{"role": "user", "content": "One line about budgets, please."}]
BUDGETS = {"timezone": "UTC", "warn_at": ["0.8"], "near_cap": "reject",
           "global": {"monthly_usd": "100"}, "tenants": {"acme": {"monthly_usd": "50"}},
           "agents": {"content": {"monthly_usd": "30"}}}
XSS = "<script>alert(1)</script>"


# -- helpers ---------------------------------------------------------------------------------
def api(stack: Stack, method: str, path: str, token: str | None = ADMIN_TOKEN,
        body: Any = None, raw: bytes | None = None) -> Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
    return stack.request(method, "/admin/api/" + path, json=body, data=raw, headers=headers)


def chat(stack: Stack, key: str = "acme-content", *, campaign: str | None = None,
         agent: str | None = None, task: str | None = None) -> Any:
    """One chat completion through the SDK with optional attribution headers."""
    headers = {name: value for name, value in (("X-Costwall-Campaign", campaign),
               ("X-Costwall-Agent", agent), ("X-Costwall-Task", task)) if value is not None}
    return stack.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=MSG, max_tokens=50, extra_headers=headers)


def invoice(stack: Stack, path: str, token: str | None = ADMIN_TOKEN) -> Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return stack.request("GET", "/admin/invoices/" + path, headers=headers)


def error_of(resp: Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "code"} <= set(body["error"]), body
    return body["error"]  # type: ignore[no-any-return]


def scope_row(stack: Stack, scope: str, scope_id: str) -> dict[str, Any] | None:
    rows = api(stack, "GET", "budget").json()["scopes"]
    return next((r for r in rows if (r["scope"], r["id"]) == (scope, scope_id)), None)


def admin_events(stack: Stack) -> list[dict[str, Any]]:
    stack.flush()
    return [e for e in stack.gw.audit.events("admin")]


class Browser:
    """A cookie-keeping HTTP client that does not follow redirects (like a careful browser)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.cookies: dict[str, str] = {}
        self.set_cookie_headers: list[str] = []

    def request(self, method: str, path: str, form: dict[str, str] | None = None) -> Response:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        headers = {}
        body = None
        if form is not None:
            body = urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        for header in resp.headers.get_all("Set-Cookie") or []:
            self.set_cookie_headers.append(header)
            for name, morsel in SimpleCookie(header).items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        conn.close()
        return Response(resp.status, resp.headers, data)

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post(self, path: str, form: dict[str, str]) -> Response:
        return self.request("POST", path, form)

    def login(self, token: str) -> Response:
        return self.post("/admin/login", {"token": token, "next": "/admin"})

    def csrf(self, path: str = "/admin/budget") -> str:
        page = self.get(path)
        assert page.status == 200, page.status
        match = re.search(r'name="csrf" value="([^"]+)"', page.body.decode())
        assert match, "no CSRF token in the page"
        return match.group(1)


@pytest.fixture
def admin_stack(tmp_path: Path) -> Any:
    s = Stack(tmp_path, budgets=BUDGETS)
    yield s
    s.close()


# -- unit: sessions and the failed-login limiter -----------------------------------------------
def test_sessions_expire_and_failures_are_limited_per_address() -> None:
    now = [1000.0]
    tokens = {"admin": ADMIN_TOKEN.encode(), "finance": FINANCE_TOKEN.encode()}
    signer = SessionSigner(b"k" * 32, tokens, ttl_s=60, clock=lambda: now[0])
    cookie, first = signer.issue("admin")
    assert signer.verify(cookie) == first and first.role == "admin"
    assert first.csrf != first.id and len(first.csrf) >= 40 and ADMIN_TOKEN not in cookie
    role, sid, expires, mac = cookie.split(".")[1:]
    assert (role, sid, int(expires)) == ("admin", first.id, 1060)
    # any change to role, id or expiry breaks the signature; so do another secret or token
    assert signer.verify(cookie.replace(".admin.", ".finance.")) is None
    assert signer.verify(f"v1.admin.{sid}.{int(expires) + 3600}.{mac}") is None
    assert signer.verify(cookie[:-2] + ("AA" if cookie[-2:] != "AA" else "BB")) is None
    assert SessionSigner(b"x" * 32, tokens, ttl_s=60, clock=lambda: now[0]).verify(cookie) is None
    rotated = {**tokens, "admin": b"a-new-admin-token-0123456789"}
    assert SessionSigner(b"k" * 32, rotated, ttl_s=60, clock=lambda: now[0]).verify(
        cookie) is None  # rotating a role's token ends its sessions
    assert signer.verify("v1.admin.x.1.y") is None and signer.verify("garbage") is None
    now[0] += 59
    assert signer.verify(cookie) == first
    now[0] += 2
    assert signer.verify(cookie) is None  # expired
    # one-time messages are bound to the session they were written for
    _, other = signer.issue("finance")
    flash = signer.sign_flash(other, [("ok", "saved <b>")])
    assert signer.read_flash(other, flash) == [("ok", "saved <b>")]
    assert signer.read_flash(first, flash) == [] and signer.read_flash(other, "x.y") == []

    limiter = FailureLimiter(limit=5, window_s=60, clock=lambda: now[0])
    for _ in range(4):
        limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") is None
    limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 61
    assert limiter.retry_after("10.0.0.2") is None  # per address
    now[0] += 61
    assert limiter.retry_after("10.0.0.1") is None  # the window slid past


# -- closed without a token ---------------------------------------------------------------------
def test_admin_is_closed_without_an_admin_token(tmp_path: Path) -> None:
    stack = Stack(tmp_path, env={"COSTWALL_ADMIN_TOKEN": ""})
    try:
        resp = api(stack, "GET", "budget", token=FINANCE_TOKEN)
        assert resp.status == 503
        err = error_of(resp)
        assert err["code"] == "admin_disabled" and "COSTWALL_ADMIN_TOKEN" in err["message"]
        page = Browser(stack.url).get("/admin")
        assert page.status == 503 and b"no admin token is configured" in page.body
        login = Browser(stack.url).login(FINANCE_TOKEN)
        assert login.status == 503 and b"closed" in login.body
        assert chat(stack).choices[0].message.content  # the proxy itself still works
    finally:
        stack.close()


# -- the JSON API ---------------------------------------------------------------------------------
def test_api_needs_a_valid_bearer_token(admin_stack: Stack) -> None:
    s = admin_stack
    missing = api(s, "GET", "budget", token=None)
    assert missing.status == 401 and error_of(missing)["code"] == "unauthorized"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = api(s, "GET", "budget", token="not-the-admin-token-at-all")
    assert wrong.status == 401 and error_of(wrong)["code"] == "invalid_admin_token"
    basic = s.request("GET", "/admin/api/budget", headers={"Authorization": "Basic eDp5"})
    assert basic.status == 401
    # a session cookie is not an API credential: the API only takes bearer tokens
    browser = Browser(s.url)
    assert browser.login(ADMIN_TOKEN).status == 303
    assert browser.get("/admin/api/budget").status == 401
    assert api(s, "GET", "budget", token=FINANCE_TOKEN).status == 200
    unknown = api(s, "GET", "nothing/here")
    assert unknown.status == 404 and error_of(unknown)["code"] == "not_found"
    wrong_method = api(s, "PATCH", "budget")
    assert wrong_method.status == 405 and error_of(wrong_method)["type"]
    assert unknown.headers["X-Content-Type-Options"] == "nosniff"


def test_get_budget_reports_exact_spend_per_scope(admin_stack: Stack) -> None:
    s = admin_stack
    for _ in range(3):
        chat(s, campaign="spring")
    chat(s, "globex-research")
    rows = s.rows()
    acme = sum(r.cost for r in rows if r.tenant == "acme")
    total = sum(r.cost for r in rows)
    assert acme > 0 and total > acme
    body = api(s, "GET", "budget", token=FINANCE_TOKEN).json()
    assert body["period"] == s.gw.budgets.current_period()
    assert body["override"] == {"enabled": False, "reason": "initial setting (override.allow)",
                                "actor": "config", "changed_at": None}
    by_key = {(r["scope"], r["id"]): r for r in body["scopes"]}
    assert set(by_key) == {("global", "global"), ("tenant", "acme"), ("agent", "content")}
    g = by_key[("global", "global")]
    assert g["limit_usd"] == g["limit"] == "100" and g["spent_usd"] == format_usd(total)
    assert g["spent"] == g["spent_usd"] and g["reserved"] == g["reserved_usd"]
    assert g["reserved_usd"] == "0" and g["source"] == "config" and g["level"] == "ok"
    assert Decimal(g["utilization"]) == (Decimal(total) / to_pico("100")).quantize(
        Decimal("0.000001"))
    assert by_key[("tenant", "acme")]["spent_usd"] == format_usd(acme)
    assert body["warn_at"] == ["0.8"]


def test_cap_changes_apply_to_the_next_request_and_survive_a_restart(admin_stack: Stack) -> None:
    s = admin_stack
    assert chat(s).usage.total_tokens > 0
    resp = api(s, "PUT", "budgets/tenant/acme", body={"monthly_usd": "0.000001",
                                                      "reason": "freeze acme"})
    assert resp.status == 200, resp.body
    assert resp.json()["limit_usd"] == "0.000001" and resp.json()["source"] == "admin"
    with pytest.raises(openai.APIStatusError) as blocked:
        chat(s)
    assert blocked.value.status_code == 402
    assert blocked.value.body["code"] == "budget_exceeded"  # type: ignore[index]
    assert blocked.value.response.json()["budget"]["scope"] == "tenant"
    assert chat(s, "globex-research").usage.total_tokens > 0  # other tenants unaffected
    event = admin_events(s)[-1]
    assert event["action"] == "cap.set" and event["target"] == "tenant:acme"
    assert event["actor"] == "admin (api, 127.0.0.1)" and event["reason"] == "freeze acme"
    assert event["detail"] == "monthly_usd 50 → 0.000001"
    assert s.call(lambda gw: gw.ledger.caps())[("tenant", "acme")] == {"monthly": 1_000_000}

    s.restart()
    with pytest.raises(openai.APIStatusError) as again:
        chat(s)
    assert again.value.status_code == 402
    # a JSON number is read exactly (12.5 is Decimal("12.5"), not a binary float)
    raised = api(s, "PUT", "budgets/tenant/acme", raw=b'{"monthly_usd": 12.5}')
    assert raised.status == 200 and raised.json()["limit_usd"] == "12.5"
    assert s.gw.budgets.limits.get(("tenant", "acme"), "monthly") == 12_500_000_000_000
    assert chat(s).usage.total_tokens > 0
    # a new scope id gets a cap too, counted from the spend it already has
    campaign = api(s, "PUT", "budgets/campaign/spring-2027", body={"monthly_usd": 3})
    assert campaign.status == 200 and campaign.json()["limit_usd"] == "3"
    assert scope_row(s, "campaign", "spring-2027") is not None


def test_removing_a_cap_lifts_it_until_set_again(admin_stack: Stack) -> None:
    s = admin_stack
    assert api(s, "PUT", "budgets/agent/content", body={"monthly_usd": "0"}).status == 200
    with pytest.raises(openai.APIStatusError) as blocked:
        chat(s)
    assert blocked.value.status_code == 402
    removed = api(s, "DELETE", "budgets/agent/content")
    assert removed.status == 200 and removed.json() == {"scope": "agent", "id": "content",
                                                        "removed": True}
    assert scope_row(s, "agent", "content") is None
    assert chat(s).usage.total_tokens > 0
    again = api(s, "DELETE", "budgets/agent/content")
    assert again.status == 404 and error_of(again)["code"] == "not_found"
    s.restart()  # the removal of a config cap is stored, not undone by the config file
    assert scope_row(s, "agent", "content") is None
    assert [e["action"] for e in admin_events(s)] == ["cap.set", "cap.remove"]


@pytest.mark.parametrize("body, raw", [
    ({"monthly_usd": "abc"}, None),
    ({"monthly_usd": "-5"}, None),
    ({"monthly_usd": -5}, None),
    ({"monthly_usd": "NaN"}, None),
    ({"monthly_usd": "Infinity"}, None),
    ({"monthly_usd": ""}, None),
    ({"monthly_usd": True}, None),
    ({"monthly_usd": [1]}, None),
    ({"monthly_usd": "0.0000000000001"}, None),  # below a pico-dollar
    ({"monthly_usd": "99999999999"}, None),  # past what the ledger can hold
    ({}, None),
    ({"monthly_usd": "5", "reason": 7}, None),
    (None, b"{not json"),
    (None, b'["monthly_usd", "5"]'),
    (None, b'{"monthly_usd": NaN}'),
    (None, b'{"monthly_usd": -1.5}'),
    (None, b"\xff\xfe"),
])
def test_bad_caps_are_400_and_change_nothing(admin_stack: Stack, body: Any,
                                             raw: bytes | None) -> None:
    resp = api(admin_stack, "PUT", "budgets/tenant/acme", body=body, raw=raw)
    assert resp.status == 400, resp.body
    assert error_of(resp)["type"] == "invalid_request_error"
    assert admin_stack.gw.budgets.limits.get(("tenant", "acme"), "monthly") == to_pico("50")
    assert admin_events(admin_stack) == []


def test_bad_scopes_and_roles_on_caps(admin_stack: Stack) -> None:
    s = admin_stack
    unknown = api(s, "PUT", "budgets/planet/earth", body={"monthly_usd": "5"})
    assert unknown.status == 400 and error_of(unknown)["code"] == "unknown_scope"
    wrong_global = api(s, "PUT", "budgets/global/other", body={"monthly_usd": "5"})
    assert wrong_global.status == 400
    assert api(s, "DELETE", "budgets/planet/earth").status == 400
    ok = api(s, "PUT", "budgets/global/global", body={"monthly_usd": "250.50"})
    assert ok.status == 200 and ok.json()["limit_usd"] == "250.5"
    for method, path, body in [("PUT", "budgets/tenant/acme", {"monthly_usd": "1"}),
                               ("DELETE", "budgets/tenant/acme", None),
                               ("POST", "override", {"enabled": True, "reason": "x"}),
                               ("POST", "keys", {"name": "k1", "tenant": "acme"}),
                               ("DELETE", "keys/acme-content", None)]:
        denied = api(s, method, path, token=FINANCE_TOKEN, body=body)
        assert denied.status == 403, (method, path)
        assert error_of(denied)["type"] == "permission_error"
    assert s.gw.budgets.limits.get(("tenant", "acme"), "monthly") == to_pico("50")
    assert not s.gw.overrides.state.enabled
    assert [e["action"] for e in admin_events(s)] == ["cap.set"]


def test_override_toggle_is_enforced_audited_and_persisted(admin_stack: Stack) -> None:
    s = admin_stack
    assert api(s, "PUT", "budgets/global/global", body={"monthly_usd": "0"}).status == 200
    with pytest.raises(openai.APIStatusError):
        chat(s)
    for bad in [{"enabled": True}, {"enabled": True, "reason": "   "}, {"enabled": "yes",
                "reason": "x"}, {"reason": "x"}, {"enabled": True, "reason": "x" * 501}]:
        resp = api(s, "POST", "override", body=bad)
        assert resp.status == 400, bad
    on = api(s, "POST", "override", body={"enabled": True, "reason": "incident 4711"})
    assert on.status == 200
    state = on.json()["override"]
    assert state["enabled"] is True and state["reason"] == "incident 4711"
    assert state["actor"] == "admin (api, 127.0.0.1)" and state["changed_at"].endswith("Z")
    assert chat(s, campaign=XSS).usage.total_tokens > 0
    s.flush()
    executed = list(s.gw.audit.events("override"))
    assert executed[-1]["reason"] == "global override: incident 4711"
    assert executed[-1]["campaign"] == XSS
    assert s.rows()[-1].override is True

    s.restart()
    after = api(s, "GET", "budget").json()["override"]
    assert after == state
    assert chat(s).usage.total_tokens > 0

    off = api(s, "POST", "override", body={"enabled": False})
    assert off.status == 200 and off.json()["override"]["enabled"] is False
    with pytest.raises(openai.APIStatusError) as blocked:
        chat(s)
    assert blocked.value.status_code == 402
    s.restart()
    assert api(s, "GET", "budget").json()["override"]["enabled"] is False
    actions = [(e["action"], e["reason"]) for e in admin_events(s)]
    assert actions == [("cap.set", ""), ("override.on", "incident 4711"), ("override.off", "")]
    md = (s.settings.logs_dir / "budget" / "admin-actions.md").read_text()
    assert "override.on" in md and "incident 4711" in md


def test_usage_by_every_grouping_with_exact_costs(admin_stack: Stack) -> None:
    s = admin_stack
    chat(s, campaign="spring")
    chat(s, campaign=XSS)
    chat(s, "globex-research")
    rows = s.rows()
    month = s.gw.budgets.current_period()
    for group_by, attr in [("tenant", "tenant"), ("agent", "agent"), ("campaign", "campaign"),
                           ("model", "model")]:
        resp = api(s, "GET", f"usage?month={month}&group_by={group_by}", token=FINANCE_TOKEN)
        assert resp.status == 200
        body = resp.json()
        expected: dict[str, int] = {}
        for r in rows:
            expected[getattr(r, attr) or ""] = expected.get(getattr(r, attr) or "", 0) + r.cost
        assert {g["group"]: g["cost_usd"] for g in body["rows"]} == {
            k: format_usd(v) for k, v in expected.items()}
        assert body["total_usd"] == format_usd(sum(r.cost for r in rows))
        assert body["requests"] == 3
    day = api(s, "GET", "usage?group_by=day").json()
    assert day["month"] == month and len(day["rows"]) == 1
    assert day["rows"][0]["group"] == rows[0].ts.strftime("%Y-%m-%d")
    one = api(s, "GET", "usage?group_by=campaign&tenant=globex").json()
    assert one["requests"] == 1 and one["tenant"] == "globex"
    empty = api(s, "GET", "usage?month=2001-01&group_by=model").json()
    assert empty["rows"] == [] and empty["total_usd"] == "0"
    for query in ["month=2026-13&group_by=model", "month=26-01&group_by=model",
                  "month=..%2Fx&group_by=model", "month=2026-1&group_by=tenant",
                  "group_by=planet", "group_by=", "group_by=day&tenant=..%2F..%2Fetc"]:
        bad = api(s, "GET", f"usage?{query}")
        assert bad.status == 400, query
        error_of(bad)


def test_logs_list_blocked_override_and_admin_events(admin_stack: Stack) -> None:
    s = admin_stack
    api(s, "PUT", "budgets/tenant/acme", body={"monthly_usd": "0"})
    with pytest.raises(openai.APIStatusError):
        chat(s, campaign=XSS)
    with pytest.raises(openai.APIStatusError):
        chat(s, campaign="autumn")
    blocked = api(s, "GET", "logs/blocked", token=FINANCE_TOKEN).json()
    assert blocked["total"] == 2 and blocked["kind"] == "blocked"
    assert [e["campaign"] for e in blocked["events"]] == ["autumn", XSS]  # newest first
    assert blocked["events"][0]["scope"] == "tenant:acme"
    assert "prev" not in blocked["events"][0]
    page = api(s, "GET", "logs/blocked?limit=1&offset=1").json()
    assert [e["campaign"] for e in page["events"]] == [XSS] and page["total"] == 2
    today = blocked["events"][0]["time"][:10]
    assert api(s, "GET", f"logs/blocked?date={today}").json()["total"] == 2
    assert api(s, "GET", "logs/blocked?date=2001-01-01").json()["total"] == 0
    assert api(s, "GET", "logs/admin?scope=tenant:acme").json()["total"] == 1
    assert api(s, "GET", "logs/override").json()["events"] == []
    assert api(s, "GET", "logs/secrets").status == 404
    for query in ["limit=0", "limit=5000", "offset=-1", "date=yesterday", "limit=abc"]:
        assert api(s, "GET", f"logs/blocked?{query}").status == 400, query


def test_keys_created_used_revoked_never_shown_twice(admin_stack: Stack) -> None:
    s = admin_stack
    created = api(s, "POST", "keys", body={"name": "support-bot", "tenant": "globex",
                                            "agent": "support", "can_override": False})
    assert created.status == 201, created.body
    secret = created.json()["key"]
    assert re.fullmatch(r"sk-cw-[A-Za-z0-9_-]{43}", secret)
    assert created.json()["prefix"] == secret[:10]
    stored = {r.name: r for r in s.call(lambda gw: gw.ledger.keys())}
    assert stored["support-bot"].key_sha256 == hash_key(secret)
    listing = api(s, "GET", "keys", token=FINANCE_TOKEN)
    assert secret not in listing.body.decode()
    by_name = {k["name"]: k for k in listing.json()["keys"]}
    assert by_name["support-bot"]["active"] is True and by_name["support-bot"]["source"] == "admin"
    assert by_name["acme-content"]["source"] == "config"

    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key=secret, max_retries=0)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                          max_tokens=20).usage.total_tokens > 0
    row = s.rows()[-1]
    assert (row.key_name, row.tenant, row.agent) == ("support-bot", "globex", "support")

    dup = api(s, "POST", "keys", body={"name": "support-bot", "tenant": "acme"})
    assert dup.status == 409
    assert api(s, "POST", "keys", body={"name": "acme-content", "tenant": "acme"}).status == 409
    for bad in [{"name": "", "tenant": "acme"}, {"name": "a b", "tenant": "acme"},
                {"name": "ok", "tenant": "<x>"}, {"name": "ok", "tenant": "acme",
                "can_override": "yes"}, {"name": ["x"], "tenant": "acme"}]:
        assert api(s, "POST", "keys", body=bad).status == 400, bad
    assert api(s, "DELETE", "keys/acme-content").status == 409  # config keys live in config

    revoked = api(s, "DELETE", "keys/support-bot")
    assert revoked.status == 200 and revoked.json() == {"name": "support-bot", "revoked": True}
    with pytest.raises(openai.AuthenticationError) as denied:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=20)
    assert denied.value.status_code == 401
    assert api(s, "DELETE", "keys/support-bot").status == 404
    assert api(s, "DELETE", "keys/never-was").status == 404
    s.restart()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{s.url}/v1", api_key=secret, max_retries=0
                      ).chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert [e["action"] for e in admin_events(s)] == ["key.create", "key.revoke"]
    for path in (s.settings.logs_dir / "budget").iterdir():  # the secret is in no log
        assert secret not in path.read_text(), path


# -- the pages: sessions, CSRF, roles, escaping -------------------------------------------------
def test_login_session_cookie_csrf_and_logout(admin_stack: Stack) -> None:
    s = admin_stack
    b = Browser(s.url)
    first = b.get("/admin/budget")
    assert first.status == 303
    assert first.headers["Location"] in ("/admin/login?next=/admin/budget",
                                         "/admin/login?next=%2Fadmin%2Fbudget")
    login_page = b.get("/admin/login")
    assert login_page.status == 200 and b'name="token"' in login_page.body
    csp = login_page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp
    assert login_page.headers["X-Frame-Options"] == "DENY"
    assert login_page.headers["Referrer-Policy"] == "no-referrer"
    assert login_page.headers["X-Content-Type-Options"] == "nosniff"
    assert b"<script>" not in login_page.body  # no inline script anywhere

    ok = b.post("/admin/login", {"token": ADMIN_TOKEN, "next": "/admin/budget"})
    assert ok.status == 303 and ok.headers["Location"] == "/admin/budget"
    cookie = b.set_cookie_headers[-1]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin" in cookie
    assert ADMIN_TOKEN not in cookie
    page = b.get("/admin/budget")
    assert page.status == 200 and b"Turn override on" in page.body
    assert page.headers["Cache-Control"] == "no-store"

    no_csrf = b.post("/admin/budget/override", {"enabled": "on", "reason": "x",
                                                 "confirm": "yes"})
    assert no_csrf.status == 403 and b"security token" in no_csrf.body
    wrong = b.post("/admin/budget/override", {"enabled": "on", "reason": "x",
                                               "confirm": "yes", "csrf": "forged"})
    assert wrong.status == 403
    assert not s.gw.overrides.state.enabled
    token = b.csrf()
    unconfirmed = b.post("/admin/budget/override", {"enabled": "on", "reason": "drill",
                                                     "csrf": token})
    assert unconfirmed.status == 400 and b"Tick the box" in unconfirmed.body
    on = b.post("/admin/budget/override", {"enabled": "on", "reason": "drill",
                                            "confirm": "yes", "csrf": token})
    assert on.status == 303 and s.gw.overrides.state.enabled
    assert s.gw.overrides.state.actor == "admin (ui, 127.0.0.1)"
    banner = b.get("/admin/logs")
    assert b'id="override-banner"' in banner.body and b"drill" in banner.body
    assert b.post("/admin/budget/override", {"enabled": "off", "csrf": token}).status == 303
    assert not s.gw.overrides.state.enabled
    assert b'id="override-banner"' not in b.get("/admin").body

    assert b.post("/admin/logout", {"csrf": token}).status == 303
    assert b.get("/admin").status == 303  # the session is gone server-side
    replay = Browser(s.url)
    replay.cookies = {"costwall_admin": "made-up-session-id"}
    assert replay.get("/admin").status == 303
    assert b.post("/admin/login", {"token": ADMIN_TOKEN, "next": "https://evil.example/"}
                  ).headers["Location"] == "/admin"  # no open redirect


def test_failed_logins_are_rate_limited_and_logged(admin_stack: Stack,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    b = Browser(admin_stack.url)
    for _ in range(5):
        bad = b.login("wrong-token-" + "x" * 20)
        assert bad.status == 401 and b"That token is not valid." in bad.body
    limited = b.login(ADMIN_TOKEN)  # even the right token waits now
    assert limited.status == 429 and int(limited.headers["Retry-After"]) > 0
    assert b"Too many failed logins" in limited.body
    assert "costwall_admin" not in b.cookies
    api_limited = api(admin_stack, "GET", "budget", token="guess-" + "y" * 20)
    assert api_limited.status == 429 and api_limited.headers["Retry-After"]
    failures = [r.getMessage() for r in caplog.records if "failed admin" in r.getMessage()]
    assert len(failures) == 5 and "127.0.0.1" in failures[0]
    assert all("wrong-token" not in m for m in failures)


def test_finance_session_reads_but_cannot_write(admin_stack: Stack) -> None:
    s = admin_stack
    b = Browser(s.url)
    assert b.login(FINANCE_TOKEN).status == 303
    for path in ("/admin", "/admin/budget", "/admin/logs", "/admin/keys", "/admin/invoices"):
        page = b.get(path)
        assert page.status == 200, path
        assert b"finance" in page.body
    budget = b.get("/admin/budget").body
    assert b"read-only" in budget and b"Turn override on" not in budget
    token = b.csrf("/admin/logs")  # the logout form carries one
    for path, form in [("/admin/budget/override", {"enabled": "on", "reason": "x",
                                                    "confirm": "yes"}),
                       ("/admin/budget/caps", {"scope": "tenant", "id": "acme",
                                               "monthly_usd": "1"}),
                       ("/admin/budget/caps/remove", {"scope": "tenant", "id": "acme"}),
                       ("/admin/keys", {"name": "x1", "tenant": "acme"}),
                       ("/admin/keys/revoke", {"name": "acme-content"})]:
        denied = b.post(path, {**form, "csrf": token})
        assert denied.status == 403, path
        assert b"read-only" in denied.body
    assert s.gw.budgets.limits.get(("tenant", "acme"), "monthly") == to_pico("50")
    assert admin_events(s) == []


def test_cap_form_validates_and_applies(admin_stack: Stack) -> None:
    s = admin_stack
    b = Browser(s.url)
    b.login(ADMIN_TOKEN)
    token = b.csrf()
    for value, message in [("abc", b"not a decimal number"), ("-3", b"negative"),
                           ("", b"required"), ("1e999999", b"")]:
        resp = b.post("/admin/budget/caps", {"scope": "tenant", "id": "acme",
                                             "monthly_usd": value, "csrf": token})
        assert resp.status == 400, value
        assert message in resp.body and b'id="cap-error"' in resp.body
    bad_scope = b.post("/admin/budget/caps", {"scope": "planet", "id": "x",
                                              "monthly_usd": "5", "csrf": token})
    assert bad_scope.status == 400 and b"Unknown scope" in bad_scope.body
    assert s.gw.budgets.limits.get(("tenant", "acme"), "monthly") == to_pico("50")
    saved = b.post("/admin/budget/caps", {"scope": "campaign", "id": XSS,
                                          "monthly_usd": "$1,250.75", "csrf": token})
    assert saved.status == 303
    assert s.gw.budgets.limits.get(("campaign", XSS), "monthly") == to_pico("1250.75")
    page = b.get("/admin/budget").body.decode()
    assert XSS not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    removed = b.post("/admin/budget/caps/remove", {"scope": "campaign", "id": XSS,
                                                   "csrf": token})
    assert removed.status == 303 and ("campaign", XSS) not in s.gw.budgets.limits
    missing = b.post("/admin/budget/caps/remove", {"scope": "campaign", "id": XSS,
                                                   "csrf": token})
    assert missing.status == 404


def test_request_text_is_escaped_on_every_page(admin_stack: Stack) -> None:
    s = admin_stack
    chat(s, campaign=XSS, agent="content", task='"><img src=x onerror=alert(2)>')
    with pytest.raises(openai.PermissionDeniedError):  # not one of the key's agent types
        chat(s, agent="<b>agent</b>")
    api(s, "PUT", "budgets/tenant/acme", body={"monthly_usd": "0", "reason": "<i>why</i>"})
    with pytest.raises(openai.APIStatusError):
        chat(s, campaign=XSS, task='"><img src=x onerror=alert(2)>')
    b = Browser(s.url)
    b.login(ADMIN_TOKEN)
    for path in ("/admin", "/admin/logs", "/admin/logs?kind=blocked&scope=%3Cscript%3E"):
        html = b.get(path).body.decode()
        assert "<script>alert(1)" not in html, path
        assert "<img src=x" not in html and "<i>why</i>" not in html, path
    dashboard = b.get("/admin").body.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dashboard
    logs = b.get("/admin/logs").body.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in logs
    assert "&lt;i&gt;why&lt;/i&gt;" in logs
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in logs


def test_logs_page_filters_by_kind_scope_and_date(admin_stack: Stack) -> None:
    s = admin_stack
    api(s, "PUT", "budgets/campaign/spring", body={"monthly_usd": "0"})
    with pytest.raises(openai.APIStatusError):
        chat(s, campaign="spring")
    b = Browser(s.url)
    b.login(FINANCE_TOKEN)
    every = b.get("/admin/logs").body.decode()
    assert "2 events" in every
    blocked = b.get("/admin/logs?kind=blocked").body.decode()
    assert "1 event<" in blocked and "cap.set" not in blocked
    admin_only = b.get("/admin/logs?kind=admin&scope=campaign:spring").body.decode()
    assert "1 event<" in admin_only and "cap.set" in admin_only
    assert "0 events" in b.get("/admin/logs?date=2001-01-01").body.decode()
    bad = b.get("/admin/logs?date=last-week")
    assert bad.status == 400 and b"YYYY-MM-DD" in bad.body


def test_keys_page_shows_a_new_secret_once(admin_stack: Stack) -> None:
    s = admin_stack
    b = Browser(s.url)
    b.login(ADMIN_TOKEN)
    token = b.csrf("/admin/keys")
    page = b.post("/admin/keys", {"name": "ui-key", "tenant": "acme", "agent": "writer",
                                  "can_override": "on", "csrf": token})
    assert page.status == 200
    secret = re.search(r'id="new-secret">(sk-cw-[^<]+)<', page.body.decode()).group(1)  # type: ignore[union-attr]
    assert s.gw.keys.authenticate(f"Bearer {secret}").can_override is True
    assert secret not in b.get("/admin/keys").body.decode()
    bad = b.post("/admin/keys", {"name": "bad name!", "tenant": "acme", "csrf": token})
    assert bad.status == 400 and b'id="key-error"' in bad.body
    assert b.post("/admin/keys/revoke", {"name": "ui-key", "csrf": token}).status == 303
    with pytest.raises(Exception, match="not a known"):
        s.gw.keys.authenticate(f"Bearer {secret}")
    assert b"revoked" in b.get("/admin/keys").body


def test_static_files_and_html_errors(admin_stack: Stack) -> None:
    s = admin_stack
    js = s.request("GET", "/admin/static/admin.js")
    assert js.status == 200 and "javascript" in js.headers["Content-Type"]
    assert "Cache-Control" not in js.headers or js.headers["Cache-Control"] != "no-store"
    css = s.request("GET", "/admin/static/admin.css")
    assert css.status == 200 and b"--accent" in css.body
    assert s.request("GET", "/admin/static/../auth.py").status == 404
    b = Browser(s.url)
    b.login(ADMIN_TOKEN)
    missing = b.get("/admin/nothing")
    assert missing.status == 404 and b"Not found" in missing.body
    assert missing.headers["Content-Type"].startswith("text/html")



def test_admin_sub_app_keeps_its_errors_and_headers_to_itself(admin_stack: Stack) -> None:
    """The admin is a sub-app at /admin: its error shapes and headers stop at the mount."""
    s = admin_stack
    for path in ("/admin", "/admin/", "/admin/nothing/deeper", "/admin/api/nothing"):
        resp = s.request("GET", path)
        assert resp.headers["X-Frame-Options"] == "DENY", path
        assert resp.headers["Cache-Control"] == "no-store", path
    assert Browser(s.url).get("/admin").status == 303  # the dashboard, behind the login
    html = s.request("GET", "/admin/nothing/deeper")  # the admin's own 404: HTML, not OpenAI's
    assert html.status == 404 and html.headers["Content-Type"].startswith("text/html")
    api_404 = s.request("GET", "/admin/api/nothing")
    assert api_404.status == 404 and error_of(api_404)["code"] == "not_found"
    assert "WWW-Authenticate" not in api_404.headers
    for path in ("/v1/nothing", "/adminx", "/healthz"):  # outside the mount: no admin headers
        resp = s.request("GET", path)
        assert "X-Frame-Options" not in resp.headers and "Cache-Control" not in resp.headers, path
    v1 = s.request("GET", "/v1/nothing")
    assert v1.status == 404 and error_of(v1)["type"] == "invalid_request_error"


# -- invoices ------------------------------------------------------------------------------------
def test_invoice_downloads_for_both_roles(admin_stack: Stack) -> None:
    pytest.importorskip("admin.invoices")
    pypdf = pytest.importorskip("pypdf")
    s = admin_stack
    chat(s, campaign="=HYPERLINK(1)")
    chat(s, "globex-research")
    rows = s.rows()
    month = s.gw.budgets.current_period()
    pdf = invoice(s, f"{month}.pdf", token=FINANCE_TOKEN)
    assert pdf.status == 200, pdf.body[:300]
    assert pdf.headers["Content-Type"] == "application/pdf"
    stem = f"costwall_invoice_{month.replace('-', '_')}"
    assert pdf.headers["Content-Disposition"] == f'attachment; filename="{stem}.pdf"'
    text = "".join(p.extract_text() for p in pypdf.PdfReader(io.BytesIO(pdf.body)).pages)
    assert month in text and "acme" in text and "globex" in text

    one = invoice(s, f"{month}.csv?tenant=acme")
    assert one.status == 200 and one.headers["Content-Type"].startswith("text/csv")
    assert one.headers["Content-Disposition"] == f'attachment; filename="{stem}_acme.csv"'
    table = list(csv.DictReader(io.StringIO(one.body.decode())))
    assert [r["request_id"] for r in table] == [r.id for r in rows if r.tenant == "acme"]
    assert sum(Decimal(r["cost_usd"]) for r in table) == Decimal(format_usd(
        sum(r.cost for r in rows if r.tenant == "acme")))
    assert table[0]["campaign"] == "'=HYPERLINK(1)"

    for path, status in [("2026-13.pdf", 404), ("2026-1.pdf", 404), ("..%2Fx.pdf", 404),
                         ("2026-05.exe", 404), (f"{month}.csv?tenant=..%2F..%2Fetc", 400),
                         (f"{month}.pdf?tenant=%3Cx%3E", 400)]:
        resp = invoice(s, path)
        assert resp.status == status, path
    assert invoice(s, f"{month}.pdf", token=None).status == 200  # urllib follows to login

    b = Browser(s.url)
    b.login(FINANCE_TOKEN)
    page = b.get("/admin/invoices").body.decode()
    assert f"/admin/invoices/{month}.pdf?tenant=acme" in page and "globex" in page
    token = b.csrf("/admin/invoices")
    saved = b.post("/admin/invoices/save", {"month": month, "tenant": "acme", "csrf": token})
    assert saved.status == 303
    out = s.settings.reports_dir / "invoices"
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}_acme.csv", f"{stem}_acme.pdf"]
    assert b.post("/admin/invoices/save", {"month": "../../x", "csrf": token}).status == 400
    via_cookie = b.get(f"/admin/invoices/{month}.csv")
    assert via_cookie.status == 200 and len(list(csv.reader(io.StringIO(
        via_cookie.body.decode())))) == len(rows) + 1


def test_json_error_shape_is_consistent_for_bad_bodies(admin_stack: Stack) -> None:
    s = admin_stack
    too_big = api(s, "POST", "override", raw=b'{"reason": "' + b"x" * 70_000 + b'"}')
    assert too_big.status == 413 and error_of(too_big)["code"] == "request_too_large"
    for raw in (b"", b"null", b"[]", b'"text"', b"{'single': 1}"):
        resp = api(s, "POST", "override", raw=raw)
        assert resp.status == 400, raw
        assert error_of(resp)["code"] == "invalid_json"
    assert json.loads(api(s, "POST", "keys", raw=b"{}").body)["error"]["param"] == "name"
    assert KEYS  # the harness keys are untouched
