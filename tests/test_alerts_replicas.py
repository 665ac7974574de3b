"""Alerts across two real ``costwall serve`` processes on one PostgreSQL database, with the
replica that is delivering killed with ``kill -9`` in the middle of its delivery.

Real everything: the OpenAI SDK drives a tenant past its 80 % threshold, the webhook receiver
verifies Standard Webhooks signatures (``tests.test_alerts.verify``), a Slack-like receiver
takes the Slack message and aiosmtpd the email. The webhook receiver holds the first request
open; the test finds which process sent it (the sender's port, looked up in /proc), waits
until that process has finished the Slack and email deliveries, kills it, and then lets the
held request go (its sender is gone, so it is never acknowledged). The other replica must
take the delivery over once the dead one's lease has expired, with the same ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest

from gateway.fake_upstream import FakeUpstreamState, start_fake_upstream
from tests import pg
from tests.harness import KEYS, LoopThread, ServeProcess, http_request, test_env, write_config
from tests.test_alerts import SECRET, Mailbox, Receiver, smtp  # noqa: F401 - a fixture
from tests.test_replicas import MAX_TOKENS, cap_for, message

TIMEOUT_S, LEASE_S = 4.0, 8.0  # an attempt is cut at 4 s; a dead sender's claim lasts 8 s


def socket_owner(local_port: int, remote_port: int, pids: list[int]) -> int | None:
    """The pid among ``pids`` holding the IPv4 TCP connection 127.0.0.1:local_port →
    127.0.0.1:remote_port (from /proc/net/tcp and /proc/<pid>/fd)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1].split(":"), fields[2].split(":")
        if int(local[1], 16) == local_port and int(remote[1], 16) == remote_port:
            inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def receivers() -> Iterator[tuple[Receiver, Receiver]]:
    hook, slack = Receiver(), Receiver()
    yield hook, slack
    hook.release()
    hook.close()
    slack.close()


def outbox(url: str) -> dict[str, tuple[str, int, str]]:
    """channel → (status, attempts, event id) of the outbox's rows."""

    async def run() -> list[Any]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(
                "SELECT channel, status, attempts, event_id FROM alert_outbox"))
        finally:
            await conn.close()

    return {r["channel"]: (r["status"], r["attempts"], r["event_id"])
            for r in asyncio.run(run())}


def test_kill9_of_the_delivering_replica_the_other_delivers_once_after_the_lease(
        tmp_path: Path, receivers: tuple[Receiver, Receiver],
        smtp: tuple[Mailbox, int]) -> None:  # noqa: F811 - the fixture
    pg.require()
    hook, slack = receivers
    hook.hold_first = True
    box, smtp_port = smtp
    lt = LoopThread()
    upstream_runner, upstream, _ = lt.run(start_fake_upstream(state=FakeUpstreamState()))
    alerts = {
        "allow_private_targets": True, "timeout_s": TIMEOUT_S, "lease_s": LEASE_S,
        "retry_s": 0.2,
        "smtp": {"host": "127.0.0.1", "port": smtp_port, "from": "costwall@example.com"},
        "channels": [
            {"name": "ops", "type": "webhook", "url": hook.url,
             "secret_env": "TEST_WEBHOOK_SECRET"},
            {"name": "chat", "type": "slack", "url_env": "TEST_SLACK_URL"},
            {"name": "mail", "type": "email", "to": ["finance@example.com"]}],
        "rules": [{"events": ["budget.threshold"], "channels": ["ops", "chat", "mail"]}]}
    env = test_env(TEST_WEBHOOK_SECRET=SECRET, TEST_SLACK_URL=slack.url)
    replicas: list[ServeProcess] = []
    with pg.temp_database() as url:
        try:
            for name in ("a", "b"):
                (tmp_path / name).mkdir()
                config = write_config(
                    tmp_path / name, upstream, database=url, alerts=alerts,
                    budgets={"timezone": "UTC", "warn_at": ["0.8"], "near_cap": "reject",
                             "tenants": {"acme": {"monthly_usd": str(cap_for(10))}}},
                    ledger={"pool_size": 3}, logging={"level": "ERROR"})
                replicas.append(ServeProcess(config, env))
            for r in replicas:
                r.start()
            pids = [r.proc.pid for r in replicas if r.proc is not None]

            # Real traffic on both replicas until the 80 % crossing reaches the receiver.
            clients = [openai.OpenAI(base_url=f"{r.url}/v1", api_key=KEYS["acme-content"]["key"],
                                     max_retries=0, timeout=30) for r in replicas]
            for i in range(40):
                try:
                    clients[i % 2].chat.completions.create(
                        model="gpt-4o-mini", messages=message(i), max_tokens=MAX_TOKENS)
                except openai.APIStatusError as exc:
                    assert exc.status_code == 402
                deadline = time.monotonic() + 0.3
                while not hook.arrivals and time.monotonic() < deadline:
                    time.sleep(0.02)
                if hook.arrivals:
                    break
            until(lambda: hook.arrivals, 5, "the threshold webhook")
            first = hook.arrivals[0]
            sender = socket_owner(first["port"], hook.port, pids)
            assert sender is not None, "the held webhook came from neither replica"
            dying = next(r for r in replicas if r.proc is not None and r.proc.pid == sender)
            survivor = next(r for r in replicas if r is not dying)

            # The Slack message and the email are done (acknowledged and recorded as sent);
            # the webhook is still in the air: kill -9 its sender now.
            until(lambda: slack.received and box.messages, 5, "the Slack message and email")
            until(lambda: {c: s[0] for c, s in outbox(url).items()}
                  == {"ops": "pending", "chat": "sent", "mail": "sent"}, 3,
                  "the Slack and email rows to be recorded as sent")
            assert time.monotonic() - first["at"] < TIMEOUT_S, "the attempt is still going"
            dying.kill9()
            killed_at = time.monotonic()
            hook.release()

            until(lambda: len(hook.received) == 1, LEASE_S + 10,
                  "the surviving replica's delivery")
            second = hook.arrivals[-1]
            assert second["at"] - first["at"] >= LEASE_S - 0.5, "taken over before the lease"
            assert survivor.proc is not None  # (the killed one is gone: nobody else could)
            assert socket_owner(second["port"], hook.port, pids) == survivor.proc.pid
            time.sleep(1.0)  # anything more would arrive now

            # The receiver: two signed attempts of one event (the same webhook-id, so
            # deduplicable), one acknowledged; Slack and email: exactly one each.
            assert [a["verified"] for a in hook.arrivals] == [True, True]
            ids = {a["id"] for a in hook.arrivals}
            [event] = hook.received
            assert ids == {event["id"]} == {event["headers"]["webhook-id"]}
            assert event["type"] == "budget.threshold"
            data = event["data"]
            assert (data["scope"], data["id"], data["threshold"]) == ("tenant", "acme", "0.8")
            [slack_message] = slack.received
            assert "webhook-signature" not in slack_message["headers"]
            assert "tenant:acme" in slack_message["text"] and event["id"] in str(
                slack_message["blocks"])
            [(rcpt, mail)] = box.messages
            assert rcpt == ["finance@example.com"] and "budget.threshold" in mail["Subject"]
            assert mail["Message-ID"] == f"<{event['id']}@costwall>"
            rows = outbox(url)
            assert rows == {"ops": ("sent", 2, event["id"]), "chat": ("sent", 1, event["id"]),
                            "mail": ("sent", 1, event["id"])}
            metrics = http_request("GET", f"{survivor.url}/metrics").body.decode()
            assert 'costwall_alerts_total{channel="ops",outcome="sent",' \
                'type="budget.threshold"} 1.0' in metrics
            print(f"\nkill -9 mid-delivery: killed {killed_at - first['at']:.2f} s after the "
                  f"attempt began; the survivor delivered {second['at'] - first['at']:.2f} s "
                  f"after it (lease {LEASE_S:g} s); webhook attempts 2, received once")
        finally:
            for r in replicas:
                if r.proc is not None and r.proc.poll() is None:
                    r.terminate()
                if r.proc is not None and r.proc.stderr is not None:
                    r.proc.stderr.close()
            lt.run(upstream_runner.cleanup())
            lt.stop()
