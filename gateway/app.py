"""The app factory: ``create_app(settings)`` wires every part; importing does no I/O.

Long-lived resources (ledger writer, upstream ``ClientSession``) open and close in
``cleanup_ctx``. Errors become responses in one middleware: the OpenAI error shape under
``/v1``. The admin UI and API are a sub-application mounted at ``/admin`` with their own
error middleware (``admin.middleware``), so this one never reshapes an admin error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from admin.app import PREFIX as ADMIN_PREFIX
from admin.app import create_admin_app
from gateway.alerts import Alerts, alerts_ctx
from gateway.anomaly import anomaly_watch
from gateway.audit import AuditTrail
from gateway.budget import Crossing, apply_caps
from gateway.config import Settings
from gateway.config.alerts import Channel
from gateway.config.upstreams import resolved
from gateway.endpoints import ERROR_KINDS
from gateway.errors import GatewayError, NotFound
from gateway.forecast_service import setup_forecast
from gateway.keys import KeyRing
from gateway.logs import REQUEST_ID
from gateway.metrics import BudgetView, Metrics
from gateway.ops import setup_ops
from gateway.pricing import PriceTable, load_price_table
from gateway.providers import OPENAI
from gateway.proxy import REQUEST_ID_KEY, new_request_id, setup_routes
from gateway.rates import open_rates, rates_ctx
from gateway.routing import Router
from gateway.services import GATEWAY, OVERRIDE_SETTING, Gateway, OverrideState
from gateway.store import open_store

log = logging.getLogger("costwall")
access_log = logging.getLogger("costwall.access")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Domain errors to their status and shape; never a traceback for client input."""
    request[REQUEST_ID_KEY] = new_request_id()
    token = REQUEST_ID.set(request[REQUEST_ID_KEY])  # tags every log line of this request
    try:
        return await handler(request)
    except GatewayError as exc:
        # 402s count as "blocked" and upstream 5xx as "upstream_error" where they happen.
        # 429s as "rate_limited" (gateway.rates).
        if exc.status < 500 and exc.status not in (402, 429) \
                and request.path.startswith("/v1/"):
            gw = request.app[GATEWAY]
            gw.metrics.child(gw.metrics.requests, "rejected", "-").inc()
        access_log.info("answered %d %s", exc.status, exc.code,
                        extra={"path": request.path, "status": exc.status, "code": exc.code})
        # The error shape of the API the client speaks on this path (Anthropic's on
        # /v1/messages), OpenAI's elsewhere.
        body = ERROR_KINDS.get(request.path, OPENAI).error_body(exc)
        return web.Response(
            status=exc.status, body=body, content_type="application/json",
            headers=[("X-Costwall-Request-Id", request[REQUEST_ID_KEY]), *exc.headers],
        )
    except web.HTTPException as exc:
        if not request.path.startswith("/v1/") or exc.status < 400:
            raise
        error = GatewayError(exc.reason)
        error.status, error.code = exc.status, exc.reason.lower().replace(" ", "_")
        if exc.status == 404:
            error = NotFound(f"Unknown endpoint {request.method} {request.path}.")
        elif exc.status == 405:
            error.message = f"Method {request.method} is not allowed on {request.path}."
        return web.Response(status=error.status,
                            body=ERROR_KINDS.get(request.path, OPENAI).error_body(error),
                            content_type="application/json")
    finally:
        REQUEST_ID.reset(token)


def _resources(gw: Gateway, follow: Callable[[Gateway], asyncio.Task[None]] | None
               ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def resources(app: web.Application) -> AsyncIterator[None]:
        await gw.ledger.start()
        await gw.audit.start()  # writes the stored backlog to the files in the background
        recovered = await gw.ledger.recover()
        if recovered:
            log.warning("settled %d requests left pending by a crash at their reserved cost",
                        recovered)
        stored = await gw.ledger.get_setting(OVERRIDE_SETTING)
        if stored is not None:
            gw.overrides.state = OverrideState.from_json(stored)
        else:
            gw.overrides.state = OverrideState(gw.settings.override_allow,
                                               "initial setting (override.allow)", "config")
        await apply_caps(gw.budgets, gw.settings.budgets.budget_limits(), await gw.ledger.caps())
        gw.keys.reload(await gw.ledger.keys())
        latest = await gw.ledger.latest_ts()
        if latest is not None:  # a clock stepped back across a restart re-opens nothing
            gw.budgets.books.observe(latest)
        await gw.budgets.load_current()
        # Admin changes made on other replicas reach this one (shared stores only).
        feed = follow(gw) if follow is not None else None
        for upstream in gw.router.upstreams:  # one pool each, sized per upstream
            gw.sessions[upstream.name] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=upstream.max_connections,
                                               limit_per_host=0, ttl_dns_cache=300),
                auto_decompress=True, skip_auto_headers=("User-Agent",),
            )
        yield
        if feed is not None:
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed
        for session in gw.sessions.values():
            await session.close()
        await gw.audit.close()
        await gw.ledger.close()

    return resources


def build_gateway(
    settings: Settings,
    *,
    prices: PriceTable | None = None,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Gateway:
    """Construct (without starting) every part the app needs."""
    if prices is None:
        prices, problems = load_price_table(settings.pricing_path)
        if problems:
            raise ValueError("price table problems:\n" + "\n".join(problems))
    clock = clock or (lambda: datetime.now(UTC))

    def report_crossings(crossings: list[Crossing]) -> None:
        gw.record_crossings(crossings)  # ``gw`` is built below, before the store starts

    store = open_store(settings, clock, report_crossings)
    metrics = Metrics(registry)
    metrics.watch_budgets(BudgetView(store.budgets))
    gw = Gateway(settings, prices, store.ledger, store.budgets, KeyRing(settings.keys),
                 AuditTrail(settings.logs_dir, clock, store.audit, tz=settings.budgets.tz),
                 metrics, clock, follow=store.follow, router=Router(resolved(settings)))
    gw.rates = open_rates(settings, metrics, clock, getattr(store.ledger, "replica", None))
    # Real time, not the injected clock: leases, backoff and webhook-timestamp are wall time.
    gw.alerts = Alerts(settings.alerts, store.ledger, metrics.alerts,
                       admin_url=ADMIN_PREFIX + "/alerts")
    if settings.invoices.email_to:
        gw.alerts.invoice_mail = Channel("invoices.email_to", "email",
                                         to=settings.invoices.email_to)
    gw.alerts.catch_up = gw.catch_up_crossings
    return gw


def create_app(settings: Settings, **parts: object) -> web.Application:
    """The whole gateway as one aiohttp application (proxy, admin, metrics, health)."""
    gw = build_gateway(settings, **parts)  # type: ignore[arg-type]
    # aiohttp's keep-alive timer also runs while a connection waits for (the rest of) a
    # request head, from its opening or its previous response: set to limits.header_timeout_s
    # it closes slowloris connections that never finish their head (handler_args reach every
    # connection, whichever runner serves the app).
    app = web.Application(middlewares=[error_middleware],
                          client_max_size=settings.max_body_bytes,
                          handler_args={"keepalive_timeout": settings.header_timeout_s})
    app[GATEWAY] = gw
    app.cleanup_ctx.append(_resources(gw, gw.follow))
    if gw.rates is not None:
        app.cleanup_ctx.append(rates_ctx(gw.rates))
    assert gw.alerts is not None
    app.cleanup_ctx.append(alerts_ctx(gw.alerts))
    app.cleanup_ctx.append(anomaly_watch(gw))
    app.cleanup_ctx.append(setup_forecast(gw))
    setup_routes(app)
    setup_ops(app)
    app.add_subapp(ADMIN_PREFIX, create_admin_app(gw))
    return app


def json_dumps(value: object) -> str:
    return orjson.dumps(value).decode()
