"""What the admin pages say, as an operator reads them: consistent numbers, words and times.

Real gateway, real SDK traffic, pages fetched over HTTP. Covers the dashboard's Spent card
against the budget rows while a request is in flight, one timestamp format everywhere,
plurals, one "no campaign" wording (placeholders that fit are measured in
test_admin_browser.py), a blocked event's reason not repeating its details, a
rejected cap edit staying in its row, and the audit Markdown's arrows.
"""

from __future__ import annotations

import html
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.money import format_usd
from tests.harness import ADMIN_TOKEN, Stack
from tests.test_admin_api import Browser, chat

BUDGETS = {"timezone": "UTC", "warn_at": ["0.8"], "global": {"monthly_usd": "100"},
           "tenants": {"acme": {"monthly_usd": "50"}}}
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d")
SHOWN = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


@pytest.fixture
def pages(tmp_path: Path) -> Any:
    s = Stack(tmp_path, budgets=BUDGETS)
    yield s
    s.close()


def page(stack: Stack, path: str) -> str:
    resp = stack.request("GET", path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert resp.status == 200, (path, resp.status)
    return resp.body.decode()


def title_of(body: str, marker: str) -> str:
    """The exact amount (title attribute) of the first element after ``marker``."""
    match = re.search(re.escape(marker) + r'.*?title="\$([0-9.]+)"', body, re.S)
    assert match, marker
    return match.group(1)


def test_spent_card_matches_the_global_row_while_a_request_is_in_flight(pages: Stack) -> None:
    s = pages
    chat(s)
    s.flush()
    s.state.delay_s = 3.0
    slow = threading.Thread(target=chat, args=(s,))
    slow.start()
    try:
        deadline = time.monotonic() + 10
        while not any(v.reserved for v in s.gw.budgets.status()):
            assert time.monotonic() < deadline, "the slow request never reserved"
            time.sleep(0.02)
        s.flush()
        body = page(s, "/admin")
        status = {(v.scope, v.id): v for v in s.gw.budgets.status()}[("global", "global")]
        assert status.reserved > 0
        spent_card = title_of(body, 'id="stat-spent"')
        assert spent_card == format_usd(status.spent)  # settled only, like the row
        assert title_of(body, 'data-scope="global:global"') == format_usd(status.limit)
        row = body[body.index('data-scope="global:global"'):]
        assert f'data-label="Spent" title="${format_usd(status.spent)}"' in row
        assert f'data-label="Reserved" title="${format_usd(status.reserved)}"' in row
        assert "reserved for 1 request in flight" in body
    finally:
        slow.join(30)
        s.state.delay_s = 0.0
    s.flush()
    body = page(s, "/admin")
    assert "in flight" not in body  # settled: nothing reserved any more
    assert title_of(body, 'id="stat-spent"') == format_usd(sum(r.cost for r in s.rows()))


def test_one_timestamp_format_plurals_and_wording(pages: Stack) -> None:
    s = pages
    chat(s)  # one request of agent "content", no campaign
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert s.request("POST", "/admin/api/override", headers=admin,
                     json={"enabled": True, "reason": "drill"}).status == 200
    assert s.request("POST", "/admin/api/keys", headers=admin,
                     json={"name": "bot-1", "tenant": "acme"}).status == 201
    for path in ("/admin", "/admin/budget", "/admin/logs", "/admin/keys", "/admin/invoices"):
        body = page(s, path)
        assert not ISO.search(body), (path, ISO.search(body))  # never raw ISO 8601
        assert not re.search(r"\b1 requests\b|\b1 events\b", body), path
    assert SHOWN.search(page(s, "/admin/budget"))  # the override's time, shown the one way
    assert re.search(r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", page(s, "/admin/logs"))
    assert SHOWN.search(page(s, "/admin/keys"))
    dashboard = page(s, "/admin")
    assert "1 request<" in dashboard and "(no campaign)" in dashboard
    assert "(none)" not in dashboard  # the PDF says "(no campaign)" too
    assert "1 request ·" in page(s, "/admin/invoices")


def test_a_blocked_events_reason_does_not_repeat_its_details(pages: Stack) -> None:
    s = pages
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    s.request("PUT", "/admin/api/budgets/tenant/acme", headers=admin,
              json={"monthly_usd": "0", "reason": "freeze"})
    with pytest.raises(Exception, match="402"):
        chat(s)
    body = html.unescape(page(s, "/admin/logs?kind=blocked"))
    assert "limit $0" in body  # the details ...
    assert "refused with 402" in body and "Budget exceeded for" not in body  # ... said once
    admin_log = html.unescape(page(s, "/admin/logs?kind=admin"))
    assert "freeze" in admin_log  # an admin's own reason is shown
    markdown = (s.settings.logs_dir / "budget" / "admin-actions.md").read_text()
    assert "monthly_usd 50 → 0" in markdown and "-&gt;" not in markdown


def test_a_rejected_row_edit_stays_in_its_row(pages: Stack) -> None:
    s = pages
    b = Browser(s.url)
    assert b.login(ADMIN_TOKEN).status == 303
    token = b.csrf()
    bad = b.post("/admin/budget/caps", {"scope": "tenant", "id": "acme", "monthly_usd": "abc",
                                        "origin": "row", "csrf": token})
    assert bad.status == 400
    body = bad.body.decode()
    row = body[body.index('data-scope="tenant:acme"'):body.index('id="add-cap"')]
    assert 'value="abc"' in row and 'aria-invalid="true"' in row
    add_form = body[body.index('id="add-cap"'):]
    assert 'value="abc"' not in add_form and 'value="acme"' not in add_form
    # the "add a cap" form keeps what was typed into it
    bad_add = b.post("/admin/budget/caps", {"scope": "agent", "id": "writer",
                                            "monthly_usd": "-1", "csrf": token}).body.decode()
    add_form = bad_add[bad_add.index('id="add-cap"'):]
    assert 'value="writer"' in add_form and 'value="-1"' in add_form
