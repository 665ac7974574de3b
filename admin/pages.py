"""The read-only pages: the dashboard (this month at a glance) and the audit logs."""

from __future__ import annotations

from aiohttp import web

from admin import ops, validate
from admin.auth import requires
from admin.charts import daily_chart
from admin.errors import BadInput
from admin.render import render
from gateway.budget import GLOBAL
from gateway.forecast import MonthClock, daily_from_rows, project
from gateway.forecast_service import VIEW_MAX_AGE_S, forecasts
from gateway.services import GATEWAY, Gateway

TOP_N = 8
TOP_USERS = 20  # end-user windows on the dashboard, most used first
LOG_PAGE = 50
LOG_KINDS = {"all": validate.LOG_KINDS, **{k: (k,) for k in validate.LOG_KINDS}}


@requires("read")
async def dashboard(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    period, scopes = await ops.scopes(gw)
    # End users can be many (every one under users_default has windows): the dashboard shows
    # the most used ones; the budget API lists them all.
    users = [v for v in scopes if v.status.scope == "user"]
    top_users = sorted(users, key=lambda v: -v.status.utilization)[:TOP_USERS]
    keep = {id(v) for v in top_users}
    shown = [v for v in scopes if v.status.scope != "user" or id(v) in keep]
    days = await ops.usage(gw, period, "day")
    tops = {group: (await ops.usage(gw, period, group))[:TOP_N]
            for group in ("agent", "campaign", "model")}
    overshoot = (await gw.ledger.overshoot(period)).get(GLOBAL, (0, 0))
    # The ledger counts a request still in flight at its reserved bound; the Spent card shows
    # what has settled and the reservations apart, as the budget rows beside it do.
    pending = next((r for r in await ops.usage(gw, period, "state") if r.group == "pending"),
                   None)
    reserved = pending.cost if pending else 0
    by_day = {r.group: r.cost for r in days}
    ahead = _projection(gw, period, by_day)
    found = await forecasts(gw).month(period, max_age=VIEW_MAX_AGE_S)
    projected = {(f.scope, f.id): f for f in found}
    return render(request, "dashboard.html", {
        "period": period, "scopes": shown, "more_users": len(users) - len(top_users),
        "top_users": TOP_USERS,
        "overshoot": overshoot,
        "overshoot_column": any(v.overshoot[1] for v in scopes),
        "chart": daily_chart(period, by_day, projected=ahead),
        "chart_narrow": daily_chart(period, by_day, width=360, height=220, left=64,
                                    projected=ahead),
        "projected": projected,
        "tops": tops, "total": sum(r.cost for r in days) - reserved, "reserved": reserved,
        "in_flight": pending.requests if pending else 0,
        "requests": sum(r.requests for r in days),
        "overrides": sum(r.overrides for r in days),
        "warn_at": gw.budgets.warn_at,
    }, active="dashboard")


def _projection(gw: Gateway, period: str, by_day: dict[str, int]) -> dict[int, int]:
    """The rest of the month's spend per day at the current pace (``gateway.forecast``)."""
    daily = daily_from_rows(period, by_day)
    clock = MonthClock.of(period, gw.clock())
    p = project(sum(daily.values()), None, daily, clock.days_in_month, clock.now_day,
                clock.day_fraction, clock.first_weekday)
    return dict(p.curve)


@requires("read")
async def logs(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    q = request.query
    kind = q.get("kind", "all")
    if kind not in LOG_KINDS:
        kind = "all"
    scope = q.get("scope", "").strip()[:200] or None
    try:
        date = validate.log_filter_date(q.get("date", "").strip())
        page = validate.bounded_int(q.get("page"), "page", 1, 1, 100_000)
        error = None
    except BadInput as exc:
        date, page, error = None, 1, exc.message
    result = await ops.events(gw, LOG_KINDS[kind], scope=scope, date=date,
                              offset=(page - 1) * LOG_PAGE, limit=LOG_PAGE)
    pages = max(1, -(-result.total // LOG_PAGE))
    return render(request, "logs.html", {
        "events": result.events, "total": result.total, "page": page, "pages": pages,
        "kind": kind, "kinds": tuple(LOG_KINDS), "scope": scope or "", "date": date or "",
        "error": error,
    }, status=400 if error else 200, active="logs")


def setup_pages(app: web.Application) -> None:
    """The dashboard (``/admin``, ``/admin/``) and ``/admin/logs``; paths relative to the mount."""
    app.router.add_get("", dashboard)
    app.router.add_get("/", dashboard)
    app.router.add_get("/logs", logs)
