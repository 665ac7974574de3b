"""The rate-limit arithmetic (``gateway.ratelimit``) as plain functions of time and counts.

The documented burst bound is checked as a property: whatever the arrival times (bursts,
gaps, a clock that steps back), no 60-second span ever holds more than the limit, and a
refused request is told a wait after which it fits.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cli import main
from gateway.config import load_settings
from gateway.ratelimit import (
    BUCKETS,
    RateLimit,
    RatePlan,
    Refusal,
    Window,
    correction,
    duration_text,
    refuse,
    take,
    tightest,
)

T0 = 1_800_000_000.0  # some second in 2027


def admit_all(limit: int, times: list[float], amounts: list[int] | None = None
              ) -> list[tuple[float, int]]:
    """Feed arrivals to one window; return the admitted (time, amount)."""
    window, admitted = Window(), []
    for i, now in enumerate(times):
        amount = amounts[i] if amounts else 1
        if window.room(now, limit) >= amount:
            window.add(now, amount)
            admitted.append((now, amount))
    return admitted


def max_in_any_span(events: list[tuple[float, int]], span: float = 60.0) -> int:
    """The most counted in any closed span of ``span`` seconds."""
    events = sorted(events)
    best, start, total = 0, 0, 0
    for t, amount in events:
        total += amount
        while events[start][0] < t - span:
            total -= events[start][1]
            start += 1
        best = max(best, total)
    return best


def test_a_burst_gets_exactly_the_limit_and_the_window_slides() -> None:
    times = [T0 + 0.5 + i * 0.001 for i in range(100)]
    assert len(admit_all(60, times)) == 60
    window = Window()
    for t in times[:60]:
        window.add(t, 1)
    assert window.room(T0 + 30, 60) == 0
    assert window.wait(T0 + 30, 1, 60) == 31.0  # the bucket of T0 leaves at T0 + 61
    assert window.room(T0 + 60.99, 60) == 0  # 60 s after the burst: still inside
    assert window.room(T0 + 61, 60) == 60


def test_tokens_are_corrected_in_their_bucket_and_only_while_it_counts() -> None:
    window = Window()
    bucket = window.add(T0, 16_000)  # the bound at admission
    assert window.room(T0 + 1, 20_000) == 4_000
    window.correct(bucket, correction("tpm", 16_000, True, 40))  # the usage: 40 tokens
    assert window.room(T0 + 2, 20_000) == 19_960
    window.correct(bucket, -40)
    assert window.total == 0
    late = Window()
    b = late.add(T0, 100)
    late.advance(T0 + BUCKETS)  # the bucket left the window: nothing to correct any more
    late.correct(b, 50)
    assert late.total == 0


def test_a_clock_stepping_back_counts_in_the_newest_bucket() -> None:
    window = Window()
    window.add(T0 + 10, 1)
    assert window.add(T0 + 5, 1) == int(T0 + 10)  # never in a bucket before the newest
    assert window.room(T0, 2) == 0
    assert window.wait(T0, 1, 2) == 71.0  # counted as at T0 + 10: out at T0 + 71


def test_a_token_bound_above_the_limit_never_fits() -> None:
    window = Window()
    assert math.isinf(window.wait(T0, 2_001, 2_000))
    refusal = refuse(T0, [(("key", "k", "tpm"), 2_000, window)], [], 2_001)
    assert refusal is not None and refusal.retry_after == 60
    assert ("x-should-retry", "false") in refusal.headers()
    assert "can never fit" in refusal.message()


def test_refusal_names_the_limit_waited_for_longest() -> None:
    rpm, tpm = Window(), Window()
    rpm.add(T0, 2)
    tpm.add(T0 + 20, 900)
    needs = [(("tenant", "acme", "rpm"), 2, rpm), (("key", "k1", "tpm"), 1_000, tpm)]
    refusal = refuse(T0 + 30, needs, [((("agent", "a"), 1), 1)], 200)
    assert refusal == Refusal("key", "k1", "tpm", 1_000, 51.0, 200, 100, 51.0)
    assert refusal.message() == (
        "Rate limit reached for key 'k1': 1000 tokens per minute (tpm). This request counts "
        "up to 200 tokens (its prompt and output bound). Try again in 51s.")
    assert refusal.headers() == [
        ("Retry-After", "51"), ("retry-after-ms", "51000"),
        ("x-ratelimit-limit-tokens", "1000"), ("x-ratelimit-remaining-tokens", "100"),
        ("x-ratelimit-reset-tokens", "51s")]
    busy = refuse(T0, [], [((("agent", "research"), 8), 8)], 1)
    assert busy is not None and (busy.kind, busy.retry_after) == ("concurrent", 1)
    assert busy.message().startswith("Rate limit reached for agent 'research': 8 concurrent")
    assert refuse(T0, [], [((("agent", "research"), 8), 7)], 1) is None
    glob = refuse(T0 + 30, needs[:1], [], 1)
    assert glob is not None and glob.message().startswith(
        "Rate limit reached for tenant 'acme': 2 requests per minute (rpm).")


def test_headers_name_the_tightest_limit_of_each_kind() -> None:
    plan = RatePlan({("global", "global"): RateLimit(rpm=100),
                     ("key", "k1"): RateLimit(rpm=10, tpm=5_000)}, RateLimit(rpm=50))
    windows, slots = plan.needs("acme", "content", "k1", "bob")
    assert [w[0] for w in windows] == [("global", "global", "rpm"), ("key", "k1", "rpm"),
                                      ("key", "k1", "tpm"), ("user", "bob", "rpm")]
    assert slots == []
    assert plan.needs("acme", "content", "k1", "bob") is plan.needs("acme", "content", "k1",
                                                                     "bob")  # resolved once
    state = [(key, limit, Window()) for key, limit in windows]
    assert refuse(T0 + 0.25, state, [], 300) is None
    counted = take(T0 + 0.25, state, 300)
    assert counted[2] == (("key", "k1", "tpm"), 300, int(T0))
    assert tightest(T0 + 0.25, state) == [
        ("x-ratelimit-limit-requests", "10"), ("x-ratelimit-remaining-requests", "9"),
        ("x-ratelimit-reset-requests", "1m0.75s"),
        ("x-ratelimit-limit-tokens", "5000"), ("x-ratelimit-remaining-tokens", "4700"),
        ("x-ratelimit-reset-tokens", "1m0.75s")]


def test_campaigns_have_no_rate_limits_and_listed_users_skip_the_default() -> None:
    plan = RatePlan({("user", "alice"): RateLimit(rpm=10)}, RateLimit(rpm=30))
    assert plan.needs("t", "a", "k", "alice")[0] == [(("user", "alice", "rpm"), 10)]
    assert plan.needs("t", "a", "k", None) == ([], [])
    assert not RatePlan({}, None) and RatePlan({}, RateLimit(rpm=1))


def test_duration_text_is_openais_format() -> None:
    assert duration_text(0.0004) == "1ms"
    assert duration_text(59.9999) == "1m0s"
    assert duration_text(7 * 3600) == "7h0m0s"


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 40),
       steps=st.lists(st.tuples(st.floats(-3, 20, allow_nan=False), st.integers(1, 5)),
                      min_size=1, max_size=400))
def test_no_60_second_span_ever_holds_more_than_the_limit(
        limit: int, steps: list[tuple[float, int]]) -> None:
    """Arrivals with bursts, long gaps and a clock that may step back: the admitted amounts
    (counted at the time they were admitted, the clock as the gateway saw it made monotonic)
    never exceed the limit in any closed 60-second span."""
    now, seen, window, admitted = T0, T0, Window(), []
    for step, amount in steps:
        now += step if step > 0 else step / 3  # small backward steps: an NTP correction
        seen = max(seen, now)  # a step back counts in the newest bucket: as if at ``seen``
        if window.room(now, limit) >= amount:
            window.add(now, amount)
            admitted.append((float(int(seen)) if now < seen else now, amount))
        else:
            wait = window.wait(now, amount, limit)
            assert wait > 0
            if not math.isinf(wait):  # after the wait it fits (if nobody else came)
                later = Window(*window.dump())
                assert later.room(now + wait, limit) >= amount
    assert max_in_any_span(admitted) <= limit


@settings(max_examples=100, deadline=None)
@given(limit=st.integers(1, 30), rate=st.floats(0.2, 5.0))
def test_a_steady_client_gets_at_least_the_limit_per_61_seconds(limit: int,
                                                               rate: float) -> None:
    """The conservative window's cost: never less than ``limit`` per 61 s to a client that
    keeps asking (here for 10 minutes)."""
    times = [T0 + i / rate for i in range(int(600 * rate))]
    admitted = admit_all(limit, times)
    offered = len(times)
    assert len(admitted) >= min(offered, limit * (600 // 61))


# -- configuration ------------------------------------------------------------------------------
def test_costwall_check_lists_every_bad_rate_limit(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "costwall.yaml"
    long_user = "u" * 129
    path.write_text(f"""
rate_limits:
  global: {{rpm: 0}}
  tenant: {{acme: {{rpm: 5}}}}
  campaigns: {{launch: {{rpm: 5}}}}
  tenants:
    acme: {{rpm: -3, tpm: 1.5}}
    "bad id": {{rpm: 1}}
    beta: {{}}
    gamma: {{rmp: 4}}
    delta: 7
    eps: {{rpm: true, tpm: "lots", concurrent: 1000000000001}}
  agents: [research]
  users: {{"{long_user}": {{rpm: 1}}, " alice": {{rpm: 1}}}}
  users_default: {{concurent: 2}}
  on_store_error: maybe
""")
    assert main(["check", "--config", str(path)]) == 1
    errors = [line.removeprefix("error: ") for line in capsys.readouterr().out.splitlines()
              if line.startswith("error: ")]
    user_rule = ("an end user id is 1 to 128 printable characters without surrounding spaces")
    assert errors == [
        "rate_limits.campaigns: campaigns have no rate limits (a client chooses its campaign); "
        "limit its key, agent, tenant or end user",
        "rate_limits.tenant: unknown setting; did you mean `tenants`?",
        "rate_limits.global.rpm: must be a positive whole number, got 0 (leave it out for no "
        "limit)",
        "rate_limits.tenants.acme.rpm: must be a positive whole number, got -3 (leave it out "
        "for no limit)",
        "rate_limits.tenants.acme.tpm: expected a whole number, got 1.5",
        "rate_limits.tenants.bad id: ids use letters, digits and . _ : @ - only (at most 128)",
        "rate_limits.tenants.beta: needs at least one of rpm, tpm, concurrent (e.g. {rpm: 60})",
        "rate_limits.tenants.gamma.rmp: unknown setting; did you mean `rpm`?",
        "rate_limits.tenants.delta: expected a mapping of limits such as {rpm: 60} (kinds: "
        "rpm, tpm, concurrent)",
        "rate_limits.tenants.eps.rpm: expected a whole number, got True",
        "rate_limits.tenants.eps.tpm: expected a whole number, got 'lots'",
        "rate_limits.tenants.eps.concurrent: must be at most 1000000000000, got 1000000000001",
        "rate_limits.agents: must be a mapping of agent id to {rpm, tpm, concurrent}",
        f"rate_limits.users.{long_user}: {user_rule}",
        f"rate_limits.users. alice: {user_rule}",
        "rate_limits.users_default.concurent: unknown setting; did you mean `concurrent`?",
        "rate_limits.on_store_error: must be 'closed' or 'open', got 'maybe'",
    ]
    path.write_text("rate_limits: [rpm]\n")
    assert main(["check", "--config", str(path)]) == 1
    assert "error: rate_limits: must be a mapping (of agents, global, keys, on_store_error, " \
           "tenants, users, users_default)" in capsys.readouterr().out


def test_a_valid_rate_limits_section_loads_as_written(tmp_path: Path) -> None:
    path = tmp_path / "costwall.yaml"
    path.write_text("""
rate_limits:
  global:  {rpm: 6000}
  tenants: {acme: {rpm: 1200, tpm: 2000000}}
  agents:  {research: {rpm: 120, concurrent: 8}}
  keys:    {content-agent: {rpm: 600, tpm: 200000, concurrent: 20}}
  users:   {alice@example.com: {rpm: 10}}
  users_default: {rpm: 30}
  on_store_error: open
""")
    settings, _ = load_settings(path, {})
    config = settings.rate_limits
    assert config.on_store_error == "open"
    assert config.limits == {
        ("global", "global"): RateLimit(rpm=6000),
        ("tenant", "acme"): RateLimit(rpm=1200, tpm=2_000_000),
        ("agent", "research"): RateLimit(rpm=120, concurrent=8),
        ("key", "content-agent"): RateLimit(rpm=600, tpm=200_000, concurrent=20),
        ("user", "alice@example.com"): RateLimit(rpm=10)}
    assert config.users_default == RateLimit(rpm=30)
    assert load_settings(tmp_path / "costwall.yaml", {})[0].rate_limits.plan
    path.write_text("database: sqlite:///x.db\n")
    empty = load_settings(path, {})[0].rate_limits
    assert not empty.plan and empty.on_store_error == "closed"
