"""/metrics after real traffic through the SDK: names, types, values equal to the ledger, bounded
labels, budget gauges right after a restart, a month rollover and spend by another replica."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import DURATION_BUCKETS
from gateway.money import to_usd
from tests import pg
from tests.harness import KEYS, Stack

MESSAGES = [{"role": "user", "content": "Say something about budgets."}]
Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(stack: Stack) -> tuple[Samples, dict[str, str]]:
    """Samples by name and metric types by family name, parsed with prometheus_client."""
    stack.flush()
    resp = stack.request("GET", "/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    samples: Samples = defaultdict(list)
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(resp.body.decode()):
        types[family.name] = family.type
        for s in family.samples:
            samples[s.name].append((s.labels, s.value))
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for lab, v in samples.get(name, []) if labels.items() <= lab.items())


def usd(pico: int) -> float:
    return float(to_usd(pico))


def test_metric_names_and_types(stack: Stack) -> None:
    stack.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    _, types = scrape(stack)
    expected = {
        "costwall_requests": "counter", "costwall_spend_usd": "counter",
        "costwall_tokens": "counter", "costwall_budget_limit_usd": "gauge",
        "costwall_budget_spent_usd": "gauge", "costwall_budget_utilization_ratio": "gauge",
        "costwall_budget_reserved_usd": "gauge", "costwall_inflight_requests": "gauge",
        "costwall_override_enabled": "gauge",
        "costwall_request_duration_seconds": "histogram",
        "costwall_upstream_duration_seconds": "histogram",
    }
    assert {name: types.get(name) for name in expected} == expected


def test_values_match_ledger_with_blocked_and_override(make_stack: Any) -> None:
    # Room for ~70 small answers; a request without max_tokens reserves 16,384 output tokens
    # of gpt-4o-mini (~$0.0098) and is refused unless it carries an override.
    stack: Stack = make_stack(budgets={"global": {"monthly_usd": "0.001"}})
    content, ops = stack.client("acme-content"), stack.client("acme-ops")
    for i in range(5):
        content.chat.completions.create(model="gpt-4o-mini-2024-07-18", messages=MESSAGES,
                                        max_tokens=10 + i)
    for chunk in content.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=12, stream=True):
        assert chunk is not None
    stack.client("globex-research").embeddings.create(model="text-embedding-3-small",
                                                      input=["spend", "wisely"])
    with pytest.raises(openai.APIStatusError) as blocked:
        content.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert blocked.value.status_code == 402
    with pytest.raises(openai.APIStatusError):
        content.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                        extra_headers={"X-Costwall-Campaign": "launch"})
    override = ops.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES,
        extra_headers={"X-Costwall-Override": "incident 4711"})
    assert override.usage is not None
    stack.state.fail_status, stack.state.fail_next = 500, 1
    with pytest.raises(openai.InternalServerError):
        content.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-wrong", max_retries=0) \
            .chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        content.chat.completions.create(model="no-such-model", messages=MESSAGES)

    samples, _ = scrape(stack)
    rows = stack.rows()
    assert len(rows) == 9  # 5 + stream + embedding + override + upstream error
    outcomes = {lab["outcome"]: v for lab, v in samples["costwall_requests_total"]
                if v and lab["model"] != "-"}
    assert value(samples, "costwall_requests_total", outcome="allowed") == 7
    assert value(samples, "costwall_requests_total", outcome="blocked") == 2
    assert value(samples, "costwall_requests_total", outcome="override") == 1
    assert value(samples, "costwall_requests_total", outcome="upstream_error") == 1
    assert value(samples, "costwall_requests_total", outcome="rejected") == 2
    assert set(outcomes) == {"allowed", "blocked", "override", "upstream_error"}
    # Model labels are price-table entries: the dated snapshot counts as gpt-4o-mini.
    assert value(samples, "costwall_requests_total", outcome="allowed",
                 model="gpt-4o-mini") == 6
    assert value(samples, "costwall_requests_total", outcome="blocked", model="gpt-4o") == 1

    # Spend per (tenant, agent, model) equals the ledger's cost per group.
    want: dict[tuple[str, str, str], int] = Counter()
    for r in rows:
        want[(r.tenant, r.agent, stack.gw.prices.lookup(r.model).name)] += r.cost
    got = {(lab["tenant"], lab["agent"], lab["model"]): v
           for lab, v in samples["costwall_spend_usd_total"]}
    assert set(got) == {k for k, c in want.items() if c}
    for k, pico in want.items():
        if pico:
            assert math.isclose(got[k], usd(pico), rel_tol=1e-12), k
    assert ("acme", "ops", "gpt-4o-mini") in got  # the override was charged

    tokens: dict[tuple[str, str], int] = Counter()
    for r in rows:
        name = stack.gw.prices.lookup(r.model).name
        tokens[(name, "prompt")] += r.prompt_tokens - r.cached_tokens
        tokens[(name, "completion")] += r.completion_tokens - r.reasoning_tokens
    got_tokens = {(lab["model"], lab["kind"]): v for lab, v in samples["costwall_tokens_total"]}
    assert got_tokens == {k: v for k, v in tokens.items() if v}

    total = sum(r.cost for r in rows)
    assert total > 0
    assert value(samples, "costwall_budget_limit_usd", scope="global", id="global") == 0.001
    assert math.isclose(value(samples, "costwall_budget_spent_usd", scope="global",
                              id="global"), usd(total), rel_tol=1e-12)
    assert math.isclose(value(samples, "costwall_budget_utilization_ratio", scope="global",
                              id="global"), usd(total) / 0.001, rel_tol=1e-9)
    assert value(samples, "costwall_budget_reserved_usd", scope="global", id="global") == 0
    assert value(samples, "costwall_inflight_requests") == 0
    assert value(samples, "costwall_override_enabled") == 0

    # Every forwarded request is timed; refused ones never reached the upstream.
    chat = value(samples, "costwall_request_duration_seconds_count", endpoint="chat")
    assert chat == sum(1 for r in rows if r.endpoint == "chat")
    assert value(samples, "costwall_upstream_duration_seconds_count", endpoint="embeddings") == 1


def test_duration_buckets_resolve_fast_and_slow_requests(stack: Stack) -> None:
    # A 20 ms embedding falls between two close boundaries; a 2-minute stream between two
    # boundaries of its own order of magnitude.
    assert any(0.01 <= b <= 0.02 for b in DURATION_BUCKETS)
    assert any(0.02 < b <= 0.05 for b in DURATION_BUCKETS)
    assert any(60 <= b < 120 for b in DURATION_BUCKETS) and any(
        120 <= b <= 300 for b in DURATION_BUCKETS)
    assert max(DURATION_BUCKETS) >= 600
    stack.state.delay_s = 0.02
    stack.client().embeddings.create(model="text-embedding-3-small", input="twenty ms")
    samples, _ = scrape(stack)
    buckets = {lab["le"]: v for lab, v in samples["costwall_upstream_duration_seconds_bucket"]
               if lab["endpoint"] == "embeddings"}
    assert buckets["0.01"] == 0 and buckets["5.0"] == 1 and buckets["+Inf"] == 1


def test_labels_stay_bounded_with_1000_campaigns(make_stack: Any) -> None:
    # acme-content may name any agent type (agents: ["*"]): free-form names must still
    # never become label values.
    stack: Stack = make_stack(budgets={"campaigns": {"campaign-123": {"monthly_usd": "50"}},
                                       "tenants": {"acme": {"monthly_usd": "100"}}},
                              keys=[{"name": name, **spec, **(
                                  {"agents": ["*"]} if name == "acme-content" else {})}
                                  for name, spec in KEYS.items()])
    client = stack.async_client()

    async def one(i: int) -> None:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=2,
            extra_headers={"X-Costwall-Campaign": f"cmp-{i:04d}",
                           "X-Costwall-Agent": f"free-agent-{i % 250}",
                           "X-Costwall-Task": f"task-{i}"})

    async def run() -> None:
        sem = asyncio.Semaphore(25)

        async def guarded(i: int) -> None:
            async with sem:
                await one(i)

        await asyncio.gather(*(guarded(i) for i in range(1000)))

    asyncio.run(run())
    samples, _ = scrape(stack)
    assert len(stack.rows()) == 1000
    text = stack.request("GET", "/metrics").body.decode()
    assert "cmp-" not in text and "free-agent" not in text and "task-" not in text
    series = {name: len(v) for name, v in samples.items()}
    # Budget gauges: one series per configured scope, nothing per campaign id.
    ids = {(lab["scope"], lab["id"]) for lab, _ in samples["costwall_budget_spent_usd"]}
    assert ids == {("campaign", "campaign-123"), ("tenant", "acme")}
    assert {lab["agent"] for lab, _ in samples["costwall_spend_usd_total"]} == {"other"}
    assert series["costwall_requests_total"] == 1
    assert series["costwall_spend_usd_total"] == 1
    assert max(series.values()) <= len(DURATION_BUCKETS) + 1
    assert sum(series.values()) < 120
    assert math.isclose(value(samples, "costwall_spend_usd_total"),
                        usd(sum(r.cost for r in stack.rows())), rel_tol=1e-9)


class Clock:
    """A settable clock shared by the gateway's budget engine and ledger."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_budget_gauges_after_restart_and_month_rollover(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 3, 31, 23, 50, tzinfo=UTC))
    stack = Stack(tmp_path, clock=clock, budgets={"global": {"monthly_usd": "5"},
                                                  "tenants": {"acme": {"monthly_usd": "2"}}})
    try:
        for _ in range(3):
            stack.client().chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                   max_tokens=20)
        march = sum(r.cost for r in stack.rows())
        assert march > 0

        stack.restart()  # the new process knows only what the ledger holds
        samples, _ = scrape(stack)
        assert math.isclose(value(samples, "costwall_budget_spent_usd", scope="tenant",
                                  id="acme"), usd(march), rel_tol=1e-12)
        assert value(samples, "costwall_budget_limit_usd", scope="tenant", id="acme") == 2

        # Month rollover with no request since: the gauges show April, from zero.
        clock.now += timedelta(minutes=20)
        assert stack.gw.budgets.status() == []  # the engine has not touched April yet
        view = stack.gw.metrics.budget_view
        assert view is not None
        view.min_interval = 0
        samples, _ = scrape(stack)
        assert value(samples, "costwall_budget_spent_usd", scope="global", id="global") == 0
        assert value(samples, "costwall_budget_limit_usd", scope="global", id="global") == 5
        assert value(samples, "costwall_budget_utilization_ratio", scope="tenant",
                     id="acme") == 0

        stack.client().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=7)
        april = [r for r in stack.rows() if r.period == "2026-04"]
        assert len(april) == 1
        samples, _ = scrape(stack)
        assert math.isclose(value(samples, "costwall_budget_spent_usd", scope="global",
                                  id="global"), usd(april[0].cost), rel_tol=1e-12)
    finally:
        stack.close()


def test_budget_gauges_agree_on_replicas_sharing_postgresql(tmp_path: Path) -> None:
    pg.require()
    budgets = {"tenants": {"acme": {"monthly_usd": "10"}}, "global": {"monthly_usd": "50"}}
    with pg.temp_database() as url:
        a = Stack(tmp_path / "a", database=url, budgets=budgets)
        b = Stack(tmp_path / "b", database=url, budgets=budgets)
        try:
            for _ in range(3):
                a.client().chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                   max_tokens=20)
            b.client("acme-ops").chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                         max_tokens=9)
            b.flush()
            rows = a.rows()  # one ledger: both replicas' rows
            assert len(rows) == 4 and {r.state for r in rows} == {"settled"}
            total = sum(r.cost for r in rows)
            deadline = time.monotonic() + 10
            while True:  # replica b learns a's spend from the shared budget rows (pg_sync)
                seen = [value(scrape(s)[0], "costwall_budget_spent_usd", scope="tenant",
                              id="acme") for s in (a, b)]
                if all(math.isclose(v, usd(total), rel_tol=1e-12) for v in seen):
                    break
                assert time.monotonic() < deadline, (seen, usd(total))
                time.sleep(0.2)
            b.restart()
            samples, _ = scrape(b)
            assert math.isclose(value(samples, "costwall_budget_spent_usd", scope="global",
                                      id="global"), usd(total), rel_tol=1e-12)
        finally:
            a.close()
            b.close()


def test_metrics_still_answer_when_the_new_month_cannot_be_loaded(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 5, 31, 23, 59, tzinfo=UTC))
    stack = Stack(tmp_path, clock=clock, budgets={"tenants": {"acme": {"monthly_usd": "10"}}})
    try:
        stack.client().chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                               max_tokens=20)
        samples, _ = scrape(stack)
        assert value(samples, "costwall_budget_spent_usd", scope="tenant", id="acme") > 0
        stack.flush()
        stack.lt.run(stack.gw.ledger.close())  # the database goes away ...
        clock.now += timedelta(minutes=2)  # ... just as June starts
        view = stack.gw.metrics.budget_view
        assert view is not None
        view.min_interval = 0
        resp = stack.request("GET", "/metrics")
        assert resp.status == 200
        text = resp.body.decode()
        # No June book: the budget gauges are left out (an alert sees them absent), never
        # shown as a misleading zero; May's values are not passed off as June's.
        assert "costwall_budget_spent_usd{" not in text
        assert 'costwall_requests_total{model="gpt-4o",outcome="allowed"} 1.0' in text
    finally:
        stack.close()


def test_keys_and_agents_in_labels_are_configured_names(make_stack: Any) -> None:
    stack: Stack = make_stack(keys=[{"name": name, **spec, **(
        {"agents": ["*"]} if name == "acme-ops" else {})} for name, spec in KEYS.items()])
    stack.client("acme-ops").chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=3,
        extra_headers={"X-Costwall-Agent": "content"})  # configured agent (another key's)
    stack.client("acme-ops").chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=3,
        extra_headers={"X-Costwall-Agent": "made-up"})
    samples, _ = scrape(stack)
    agents = {lab["agent"] for lab, _ in samples["costwall_spend_usd_total"]}
    assert agents == {"content", "other"}
    text = stack.request("GET", "/metrics").body.decode()
    assert KEYS["acme-ops"]["key"] not in text and "made-up" not in text
