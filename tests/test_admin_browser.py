"""The admin UI in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

What only a browser shows: forms submit with their CSRF tokens, the confirm dialogs, the
banner, the CSP leaving our own script working, a hostile campaign id staying text (no dialog
ever fires), and the layout fitting a phone. Effects are checked where they land: the next
proxied request through the official SDK.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.money import to_pico
from tests.harness import ADMIN_TOKEN, FINANCE_TOKEN, Stack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
XSS = "<script>alert(1)</script>"
MSG = [{"role": "user", "content": "One line about budgets, please."}]
BUDGETS = {"timezone": "UTC", "warn_at": ["0.8"], "near_cap": "reject",
           "global": {"monthly_usd": "100"}, "tenants": {"acme": {"monthly_usd": "50"},
                                                         "globex": {"monthly_usd": "40"}}}

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)")


class UI:
    """One gateway and one browser for the module; every test gets a fresh browser context."""

    def __init__(self, stack: Stack, browser: Any):
        self.stack, self.browser = stack, browser
        self.dialogs: list[str] = []

    def page(self, token: str | None = ADMIN_TOKEN, **context: Any) -> Any:
        page = self.browser.new_context(**context).new_page()
        page.set_default_timeout(10_000)

        def on_dialog(dialog: Any) -> None:  # confirm() of our own forms: record and accept
            self.dialogs.append(dialog.message)
            dialog.accept()

        page.on("dialog", on_dialog)
        if token is not None:
            page.goto(f"{self.stack.url}/admin/login")
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_url(f"{self.stack.url}/admin")
        return page

    def chat(self, key: str = "acme-content", **headers: str) -> Any:
        return self.stack.client(key).chat.completions.create(
            model="gpt-4o-mini", messages=MSG, max_tokens=40, extra_headers=headers)


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    from playwright.sync_api import sync_playwright

    stack = Stack(tmp_path_factory.mktemp("admin-ui"), budgets=BUDGETS)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield UI(stack, browser)
            browser.close()
    finally:
        stack.close()


def test_bad_token_is_rejected(ui: UI) -> None:
    page = ui.page(token=None)
    page.goto(f"{ui.stack.url}/admin/budget")
    assert page.url.startswith(f"{ui.stack.url}/admin/login")
    page.fill("#token", "definitely-not-the-admin-token")
    page.click("button[type=submit]")
    assert page.locator(".form-error").inner_text() == "That token is not valid."
    assert "/admin/login" in page.url
    assert not [c for c in page.context.cookies() if c["name"] == "costwall_admin"]
    page.fill("#token", ADMIN_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(f"{ui.stack.url}/admin/budget")  # back where we wanted to go
    cookie = next(c for c in page.context.cookies() if c["name"] == "costwall_admin")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin"
    assert page.evaluate("document.cookie") == ""  # invisible to scripts
    page.context.close()


def test_dashboard_shows_utilization(ui: UI) -> None:
    ui.chat()
    ui.chat("globex-research")
    spent = sum(r.cost for r in ui.stack.rows() if r.tenant == "acme")
    page = ui.page()
    row = page.locator('tr[data-scope="tenant:acme"]')
    assert row.locator("td").nth(2).get_attribute("title") == f"${Decimal(spent) / 10**12}"
    for limit, percent, level in [(spent * 4, "25.0%", "ok"), (spent * 100 // 85, "85.0%", "warn"),
                                  (spent, "100.0%", "over")]:
        ui.stack.call(lambda gw, limit=limit: gw.budgets.set_limit(("tenant", "acme"), limit))
        page.reload()
        assert row.locator(".pct").inner_text() == percent
        fill = row.locator(".meter-fill")
        assert fill.get_attribute("class") == f"meter-fill meter-{level}"
        assert fill.get_attribute("width") == percent.rstrip("%")
    ui.stack.call(lambda gw: gw.budgets.set_limit(("tenant", "acme"), to_pico("50")))
    assert page.locator('tr[data-scope="global:global"] td').nth(1).inner_text() == "$100.00"
    assert page.locator("svg.chart rect.bar").count() >= 28  # one bar per day of the month
    assert page.locator("#top-model").inner_text().count("gpt-4o-mini") == 1
    page.context.close()


def test_override_on_and_off_with_banner(ui: UI) -> None:
    page = ui.page()
    page.goto(f"{ui.stack.url}/admin/budget")
    assert page.locator("#override-banner").count() == 0
    page.fill("#override-reason", "incident 4711")
    page.click("#override-form button[type=submit]")  # unticked: the browser refuses to submit
    assert not ui.stack.gw.overrides.state.enabled
    page.check("#override-confirm")
    page.click("#override-form button[type=submit]")
    banner = page.locator("#override-banner")
    banner.wait_for()
    assert "GLOBAL BUDGET OVERRIDE IS ON" in banner.inner_text()  # as shown (uppercase)
    assert "Reason: “incident 4711”" in banner.inner_text()
    assert page.locator("#override-state").inner_text() == "ON"
    assert ui.stack.gw.overrides.state.enabled
    for path in ("/admin", "/admin/logs", "/admin/keys", "/admin/invoices"):
        page.goto(ui.stack.url + path)
        assert page.locator("#override-banner").is_visible(), path
    page.goto(f"{ui.stack.url}/admin/budget")
    page.fill("#override-reason", "incident over")
    page.click("#override-form button[type=submit]")
    page.locator(".flash").wait_for()
    assert page.locator("#override-banner").count() == 0
    assert page.locator("#override-state").inner_text() == "OFF"
    assert not ui.stack.gw.overrides.state.enabled
    ui.stack.flush()
    actions = [e["action"] for e in ui.stack.gw.audit.events("admin")][-2:]
    assert actions == ["override.on", "override.off"]
    page.context.close()


def test_edit_a_cap_and_it_holds_on_the_next_request(ui: UI) -> None:
    page = ui.page()
    page.goto(f"{ui.stack.url}/admin/budget")
    row = page.locator('tr[data-scope="tenant:globex"]')
    row.locator('input[name="monthly_usd"]').fill("abc")
    row.locator("button", has_text="Save").click()
    assert "not a decimal number" in page.locator("#cap-error").inner_text()
    row = page.locator('tr[data-scope="tenant:globex"]')
    row.locator('input[name="monthly_usd"]').fill("0.000001")
    row.locator("button", has_text="Save").click()
    assert "set to $0.000001" in page.locator(".flash").inner_text()
    with pytest.raises(openai.APIStatusError) as blocked:
        ui.chat("globex-research")
    assert blocked.value.status_code == 402
    assert blocked.value.response.json()["budget"]["id"] == "globex"
    # add a cap for a new scope, then remove it again (a confirm dialog asks first)
    form = page.locator("#add-cap form")
    form.locator('select[name="scope"]').select_option("agent")
    form.locator('input[name="id"]').fill("research")
    form.locator('input[name="monthly_usd"]').fill("7.25")
    form.locator("button[type=submit]").click()
    assert page.locator('tr[data-scope="agent:research"] input[name="monthly_usd"]'
                        ).input_value() == "7.25"
    page.locator('tr[data-scope="agent:research"] button', has_text="Remove").click()
    page.locator(".flash").wait_for()
    assert page.locator('tr[data-scope="agent:research"]').count() == 0
    assert any("Remove the cap for agent 'research'" in d for d in ui.dialogs)
    row = page.locator('tr[data-scope="tenant:globex"]')
    row.locator('input[name="monthly_usd"]').fill("40")
    row.locator("button", has_text="Save").click()
    page.locator(".flash").wait_for()
    assert ui.chat("globex-research").usage.total_tokens > 0
    page.context.close()


def test_daily_and_hourly_caps_are_edited_and_shown_per_window(ui: UI) -> None:
    """A scope's row edits all its windows; each window gets its own bar, on the budget
    page and the dashboard; emptying a field removes that window. Effects are checked on the
    next request through the SDK."""
    page = ui.page()
    page.goto(f"{ui.stack.url}/admin/budget")
    form = page.locator("#add-cap form")
    form.locator('select[name="scope"]').select_option("agent")
    form.locator('input[name="id"]').fill("research")
    form.locator('input[name="daily_usd"]').fill("0.000001")
    form.locator('input[name="hourly_usd"]').fill("3")
    form.locator("button[type=submit]").click()
    assert "$0.000001 a day, $3 an hour" in page.locator(".flash").inner_text()
    row = page.locator('tr[data-scope="agent:research"]')
    assert row.locator(".window-use").count() == 2
    assert row.locator('.window-use[data-window="hourly"] .pct').inner_text() == "0.0%"
    assert row.locator('input[name="monthly_usd"]').input_value() == ""
    with pytest.raises(openai.APIStatusError) as blocked:
        ui.chat("globex-research")
    assert blocked.value.status_code == 402
    assert blocked.value.response.json()["budget"]["window"] == "daily"
    page.goto(f"{ui.stack.url}/admin")
    assert page.locator('tr[data-scope="agent:research"]').count() == 2
    assert page.locator('tr[data-scope="agent:research"][data-window="daily"] .window-tag'
                        ).inner_text() == "daily"
    page.goto(f"{ui.stack.url}/admin/budget")
    row = page.locator('tr[data-scope="agent:research"]')
    row.locator('input[name="daily_usd"]').fill("")
    row.locator("button", has_text="Save").click()
    page.locator(".flash").wait_for()
    assert page.locator('tr[data-scope="agent:research"] .window-use').count() == 1
    assert ui.stack.gw.budgets.limits.of(("agent", "research")) == {"hourly": to_pico(3)}
    assert ui.chat("globex-research").usage.total_tokens > 0
    page.locator('tr[data-scope="agent:research"] button', has_text="Remove").click()
    page.locator(".flash").wait_for()
    assert page.locator('tr[data-scope="agent:research"]').count() == 0
    page.context.close()


def test_create_use_and_revoke_a_key(ui: UI) -> None:
    page = ui.page()
    page.goto(f"{ui.stack.url}/admin/keys")
    form = page.locator("#create-key form")
    form.locator('input[name="name"]').fill("browser-bot")
    form.locator('input[name="tenant"]').fill("acme")
    form.locator('input[name="agent"]').fill("writer")
    form.locator("button[type=submit]").click()
    secret = page.locator("#new-secret").inner_text().strip()
    assert secret.startswith("sk-cw-") and len(secret) == 49
    client = openai.OpenAI(base_url=f"{ui.stack.url}/v1", api_key=secret, max_retries=0)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                          max_tokens=10).usage.total_tokens > 0
    page.goto(f"{ui.stack.url}/admin/keys")
    assert secret not in page.content()  # shown once only
    page.locator('tr[data-key="browser-bot"] button', has_text="Revoke").click()
    assert "revoked" in page.locator(".flash").inner_text()
    assert "revoked" in page.locator('tr[data-key="browser-bot"]').inner_text()
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=10)
    page.context.close()


def test_script_in_a_campaign_id_is_only_text(ui: UI) -> None:
    ui.chat(**{"X-Costwall-Campaign": XSS, "X-Costwall-Task": '"><img src=x onerror=alert(2)>'})
    ui.stack.call(lambda gw: gw.budgets.set_limit(("campaign", XSS), 0))
    with pytest.raises(openai.APIStatusError):
        ui.chat(**{"X-Costwall-Campaign": XSS})
    before = len(ui.dialogs)
    page = ui.page(token=FINANCE_TOKEN)
    assert page.locator("#top-campaign").get_by_text(XSS, exact=True).is_visible()
    page.goto(f"{ui.stack.url}/admin/logs?kind=blocked")
    assert page.locator("table.events .campaign").first.inner_text() == XSS
    page.goto(f"{ui.stack.url}/admin/logs?kind=blocked&scope={XSS}")
    assert page.locator("input[name=scope]").input_value() == XSS
    assert page.locator("table.events .campaign").count() == 1
    page.wait_for_timeout(200)
    assert len(ui.dialogs) == before  # no alert() ever ran
    assert page.evaluate("document.querySelectorAll('img[src=x]').length") == 0
    ui.stack.call(lambda gw: gw.budgets.set_limit(("campaign", XSS), None))
    page.context.close()


PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True,
         "device_scale_factor": 2}
PAGES = ("/admin", "/admin/budget", "/admin/logs", "/admin/keys", "/admin/invoices")
# Is the element inside the 390 px wide viewport (after scrolling the page to it), and is it
# what a tap at its centre would hit (not covered, not clipped by a container)?
REACHABLE = """(el) => {
  el.scrollIntoView({block: "center", inline: "nearest"});
  const r = el.getBoundingClientRect();
  if (r.width === 0 || r.height === 0) return "not shown";
  if (r.left < 0 || r.right > window.innerWidth) return `off-screen: ${r.left}..${r.right}`;
  const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
  return hit && (hit === el || el.contains(hit)) ? "ok" : `covered by ${hit && hit.outerHTML}`;
}"""
# Placeholders cut off by their input (measured in the input's own font).
CUT_PLACEHOLDERS = """() => {
  const ctx = document.createElement("canvas").getContext("2d");
  return [...document.querySelectorAll("input[placeholder]")].filter((i) => {
    if (!i.offsetParent) return false;
    const s = getComputedStyle(i);
    ctx.font = s.font;
    const room = i.clientWidth - parseFloat(s.paddingLeft) - parseFloat(s.paddingRight);
    return ctx.measureText(i.placeholder).width > room;
  }).map((i) => i.placeholder);
}"""
# The font size a chart label is drawn at, in CSS pixels (viewBox units times the scale).
LABEL_PX = """(text) => {
  const svg = text.ownerSVGElement;
  const scale = svg.getBoundingClientRect().width / svg.viewBox.baseVal.width;
  return parseFloat(getComputedStyle(text).fontSize) * scale;
}"""


def reachable(page: Any, selector: str, at_least: int = 1) -> None:
    elements = page.locator(selector)
    assert elements.count() >= at_least, (page.url, selector)
    for i in range(elements.count()):
        assert elements.nth(i).evaluate(REACHABLE) == "ok", (page.url, selector, i)


def test_every_page_is_usable_on_a_phone(ui: UI) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    created = ui.stack.request("POST", "/admin/api/keys", headers=admin,
                               json={"name": "phone-bot", "tenant": "acme"})
    assert created.status == 201
    ui.stack.call(lambda gw: gw.budgets.set_limit(("campaign", "phone-test"), 0))
    with pytest.raises(openai.APIStatusError):  # a blocked event for the logs page
        ui.chat(**{"X-Costwall-Campaign": "phone-test"})
    ui.stack.call(lambda gw: gw.budgets.set_limit(("campaign", "phone-test"), None))
    ui.stack.request("PUT", "/admin/api/budgets/agent/phone-agent", headers=admin,
                     json={"monthly_usd": "3", "reason": "a reason that is rather long " * 4})
    page = ui.page(**PHONE)
    for path in PAGES:
        page.goto(ui.stack.url + path)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, (path, width)  # nothing makes the whole page scroll sideways
        # nothing hides in a sideways-scrolling box either: rows reflow, the nav wraps
        hidden = page.evaluate("""[...document.querySelectorAll('nav, .table-wrap')]
            .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.className || e.tagName)""")
        assert hidden == [], (path, hidden)
        reachable(page, 'nav a:text-is("Keys")')
        reachable(page, "button[type=submit]")  # every form's button (log out too)
        reachable(page, "main input:not([type=hidden]), main select", at_least=0)
        assert page.evaluate(CUT_PLACEHOLDERS) == [], path
        page.screenshot(path=str(ui.stack.dir / f"phone{path.replace('/', '-')}.png"),
                        full_page=True)

    page.goto(f"{ui.stack.url}/admin")
    labels = page.locator("svg.chart text")
    sizes = [labels.nth(i).evaluate(LABEL_PX) for i in range(labels.count())
             if labels.nth(i).is_visible()]
    assert len(sizes) >= 10 and min(sizes) >= 10, sizes  # legible: 10 px or more
    for cell in ("Limit", "Spent", "Reserved", "Utilization"):
        reachable(page, f'table.scopes td[data-label="{cell}"]')

    page.goto(f"{ui.stack.url}/admin/logs")
    for cell in ("Time (UTC)", "Kind", "Who", "Details", "Reason"):
        reachable(page, f'table.events tr.kind-blocked td[data-label="{cell}"]')
    reachable(page, 'table.events tr.kind-admin td[data-label="Who"]')

    page.goto(f"{ui.stack.url}/admin/budget")
    reachable(page, "table.caps button:text-is('Save')")
    reachable(page, "table.caps button:text-is('Remove')")
    row = page.locator('tr[data-scope="agent:phone-agent"]')
    row.locator('input[name="monthly_usd"]').tap()
    row.locator('input[name="monthly_usd"]').fill("4.5")
    row.locator("button", has_text="Save").tap()
    assert "set to $4.5" in page.locator(".flash").inner_text()
    page.locator('tr[data-scope="agent:phone-agent"] button', has_text="Remove").tap()
    page.locator(".flash").wait_for()
    assert page.locator('tr[data-scope="agent:phone-agent"]').count() == 0

    page.goto(f"{ui.stack.url}/admin/keys")
    reachable(page, 'tr[data-key="phone-bot"] button:text-is("Revoke")')
    page.locator('tr[data-key="phone-bot"] button', has_text="Revoke").tap()
    page.locator('tr[data-key="phone-bot"] .status-revoked').wait_for()  # after the redirect
    assert "revoked" in page.locator('tr[data-key="phone-bot"]').inner_text()
    page.goto(f"{ui.stack.url}/admin/invoices")
    reachable(page, "table.invoices a:text-is('PDF')")
    page.context.close()


def test_a_wide_window_keeps_tables_and_the_wide_chart(ui: UI) -> None:
    page = ui.page(viewport={"width": 1280, "height": 900})
    assert page.locator("svg.chart-wide").is_visible()
    assert not page.locator("svg.chart-narrow").is_visible()
    assert page.locator("table.scopes thead").is_visible()  # a real table again
    box = page.locator("table.scopes").bounding_box()
    assert box is not None and box["width"] > 1000  # the table fills its card
    for path in PAGES:
        page.goto(ui.stack.url + path)
        assert page.evaluate(CUT_PLACEHOLDERS) == [], path
    page.context.close()


def test_finance_on_a_phone_sees_no_forms(ui: UI) -> None:
    page = ui.page(token=FINANCE_TOKEN, **PHONE)
    for path in PAGES:
        page.goto(ui.stack.url + path)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, (path, width)
    page.goto(f"{ui.stack.url}/admin/budget")
    assert page.locator("form#override-form").count() == 0
    assert page.locator('input[name="monthly_usd"]').count() == 0
    assert "read-only" in page.locator(".notice").inner_text()
    page.context.close()


def test_alerts_page_on_a_phone_and_its_send_test_button(ui: UI, tmp_path: Path) -> None:
    """``/admin/alerts`` with real deliveries (one sent, one failed, one waiting) at 390 px:
    no sideways scroll, whole event ids, the status tags and the send-test form usable."""
    from tests.test_alerts import SECRET, Receiver, wait_for

    hook = Receiver()
    alerts = {"allow_private_targets": True, "retry_s": 600, "timeout_s": 2, "lease_s": 5,
              "channels": [
                  {"name": "ops", "type": "webhook", "url": hook.url,
                   "secret_env": "TEST_WEBHOOK_SECRET"},
                  {"name": "gone", "type": "webhook", "url": hook.url + "-nowhere"},
                  {"name": "down", "type": "webhook", "url": "http://127.0.0.1:9/hook"}]}
    stack = Stack(tmp_path, env={"TEST_WEBHOOK_SECRET": SECRET}, alerts=alerts)
    sender = stack.gw.alerts
    assert sender is not None
    try:
        for name in ("ops", "gone", "down"):
            sender.emit("alert.test", f"evt_{name}_0123456789abcdef0123456789", {},
                        only=sender.channel(name))
        wait_for(lambda: {r.status for r in stack.lt.run(sender.deliveries())} == {
            "sent", "failed", "pending"} and all(
            r.last_error for r in stack.lt.run(sender.deliveries()) if r.status != "sent"))
        page = UI(stack, ui.browser).page(**PHONE)  # the module's browser, another gateway
        page.goto(f"{stack.url}/admin/alerts")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        for status in ("sent", "failed", "pending"):
            reachable(page, f"td[data-label='Status'] .tag-{status}")
        ids = page.locator("td[data-label='Event'] span:last-child")
        assert ids.count() == 3
        for i in range(3):  # the whole id is on screen, not cut off by its card
            box = ids.nth(i).evaluate("e => e.getBoundingClientRect().right")
            assert box <= 390, box
        reachable(page, "form[action='/admin/alerts/test'] select")
        page.locator("form[action='/admin/alerts/test'] button").tap()
        assert "queued for channel 'ops'" in page.locator(".flash").inner_text()
        wait_for(lambda: len(hook.received) == 2)
        page.context.close()
    finally:
        stack.close()
        hook.close()
