"""The JSON admin API under ``/admin/api/``: the same operations as the pages, for scripts.

Bearer tokens only (``Authorization: Bearer <admin or finance token>``); finance may read.
Money comes in as a decimal string or a JSON number read exactly (``12.5`` is parsed as
``Decimal('12.5')``, never a float) and goes out as a decimal string.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from admin import ops, validate
from admin.auth import principal, requires
from admin.errors import BadInput, Missing, TooLarge
from gateway import rates
from gateway.money import format_usd
from gateway.services import GATEWAY

MAX_BODY = 64 * 1024


def reply(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, floats kept exact; 4xx for anything else."""
    if (request.content_length or 0) > MAX_BODY:
        raise TooLarge(f"Admin API bodies are at most {MAX_BODY} bytes.")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise TooLarge(f"Admin API bodies are at most {MAX_BODY} bytes.")
    try:
        data = json.loads(raw.decode("utf-8"), parse_float=Decimal,
                          parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError):
        raise BadInput("The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadInput("The body must be a JSON object.", code="invalid_json")
    return data


# -- budget and override ---------------------------------------------------------------------
@requires("read")
async def get_budget(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    period, scopes = await ops.scopes(gw)
    return reply({"period": period, "scopes": [s.as_json() for s in scopes],
                  "warn_at": [str(w) for w in gw.budgets.warn_at],
                  "override": ops.override_json(gw.overrides.state),
                  "rate_limits": rates.describe(gw.rates)})


@requires("write")
async def post_override(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body = await read_json(request)
    enabled = validate.flag(body.get("enabled"), "enabled")
    state = await ops.set_override(gw, enabled, body.get("reason"), principal(request).actor)
    return reply({"override": ops.override_json(state)})


@requires("write")
async def put_budget(request: web.Request) -> web.Response:
    """Set, change or (null) remove any of a scope's windows: ``{"daily_usd": "40"}``.

    The answer is the scope's first changed window that still has a cap (the same fields
    as a ``GET budget`` scope) plus ``windows``, every window the scope now has."""
    gw = request.app[GATEWAY]
    key = ops.cap_key(request.match_info["scope"], request.match_info["id"])
    body = await read_json(request)
    changes = validate.caps(body)
    reason = validate.reason(body.get("reason"), required=False)
    await ops.set_caps(gw, key, changes, principal(request).actor, reason)
    _, scopes = await ops.scopes(gw)
    windows = [s for s in scopes if (s.status.scope, s.status.id) == key]
    first = next((s for s in windows if s.status.window in changes), None)
    out = first.as_json() if first else {"scope": key[0], "id": key[1]}
    return reply({**out, "windows": [s.as_json() for s in windows]})


@requires("write")
async def delete_budget(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    key = ops.cap_key(request.match_info["scope"], request.match_info["id"])
    await ops.remove_cap(gw, key, principal(request).actor)
    return reply({"scope": key[0], "id": key[1], "removed": True})


# -- usage and logs --------------------------------------------------------------------------
@requires("read")
async def get_usage(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    q = request.query
    month = validate.month(q.get("month"), gw.budgets.current_period())
    group_by = validate.group_by(q.get("group_by", "tenant"))
    tenant = validate.tenant(q.get("tenant"))
    rows = await ops.usage(gw, month, group_by, tenant)
    return reply({"month": month, "group_by": group_by, "tenant": tenant,
                  "total_usd": format_usd(sum(r.cost for r in rows)),
                  "requests": sum(r.requests for r in rows),
                  "rows": [ops.usage_json(r) for r in rows]})


@requires("read")
async def get_logs(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    kind = request.match_info["kind"]
    if kind not in validate.LOG_KINDS:
        raise Missing(f"Unknown log {kind[:40]!r}; expected one of "
                      f"{', '.join(validate.LOG_KINDS)}.")
    q = request.query
    page = await ops.events(
        gw, (kind,), scope=q.get("scope") or None, date=validate.log_filter_date(q.get("date")),
        offset=validate.bounded_int(q.get("offset"), "offset", 0, 0, 10**9),
        limit=validate.bounded_int(q.get("limit"), "limit", 100, 1, 1000))
    return reply({"kind": kind, "total": page.total, "offset": page.offset,
                  "limit": page.limit, "events": page.events})


# -- keys ------------------------------------------------------------------------------------
@requires("read")
async def get_keys(request: web.Request) -> web.Response:
    return reply({"keys": [k.as_json() for k in await ops.keys(request.app[GATEWAY])]})


@requires("write")
async def post_key(request: web.Request) -> web.Response:
    body = await read_json(request)
    can_override = validate.flag(body.get("can_override", False), "can_override")
    view, secret = await ops.create_key(request.app[GATEWAY], body.get("name"),
                                        body.get("tenant"), body.get("agent") or "default",
                                        can_override, principal(request).actor,
                                        body.get("agents"))
    return reply({**view.as_json(), "key": secret,
                  "note": "Store this key now: it is not shown again."}, status=201)


@requires("write")
async def delete_key(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await ops.revoke_key(request.app[GATEWAY], name, principal(request).actor)
    return reply({"name": name, "revoked": True})


def setup_api(app: web.Application) -> None:
    """Routes of the JSON API: ``/admin/api/...`` (paths relative to the admin mount)."""
    r = app.router
    r.add_get("/api/budget", get_budget)
    r.add_post("/api/override", post_override)
    r.add_put("/api/budgets/{scope}/{id}", put_budget)
    r.add_delete("/api/budgets/{scope}/{id}", delete_budget)
    r.add_get("/api/usage", get_usage)
    r.add_get("/api/logs/{kind}", get_logs)
    r.add_get("/api/keys", get_keys)
    r.add_post("/api/keys", post_key)
    r.add_delete("/api/keys/{name}", delete_key)
    from admin.alerts_api import get_alerts, post_alert_test

    r.add_get("/api/alerts", get_alerts)
    r.add_post("/api/alerts/test", post_alert_test)
