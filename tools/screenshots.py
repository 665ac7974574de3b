"""Screenshots of the admin UI for the docs: ``python tools/screenshots.py [OUT_DIR]``.

Runs the test harness (simulated OpenAI upstream + a real gateway on a free port), sends a
month of traffic through the official SDK with a moving clock, then photographs the pages in
headless Chromium (Debian's ``/usr/bin/chromium`` driven by Playwright). Writes
``dashboard.png``, ``budget.png``, ``override.png`` and, at a phone's 390 px,
``dashboard-phone.png``, ``budget-phone.png``, ``logs-phone.png``, ``keys-phone.png`` and
``invoices-phone.png`` (default ``docs/screenshots``). Nothing is downloaded.
``--forecast`` writes only ``dashboard-forecast.png`` and ``dashboard-forecast-phone.png``;
``--alerts`` only ``alerts.png`` and ``alerts-phone.png`` (``/admin/alerts`` after real
deliveries: a webhook that is sent, a Slack target that answers 404 so the delivery fails, and
a mail server that is down so the email waits for its next attempt).
"""

from __future__ import annotations

import base64
import contextlib
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from tests.harness import ADMIN_TOKEN, LoopThread, Stack, free_port  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
BUDGETS = {  # tight enough that the pictures show every colour: ok, warning, at the cap
    "global": {"monthly_usd": "6"},
    "tenants": {"acme": {"monthly_usd": "2.5"}, "globex": {"monthly_usd": "3"}},
    "agents": {"content": {"monthly_usd": "1.6"}, "research": {"monthly_usd": "2"}},
    "campaigns": {"spring-sale": {"monthly_usd": "0.86"},
                  "onboarding-emails": {"monthly_usd": "1.5"}},
}
PHONE_PAGES = (("dashboard", "/admin"), ("budget", "/admin/budget"), ("logs", "/admin/logs"),
               ("keys", "/admin/keys"), ("invoices", "/admin/invoices"))
TRAFFIC = [  # (key, agent header, campaign, model, weight)
    ("acme-content", None, "spring-sale", "gpt-5", 3),
    ("acme-content", None, "onboarding-emails", "gpt-4.1", 3),
    ("acme-ops", None, None, "gpt-4o-mini", 2),
    ("globex-research", None, "market-scan", "o3", 3),
    ("globex-research", "summarizer", "market-scan", "gpt-4.1-mini", 2),
]


def generate(stack: Stack, now: list[datetime], days: int) -> None:
    rng = random.Random(7)
    month = now[0]
    for day in range(1, days + 1):
        for _ in range(rng.randint(3, 9)):
            key, agent, campaign, model, _w = rng.choices(TRAFFIC, [t[4] for t in TRAFFIC])[0]
            now[0] = month.replace(day=day, hour=rng.randint(6, 20), minute=rng.randint(0, 59))
            headers = {}
            if agent:
                headers["X-Costwall-Agent"] = agent
            if campaign:
                headers["X-Costwall-Campaign"] = campaign
            # a 402 once a cap is reached is part of the picture
            with contextlib.suppress(openai.APIStatusError):
                stack.client(key).chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Draft the update."}],
                    max_completion_tokens=rng.randint(800, 4000), extra_headers=headers)
    stack.flush()


def main(out: Path) -> None:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    real = datetime.now(UTC)
    now = [real.replace(day=1, hour=8, minute=0, second=0, microsecond=0)]
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp), clock=lambda: now[0], budgets=BUDGETS)
        try:
            generate(stack, now, days=28)  # late in the month: every colour is on show
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"{stack.url}/admin/login")
                page.fill("#token", ADMIN_TOKEN)
                page.click("button[type=submit]")
                page.wait_for_url(f"{stack.url}/admin")
                page.screenshot(path=str(out / "dashboard.png"), full_page=True)
                page.goto(f"{stack.url}/admin/budget")
                page.screenshot(path=str(out / "budget.png"), full_page=True)
                page.fill("#override-reason", "incident 4711: month-end reports must finish")
                page.check("#override-confirm")
                page.click("#override-form button[type=submit]")
                page.wait_for_selector("#override-banner")
                page.screenshot(path=str(out / "override.png"), full_page=False)
                phone = browser.new_page(viewport={"width": 390, "height": 844},
                                         device_scale_factor=2, is_mobile=True)
                phone.context.add_cookies(page.context.cookies())
                for name, path in PHONE_PAGES:
                    phone.goto(f"{stack.url}{path}")
                    phone.screenshot(path=str(out / f"{name}-phone.png"),
                                     full_page=name != "dashboard")
                browser.close()
        finally:
            stack.close()
    for name in ("dashboard", "budget", "override", *(f"{n}-phone" for n, _ in PHONE_PAGES)):
        print(out / f"{name}.png")


def forecast(out: Path) -> None:
    """``dashboard-forecast.png``: the dashboard mid-month (day 17 of a 30-day month), with
    the projection drawn on the daily chart and the Projected column; and its phone view."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    now = [datetime(2026, 11, 1, 8, tzinfo=UTC)]
    with tempfile.TemporaryDirectory() as tmp:
        budgets = {**BUDGETS, "global": {"monthly_usd": "9"},
                   "tenants": {"acme": {"monthly_usd": "4"}, "globex": {"monthly_usd": "6"}}}
        stack = Stack(Path(tmp), clock=lambda: now[0], budgets=budgets)
        try:
            generate(stack, now, days=16)
            now[0] = datetime(2026, 11, 17, 14, tzinfo=UTC)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"{stack.url}/admin/login")
                page.fill("#token", ADMIN_TOKEN)
                page.click("button[type=submit]")
                page.wait_for_url(f"{stack.url}/admin")
                page.screenshot(path=str(out / "dashboard-forecast.png"), full_page=True)
                phone = browser.new_page(viewport={"width": 390, "height": 844},
                                         device_scale_factor=2, is_mobile=True)
                phone.context.add_cookies(page.context.cookies())
                phone.goto(f"{stack.url}/admin")
                phone.screenshot(path=str(out / "dashboard-forecast-phone.png"),
                                 full_page=True)
                browser.close()
        finally:
            stack.close()
    print(out / "dashboard-forecast.png")
    print(out / "dashboard-forecast-phone.png")


def alerts(out: Path) -> None:
    """``alerts.png`` and ``alerts-phone.png``: ``/admin/alerts`` after a tenant passed its 50 %
    and 80 % thresholds and was refused, and a test alert was sent from the page's form. The
    three channels are real receivers: a webhook answering 204 (sent), a Slack-like URL
    answering 404 like a revoked Slack webhook (failed at once), and an SMTP port nobody
    listens on (pending, its next attempt shown)."""
    from aiohttp import web
    from playwright.sync_api import sync_playwright

    async def ok(_request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def gone(_request: web.Request) -> web.Response:
        return web.Response(status=404, text="no_service")

    out.mkdir(parents=True, exist_ok=True)
    secret = "whsec_" + base64.b64encode(b"screenshot-secret-0123456789abcd").decode()
    with tempfile.TemporaryDirectory() as tmp:
        receivers = LoopThread()

        async def start_receivers() -> tuple[web.AppRunner, int]:
            app = web.Application()
            app.router.add_post("/costwall", ok)
            app.router.add_post("/services/T000/B000/xxxx", gone)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        runner, port = receivers.run(start_receivers())
        channels = [
            {"name": "ops", "type": "webhook", "url": f"http://127.0.0.1:{port}/costwall",
             "secret_env": "SHOT_WEBHOOK_SECRET"},
            {"name": "finance-slack", "type": "slack", "url_env": "SHOT_SLACK_URL"},
            {"name": "finance-mail", "type": "email", "to": ["finance@example.com"]}]
        config = {
            "allow_private_targets": True, "retry_s": 600, "timeout_s": 2, "lease_s": 10,
            "smtp": {"host": "127.0.0.1", "port": free_port(), "from": "costwall@example.com"},
            "channels": channels,
            "rules": [{"events": ["budget.threshold"], "channels": [c["name"] for c in channels]},
                      {"events": ["budget.exhausted", "alert.test"], "channels": ["ops"]}]}
        env = {"SHOT_WEBHOOK_SECRET": secret,
               "SHOT_SLACK_URL": f"http://127.0.0.1:{port}/services/T000/B000/xxxx"}
        stack = Stack(Path(tmp) / "run", env=env, alerts=config,
                      budgets={"timezone": "UTC", "warn_at": ["0.5", "0.8"],
                               "tenants": {"acme": {"monthly_usd": "0.02"}}})
        try:
            for _ in range(200):  # until the cap refuses: two thresholds, then exhausted
                try:
                    stack.client().chat.completions.create(
                        model="gpt-4o-mini", max_tokens=2000,
                        messages=[{"role": "user", "content": "Draft the weekly update."}])
                except openai.APIStatusError:
                    break
            sender = stack.gw.alerts
            assert sender is not None

            def settled() -> bool:  # every delivery tried once: sent, failed or waiting
                rows = stack.lt.run(sender.deliveries())
                return bool(rows) and all(r.attempts > 0 and r.last_error != "" for r in rows) \
                    and {r.status for r in rows} == {"sent", "failed", "pending"}

            deadline = time.monotonic() + 20
            while not settled():
                assert time.monotonic() < deadline, "deliveries did not settle"
                time.sleep(0.2)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"{stack.url}/admin/login")
                page.fill("#token", ADMIN_TOKEN)
                page.click("button[type=submit]")
                page.wait_for_url(f"{stack.url}/admin")
                page.goto(f"{stack.url}/admin/alerts")
                page.click("form[action='/admin/alerts/test'] button[type=submit]")
                page.wait_for_url(f"{stack.url}/admin/alerts")
                time.sleep(1.0)  # the test alert is delivered
                page.goto(f"{stack.url}/admin/alerts")
                page.screenshot(path=str(out / "alerts.png"), full_page=True)
                phone = browser.new_page(viewport={"width": 390, "height": 844},
                                         device_scale_factor=2, is_mobile=True)
                phone.context.add_cookies(page.context.cookies())
                phone.goto(f"{stack.url}/admin/alerts")
                phone.screenshot(path=str(out / "alerts-phone.png"), full_page=True)
                browser.close()
        finally:
            stack.close()
            receivers.run(runner.cleanup())
            receivers.stop()
    print(out / "alerts.png")
    print(out / "alerts-phone.png")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    target = Path(args[0]) if args else ROOT / "docs" / "screenshots"
    if "--forecast" in sys.argv:
        forecast(target)
    elif "--alerts" in sys.argv:
        alerts(target)
    else:
        main(target)
