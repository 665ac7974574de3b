"""Budget windows and end-user budgets end to end: real gateway, real simulator, the official
``openai`` SDK. Daily caps and new end users hard-capped under concurrency, hourly and daily
windows rolling over at local boundaries (injected clock, never a sleep), a clock stepped
back, the admin API per window, bad input, and two replicas on PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.config import ConfigError, load_settings
from gateway.estimate import estimate
from gateway.money import to_pico
from tests import pg
from tests.harness import ADMIN_TOKEN, KEYS, Stack

MSG = [{"role": "user", "content": "Write one line about budgets."}]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MAX_TOKENS = 100


class Clock:
    """The gateway's injected clock: moved by the test, never by sleeping."""

    def __init__(self, moment: datetime):
        self.moment = moment

    def __call__(self) -> datetime:
        return self.moment

    def set(self, moment: datetime) -> None:
        self.moment = moment


def bound_usd(stack: Stack, requests: int) -> str:
    """USD that fits exactly ``requests`` requests of MSG at MAX_TOKENS (the simulator
    answers with exactly MAX_TOKENS tokens, so each costs its bound)."""
    price = stack.gw.prices.lookup("gpt-4o-mini")
    assert price is not None
    est = estimate("chat", {"messages": MSG, "max_tokens": MAX_TOKENS}, price)
    return str(Decimal(price.upper_bound(est.prompt_tokens, MAX_TOKENS) * requests) / 10**12)


@pytest.fixture(scope="module")
def forty(tmp_path_factory: pytest.TempPathFactory) -> str:
    probe = Stack(tmp_path_factory.mktemp("probe"))
    try:
        return bound_usd(probe, 40)
    finally:
        probe.close()


def fire(stack: Stack, n: int = 200, concurrency: int = 50, key: str = "acme-content",
         headers: dict[str, str] | None = None) -> list[int]:
    """``n`` chat requests at ``concurrency`` through the async SDK; their statuses."""

    async def run() -> list[int]:
        client = stack.async_client(key)
        sem = asyncio.Semaphore(concurrency)

        async def one() -> int:
            async with sem:
                try:
                    await client.chat.completions.create(
                        model="gpt-4o-mini", messages=MSG, max_tokens=MAX_TOKENS,
                        extra_headers=headers or {})
                    return 200
                except openai.APIStatusError as exc:
                    return exc.status_code

        try:
            return await asyncio.gather(*(one() for _ in range(n)))
        finally:
            await client.close()

    return asyncio.run(run())


def chat(stack: Stack, key: str = "acme-content", **headers: str) -> Any:
    return stack.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MSG, max_tokens=MAX_TOKENS, extra_headers=headers)


def refusal(stack: Stack, key: str = "acme-content", **headers: str) -> dict[str, Any]:
    with pytest.raises(openai.APIStatusError) as refused:
        chat(stack, key, **headers)
    assert refused.value.status_code == 402
    body: dict[str, Any] = refused.value.response.json()
    assert body["error"]["budget"] == body["budget"]
    return body["budget"]


def budget_rows(stack: Stack) -> list[dict[str, Any]]:
    resp = stack.request("GET", "/admin/api/budget", headers=ADMIN)
    assert resp.status == 200, resp.body
    scopes: list[dict[str, Any]] = resp.json()["scopes"]
    return scopes


# -- hard caps per window -------------------------------------------------------------------
def test_daily_cap_holds_exactly_under_concurrency(tmp_path: Path, forty: str) -> None:
    """200 requests at concurrency 50 against a daily cap that fits 40: exactly 40 pass."""
    clock = Clock(datetime(2026, 11, 30, 15, 0, tzinfo=UTC))  # 10:00 in New York
    stack = Stack(tmp_path, clock=clock, budgets={
        "timezone": "America/New_York", "agents": {"content": {"daily_usd": forty,
                                                               "monthly_usd": "1000"}}})
    try:
        statuses = fire(stack)
        assert statuses.count(200) == 40 and statuses.count(402) == 160
        assert len(stack.state.requests) == 40  # refused requests never reach the upstream
        spent = sum(r.cost for r in stack.rows())
        assert spent == to_pico(forty), "the whole cap is used, never more"
        budget = refusal(stack)
        assert (budget["scope"], budget["id"], budget["window"]) == ("agent", "content", "daily")
        assert budget["period"] == "2026-11-30"
        assert budget["resets_at"] == "2026-12-01T05:00:00Z"  # midnight in New York
        assert Decimal(budget["limit_usd"]) == Decimal(forty)
        assert all(s.reserved == 0 for s in stack.gw.budgets.status())
    finally:
        stack.close()


def test_a_new_end_user_is_hard_capped_from_the_first_request(tmp_path: Path,
                                                                forty: str) -> None:
    """50 first requests of a brand-new user at once, under ``users_default``."""
    stack = Stack(tmp_path, budgets={"users_default": {"daily_usd": forty, "monthly_usd": "50"},
                                     "users": {"vip": {"daily_usd": "100"}}})
    try:
        statuses = fire(stack, headers={"X-Costwall-User": "brand-new-user"})
        assert statuses.count(200) == 40 and statuses.count(402) == 160
        budget = refusal(stack, **{"X-Costwall-User": "brand-new-user"})
        assert (budget["scope"], budget["id"], budget["window"]) == (
            "user", "brand-new-user", "daily")
        # Other users have their own budgets: a second new user, and one listed with more.
        assert chat(stack, **{"X-Costwall-User": "someone-else"}).http_response.status_code \
            == 200
        for _ in range(45):
            chat(stack, "globex-research", **{"X-Costwall-User": "vip"})
        # The body's ``user`` field names the user when the header does not.
        with pytest.raises(openai.APIStatusError) as refused:
            stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                                   max_tokens=MAX_TOKENS,
                                                   user="brand-new-user")
        assert refused.value.status_code == 402
        rows = stack.rows()
        by_user: dict[str | None, int] = {}
        for r in rows:
            by_user[r.end_user] = by_user.get(r.end_user, 0) + r.cost
        assert by_user["brand-new-user"] == to_pico(forty)
        assert len([r for r in rows if r.end_user == "vip"]) == 45
        # The ledger, the usage API and the CSV carry the user; metrics never name one.
        usage = stack.request("GET", "/admin/api/usage?group_by=user", headers=ADMIN).json()
        groups = {g["group"]: g for g in usage["rows"]}
        assert groups["brand-new-user"]["requests"] == 40 and groups["vip"]["requests"] == 45
        month = stack.gw.budgets.current_period()
        csv = stack.request("GET", f"/admin/invoices/{month}.csv", headers=ADMIN).body.decode()
        assert '"user","provider"' in csv.splitlines()[0] and '"brand-new-user"' in csv
        metrics = stack.request("GET", "/metrics").body.decode()
        assert "brand-new-user" not in metrics and "vip" not in metrics
        page = stack.request("GET", "/admin", headers=ADMIN).body.decode()
        assert 'data-scope="user:brand-new-user"' in page
    finally:
        stack.close()


def test_windows_roll_over_at_local_boundaries(tmp_path: Path) -> None:
    """Hourly and daily windows in Berlin: the hour and the day end on local time, without a
    reset job or a restart; a clock stepped back re-opens nothing, also across a restart."""
    berlin_13_59 = datetime(2026, 11, 30, 12, 59, tzinfo=UTC)
    clock = Clock(berlin_13_59)
    probe = Stack(tmp_path / "probe")
    three, five = bound_usd(probe, 3), bound_usd(probe, 5)
    probe.close()
    stack = Stack(tmp_path / "run", clock=clock, budgets={
        "timezone": "Europe/Berlin", "warn_at": ["0.5"],
        "tenants": {"acme": {"hourly_usd": three, "daily_usd": five}}})
    try:
        warnings = [chat(stack).headers.get("x-costwall-budget-warning") for _ in range(3)]
        assert warnings[0] is None
        # Each window past the threshold, named (one header each; the client joins them).
        assert warnings[-1] == "tenant:acme 60% daily, tenant:acme 100% hourly"
        budget = refusal(stack)
        assert (budget["window"], budget["period"], budget["resets_at"]) == (
            "hourly", "2026-11-30T13", "2026-11-30T13:00:00Z")
        clock.set(datetime(2026, 11, 30, 12, 59, 59, 999999, tzinfo=UTC))
        refusal(stack)  # still the same hour
        clock.set(datetime(2026, 11, 30, 13, 0, tzinfo=UTC))  # 14:00 in Berlin
        assert chat(stack).http_response.status_code == 200
        # The clock steps back (NTP): the 13:00 hour, already over, does not open again.
        clock.set(datetime(2026, 11, 30, 12, 59, 30, tzinfo=UTC))
        assert chat(stack).http_response.status_code == 200
        budget = refusal(stack)  # five today: the daily window now refuses
        assert (budget["window"], budget["period"], budget["resets_at"]) == (
            "daily", "2026-11-30", "2026-11-30T23:00:00Z")
        rows = stack.rows()
        assert [r.ts.isoformat() for r in rows[3:]] == ["2026-11-30T13:00:00+00:00"] * 2
        # Every current window of the scope, with its period and when it resets.
        windows = {s["window"]: s for s in budget_rows(stack) if s["id"] == "acme"}
        assert windows["hourly"]["period"] == "2026-11-30T14"
        assert windows["hourly"]["resets_at"] == "2026-11-30T14:00:00Z"
        assert windows["daily"]["spent_usd"] == windows["daily"]["limit_usd"]
        # A restart with the clock still behind: the ledger's newest row holds time back.
        stack.restart()
        refusal(stack)
        clock.set(datetime(2026, 11, 30, 23, 0, tzinfo=UTC))  # midnight in Berlin
        assert chat(stack).http_response.status_code == 200
        metrics = stack.request("GET", "/metrics").body.decode()
        assert 'costwall_budget_limit_usd{id="acme",scope="tenant",window="daily"}' in metrics
        assert 'costwall_budget_limit_usd{id="acme",scope="tenant",window="hourly"}' in metrics
        stack.flush()
        blocked = list(stack.gw.audit.events("blocked"))
        assert [(e["window"], e["period"]) for e in blocked] == [
            ("hourly", "2026-11-30T13"), ("hourly", "2026-11-30T13"),
            ("daily", "2026-11-30"), ("daily", "2026-11-30")]
        assert "daily window 2026-11-30" in blocked[-1]["reason"]
        warned = {(e["window"], e["period"]) for e in stack.gw.audit.events("warning")}
        assert ("hourly", "2026-11-30T13") in warned and ("daily", "2026-11-30") in warned
    finally:
        stack.close()


# -- the admin API per window ---------------------------------------------------------------
@pytest.fixture
def admin_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path, budgets={"tenants": {"acme": {"monthly_usd": "50"}},
                                     "users_default": {"daily_usd": "2", "monthly_usd": "20"}})
    yield stack
    stack.close()


def put(stack: Stack, path: str, body: Any = None, raw: bytes | None = None) -> Any:
    if raw is not None:
        return stack.request("PUT", f"/admin/api/budgets/{path}", data=raw,
                             headers={**ADMIN, "Content-Type": "application/json"})
    return stack.request("PUT", f"/admin/api/budgets/{path}", json=body, headers=ADMIN)


def test_admin_api_sets_and_removes_windows(admin_stack: Stack) -> None:
    s = admin_stack
    resp = put(s, "tenant/acme", {"daily_usd": "0.000001", "hourly_usd": "5",
                                  "reason": "slow acme down"})
    assert resp.status == 200, resp.body
    body = resp.json()
    assert (body["window"], body["limit_usd"], body["source"]) == ("daily", "0.000001", "admin")
    assert [w["window"] for w in body["windows"]] == ["monthly", "daily", "hourly"]
    assert refusal(s)["window"] == "daily"
    s.flush()
    event = list(s.gw.audit.events("admin"))[-1]
    assert (event["action"], event["target"], event["reason"]) == (
        "cap.set", "tenant:acme", "slow acme down")
    assert event["detail"] == "daily_usd none → 0.000001; hourly_usd none → 5"
    # null removes one window; the others stay
    assert put(s, "tenant/acme", {"daily_usd": None}).status == 200
    assert chat(s).http_response.status_code == 200
    windows = [r["window"] for r in budget_rows(s) if r["id"] == "acme"]
    assert windows == ["monthly", "hourly"]
    s.restart()  # stored, not undone by the config file
    assert [r["window"] for r in budget_rows(s) if r["id"] == "acme"] == ["monthly", "hourly"]
    assert s.gw.budgets.limits.of(("tenant", "acme")) == {"monthly": to_pico(50),
                                                          "hourly": to_pico(5)}


def test_a_user_cap_starts_from_the_template_and_falls_back_to_it(admin_stack: Stack) -> None:
    s = admin_stack
    assert put(s, "user/alice%20smith", {"daily_usd": "0.000001"}).status == 200
    alice = ("user", "alice smith")
    assert s.gw.budgets.limits.of(alice) == {"daily": 1_000_000, "monthly": to_pico(20)}
    assert refusal(s, **{"X-Costwall-User": "alice smith"})["window"] == "daily"
    assert chat(s, **{"X-Costwall-User": "bob"}).http_response.status_code == 200
    s.restart()
    assert s.gw.budgets.limits.of(alice) == {"daily": 1_000_000, "monthly": to_pico(20)}
    removed = s.request("DELETE", "/admin/api/budgets/user/alice%20smith", headers=ADMIN)
    assert removed.status == 200, removed.body
    assert s.gw.budgets.limits.of(alice) == {"daily": to_pico(2), "monthly": to_pico(20)}
    assert chat(s, **{"X-Costwall-User": "alice smith"}).http_response.status_code == 200
    s.restart()
    assert alice not in s.gw.budgets.limits


@pytest.mark.parametrize("body, raw", [
    ({"yearly_usd": "5"}, None),
    ({"daily_usd": "-1"}, None),
    ({"hourly_usd": "abc"}, None),
    ({"weekly_usd": "NaN"}, None),
    ({"daily_usd": True}, None),
    ({}, None),
    ({"reason": "only a reason"}, None),
    ({"daily_usd": "5", "monthly": "5"}, None),
    (None, b'{"daily_usd": -0.5}'),
])
def test_bad_windows_are_400_and_store_nothing(admin_stack: Stack, body: Any,
                                               raw: bytes | None) -> None:
    resp = put(admin_stack, "tenant/acme", body, raw)
    assert resp.status == 400, resp.body
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert admin_stack.gw.budgets.limits.of(("tenant", "acme")) == {"monthly": to_pico(50)}
    assert admin_stack.call(lambda gw: gw.ledger.caps()) == {}


@pytest.mark.parametrize("headers, user", [
    ({"X-Costwall-User": "u" * 129}, None),
    ({}, "u" * 129),
    ({}, "line\nbreak"),
    ({}, 42),
])
def test_bad_user_ids_are_400_and_nothing_is_forwarded(admin_stack: Stack,
                                                       headers: dict[str, str],
                                                       user: Any) -> None:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MSG}
    if user is not None:
        body["user"] = user
    resp = admin_stack.request("POST", "/v1/chat/completions", json=body, headers={
        "Authorization": f"Bearer {KEYS['acme-content']['key']}", **headers})
    assert resp.status == 400, resp.body
    error = resp.json()["error"]
    assert error["param"] == ("X-Costwall-User" if headers else "user")
    assert ("must be a string" if user == 42 else "at most 128 printable") in error["message"]
    assert admin_stack.state.total_requests == 0 and admin_stack.rows() == []


@pytest.mark.parametrize("budgets, problem", [
    ({"tenants": {"acme": {"yearly_usd": 5}}}, "budgets.tenants.acme.yearly_usd: unknown"),
    ({"tenants": {"acme": {"daily_usd": -1}}}, "budgets.tenants.acme.daily_usd: expected an "
                                               "amount in USD such as 200 or \"12.50\" (-1 is "
                                               "negative)"),
    ({"global": {"hourly_usd": "lots"}}, "budgets.global.hourly_usd: expected an amount"),
    ({"users_default": {"daly_usd": 2}}, "did you mean `daily_usd`"),
    ({"users_default": {}}, "budgets.users_default: needs at least one of"),
    ({"users": {"u" * 129: {"daily_usd": 1}}}, "user ids are 1 to 128 printable"),
    ({"agents": {"x": {}}}, "budgets.agents.x: needs at least one of"),
])
def test_bad_window_config_is_a_check_error(tmp_path: Path, budgets: dict[str, Any],
                                            problem: str) -> None:
    import yaml

    path = tmp_path / "costwall.yaml"
    path.write_text(yaml.safe_dump({"budgets": budgets}))
    with pytest.raises(ConfigError) as failed:
        load_settings(path, {})
    assert problem in str(failed.value), str(failed.value)


# -- two replicas on PostgreSQL -------------------------------------------------------------
def test_two_replicas_share_a_daily_cap_and_a_new_users_budget(tmp_path: Path,
                                                               forty: str) -> None:
    """Both windows' rows are shared: 200 requests over two gateways at concurrency 50
    (25 per replica) against a daily cap, then against a new end user's default cap."""
    pg.require()
    with pg.temp_database() as url:
        budgets = {"timezone": "Asia/Tokyo", "agents": {"content": {"daily_usd": forty}},
                   "users_default": {"daily_usd": forty}}
        a = Stack(tmp_path / "a", database=url, budgets=budgets)
        b = Stack(tmp_path / "b", database=url, budgets=budgets)
        try:
            def both(key: str, headers: dict[str, str] | None = None) -> list[int]:
                out: list[int] = []

                async def run() -> None:
                    loop = asyncio.get_running_loop()
                    got = await asyncio.gather(
                        loop.run_in_executor(None, lambda: fire(a, 100, 25, key, headers)),
                        loop.run_in_executor(None, lambda: fire(b, 100, 25, key, headers)))
                    out.extend(got[0] + got[1])

                asyncio.run(run())
                return out

            statuses = both("acme-content")
            assert statuses.count(200) == 40 and statuses.count(402) == 160
            statuses = both("globex-research", {"X-Costwall-User": "fresh"})
            assert statuses.count(200) == 40 and statuses.count(402) == 160
            rows = a.rows()
            content = sum(r.cost for r in rows if r.agent == "content")
            fresh = sum(r.cost for r in rows if r.end_user == "fresh")
            overshoot = max(content, fresh) - to_pico(forty)
            print(f"\ntwo replicas, daily cap of 40 requests: 40 + 40 allowed, overshoot "
                  f"{overshoot} pico-USD")
            assert content == fresh == to_pico(forty) and overshoot == 0
        finally:
            a.close()
            b.close()


def test_budget_windows_table_replaces_budget_caps_on_upgrade(tmp_path: Path) -> None:
    """A ledger from before windows keeps its admin caps, as monthly windows."""
    from gateway.store.sqlite_sql import MIGRATIONS

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY)")
        for version, script in enumerate(MIGRATIONS[:6], start=1):
            conn.executescript(script)
            conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        conn.execute("INSERT INTO budget_caps VALUES ('tenant', 'acme', 7000000000000, 'x')")
        conn.execute("INSERT INTO budget_caps VALUES ('agent', 'ops', NULL, 'x')")
    stack = Stack(tmp_path / "s", database=f"sqlite:///{db}",
                  budgets={"agents": {"ops": {"monthly_usd": "3"}}})
    try:
        assert stack.call(lambda gw: gw.ledger.caps()) == {
            ("tenant", "acme"): {"monthly": to_pico(7)}, ("agent", "ops"): {"monthly": None}}
        assert stack.gw.budgets.limits.of(("tenant", "acme")) == {"monthly": to_pico(7)}
        assert stack.gw.budgets.limits.of(("agent", "ops")) is None
    finally:
        stack.close()


def test_the_dashboard_lists_each_window(tmp_path: Path) -> None:
    stack = Stack(tmp_path, budgets={"tenants": {"acme": {"monthly_usd": "50",
                                                          "daily_usd": "5"}}})
    try:
        chat(stack)
        page = stack.request("GET", "/admin", headers=ADMIN).body.decode()
        assert 'data-scope="tenant:acme" data-window="monthly"' in page
        assert 'data-scope="tenant:acme" data-window="daily"' in page
        budget = stack.request("GET", "/admin/budget", headers=ADMIN).body.decode()
        row = budget[budget.index('data-scope="tenant:acme"'):budget.index('id="add-cap"')]
        assert 'name="daily_usd"' in row and 'value="5"' in row and 'data-window="daily"' in row
    finally:
        stack.close()


def test_the_dashboard_shows_the_most_used_end_users_and_counts_the_rest(
        tmp_path: Path) -> None:
    """Every end user under ``users_default`` has windows; the dashboard lists the 20 most
    used (the budget API all of them), so a fleet of users cannot flood the page."""
    stack = Stack(tmp_path, budgets={"users_default": {"daily_usd": "5"}})
    try:
        for i in range(23):
            for _ in range(2 if i == 22 else 1):  # user-22 uses the most
                chat(stack, **{"X-Costwall-User": f"user-{i}"})
        page = stack.request("GET", "/admin", headers=ADMIN).body.decode()
        assert page.count('data-scope="user:') == 20
        assert 'data-scope="user:user-22"' in page
        assert "3 more end-user windows" in page
        assert len([r for r in budget_rows(stack) if r["scope"] == "user"]) == 23
    finally:
        stack.close()
