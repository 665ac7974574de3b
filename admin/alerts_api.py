"""Alerts in the admin: deliveries and channels (``GET /admin/api/alerts``) and a test event
(``POST /admin/api/alerts/test``). Channel URLs and secrets are never shown: a host only."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from aiohttp import web

from admin.auth import principal, requires
from admin.errors import BadInput, Missing
from gateway.alerts import event_id
from gateway.services import GATEWAY, Gateway
from gateway.store.interfaces import OutboxRow


def _iso(value: float | None) -> str | None:
    if value is None or value <= 0:
        return None
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def about(body: str) -> str:
    """What an event is about, in a few words: ``tenant:acme · 80 % · 2026-11``."""
    try:
        data = orjson.loads(body).get("data") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    parts = [f"{data['scope']}:{data.get('id', '')}"] if data.get("scope") else []
    try:
        if data.get("threshold"):
            parts.append(f"{float(Decimal(str(data['threshold']))) * 100:g} %")
    except (InvalidOperation, ValueError):
        pass
    if data.get("period"):
        parts.append(str(data["period"]))
    return " · ".join(parts)


def delivery_json(row: OutboxRow) -> dict[str, Any]:
    return {"event": row.event_id, "type": row.type, "about": about(row.body),
            "channel": row.channel,
            "status": row.status, "attempts": row.attempts, "last_error": row.last_error,
            "created_at": _iso(row.created_at), "sent_at": _iso(row.sent_at),
            "next_attempt_at": _iso(row.next_at) if row.status == "pending" else None}


async def overview(gw: Gateway, limit: int = 200) -> dict[str, Any]:
    """Channels (type, host, last delivery) and the most recent deliveries."""
    alerts = gw.alerts
    if alerts is None or not alerts.enabled:
        return {"channels": [], "deliveries": []}
    rows = await alerts.deliveries(limit)
    channels = []
    for c in alerts.settings.channels:
        # The latest attempt's outcome: sent, failed, or pending after a failed attempt.
        last = next((r for r in rows if r.channel == c.name and r.attempts > 0), None)
        channels.append({"name": c.name, "type": c.type, "target": c.host,
                         "last_delivery": delivery_json(last) if last else None})
    return {"channels": channels, "deliveries": [delivery_json(r) for r in rows]}


def send_test(gw: Gateway, name: object, actor: str) -> str:
    """Record an ``alert.test`` for one channel; return its event id."""
    if not isinstance(name, str) or not name:
        raise BadInput("`channel` must be the name of a configured alert channel.",
                       param="channel")
    channel = gw.alerts.settings.channel(name) if gw.alerts is not None else None
    if gw.alerts is None or channel is None:
        raise Missing(f"There is no alert channel named {name[:100]!r}.")
    ident = event_id("alert.test", name, secrets.token_hex(8))
    gw.alerts.emit("alert.test", ident, {"channel": name, "actor": actor,
                                         "message": "costwall test alert"}, only=channel)
    return ident


@requires("read")
async def get_alerts(request: web.Request) -> web.Response:
    from admin.api import reply

    return reply(await overview(request.app[GATEWAY]))


@requires("write")
async def post_alert_test(request: web.Request) -> web.Response:
    from admin.api import read_json, reply

    body = await read_json(request)
    ident = send_test(request.app[GATEWAY], body.get("channel"), principal(request).actor)
    return reply({"queued": True, "id": ident}, status=202)
