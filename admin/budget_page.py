"""``/admin/budget``: the global override switch and the monthly caps, editable in place.

Every form posts here, is checked (CSRF, role, values) and, when it succeeds, redirects back
with a message (post/redirect/get). Bad input re-renders the page with the error and the
values as typed, status 400, never a 500.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from admin import ops, validate
from admin.auth import form_text, principal, read_form, requires
from admin.errors import BadInput
from admin.render import flash, render
from gateway.config import SCOPES
from gateway.errors import GatewayError
from gateway.services import GATEWAY


async def _page(request: web.Request, status: int = 200, **extra: Any) -> web.Response:
    gw = request.app[GATEWAY]
    period, scopes = await ops.scopes(gw)
    stored = await gw.ledger.caps()
    removed = sorted(k for k, v in stored.items() if v is None
                     and k in gw.settings.budgets.limits and k not in gw.budgets.limits)
    context = {"period": period, "scopes": scopes, "scope_kinds": SCOPES, "removed": removed,
               "form": {}, "row_form": None, "config_limits": gw.settings.budgets.limits,
               "override_error": None, "cap_error": None}
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


@requires("write")
async def save_cap(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    form = await read_form(request)
    values = {k: form_text(form, k)[:200] for k in ("scope", "id", "monthly_usd", "reason")}
    try:
        key = ops.cap_key(values["scope"], values["id"])
        limit = validate.money(values["monthly_usd"])
        reason = validate.reason(values["reason"], required=False)
        await ops.set_cap(gw, key, limit, principal(request).actor, reason)
    except GatewayError as exc:
        # A rejected edit stays in its own row; only the "add a cap" form refills that form.
        if form_text(form, "origin") == "row":
            return await _page(request, exc.status, cap_error=exc.message, row_form=values)
        return await _page(request, exc.status, cap_error=exc.message, form=values)
    flash(request, f"Cap for {key[0]} '{key[1]}' set to ${values['monthly_usd'].strip()} a "
                   "month; it applies from the next request.")
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
