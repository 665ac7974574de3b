"""Alerts (SPEC "Alerts"): events recorded into a durable outbox, sent by a background task.

Recording (``Alerts.emit``) only appends to a bounded in-memory list and never raises, so the
request path pays a dict and an append. A background task stores the events in the ledger
database's outbox (one row per channel, idempotent on (event id, channel)) *before* any
attempt, then claims due rows with a lease and starts one task per attempt, each cut at
``alerts.timeout_s``: at most ``PER_CHANNEL`` per channel and ``MAX_INFLIGHT`` in all. The loop
never waits for an attempt, and a channel's claims stop at its own slots, so a hanging
receiver delays neither the storing of new events nor the other channels. The
sender has its own HTTP session and its own threads (SMTP conversations, name resolution):
a hanging receiver never holds a thread the request path uses. Failures retry with
exponential backoff and jitter until ``alerts.give_up_s`` or ``alerts.max_attempts``; then the
row stays ``failed``, visible in ``/admin/alerts``.

Event ids are stable (sha256 of the event's identity), so the same threshold crossing is one
event however many replicas see it, and ``webhook-id`` lets receivers deduplicate a resend.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import web

from gateway.config.alerts import AlertSettings, Channel, is_private_address
from gateway.store.interfaces import Outbox, OutboxRow

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger("costwall.alerts")

MAX_QUEUED = 10_000  # events waiting to be stored; beyond this new ones are dropped (logged)
MAX_INFLIGHT = 50  # attempts running at once in one replica
PER_CHANNEL = 10  # of which for one channel
THREADS = 4  # the sender's own threads: SMTP conversations and name resolution
MAX_RESPONSE_BYTES = 64 * 1024  # read of a receiver's answer
MAX_BACKOFF_S = 3600.0


def event_id(event_type: str, *parts: object) -> str:
    """A stable id: the same event identity always gives the same id."""
    digest = hashlib.sha256("|".join([event_type, *map(str, parts)]).encode()).hexdigest()
    return f"evt_{digest[:32]}"


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks ``webhook-signature`` value."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def backoff(attempts: int, base_s: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt: exponential from ``base_s``, capped, ±25 % jitter."""
    delay = min(MAX_BACKOFF_S, base_s * 2 ** max(0, attempts - 1))
    return float(delay * (0.75 + rng() * 0.5))


async def resolves_private(host: str, executor: Executor | None = None) -> bool:
    """True when ``host`` is, or resolves to, a loopback or private address (resolved in
    ``executor``'s threads: a hanging DNS server must not hold the loop's default ones)."""
    if is_private_address(host):
        return True
    try:
        infos = await asyncio.get_running_loop().run_in_executor(
            executor, socket.getaddrinfo, host, None)
    except OSError:
        return False  # the attempt itself then fails and is retried
    return any(is_private_address(str(info[4][0])) for info in infos)


class Retry(Exception):
    """A failed attempt worth retrying (timeout, connection error, 5xx, 408, 429)."""


class Refused(Exception):
    """A failed attempt not worth retrying (3xx, other 4xx, a forbidden target)."""


def slack_message(event: dict[str, Any], admin_url: str) -> dict[str, Any]:
    """An incoming-webhook message: ``text`` plus blocks naming scope, window, spent/limit."""
    data = event.get("data") or {}
    lines = [f"*{event['type']}*"]
    if "scope" in data:
        lines.append(f"Scope: `{data['scope']}:{data.get('id', '')}` · window "
                     f"{data.get('window', 'monthly')} {data.get('period', '')}")
    if "limit_usd" in data:
        lines.append(f"Spent ${data.get('spent_usd', '?')} of ${data['limit_usd']}"
                     + (f" ({data['threshold']})" if data.get("threshold") else ""))
    if data.get("projected_usd"):
        lines.append(f"Projected ${data['projected_usd']}")
    text = " · ".join(lines)
    # The event id in the context line: a resend after a crash shows the same id (Slack
    # itself cannot deduplicate, so readers can) and it matches the admin page's row.
    context = [{"type": "mrkdwn", "text": f"event `{event.get('id', '')}`"}]
    if admin_url:
        context.append({"type": "mrkdwn", "text": f"<{admin_url}|costwall admin>"})
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)}},
        {"type": "context", "elements": context}]
    return {"text": text, "blocks": blocks}


class Alerts:
    """The alerts of one gateway: the queue of recorded events and the sender task."""

    def __init__(self, settings: AlertSettings, outbox: Outbox, counter: Counter | None = None,
                 clock: Callable[[], float] = time.time, admin_url: str = ""):
        self.settings = settings
        self.outbox = outbox
        self.counter = counter
        self.clock = clock
        self.admin_url = admin_url
        self.backoff_s = settings.retry_s
        self.poll_s = 1.0
        self.timeout_s = settings.timeout_s
        self.lease_s = settings.lease_s
        self.max_attempts = settings.max_attempts
        self.give_up_s = settings.give_up_s
        self.max_inflight = MAX_INFLIGHT
        self.per_channel = PER_CHANNEL
        # ``invoices.email_to``: an email channel that receives ``invoice.issued`` only, with
        # the invoice files attached (``attachments``, set by ``admin.invoice_auto``).
        self.invoice_mail: Channel | None = None
        self.attachments: Callable[[dict[str, Any]],
                                   Awaitable[list[tuple[str, bytes, str]]]] | None = None
        # Once at start: events recorded before a crash but never stored, recorded again
        # (``Gateway.catch_up_crossings``; stable ids make it a no-op for stored ones).
        self.catch_up: Callable[[], Awaitable[object]] | None = None
        self._queued: list[OutboxRow] = []
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: dict[asyncio.Task[None], str] = {}  # attempt → its channel
        self._full = False  # claims stopped at a limit: a finished attempt wakes the loop
        self._swept = False
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return bool(self.settings.channels) or self.invoice_mail is not None

    def channels(self) -> list[Channel]:
        """Every channel the sender delivers to (``invoices.email_to`` included)."""
        extra = [self.invoice_mail] if self.invoice_mail is not None else []
        return [*self.settings.channels, *extra]

    def channel(self, name: str) -> Channel | None:
        if self.invoice_mail is not None and name == self.invoice_mail.name:
            return self.invoice_mail
        return self.settings.channel(name)

    # -- recording (any thread of control; never blocks, never raises) -----------------------
    def emit(self, event_type: str, ident: str, data: dict[str, Any],
             only: Channel | None = None) -> None:
        """Record an event for the channels its rules route it to (``only``: one channel)."""
        try:
            channels = [only] if only is not None else self.settings.routes(event_type)
            if event_type == "invoice.issued" and self.invoice_mail is not None and \
                    only is None:
                channels.append(self.invoice_mail)
            if not channels:
                return
            now = self.clock()
            body = orjson.dumps({"type": event_type, "id": ident,
                                 "timestamp": datetime.fromtimestamp(now, UTC).isoformat(
                                     timespec="seconds").replace("+00:00", "Z"),
                                 "data": data}).decode()
            for channel in channels:
                if len(self._queued) >= MAX_QUEUED:
                    self.dropped += 1
                    log.error("alerts: queue full, event %s dropped", ident)
                    continue
                self._queued.append(OutboxRow(ident, channel.name, event_type, body, now,
                                              next_at=now))
            self._wake.set()
        except Exception as exc:  # never into a request
            log.error("alerts: could not record %s: %s", event_type, type(exc).__name__)

    def emit_event(self, event: dict[str, Any]) -> None:
        """Record a prepared ``{"type", "id", "data"}`` (forecast, invoices)."""
        self.emit(str(event["type"]), str(event["id"]), dict(event.get("data") or {}))

    # -- the sender --------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None and self.enabled:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_inflight))
            self._executor = ThreadPoolExecutor(THREADS, thread_name_prefix="costwall-alerts")
            self._task = asyncio.create_task(self._run(), name="costwall-alerts")

    async def close(self) -> None:
        """Store what is queued, give running attempts a moment, then stop. An attempt cut
        here keeps its lease: after ``lease_s`` a replica sends it again (same id)."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.store(), 5)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=min(2.0, self.timeout_s))
            for task in list(self._inflight):
                task.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def store(self) -> None:
        """Move queued events into the outbox (kept queued if the database fails)."""
        if not self._queued:
            return
        batch, self._queued = self._queued, []
        try:
            await self.outbox.outbox_add(batch)
        except Exception:
            self._queued[:0] = batch
            raise

    async def _run(self) -> None:
        while True:
            try:
                await self.store()
                await self.dispatch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("alerts: outbox unavailable: %s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()

    async def dispatch(self) -> int:
        """For each channel, claim as many due rows as it has free slots and start an attempt
        for each (not awaited); return how many were started."""
        names = [c.name for c in self.channels()]
        if not self._swept:  # rows of a channel removed from the config: failed, visibly
            await self.outbox.outbox_abandon(tuple(names), "channel no longer configured")
            if self.catch_up is not None:
                await self.catch_up()
                await self.store()
            self._swept = True
        self._full = False
        busy = dict.fromkeys(names, 0)
        for name in self._inflight.values():
            busy[name] = busy.get(name, 0) + 1
        started = 0
        for name in names:
            free = min(self.max_inflight - len(self._inflight), self.per_channel - busy[name])
            if free <= 0:
                self._full = True
                continue
            rows = await self.outbox.outbox_claim(self.clock(), self.lease_s, free, name)
            for row in rows:
                task = asyncio.create_task(self._attempt(row), name="costwall-alert-attempt")
                self._inflight[task] = name
                task.add_done_callback(self._finished)
            self._full |= len(rows) == free
            started += len(rows)
        return started

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        if self._full:  # claims stopped at a limit: more may be due
            self._full = False
            self._wake.set()

    async def _attempt(self, row: OutboxRow) -> None:
        channel = self.channel(row.channel)
        error: str | None
        try:
            if channel is None:
                raise Refused("channel no longer configured")
            # The whole attempt (name resolution, connection, answer; the SMTP conversation)
            # ends within timeout_s, well inside the lease (lease_s >= 2 x timeout_s).
            await asyncio.wait_for(self.deliver(channel, row), self.timeout_s)
            status, error, next_at = "sent", None, 0.0
        except Refused as exc:
            status, error, next_at = "failed", str(exc)[:300], 0.0
        except Exception as exc:
            error = (str(exc) if isinstance(exc, Retry) else type(exc).__name__)[:300]
            now = self.clock()
            if row.attempts >= self.max_attempts or now - row.created_at >= self.give_up_s:
                status, next_at = "failed", 0.0
            else:
                status, next_at = "pending", now + backoff(row.attempts, self.backoff_s)
        outcome = {"sent": "sent", "failed": "failed"}.get(status, "retry")
        if self.counter is not None:
            self.counter.labels(row.channel, row.type, outcome).inc()
        if status != "sent":
            log.warning("alerts: %s to channel %s, attempt %d: %s", row.type, row.channel,
                        row.attempts, error)
        try:
            await self.outbox.outbox_finish(row.event_id, row.channel, status, next_at, error,
                                            self.clock())
        except Exception as exc:  # the lease then expires and the row is tried again
            log.warning("alerts: could not record the attempt: %s", type(exc).__name__)

    async def deliver(self, channel: Channel, row: OutboxRow) -> None:
        """One attempt; raises ``Retry`` or ``Refused`` (or a network error) when it fails."""
        if channel.type == "email":
            from gateway.alerts_email import send_email

            event = orjson.loads(row.body)
            files = (await self.attachments(event)
                     if self.attachments is not None and row.type == "invoice.issued" else [])
            await send_email(self.settings.smtp, channel, event, self.timeout_s, files,
                             self._executor)
            return
        if not channel.url:
            raise Refused("no URL (its environment variable is not set)")
        host = urlsplit(channel.url).hostname or ""
        if not self.settings.allow_private_targets and \
                await resolves_private(host, self._executor):
            raise Refused("target is a private or loopback address")
        body = row.body.encode()
        headers = {"content-type": "application/json", "user-agent": "costwall-alerts"}
        if channel.type == "slack":
            body = orjson.dumps(slack_message(orjson.loads(body), self.admin_url))
        else:
            ts = int(self.clock())
            headers |= {"webhook-id": row.event_id, "webhook-timestamp": str(ts)}
            if channel.secret:
                headers["webhook-signature"] = sign(channel.secret, row.event_id, ts, body)
        assert self._session is not None
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s,
                                            connect=min(5.0, self.timeout_s))
            async with self._session.post(channel.url, data=body, headers=headers,
                                          allow_redirects=False, timeout=timeout) as resp:
                await resp.content.read(MAX_RESPONSE_BYTES)
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Retry(type(exc).__name__) from None
        if 200 <= status < 300:
            return
        if status >= 500 or status in (408, 429):
            raise Retry(f"HTTP {status}")
        raise Refused(f"HTTP {status}")

    async def deliveries(self, limit: int = 200) -> list[OutboxRow]:
        await self.store()
        return await self.outbox.outbox_list(limit)


ALERTS = web.AppKey("alerts", Alerts)


def alerts_ctx(alerts: Alerts) -> Callable[[web.Application], AsyncIterator[None]]:
    """The ``cleanup_ctx`` that runs the sender while the app runs."""

    async def run(_app: web.Application) -> AsyncIterator[None]:
        await alerts.start()
        yield
        await alerts.close()

    return run
