"""``/admin/alerts``: channels with their last delivery, recent deliveries and failures, and a
"send test" form (CSRF-checked like every form; post/redirect/get)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from admin.alerts_api import overview, send_test
from admin.auth import form_text, principal, read_form, requires
from admin.render import flash, render
from gateway.errors import GatewayError
from gateway.services import GATEWAY


async def _page(request: web.Request, status: int = 200, **extra: Any) -> web.Response:
    context = await overview(request.app[GATEWAY])
    context.update({"test_error": None, **extra})
    return render(request, "alerts.html", context, status=status, active="alerts")


@requires("read")
async def alerts(request: web.Request) -> web.Response:
    return await _page(request)


@requires("write")
async def post_test(request: web.Request) -> web.Response:
    form = await read_form(request)
    name = form_text(form, "channel")[:100]
    try:
        ident = send_test(request.app[GATEWAY], name, principal(request).actor)
    except GatewayError as exc:
        return await _page(request, exc.status, test_error=exc.message)
    flash(request, f"Test alert {ident} queued for channel '{name}'.")
    raise web.HTTPSeeOther("/admin/alerts")


def setup_alerts_page(app: web.Application) -> None:
    app.router.add_get("/alerts", alerts)
    app.router.add_post("/alerts/test", post_test)
