"""``/admin/budget``: the global override switch and the caps per window, editable in place.

Every form posts here, is checked (CSRF, role, values) and, when it succeeds, redirects back
with a message (post/redirect/get). Bad input re-renders the page with the error and the
values as typed, status 400, never a 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from admin import ops, validate
from admin.auth import form_text, principal, read_form, requires
from admin.errors import BadInput
from admin.render import flash, render
from gateway.config import SCOPES
from gateway.errors import GatewayError
from gateway.money import format_usd
from gateway.services import GATEWAY, Gateway
from gateway.windows import FIELDS, WINDOWS


@dataclass(frozen=True, slots=True)
class CapRow:
    """One scope with caps of its own: its windows' current periods, one form to edit them."""

    scope: str
    id: str
    views: list[ops.ScopeView]
    caps: dict[str, int]

    @property
    def level(self) -> str:
        levels = {v.level for v in self.views}
        return next((lv for lv in ("over", "warn") if lv in levels), "ok")

    @property
    def sources(self) -> list[str]:
        return sorted({v.source for v in self.views})


def cap_rows(gw: Gateway, views: list[ops.ScopeView]) -> list[CapRow]:
    """Scopes with caps of their own, in the order of ``views`` (end users under the
    ``users_default`` template are summarised on the page, not listed)."""
    by_key: dict[tuple[str, str], list[ops.ScopeView]] = {}
    for v in views:
        by_key.setdefault((v.status.scope, v.status.id), []).append(v)
    caps = gw.budgets.limits.caps
    return [CapRow(k[0], k[1], by_key.get(k, []), dict(caps[k])) for k in by_key if k in caps]


def removed_caps(gw: Gateway, stored: dict[tuple[str, str], dict[str, int | None]]
                 ) -> list[tuple[str, str, str, int]]:
    """Configured caps an admin removed: (scope, id, window, the configured limit)."""
    configured = gw.settings.budgets.limits
    return sorted((k[0], k[1], w, configured[k][w]) for k, changes in stored.items()
                  for w, v in changes.items()
                  if v is None and w in configured.get(k, {})
                  and gw.budgets.limits.get(k, w) is None)


def _described(changes: dict[str, int | None]) -> str:
    """``$500 a month, $40 a day, no hourly cap``."""
    per = {"monthly": "a month", "weekly": "a week", "daily": "a day", "hourly": "an hour"}
    return ", ".join(f"no {w} cap" if v is None else f"${format_usd(v)} {per[w]}"
                     for w, v in changes.items())


async def _page(request: web.Request, status: int = 200, **extra: Any) -> web.Response:
    gw = request.app[GATEWAY]
    period, scopes = await ops.scopes(gw)
    stored = await gw.ledger.caps()
    default = gw.budgets.limits.user_default
    context = {"period": period, "rows": cap_rows(gw, scopes), "scope_kinds": SCOPES,
               "timezone": gw.settings.budgets.timezone,
               "removed": removed_caps(gw, stored), "fields": FIELDS,
               "users_default": [(w, default[w]) for w in WINDOWS if w in default],
               "default_users": sum(1 for v in scopes if v.status.scope == "user"
                                    and ("user", v.status.id) not in gw.budgets.limits
                                    and v.status.window == "monthly"),
               "form": {}, "row_form": None, "override_error": None, "cap_error": None}
    context.update(extra)
    return render(request, "budget.html", context, status=status, active="budget")


@requires("read")
async def budget(request: web.Request) -> web.Response:
    return await _page(request)


@requires("write")
async def toggle_override(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    form = await read_form(request)
    action = form_text(form, "enabled")
    try:
        if action not in ("on", "off"):
            raise BadInput("Choose whether to turn the override on or off.")
        enabled = action == "on"
        if enabled and form_text(form, "confirm") != "yes":
            raise BadInput("Tick the box to confirm that you understand what the override "
                           "does.")
        await ops.set_override(gw, enabled, form_text(form, "reason"), principal(request).actor)
    except GatewayError as exc:
        return await _page(request, exc.status, override_error=exc.message,
                           form={"reason": form_text(form, "reason")[:500]})
    flash(request, "Global override is now ON: budgets are not enforced." if enabled
          else "Global override is now off: budgets are enforced again.",
          "warn" if enabled else "ok")
    raise web.HTTPSeeOther("/admin/budget")


def _changes(gw: Gateway, key: tuple[str, str], form: Any, row: bool) -> dict[str, int | None]:
    """The windows a cap form changes. In a scope's row every window is shown, so an
    emptied field removes that window; in the "add" form an empty field changes nothing."""
    changes: dict[str, int | None] = {}
    for name, window in FIELDS.items():
        if name not in form:
            continue
        raw = form_text(form, name).strip()
        if raw:
            changes[window] = validate.money(raw, name)
        elif row and gw.budgets.limits.caps.get(key, {}).get(window) is not None:
            changes[window] = None
    if not changes:
        raise BadInput("A cap is required: give an amount in USD for at least one window "
                       "(monthly_usd, e.g. \"250\" or \"12.50\").", param="monthly_usd")
    return changes


@requires("write")
async def save_cap(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    form = await read_form(request)
    values = {k: form_text(form, k)[:200] for k in ("scope", "id", "reason", *FIELDS)}
    row = form_text(form, "origin") == "row"
    try:
        key = ops.cap_key(values["scope"], values["id"])
        changes = _changes(gw, key, form, row)
        reason = validate.reason(values["reason"], required=False)
        await ops.set_caps(gw, key, changes, principal(request).actor, reason)
    except GatewayError as exc:
        # A rejected edit stays in its own row; only the "add a cap" form refills that form.
        if row:
            return await _page(request, exc.status, cap_error=exc.message, row_form=values)
        return await _page(request, exc.status, cap_error=exc.message, form=values)
    flash(request, f"Cap for {key[0]} '{key[1]}' set to {_described(changes)}; it applies "
                   "from the next request." if len(changes) == 1 else
                   f"Caps for {key[0]} '{key[1]}' set: {_described(changes)}; they apply from "
                   "the next request.")
    raise web.HTTPSeeOther("/admin/budget")


@requires("write")
async def remove_cap(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    form = await read_form(request)
    try:
        key = ops.cap_key(form_text(form, "scope"), form_text(form, "id"))
        await ops.remove_cap(gw, key, principal(request).actor)
    except GatewayError as exc:
        return await _page(request, exc.status, cap_error=exc.message)
    flash(request, f"Cap for {key[0]} '{key[1]}' removed.")
    raise web.HTTPSeeOther("/admin/budget")


def setup_budget(app: web.Application) -> None:
    """Routes of ``/admin/budget`` and its forms (paths relative to the admin mount)."""
    app.router.add_get("/budget", budget)
    app.router.add_post("/budget/override", toggle_override)
    app.router.add_post("/budget/caps", save_cap)
    app.router.add_post("/budget/caps/remove", remove_cap)
