"""Alerts end to end (SPEC "Alerts"): real gateways, real receivers on real ports.

The webhook receiver verifies every request the Standard Webhooks way, written here from the
specification (HMAC-SHA256 over "<id>.<timestamp>.<body>" keyed with the base64-decoded part
of the whsec_ secret), so a signing bug in the gateway fails these tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from gateway.alerts import Alerts
from gateway.config import ConfigError, load_settings
from tests import pg
from tests.harness import ADMIN_TOKEN, LoopThread, Stack, write_config
from tests.silent import SilentServer
from tests.test_budgets import MSG, cap_for

SECRET_KEY = b"0123456789abcdef0123456789abcdef"
SECRET = "whsec_" + base64.b64encode(SECRET_KEY).decode()


def verify(headers: Any, body: bytes, secret: str = SECRET) -> bool:
    """Standard Webhooks verification, independent of the gateway's code."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id, ts = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(ts)) > 300:
        return False
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body,
                                         hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(sig.split(",", 1)[1], expected)
               for sig in headers["webhook-signature"].split() if sig.startswith("v1,"))


class Receiver:
    """An aiohttp webhook receiver: records verified deliveries; can fail or hang.

    ``arrivals`` lists every request as it comes in (its ``webhook-id``, whether its signature
    verified, the sender's port, when), ``received`` the deliveries it acknowledged with 2xx.
    With ``hold_first`` the first request waits for ``release()`` before it is answered; one
    whose sender died meanwhile (connection gone) is not counted as received.
    """

    def __init__(self) -> None:
        self.lt = LoopThread()
        self.fail_first = 0
        self.hang = False
        self.hold_first = False
        self.calls = 0
        self.received: list[dict[str, Any]] = []
        self.arrivals: list[dict[str, Any]] = []
        self.unverified = 0
        self._released = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)

        async def start() -> int:
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

        self.port = self.lt.run(start())
        self.url = f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.arrivals.append({
            "id": request.headers.get("webhook-id"), "port": peer[1] if peer else None,
            "verified": "webhook-signature" in request.headers and verify(request.headers,
                                                                           body),
            "at": time.monotonic(), "type": orjson.loads(body).get("type")})
        if self.hold_first and self.calls == 1:
            await self._released.wait()
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=204)  # nobody is there to read it
        if self.hang:
            await asyncio.sleep(5)
        if self.calls <= self.fail_first:
            return web.Response(status=503, text="down")
        if "webhook-signature" in request.headers and not verify(request.headers, body):
            self.unverified += 1
            return web.Response(status=401)
        self.received.append({"headers": dict(request.headers), **orjson.loads(body)})
        return web.Response(status=204)

    def release(self) -> None:
        """Let a held request be answered."""
        self.lt.loop.call_soon_threadsafe(self._released.set)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.received if r.get("type") == kind]

    def close(self) -> None:
        self.lt.run(self.runner.cleanup())
        self.lt.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def alerts_config(url: str, **extra: Any) -> dict[str, Any]:
    return {"allow_private_targets": True,
            "channels": [{"name": "ops", "type": "webhook", "url": url,
                          "secret_env": "TEST_WEBHOOK_SECRET"}], **extra}


def alert_stack(path: Path, url: str, **config: Any) -> Stack:
    stack = Stack(path, env={"TEST_WEBHOOK_SECRET": SECRET},
                  alerts=alerts_config(url), **config)
    fast(stack.gw.alerts)
    return stack


def fast(alerts: Alerts | None) -> None:
    assert alerts is not None
    alerts.backoff_s, alerts.poll_s, alerts.timeout_s = 0.05, 0.05, 1.0


def wait_for(check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def rows(stack: Stack) -> list[Any]:
    """The outbox rows, newest first (queued events stored first)."""
    assert stack.gw.alerts is not None
    return stack.lt.run(stack.gw.alerts.deliveries(10))  # type: ignore[no-any-return]


def spend_until_refused(stack: Stack) -> None:
    for _ in range(20):
        try:
            stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                                   max_tokens=50)
        except openai.APIStatusError as exc:
            assert exc.status_code == 402
            break


def budget_config(cap: str) -> dict[str, Any]:
    return {"budgets": {"timezone": "UTC", "warn_at": ["0.8"], "near_cap": "reject",
                        "tenants": {"acme": {"monthly_usd": cap}}}}


def test_crossing_sends_one_signed_webhook_and_exhaustion_once(tmp_path: Path,
                                                               receiver: Receiver) -> None:
    probe = Stack(tmp_path / "probe")
    cap = cap_for(probe, 10, max_tokens=50)
    probe.close()
    stack = alert_stack(tmp_path / "run", receiver.url, **budget_config(cap))
    try:
        spend_until_refused(stack)
        spend_until_refused(stack)  # a second refusal in the same period: no second event
        wait_for(lambda: receiver.of_type("budget.threshold")
                 and receiver.of_type("budget.exhausted"))
        time.sleep(0.3)
        [threshold] = receiver.of_type("budget.threshold")
        [exhausted] = receiver.of_type("budget.exhausted")
        assert receiver.unverified == 0
        assert threshold["headers"]["webhook-id"] == threshold["id"]
        data = threshold["data"]
        assert (data["scope"], data["id"], data["window"]) == ("tenant", "acme", "monthly")
        assert Decimal(data["limit_usd"]) == Decimal(cap)
        assert data["threshold"] == "0.8" and data["period"] == stack.gw.budgets.current_period()
        assert exhausted["data"]["scope"] == "tenant"
        metric = stack.request("GET", "/metrics").body.decode()
        assert 'costwall_alerts_total{channel="ops",outcome="sent",type="budget.threshold"}' \
            in metric
        # the admin API lists the deliveries without the URL or the secret
        r = stack.request("GET", "/admin/api/alerts",
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status == 200
        text = r.body.decode()
        assert receiver.url not in text and SECRET not in text
        listing = orjson.loads(r.body)
        assert listing["channels"][0]["target"] == "127.0.0.1"
        assert {d["status"] for d in listing["deliveries"]} == {"sent"}
    finally:
        stack.close()


def test_a_crossing_never_stored_is_sent_at_the_next_start_and_only_once(
        tmp_path: Path, receiver: Receiver) -> None:
    """An event lives in memory between being recorded and being stored; a crash there
    loses it. At start the sender records every threshold this month has passed again, with
    the same ids, so a lost one is sent and a stored one is not sent twice. Here the crossing
    happens while no channel exists (nothing stored), as after such a crash."""
    probe = Stack(tmp_path / "probe")
    cap = cap_for(probe, 10, max_tokens=50)
    probe.close()
    first = Stack(tmp_path / "run", **budget_config(cap))
    try:
        spend_until_refused(first)
        first.flush()
    finally:
        first.close()
    stack = alert_stack(tmp_path / "run", receiver.url, **budget_config(cap))
    try:
        wait_for(lambda: receiver.of_type("budget.threshold"))
        [event] = receiver.of_type("budget.threshold")
        assert (event["data"]["scope"], event["data"]["threshold"]) == ("tenant", "0.8")
        assert Decimal(event["data"]["spent_usd"]) >= Decimal(cap) * Decimal("0.8")
        stack.restart()
        fast(stack.gw.alerts)
        time.sleep(1.5)
        assert [e["id"] for e in receiver.of_type("budget.threshold")] == [event["id"]]
    finally:
        stack.close()


def test_receiver_failing_three_times_gets_the_event_once(tmp_path: Path,
                                                          receiver: Receiver) -> None:
    receiver.fail_first = 3
    stack = alert_stack(tmp_path, receiver.url)
    try:
        r = stack.request("POST", "/admin/api/alerts/test", json={"channel": "ops"},
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status == 202, r.body
        wait_for(lambda: receiver.received)
        time.sleep(0.5)
        assert receiver.calls == 4 and len(receiver.received) == 1
        assert receiver.received[0]["type"] == "alert.test"
        [row] = rows(stack)
        assert (row.status, row.attempts, row.last_error) == ("sent", 4, None)
        metric = stack.request("GET", "/metrics").body.decode()
        assert 'costwall_alerts_total{channel="ops",outcome="retry",type="alert.test"} 3.0' \
            in metric
    finally:
        stack.close()


def test_unknown_test_channel_is_a_404(tmp_path: Path, receiver: Receiver) -> None:
    stack = alert_stack(tmp_path, receiver.url)
    try:
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        r = stack.request("POST", "/admin/api/alerts/test", json={"channel": "nope"},
                          headers=auth)
        assert r.status == 404
        r = stack.request("POST", "/admin/api/alerts/test", json={"channel": 5}, headers=auth)
        assert r.status == 400
    finally:
        stack.close()


def test_refused_receiver_fails_visibly_without_retry(tmp_path: Path,
                                                      receiver: Receiver) -> None:
    stack = alert_stack(tmp_path, receiver.url.replace("/hook", "/missing"))
    try:
        stack.request("POST", "/admin/api/alerts/test", json={"channel": "ops"},
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        wait_for(lambda: [r.status for r in rows(stack)] == ["failed"])
        [row] = rows(stack)
        assert row.attempts == 1 and row.last_error == "HTTP 404"
    finally:
        stack.close()


def test_hanging_receiver_does_not_slow_requests(tmp_path: Path, receiver: Receiver) -> None:
    receiver.hang = True
    stack = alert_stack(tmp_path, receiver.url)
    try:
        for _ in range(5):
            stack.gw.alerts.emit("alert.test", f"evt_{_}", {"n": _})  # type: ignore[union-attr]
        client = stack.client()
        started = time.perf_counter()
        for _ in range(20):
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5)
        elapsed = time.perf_counter() - started
        assert elapsed < 5, elapsed
        wait_for(lambda: any(r.last_error == "TimeoutError" for r in
                             rows(stack)), timeout=15)
    finally:
        stack.close()


def test_a_hanging_mail_server_holds_none_of_the_request_paths_threads(tmp_path: Path) -> None:
    """Large request bodies are estimated in the loop's default threads; mail goes out in the
    sender's own, so 20 SMTP conversations stuck on a silent server delay no request."""
    silent = SilentServer()
    stack = Stack(tmp_path, alerts={
        "smtp": {"host": "127.0.0.1", "port": silent.port}, "timeout_s": 5, "lease_s": 10,
        "channels": [{"name": "mail", "type": "email", "to": ["ops@example.com"]}]})
    try:
        assert stack.gw.alerts is not None
        for n in range(20):
            stack.gw.alerts.emit("alert.test", f"evt_mail_{n}", {"n": n})
        wait_for(lambda: len(silent.held) >= 4)
        big = [{"role": "user", "content": "budget line " * 8000}]  # 96 KB: offloaded
        client = stack.client()
        started = time.perf_counter()
        for _ in range(3):
            client.chat.completions.create(model="gpt-4o-mini", messages=big, max_tokens=5)
        elapsed = time.perf_counter() - started
        assert elapsed < 2.0, f"{elapsed:.1f} s for 3 requests while the mail server hangs"
        wait_for(lambda: any(r.last_error == "TimeoutError" for r in rows(stack)), timeout=15)
    finally:
        stack.close()
        silent.close()


def test_redirects_are_not_followed_and_huge_answers_are_cut(tmp_path: Path) -> None:
    """A 302 fails the delivery at once (its target is never asked); a 200 with an endless
    body is sent after at most 64 KiB of it is read, and the connection is dropped."""
    hits = {"target": 0, "huge_bytes": 0}

    async def moved(_request: web.Request) -> web.Response:
        raise web.HTTPFound("/target")

    async def target(_request: web.Request) -> web.Response:
        hits["target"] += 1
        return web.Response(status=204)

    async def huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200)
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(10_000):  # up to 640 MB
                await resp.write(b"x" * 65536)
                hits["huge_bytes"] += 65536
        return resp

    lt = LoopThread()
    app = web.Application()
    for path, handler in (("/moved", moved), ("/target", target), ("/huge", huge)):
        app.router.add_post(path, handler)
    runner = web.AppRunner(app, access_log=None)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    port = lt.run(start())
    stack = Stack(tmp_path, alerts={"allow_private_targets": True, "channels": [
        {"name": "moved", "type": "webhook", "url": f"http://127.0.0.1:{port}/moved"},
        {"name": "huge", "type": "slack", "url": f"http://127.0.0.1:{port}/huge"}]})
    fast(stack.gw.alerts)
    try:
        for name in ("moved", "huge"):
            stack.request("POST", "/admin/api/alerts/test", json={"channel": name},
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        wait_for(lambda: {r.channel: r.status for r in rows(stack)} == {
            "moved": "failed", "huge": "sent"})
        by = {r.channel: r for r in rows(stack)}
        assert (by["moved"].attempts, by["moved"].last_error) == (1, "HTTP 302")
        assert hits["target"] == 0
        time.sleep(0.5)
        assert hits["huge_bytes"] < 64 * 2**20, hits  # the sender hung up early
        client = stack.client()
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5)
    finally:
        stack.close()
        lt.run(runner.cleanup())
        lt.stop()


def test_a_hanging_receiver_holds_its_own_slots_only(tmp_path: Path,
                                                     receiver: Receiver) -> None:
    """30 events for a receiver that never answers take 10 attempts at a time; an event for
    another channel, recorded after them, is delivered at once, and new events keep being
    stored while the stuck attempts wait."""
    silent = SilentServer()
    alerts = alerts_config(receiver.url, timeout_s=4, lease_s=8)
    alerts["channels"].append({"name": "stuck", "type": "webhook",
                               "url": f"http://127.0.0.1:{silent.port}/hook"})
    stack = Stack(tmp_path, env={"TEST_WEBHOOK_SECRET": SECRET}, alerts=alerts)
    gw_alerts = stack.gw.alerts
    assert gw_alerts is not None
    stuck, ops = gw_alerts.channel("stuck"), gw_alerts.channel("ops")
    try:
        for n in range(30):
            gw_alerts.emit("alert.test", f"evt_stuck_{n}", {"n": n}, only=stuck)
        wait_for(lambda: len(silent.held) >= 10)
        started = time.monotonic()
        gw_alerts.emit("alert.test", "evt_ops", {"n": 0}, only=ops)
        wait_for(lambda: receiver.received, timeout=3)
        assert time.monotonic() - started < 2.0
        assert [r["id"] for r in receiver.received] == ["evt_ops"]
        assert len(silent.held) == 10  # its own slots, no more
        listed = stack.lt.run(gw_alerts.deliveries(100))
        assert len(listed) == 31  # stored, although ten attempts hang
        assert sum(r.attempts for r in listed if r.channel == "stuck") == 10
    finally:
        stack.close()
        silent.close()


def test_two_gateways_on_one_postgres_deliver_once(tmp_path: Path, receiver: Receiver,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pg.require()
    with pg.temp_database() as url:
        monkeypatch.setenv("COSTWALL_TEST_DATABASE", url)
        a = alert_stack(tmp_path / "a", receiver.url)
        b = alert_stack(tmp_path / "b", receiver.url)
        try:
            for stack in (a, b):  # both replicas see the same event (same stable id)
                for n in range(10):
                    stack.gw.alerts.emit("alert.test", f"evt_same_{n}",  # type: ignore
                                         {"n": n})
            wait_for(lambda: len(receiver.received) >= 10)
            time.sleep(1.0)
            ids = [r["id"] for r in receiver.received]
            assert sorted(ids) == sorted(f"evt_same_{n}" for n in range(10))
        finally:
            a.close()
            b.close()


@pytest.mark.parametrize(("channel", "problem"), [
    ({"name": "x", "type": "webhook", "url": "ftp://example.com/"}, "expected an http(s) URL"),
    ({"name": "x", "type": "webhook", "url": "https://127.0.0.1/h"}, "private address"),
    ({"name": "x", "type": "webhook", "url": "https://10.1.2.3/h"}, "private address"),
    ({"name": "x", "type": "webhook", "url": "https://example.com/h",
      "secret_env": "BAD_SECRET"}, "whsec_"),
    ({"name": "x", "type": "pager", "url": "https://example.com/h"}, "expected one of"),
    ({"name": "x", "type": "email", "to": ["nobody"]}, "e-mail addresses"),
])
def test_bad_channels_are_config_errors(tmp_path: Path, channel: dict[str, Any],
                                        problem: str) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9/v1", alerts={"channels": [channel]})
    with pytest.raises(ConfigError) as err:
        load_settings(path, {"BAD_SECRET": "not-a-secret"})
    assert any(problem in p for p in err.value.problems), err.value.problems
    assert not any("not-a-secret" in p for p in err.value.problems)


def test_delivery_timings_are_settings_and_a_lease_must_outlive_an_attempt(
        tmp_path: Path) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9/v1", alerts={
        "timeout_s": 2, "lease_s": 5, "retry_s": 0.5, "max_attempts": 3, "give_up_s": 60})
    alerts = load_settings(path, {})[0].alerts
    assert (alerts.timeout_s, alerts.lease_s, alerts.retry_s, alerts.max_attempts,
            alerts.give_up_s) == (2, 5, 0.5, 3, 60)
    assert load_settings(write_config(tmp_path, "http://127.0.0.1:9/v1"), {})[0].alerts \
        .lease_s == 60
    path = write_config(tmp_path, "http://127.0.0.1:9/v1", alerts={
        "timeout_s": 10, "lease_s": 15, "max_attempts": 0})
    with pytest.raises(ConfigError) as err:
        load_settings(path, {})
    assert "alerts.lease_s: must be at least 2 x alerts.timeout_s (20 s)" in err.value.problems
    assert any(p.startswith("alerts.max_attempts") for p in err.value.problems)


def test_rules_route_events_and_unknown_channels_are_errors(tmp_path: Path) -> None:
    channels = [{"name": "a", "type": "webhook", "url": "https://example.com/a"},
                {"name": "b", "type": "webhook", "url": "https://example.com/b"}]
    path = write_config(tmp_path, "http://127.0.0.1:9/v1", alerts={
        "channels": channels, "rules": [{"events": ["budget.*"], "channels": ["a"]},
                                        {"events": ["alert.test"], "channels": ["a", "b"]}]})
    settings, _ = load_settings(path, {})
    assert [c.name for c in settings.alerts.routes("budget.threshold")] == ["a"]
    assert [c.name for c in settings.alerts.routes("alert.test")] == ["a", "b"]
    assert settings.alerts.routes("cap.changed") == []
    path = write_config(tmp_path, "http://127.0.0.1:9/v1", alerts={
        "channels": channels, "rules": [{"events": ["budget.*"], "channels": ["c"]},
                                        {"events": ["nothing.*"], "channels": ["a"]}]})
    with pytest.raises(ConfigError) as err:
        load_settings(path, {})
    assert any("unknown channel 'c'" in p for p in err.value.problems)
    assert any("matches no event type" in p for p in err.value.problems)


def test_admin_page_test_form_and_admin_change_events(tmp_path: Path,
                                                      receiver: Receiver) -> None:
    from tests.test_admin_api import Browser

    stack = alert_stack(tmp_path, receiver.url)
    try:
        b = Browser(stack.url)
        assert b.login(ADMIN_TOKEN).status == 303
        page = b.get("/admin/alerts").body.decode()
        assert 'href="/admin/alerts"' in page and "127.0.0.1" in page
        assert receiver.url not in page and SECRET not in page
        assert b.post("/admin/alerts/test", {"channel": "ops"}).status == 403  # no CSRF
        assert b.post("/admin/alerts/test", {"channel": "ops", "csrf": b.csrf()}).status == 303
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert stack.request("PUT", "/admin/api/budgets/tenant/acme", json={"monthly_usd": "7"},
                             headers=auth).status == 200
        assert stack.request("POST", "/admin/api/override",
                             json={"enabled": True, "reason": "quarter end"},
                             headers=auth).status == 200
        wait_for(lambda: {r["type"] for r in receiver.received} >=
                 {"alert.test", "cap.changed", "override.changed"})
        [cap] = receiver.of_type("cap.changed")
        assert cap["data"]["scope"] == "tenant" and Decimal(cap["data"]["limit_usd"]) == 7
        [override] = receiver.of_type("override.changed")
        assert override["data"]["enabled"] is True and override["data"]["actor"]
        page = b.get("/admin/alerts").body.decode()
        assert 'data-label="Status"' in page and "sent" in page and "cap.changed" in page
    finally:
        stack.close()


class Mailbox:
    """An aiosmtpd handler keeping every message it receives."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        from email import message_from_bytes, policy

        self.messages.append((envelope.rcpt_tos,
                              message_from_bytes(envelope.content, policy=policy.default)))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    from aiosmtpd.controller import Controller

    from tests.harness import free_port

    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield box, controller.port
    controller.stop()


def test_slack_and_email_get_one_message_each_per_crossing(
        tmp_path: Path, receiver: Receiver, smtp: tuple[Mailbox, int]) -> None:
    box, port = smtp
    probe = Stack(tmp_path / "probe")
    cap = cap_for(probe, 10, max_tokens=50)
    probe.close()
    alerts = {"allow_private_targets": True, "smtp": {"host": "127.0.0.1", "port": port,
                                                      "from": "costwall@example.com"},
              "channels": [{"name": "chat", "type": "slack", "url_env": "TEST_SLACK_URL"},
                           {"name": "mail", "type": "email", "to": ["finance@example.com"]}],
              "rules": [{"events": ["budget.threshold"], "channels": ["chat", "mail"]}]}
    stack = Stack(tmp_path / "run", env={"TEST_SLACK_URL": receiver.url}, alerts=alerts,
                  **budget_config(cap))
    fast(stack.gw.alerts)
    try:
        spend_until_refused(stack)
        wait_for(lambda: receiver.received and box.messages)
        time.sleep(0.5)
        [slack] = receiver.received
        assert "webhook-signature" not in slack["headers"]
        assert "tenant:acme" in slack["text"] and "budget.threshold" in slack["text"]
        assert any("/admin/alerts" in str(b) for b in slack["blocks"])
        [(rcpt, msg)] = box.messages
        assert rcpt == ["finance@example.com"] and "budget.threshold" in msg["Subject"]
        assert msg.get_body(("plain",)) is not None and msg.get_body(("html",)) is not None
        assert "acme" in msg.get_body(("plain",)).get_content()
    finally:
        stack.close()


def test_invoices_email_to_mails_pdf_and_csv_once(tmp_path: Path,
                                                  smtp: tuple[Mailbox, int]) -> None:
    from datetime import UTC, datetime

    from tests.test_invoice_auto import Clock, issued, wake

    box, port = smtp
    clock = Clock(datetime(2026, 10, 20, 12, 0, tzinfo=UTC))
    stack = Stack(tmp_path, clock=clock, invoices={"auto": True,
                                                   "email_to": ["finance@example.com"]},
                  alerts={"smtp": {"host": "127.0.0.1", "port": port}})
    fast(stack.gw.alerts)
    try:
        stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG)
        stack.flush()
        clock.now = datetime(2026, 11, 1, 0, 0, 30, tzinfo=UTC)
        wake(stack)
        issued(stack, count=2)
        wait_for(lambda: box.messages, timeout=15)
        wake(stack)
        time.sleep(0.5)
        [(rcpt, msg)] = box.messages
        assert rcpt == ["finance@example.com"] and "invoice.issued" in msg["Subject"]
        names = sorted(part.get_filename() for part in msg.iter_attachments())
        assert len(names) == 4 and sum(n.endswith(".pdf") for n in names) == 2
        pdf = next(p for p in msg.iter_attachments() if p.get_filename().endswith(".pdf"))
        assert pdf.get_content().startswith(b"%PDF")
    finally:
        stack.close()


def test_spend_anomaly_once_per_scope_and_hour(tmp_path: Path, receiver: Receiver) -> None:
    from datetime import UTC, datetime, timedelta

    from gateway.anomaly import check
    from tests.test_invoice_auto import Clock

    clock = Clock(datetime(2026, 10, 1, 0, 30, tzinfo=UTC))
    stack = Stack(tmp_path, clock=clock, env={"TEST_WEBHOOK_SECRET": SECRET},
                  alerts={**alerts_config(receiver.url), "anomaly": {"factor": 3}})
    fast(stack.gw.alerts)
    gw = stack.gw
    try:
        client = stack.client()
        for hour in range(30):  # one request an hour: the history
            clock.now = datetime(2026, 10, 1, 0, 30, tzinfo=UTC) + timedelta(hours=hour)
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5)
        stack.flush()
        assert stack.lt.run(check(gw, 3)) == 0  # an ordinary hour
        clock.now += timedelta(hours=1)
        for _ in range(2):  # twice the mean: not an anomaly at factor 3
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5)
        stack.flush()
        assert stack.lt.run(check(gw, 3)) == 0
        for _ in range(6):  # eight times the mean
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5)
        stack.flush()
        assert stack.lt.run(check(gw, 3)) > 0
        assert stack.lt.run(check(gw, 3)) > 0  # checked again: the same events
        wait_for(lambda: receiver.of_type("spend.anomaly"))
        time.sleep(0.5)
        events = receiver.of_type("spend.anomaly")
        scopes = sorted((e["data"]["scope"], e["data"]["id"]) for e in events)
        assert scopes == sorted(set(scopes)) and ("tenant", "acme") in scopes
        assert all(e["data"]["window"] == "hourly" for e in events)
    finally:
        stack.close()


def test_forecast_exceeded_is_sent_once(tmp_path: Path, receiver: Receiver) -> None:
    from datetime import UTC, datetime

    from tests.test_invoice_auto import Clock

    clock = Clock(datetime(2026, 11, 1, 9, tzinfo=UTC))
    stack = Stack(tmp_path, clock=clock, env={"TEST_WEBHOOK_SECRET": SECRET},
                  alerts={**alerts_config(receiver.url),
                          "rules": [{"events": ["budget.forecast_exceeded"],
                                     "channels": ["ops"]}]})
    fast(stack.gw.alerts)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        raw = stack.client().chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MSG, max_tokens=20)
        cost = Decimal(raw.headers["X-Costwall-Cost-Usd"])
        for day in range(1, 10):
            clock.now = datetime(2026, 11, day, 10, tzinfo=UTC)
            for _ in range(2 if day > 1 else 1):
                stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                                       max_tokens=20)
        stack.flush()
        clock.now = datetime(2026, 11, 10, 12, tzinfo=UTC)
        assert stack.request("PUT", "/admin/api/budgets/agent/content", headers=auth,
                             json={"monthly_usd": str(30 * cost)}).status == 200
        for _ in range(2):
            assert stack.request("GET", "/admin/api/forecast", headers=auth).status == 200
        wait_for(lambda: receiver.of_type("budget.forecast_exceeded"))
        time.sleep(0.5)
        [event] = receiver.of_type("budget.forecast_exceeded")
        data = event["data"]
        assert (data["scope"], data["id"], data["window"]) == ("agent", "content", "monthly")
        assert Decimal(data["projected_usd"]) > Decimal(data["limit_usd"])
        assert data["exhausts_at"].startswith("2026-11-1")
        assert receiver.of_type("cap.changed") == []  # routed by the rule: forecasts only
    finally:
        stack.close()


def test_a_dead_senders_claim_is_taken_over_and_sent_once(tmp_path: Path,
                                                          receiver: Receiver) -> None:
    """A replica that claimed a delivery and died (kill -9: no finish) holds only a lease;
    once it expires another sender delivers the event, once, with the same webhook-id."""
    from gateway.store import open_ledger
    from gateway.store.interfaces import OutboxRow

    db = f"sqlite:///{tmp_path / 'shared.db'}"
    body = orjson.dumps({"type": "alert.test", "id": "evt_dead", "timestamp": "x",
                         "data": {}}).decode()
    lt = LoopThread()

    async def dead_replica() -> int:
        ledger = open_ledger(db)
        await ledger.start()
        now = time.time()
        await ledger.outbox_add([OutboxRow("evt_dead", "ops", "alert.test", body, now,
                                           next_at=now)])
        claimed = await ledger.outbox_claim(now, 2.0, 10)
        assert await ledger.outbox_claim(now, 2.0, 10) == []  # leased: nobody else takes it
        await ledger.close()  # and never finishes
        return len(claimed)

    assert lt.run(dead_replica()) == 1
    lt.stop()
    started = time.monotonic()
    stack = alert_stack(tmp_path / "gw", receiver.url, database=db)
    try:
        wait_for(lambda: receiver.received, timeout=10)
        assert time.monotonic() - started > 1.0  # not before the lease expired
        time.sleep(0.5)
        assert [r["id"] for r in receiver.received] == ["evt_dead"]
        assert receiver.received[0]["headers"]["webhook-id"] == "evt_dead"
        [row] = rows(stack)
        assert (row.status, row.attempts) == ("sent", 2)
    finally:
        stack.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_outbox_claims_by_channel_and_abandons_removed_channels(tmp_path: Path,
                                                                     backend: str) -> None:
    """Both backends: a claim can be limited to one channel; rows of channels no longer
    configured become failed (visible) instead of pending for ever."""
    from gateway.store import open_ledger
    from gateway.store.interfaces import OutboxRow

    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    if backend == "postgresql":
        pg.require()
        url = await pg.create_database()
    ledger = open_ledger(url)
    await ledger.start()
    try:
        now = time.time()
        await ledger.outbox_add([OutboxRow(f"evt_{n}", channel, "alert.test", "{}", now + n,
                                           next_at=now + n)
                                 for n in range(3) for channel in ("a", "b", "gone")])
        claimed = await ledger.outbox_claim(now + 5, 10, 2, "a")
        assert [(r.event_id, r.channel, r.attempts) for r in claimed] == [
            ("evt_0", "a", 1), ("evt_1", "a", 1)]
        assert await ledger.outbox_abandon(("a", "b"), "channel no longer configured") == 3
        assert await ledger.outbox_abandon(("a", "b"), "channel no longer configured") == 0
        rows = {(r.event_id, r.channel): r for r in await ledger.outbox_list(20)}
        assert {r.status for k, r in rows.items() if k[1] == "gone"} == {"failed"}
        assert rows[("evt_0", "gone")].last_error == "channel no longer configured"
        rest = await ledger.outbox_claim(now + 5, 10, 10)
        assert sorted((r.event_id, r.channel) for r in rest) == [
            ("evt_0", "b"), ("evt_1", "b"), ("evt_2", "a"), ("evt_2", "b")]
    finally:
        await ledger.close()
        if backend == "postgresql":
            await pg.drop_database(url)


def test_window_alerts_name_their_window_and_template_users_raise_none(
        tmp_path: Path, receiver: Receiver) -> None:
    """A daily window's crossing and exhaustion are alerts of the daily window and period;
    the end users under ``users_default`` (unbounded, crossing every day) are only
    audit-logged, while a user with caps of their own is alerted like any scope."""
    probe = Stack(tmp_path / "probe")
    cap = cap_for(probe, 10, max_tokens=50)
    probe.close()
    stack = alert_stack(tmp_path / "run", receiver.url, budgets={
        "timezone": "UTC", "warn_at": ["0.8"], "tenants": {"acme": {"daily_usd": cap}},
        "users_default": {"daily_usd": cap}, "users": {"named": {"daily_usd": cap}}})
    try:
        for user in ("from-the-template", "named"):
            for _ in range(12):
                try:
                    stack.client("globex-research").chat.completions.create(
                        model="gpt-4o-mini", messages=MSG, max_tokens=50,
                        extra_headers={"X-Costwall-User": user})
                except openai.APIStatusError as exc:
                    assert exc.status_code == 402
                    break
        spend_until_refused(stack)
        wait_for(lambda: len(receiver.of_type("budget.threshold")) == 2
                 and len(receiver.of_type("budget.exhausted")) == 2)
        time.sleep(0.3)
        about = sorted((e["data"]["scope"], e["data"]["id"], e["data"]["window"],
                        e["data"]["period"]) for e in receiver.received)
        today = next(s.period for s in stack.gw.budgets.books.current_spans()
                     if s.window == "daily")
        assert about == [("tenant", "acme", "daily", today)] * 2 + \
            [("user", "named", "daily", today)] * 2
        stack.flush()
        warned = {(e["scope"], e["id"]) for e in stack.gw.audit.events("warning")}
        assert ("user", "from-the-template") in warned  # audit-logged all the same
    finally:
        stack.close()
