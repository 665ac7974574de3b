"""Budgets on the wire, end to end: hard caps under concurrency, scopes, overrides, warnings,
clamping, month rollover, restarts and the audit trail."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from gateway.money import to_pico
from gateway.services import OverrideState
from tests.harness import KEYS, ROOT, Stack

MSG = [{"role": "user", "content": "Write one line about budgets."}]


def cap_for(stack: Stack, requests: int, max_tokens: int = 100) -> str:
    """A USD cap that fits about ``requests`` requests of MSG at ``max_tokens``."""
    from gateway.estimate import estimate

    price = stack.gw.prices.lookup("gpt-4o-mini")
    assert price is not None
    est = estimate("chat", {"messages": MSG, "max_tokens": max_tokens}, price)
    bound = price.upper_bound(est.prompt_tokens, max_tokens)
    return str(Decimal(bound * requests) / 10**12)


def budget_stack(tmp_path: Path, **budgets: Any) -> Stack:
    cfg = {"timezone": "UTC", "warn_at": ["0.8"], "near_cap": "reject", **budgets}
    return Stack(tmp_path, budgets=cfg)


def spend(stack: Stack) -> int:
    return sum(r.cost for r in stack.rows())


def test_hard_cap_under_concurrency(tmp_path: Path) -> None:
    probe = Stack(tmp_path / "probe")
    cap = cap_for(probe, 40)
    probe.close()
    stack = budget_stack(tmp_path / "run", **{"global": {"monthly_usd": cap}})
    stack.state.delay_s = 0.02

    async def fire() -> list[int]:
        client = stack.async_client()
        sem = asyncio.Semaphore(50)

        async def one(i: int) -> int:
            async with sem:
                try:
                    await client.chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                                         max_tokens=100)
                    return 200
                except openai.APIStatusError as exc:
                    return exc.status_code

        statuses = await asyncio.gather(*(one(i) for i in range(200)))
        await client.close()
        return statuses

    statuses = asyncio.run(fire())
    try:
        ok, blocked = statuses.count(200), statuses.count(402)
        assert ok + blocked == 200 and 0 < ok <= 40
        total = spend(stack)
        assert total <= to_pico(cap), "zero overshoot"
        assert len(stack.state.requests) == ok, "blocked requests never reach the upstream"
        share = Decimal(total) / to_pico(cap)
        print(f"\nhard cap: {ok} allowed, {blocked} blocked, {share:.1%} of the cap used")
        assert share > Decimal("0.9")
        assert all(s.reserved == 0 for s in stack.gw.budgets.status())
    finally:
        stack.close()


def test_402_shape_and_each_scope_blocks_only_its_own(tmp_path: Path) -> None:
    stack = budget_stack(tmp_path, tenants={"acme": {"monthly_usd": "0"}},
                         campaigns={"spring": {"monthly_usd": "0"}})
    try:
        with pytest.raises(openai.APIStatusError) as info:
            stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG)
        assert info.value.status_code == 402
        body = info.value.response.json()
        assert body["error"]["type"] == body["error"]["code"] == "budget_exceeded"
        assert "tenant 'acme'" in body["error"]["message"] and "$0" in body["error"]["message"]
        assert body["budget"]["scope"] == "tenant" and body["budget"]["id"] == "acme"
        assert body["budget"]["period"] == datetime.now(UTC).strftime("%Y-%m")
        assert (body["budget"]["limit_usd"], body["budget"]["spent_usd"]) == ("0", "0")
        # globex is unaffected by acme's cap...
        stack.client("globex-research").chat.completions.create(model="gpt-4o-mini",
                                                                messages=MSG, max_tokens=5)
        # ...but its spring campaign traffic is blocked by the campaign cap.
        with pytest.raises(openai.APIStatusError) as info:
            stack.client("globex-research").chat.completions.create(
                model="gpt-4o-mini", messages=MSG,
                extra_headers={"X-Costwall-Campaign": "spring"})
        assert info.value.response.json()["budget"]["scope"] == "campaign"
        # A streaming request is refused before anything streams.
        with pytest.raises(openai.APIStatusError) as info:
            stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                                   stream=True)
        assert info.value.status_code == 402
        assert len(stack.state.requests) == 1
        assert [r.tenant for r in stack.rows()] == ["globex"]
        blocked = (stack.settings.logs_dir / "budget" / "blocked-executions.md").read_text()
        assert blocked.count("| cw-") == 3 and "campaign:spring" in blocked
    finally:
        stack.close()


def test_agent_and_key_scopes(tmp_path: Path) -> None:
    stack = budget_stack(tmp_path, agents={"research": {"monthly_usd": "0"}},
                         keys={"acme-ops": {"monthly_usd": "0"}})
    try:
        for key in ("globex-research", "acme-ops"):
            with pytest.raises(openai.APIStatusError) as info:
                stack.client(key).chat.completions.create(model="gpt-4o-mini", messages=MSG)
            assert info.value.response.json()["budget"]["scope"] in ("agent", "key")
        # The agent header cannot leave the key's agent types: acme-content acting as
        # "research" is refused (403) before any budget is looked at.
        with pytest.raises(openai.PermissionDeniedError):
            stack.client().chat.completions.create(
                model="gpt-4o-mini", messages=MSG, extra_headers={"X-Costwall-Agent": "research"})
        stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=3)
        assert len(stack.rows()) == 1
    finally:
        stack.close()


def test_per_request_override(tmp_path: Path) -> None:
    stack = budget_stack(tmp_path, **{"global": {"monthly_usd": "0"}})
    try:
        with pytest.raises(openai.PermissionDeniedError) as info:
            stack.client().chat.completions.create(
                model="gpt-4o-mini", messages=MSG,
                extra_headers={"X-Costwall-Override": "please"})
        assert "not allowed to override" in info.value.response.json()["error"]["message"]
        empty = stack.request("POST", "/v1/chat/completions",
                              json={"model": "gpt-4o-mini", "messages": MSG},
                              headers={"Authorization": f"Bearer {KEYS['acme-ops']['key']}",
                                       "X-Costwall-Override": ""})
        assert empty.status == 400 and "needs a reason" in empty.json()["error"]["message"]
        resp = stack.client("acme-ops").chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MSG, max_tokens=7,
            extra_headers={"X-Costwall-Override": "incident 4711 | <b>hot</b>"})
        assert resp.parse().usage.completion_tokens == 7
        [row] = stack.rows()
        assert row.override and row.override_reason == "incident 4711 | <b>hot</b>"
        assert row.cost > 0
        log = (stack.settings.logs_dir / "budget" / "override-executions.md").read_text()
        assert "incident 4711 \\| &lt;b&gt;hot&lt;/b&gt;" in log and row.id in log
        assert "global:global" in log
        assert stack.gw.budgets.status()[0].spent == row.cost  # charged past the cap
    finally:
        stack.close()


def test_global_override_and_initial_env(tmp_path: Path) -> None:
    stack = Stack(tmp_path, env={"ALLOW_BUDGET_OVERRIDE": "true"},
                  budgets={"global": {"monthly_usd": "0"}})
    try:
        stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=2)
        [row] = stack.rows()
        assert row.override and "global override" in (row.override_reason or "")
        stack.gw.overrides.state = OverrideState(False, "incident over", "test")
        with pytest.raises(openai.APIStatusError) as info:
            stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG)
        assert info.value.status_code == 402
    finally:
        stack.close()


def test_warnings_header_and_audit_once(tmp_path: Path) -> None:
    probe = Stack(tmp_path / "probe")
    cap = cap_for(probe, 10, max_tokens=50)
    probe.close()
    stack = budget_stack(tmp_path / "run", tenants={"acme": {"monthly_usd": cap}})
    try:
        warned = []
        for _ in range(10):
            try:
                r = stack.client().chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=MSG, max_tokens=50)
            except openai.APIStatusError as exc:
                assert exc.status_code == 402
                break
            warned.append(r.headers.get("x-costwall-budget-warning"))
            remaining = Decimal(r.headers["x-costwall-budget-remaining-usd"])
            assert remaining >= 0
        assert warned[0] is None and warned[-1] is not None
        assert warned[-1].startswith("tenant:acme ") and warned[-1].endswith("%")
        stack.flush()
        warnings = [e for e in stack.gw.audit.events("warning")]
        assert len(warnings) == 1 and warnings[0]["threshold"] == "80%"
    finally:
        stack.close()


def test_clamp_near_cap(tmp_path: Path) -> None:
    probe = Stack(tmp_path / "probe")
    cap = cap_for(probe, 1, max_tokens=60)
    probe.close()
    stack = budget_stack(tmp_path / "run", near_cap="clamp",
                         tenants={"acme": {"monthly_usd": cap}})
    try:
        r = stack.client().chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MSG, max_tokens=1000)
        assert r.headers["x-costwall-clamped-max-tokens"] == "60"
        assert stack.state.requests[-1]["json"]["max_tokens"] == 60
        assert r.parse().usage.completion_tokens == 60
        assert spend(stack) <= to_pico(cap)
        # Nothing left: not even a minimal answer fits, so it is refused.
        with pytest.raises(openai.APIStatusError) as info:
            stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                                   max_completion_tokens=1000)
        assert info.value.status_code == 402
    finally:
        stack.close()


def test_clamp_without_a_limit_sets_max_completion_tokens(tmp_path: Path) -> None:
    probe = Stack(tmp_path / "probe")
    cap = cap_for(probe, 1, max_tokens=30)
    probe.close()
    stack = budget_stack(tmp_path / "run", near_cap="clamp",
                         tenants={"acme": {"monthly_usd": cap}})
    try:
        r = stack.client().chat.completions.with_raw_response.create(model="gpt-4o-mini",
                                                                      messages=MSG)
        sent = stack.state.requests[-1]["json"]
        assert sent["max_completion_tokens"] == 30 and "max_tokens" not in sent
        assert r.headers["x-costwall-clamped-max-tokens"] == "30"
    finally:
        stack.close()


def test_reject_policy_refuses_what_clamp_would_shorten(tmp_path: Path) -> None:
    probe = Stack(tmp_path / "probe")
    cap = cap_for(probe, 1, max_tokens=60)
    probe.close()
    stack = budget_stack(tmp_path / "run", tenants={"acme": {"monthly_usd": cap}})
    try:
        with pytest.raises(openai.APIStatusError) as info:
            stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                                   max_tokens=1000)
        assert info.value.status_code == 402
        stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                               max_tokens=60)
    finally:
        stack.close()


def test_month_rollover_and_restart(tmp_path: Path) -> None:
    now = [datetime(2026, 11, 30, 23, 59, 0, tzinfo=UTC)]
    probe = Stack(tmp_path / "probe")
    cap = cap_for(probe, 2, max_tokens=40)
    probe.close()
    stack = Stack(tmp_path / "run", clock=lambda: now[0],
                  budgets={"global": {"monthly_usd": cap}})
    try:
        c = stack.client()
        for _ in range(2):
            c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=40)
        with pytest.raises(openai.APIStatusError):
            c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=40)
        november = stack.gw.budgets.status("2026-11")[0].spent
        stack.restart()  # spend survives a restart exactly
        assert stack.gw.budgets.status("2026-11")[0].spent == november
        with pytest.raises(openai.APIStatusError):
            stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                                   max_tokens=40)
        now[0] = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC)  # a new month, no restart
        stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=40)
        [december] = stack.gw.budgets.status("2026-12")
        assert 0 < december.spent < november
        periods = stack.lt.run(stack.gw.ledger.periods())
        assert periods == ["2026-12", "2026-11"]
    finally:
        stack.close()


def test_month_boundaries_follow_budget_timezone(tmp_path: Path) -> None:
    now = [datetime(2026, 11, 30, 23, 30, tzinfo=UTC)]  # already December in Tokyo
    stack = Stack(tmp_path, clock=lambda: now[0], budgets={"timezone": "Asia/Tokyo"})
    try:
        stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=1)
        assert stack.lt.run(stack.gw.ledger.periods()) == ["2026-12"]
    finally:
        stack.close()


def test_audit_chain_detects_edits(tmp_path: Path) -> None:
    stack = budget_stack(tmp_path, **{"global": {"monthly_usd": "0"}})
    try:
        for _ in range(3):
            with pytest.raises(openai.APIStatusError):
                stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG)
        stack.flush()
        config = tmp_path / "costwall.yaml"
        check = [sys.executable, "-m", "gateway.cli", "check", "--audit", "--config",
                 str(config)]
        ok = subprocess.run(check, capture_output=True, text=True, cwd=ROOT)
        assert ok.returncode == 0 and "3 events, chain intact" in ok.stdout
        events = stack.settings.logs_dir / "budget" / "events.jsonl"
        lines = events.read_bytes().splitlines()
        record = orjson.loads(lines[1])
        record["estimate_usd"] = "0"
        lines[1] = orjson.dumps(record)
        events.write_bytes(b"\n".join(lines) + b"\n")
        bad = subprocess.run(check, capture_output=True, text=True, cwd=ROOT)
        assert bad.returncode == 1 and "events.jsonl line 2:" in bad.stdout  # the edited one
        for line in lines:
            assert b"Write one line" not in line and b"sk-cw-" not in line
    finally:
        stack.close()
