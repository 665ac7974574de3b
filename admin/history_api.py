"""``GET /admin/api/forecast`` and ``GET /admin/api/invoices`` (admin and finance tokens).

The forecast comes from ``gateway.forecast_service`` (cached, never on the request path); the
invoice history from ``admin.invoice_auto`` (the shared database's records).
"""

from __future__ import annotations

from aiohttp import web

from admin import validate
from admin.api import reply
from admin.auth import requires
from admin.errors import BadInput
from admin.invoice_auto import history
from gateway.forecast_service import VIEW_MAX_AGE_S, forecasts
from gateway.services import GATEWAY


@requires("read")
async def get_forecast(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    current = gw.budgets.current_period()
    month = request.query.get("month", "").strip() or current
    if not validate.MONTH_RE.match(month):
        raise BadInput("month must look like YYYY-MM, e.g. 2026-11.", param="month")
    if month > current:
        raise BadInput(f"{month} has not begun yet: there is nothing to project.",
                       param="month")
    found = await forecasts(gw).month(month, max_age=VIEW_MAX_AGE_S)
    return reply({"period": month, "scopes": [f.as_json() for f in found]})


@requires("read")
async def get_invoices(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    return reply({"auto": gw.settings.invoices_auto, "invoices": await history(gw)})


def setup_history_api(app: web.Application) -> None:
    app.router.add_get("/api/forecast", get_forecast)
    app.router.add_get("/api/invoices", get_invoices)
