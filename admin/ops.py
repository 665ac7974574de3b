"""What admins can see and change, shared by the web pages and the JSON API.

Each change is persisted in the ledger together with its audit event (who did it and why) in
one transaction, so a change is never applied without its record nor recorded without being
applied; only then does it take effect in the running gateway (budget engine, key ring,
override switch). Views only parse input and present results.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC
from decimal import Decimal
from typing import Any, TypeVar

from admin import validate
from admin.errors import BadInput, Conflict, Missing
from gateway.alerts import event_id
from gateway.budget import ScopeKey, ScopeStatus, WarnRule
from gateway.config import hash_key
from gateway.errors import ServiceUnavailable, iso_utc
from gateway.ledger import KeyRecord, UsageRow
from gateway.money import format_usd
from gateway.services import OVERRIDE_SETTING, Gateway, OverrideState
from gateway.windows import WINDOWS

SECRET_PREFIX = "sk-cw-"
log = logging.getLogger("costwall.admin")
T = TypeVar("T")
FLUSH_TIMEOUT_S = 10.0  # a ledger that cannot flush this fast is unavailable: 503, nothing applied


async def _commit(gw: Gateway, write: Awaitable[T]) -> T:
    """Await a ledger write that carries its audit event; a failure applies nothing.

    The audit events of requests queued before this change are flushed first, so the trail
    lists them before the change (it commits at once, ahead of the request writer's batches).
    """
    try:
        await asyncio.wait_for(gw.ledger.flush(), FLUSH_TIMEOUT_S)
        result = await write
    except Exception as exc:
        if inspect.iscoroutine(write):
            write.close()  # not started when the flush failed: nothing to apply
        log.error("admin change not applied: the ledger write failed: %s", type(exc).__name__)
        raise ServiceUnavailable(
            "The change was not applied: costwall could not store it together with its audit "
            "record (the ledger database is unavailable). Try again.",
            code="ledger_unavailable") from None
    gw.audit.wake()
    return result


# -- reading ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ScopeView:
    """One limited scope in the current period of one of its windows, with where its limit
    comes from."""

    status: ScopeStatus
    source: str  # "config" or "admin"
    level: str   # "ok", "warn" (past the first warn_at threshold) or "over" (at the cap)
    # pico-USD charged beyond reservations this month and how many requests did (an upstream
    # billed past the admission bound; see gateway.proxy.settle)
    overshoot: tuple[int, int] = (0, 0)

    @property
    def percent(self) -> Decimal:
        return (self.status.utilization * 100).quantize(Decimal("0.1"))

    @property
    def bar(self) -> Decimal:
        """Bar width in percent, 0..100."""
        return min(self.percent, Decimal(100))

    def as_json(self) -> dict[str, Any]:
        s = self.status
        limit, spent, reserved = format_usd(s.limit), format_usd(s.spent), format_usd(s.reserved)
        # SPEC names the fields limit/spent/reserved/utilization; the _usd names match the
        # 402 body's budget object. Both are kept so scripts written either way work.
        return {"scope": s.scope, "id": s.id, "window": s.window, "period": s.period,
                "resets_at": iso_utc(s.resets_at) if s.resets_at is not None else None,
                "limit_usd": limit, "spent_usd": spent,
                "reserved_usd": reserved, "limit": limit, "spent": spent, "reserved": reserved,
                "utilization": str(s.utilization.quantize(Decimal("0.000001"))),
                "source": self.source, "level": self.level,
                "overshoot_usd": format_usd(self.overshoot[0]),
                "overshoot_requests": self.overshoot[1]}


AT_CAP = Decimal("0.98")


def level(status: ScopeStatus, rule: WarnRule) -> str:
    """``over`` at the cap (98% spent or reserved: little fits any more), ``warn`` past the
    first warn_at threshold (the budgets' own rule), else ``ok``."""
    if status.spent + status.reserved >= AT_CAP * status.limit:
        return "over"
    if rule.warns(status.spent, status.limit):
        return "warn"
    return "ok"


SCOPE_ORDER = {"global": 0, "tenant": 1, "agent": 2, "campaign": 3, "key": 4, "user": 5}
WINDOW_ORDER = {w: i for i, w in enumerate(WINDOWS)}


async def scopes(gw: Gateway) -> tuple[str, list[ScopeView]]:
    """This month's period and every limited scope in the current period of each of its
    windows: global first, each scope's windows longest first. Overshoot is counted per
    month, so it shows on the monthly rows."""
    period = gw.budgets.current_period()
    await gw.budgets.load_current()
    admin_caps = await gw.ledger.caps()
    over = await gw.ledger.overshoot(period)
    views = [
        ScopeView(s, "admin" if s.window in admin_caps.get((s.scope, s.id), {}) else "config",
                  level(s, gw.budgets.rule),
                  over.get((s.scope, s.id), (0, 0)) if s.window == "monthly" else (0, 0))
        for s in gw.budgets.status()
    ]
    views.sort(key=lambda v: (SCOPE_ORDER.get(v.status.scope, 9), v.status.id,
                              WINDOW_ORDER.get(v.status.window, 9)))
    return period, views


def override_json(state: OverrideState) -> dict[str, Any]:
    return {"enabled": state.enabled, "reason": state.reason, "actor": state.actor,
            "changed_at": state.changed_at}


async def usage(gw: Gateway, period: str, group_by: str,
                tenant: str | None = None) -> list[UsageRow]:
    """A month's usage grouped one way, most expensive first."""
    rows = await gw.ledger.usage(period, group_by, tenant)
    if group_by == "day":
        return rows
    return sorted(rows, key=lambda r: (-r.cost, r.group))


def usage_json(row: UsageRow) -> dict[str, Any]:
    return {"group": row.group, "requests": row.requests, "prompt_tokens": row.prompt_tokens,
            "cached_tokens": row.cached_tokens, "completion_tokens": row.completion_tokens,
            "reasoning_tokens": row.reasoning_tokens, "cost_usd": format_usd(row.cost),
            "overrides": row.overrides}


@dataclass(frozen=True, slots=True)
class LogPage:
    events: list[dict[str, Any]]
    total: int
    offset: int
    limit: int


async def events(gw: Gateway, kinds: Iterable[str], *, scope: str | None = None,
                 date: str | None = None, offset: int = 0, limit: int = 100) -> LogPage:
    """Audit events of ``kinds``, newest first, filtered by scope text and day/month."""
    wanted = set(kinds)

    def read() -> list[dict[str, Any]]:
        out = []
        for event in gw.audit.events():
            if event.get("kind") not in wanted:
                continue
            if date and not str(event.get("time", "")).startswith(date):
                continue
            if scope:
                where = f"{event.get('scope') or ''} {event.get('target') or ''}".lower()
                if scope.lower() not in where:
                    continue
            for chain_field in ("prev", "mac", "n", "seq"):
                event.pop(chain_field, None)
            out.append(event)
        out.reverse()
        return out

    await gw.audit.flush(timeout=1.0)  # show what was just recorded, if the files can be written
    found = await asyncio.to_thread(read)
    return LogPage(found[offset:offset + limit], len(found), offset, limit)


# -- the global override ---------------------------------------------------------------------
async def set_override(gw: Gateway, enabled: bool, reason: object,
                       actor: str) -> OverrideState:
    """Switch the global override; persisted first, so a failed write changes nothing.

    ``reason`` is checked here (a JSON value from the API, a form field from the page).
    """
    text = validate.reason(reason, required=enabled)
    now = gw.clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    state = OverrideState(enabled, text or None, actor, now)
    audit = gw.admin_row(actor, "override.on" if enabled else "override.off", "global",
                         "global budget override " + ("enabled" if enabled else "disabled"),
                         text)
    await _commit(gw, gw.ledger.set_setting(OVERRIDE_SETTING, state.to_json(),
                                            audit=audit))
    gw.overrides.state = state
    _alert(gw, "override.changed", now, {"enabled": enabled, "reason": text or None,
                                         "actor": actor, "changed_at": now})
    return state


# -- caps ------------------------------------------------------------------------------------
def cap_key(scope: str, scope_id: str) -> ScopeKey:
    kind = validate.scope(scope)
    return kind, validate.scope_id(kind, scope_id)


async def set_caps(gw: Gateway, key: ScopeKey, changes: Mapping[str, int | None], actor: str,
                   reason: str = "") -> None:
    """Add, change or (None) remove caps of one scope, per window, in one change with one
    audit event; the next request is admitted against them."""
    old = {w: gw.budgets.limits.get(key, w) for w in changes}
    detail = "; ".join(f"{w}_usd {_usd_or_none(old[w])} → {_usd_or_none(v)}"
                       for w, v in changes.items())
    action = "cap.remove" if all(v is None for v in changes.values()) else "cap.set"
    audit = gw.admin_row(actor, action, f"{key[0]}:{key[1]}", detail, reason)
    await _commit(gw, gw.ledger.set_caps(key, changes, audit=audit))
    for window, limit in changes.items():
        await gw.budgets.set_limit(key, limit, window)
    for window, limit in changes.items():
        if old[window] != limit:
            _cap_alert(gw, key, window, old[window], limit, actor)


async def set_cap(gw: Gateway, key: ScopeKey, limit: int, actor: str, reason: str = "") -> None:
    """Add or change a monthly cap (the admin page's and older API clients' one window)."""
    await set_caps(gw, key, {"monthly": limit}, actor, reason)


async def remove_cap(gw: Gateway, key: ScopeKey, actor: str, reason: str = "") -> None:
    """Remove every window's cap of a scope (also caps from the config file: the removal is
    stored). An end user then falls back to ``users_default``."""
    caps = gw.budgets.limits.caps.get(key)
    if not caps:
        raise Missing(f"There is no cap for {key[0]} '{key[1]}'.")
    await set_caps(gw, key, {w: None for w in caps}, actor, reason)


def _usd_or_none(value: int | None) -> str:
    return "none" if value is None else format_usd(value)


def _alert(gw: Gateway, event_type: str, unique: str, data: dict[str, Any]) -> None:
    """Record an admin change's alert; its id is unique to this change."""
    if gw.alerts is not None and gw.alerts.enabled:
        gw.alerts.emit(event_type, event_id(event_type, unique, *sorted(data.items())), data)


def _cap_alert(gw: Gateway, key: ScopeKey, window: str, old: int | None, new: int | None,
               actor: str) -> None:
    now = gw.clock().astimezone(UTC).isoformat(timespec="microseconds")
    _alert(gw, "cap.changed", now, {
        "scope": key[0], "id": key[1], "window": window,
        "old_limit_usd": None if old is None else format_usd(old),
        "limit_usd": None if new is None else format_usd(new), "actor": actor,
        "changed_at": now})


# -- virtual keys ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class KeyView:
    name: str
    tenant: str
    agent: str
    can_override: bool
    source: str  # "config" or "admin"
    prefix: str = ""
    created_at: str | None = None
    revoked_at: str | None = None
    agents: tuple[str, ...] = ()  # further agent types X-Costwall-Agent may name

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "tenant": self.tenant, "agent": self.agent,
                "can_override": self.can_override, "source": self.source,
                "prefix": self.prefix, "created_at": self.created_at,
                "revoked_at": self.revoked_at, "active": self.active,
                "agents": list(self.agents)}


def _iso(value: Any) -> str | None:
    return None if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def keys(gw: Gateway) -> list[KeyView]:
    """Config keys (not revocable here) and admin-created keys, revoked ones included."""
    views = [KeyView(k.name, k.tenant, k.agent, k.can_override, "config",
                     agents=tuple(sorted(k.agents)))
             for k in gw.keys.configured]
    views += [KeyView(r.name, r.tenant, r.agent, r.can_override, "admin", r.prefix,
                      _iso(r.created_at), _iso(r.revoked_at), r.agents)
              for r in await gw.ledger.keys()]
    return views


def _lock(gw: Gateway) -> asyncio.Lock:
    return gw.extras.setdefault("admin.keys_lock", asyncio.Lock())  # type: ignore[no-any-return]


async def create_key(gw: Gateway, name: Any, tenant: Any, agent: Any, can_override: bool,
                     actor: str, agents: Any = None) -> tuple[KeyView, str]:
    """A new virtual key; returns its secret, which is never stored or shown again.

    ``agents``: further agent types the key may name in ``X-Costwall-Agent`` (its own
    ``agent`` always); any other value is refused with 403, so the agent caps hold.
    """
    name = validate.name(name, "name")
    tenant = validate.name(tenant, "tenant")
    agent = validate.name(agent or "default", "agent")
    extra = validate.agents(agents)
    async with _lock(gw):
        taken = {k.name for k in gw.keys.configured} | {r.name for r in await gw.ledger.keys()}
        if name in taken:
            raise Conflict(f"A key named '{name}' exists already (names are never reused, "
                           "also after a revoke).", param="name")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(name, hash_key(secret), tenant, agent, can_override,
                           gw.clock(), None, secret[:len(SECRET_PREFIX) + 4], extra)
        audit = gw.admin_row(
            actor, "key.create", f"key:{name}",
            f"tenant={tenant} agent={agent} can_override={str(can_override).lower()}"
            + (f" agents={','.join(extra)}" if extra else ""))
        await _commit(gw, gw.ledger.add_key(record, audit=audit))
        gw.keys.reload(await gw.ledger.keys())
    return KeyView(name, tenant, agent, can_override, "admin", record.prefix,
                   _iso(record.created_at), None, extra), secret


async def revoke_key(gw: Gateway, name: str, actor: str) -> None:
    """Revoke an admin-created key; requests with it get 401 from now on."""
    if any(k.name == name for k in gw.keys.configured):
        raise Conflict(f"Key '{name}' comes from the config file; remove it there.",
                       code="config_key")
    async with _lock(gw):
        audit = gw.admin_row(actor, "key.revoke", f"key:{name}", "revoked")
        if not await _commit(gw, gw.ledger.revoke_key(name, gw.clock(),
                                                      audit=audit)):
            raise Missing(f"No active admin-created key named '{name[:128]}'.")
        gw.keys.reload(await gw.ledger.keys())


def ensure_form_bool(value: str | None) -> bool:
    """HTML checkbox: present means true."""
    if value not in (None, "", "on", "true", "1", "yes"):
        raise BadInput("Unexpected checkbox value.")
    return value not in (None, "")
