"""``/admin/keys``: virtual keys from the config file and those created here.

A new key's secret is rendered once, in the answer to the create form (never redirected to,
never stored, never logged); only its SHA-256 and a short prefix are kept.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from admin import ops
from admin.auth import form_text, principal, read_form, requires
from admin.render import flash, render
from gateway.errors import GatewayError
from gateway.services import GATEWAY


async def _page(request: web.Request, status: int = 200, **extra: Any) -> web.Response:
    gw = request.app[GATEWAY]
    context: dict[str, Any] = {"keys": await ops.keys(gw), "created": None, "secret": None,
                               "form": {}, "key_error": None}
    context.update(extra)
    return render(request, "keys.html", context, status=status, active="keys")


@requires("read")
async def keys(request: web.Request) -> web.Response:
    return await _page(request)


@requires("write")
async def create_key(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    form = await read_form(request)
    values = {k: form_text(form, k, 200) for k in ("name", "tenant", "agent")}
    values["agents"] = form_text(form, "agents", 4000)
    try:
        created, secret = await ops.create_key(
            gw, values["name"], values["tenant"], values["agent"],
            ops.ensure_form_bool(form_text(form, "can_override", 200) or None),
            principal(request).actor, values["agents"])
    except GatewayError as exc:
        return await _page(request, exc.status, key_error=exc.message, form=values)
    return await _page(request, created=created, secret=secret)


@requires("write")
async def revoke_key(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    form = await read_form(request)
    name = form_text(form, "name", 200)
    try:
        await ops.revoke_key(gw, name, principal(request).actor)
    except GatewayError as exc:
        return await _page(request, exc.status, key_error=exc.message)
    flash(request, f"Key '{name}' revoked; requests with it now get 401.")
    raise web.HTTPSeeOther("/admin/keys")


def setup_keys(app: web.Application) -> None:
    """Routes of ``/admin/keys`` and its forms (paths relative to the admin mount)."""
    app.router.add_get("/keys", keys)
    app.router.add_post("/keys", create_key)
    app.router.add_post("/keys/revoke", revoke_key)
