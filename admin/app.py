"""The admin UI and API as one aiohttp sub-application, mounted by the gateway at ``/admin``.

A sub-application keeps the admin's own concerns to itself: its middleware (auth errors as
JSON under ``/admin/api/``, as HTML pages elsewhere) and its security headers only ever see
admin requests, and the gateway's OpenAI-shaped error middleware never sees an admin error
(the admin middleware answers them first). Route paths below are relative to the mount point:
``"/login"`` is served at ``/admin/login``.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from admin.alerts_page import setup_alerts_page
from admin.api import setup_api
from admin.auth import AUTH, AdminAuth
from admin.budget_page import setup_budget
from admin.history_api import setup_history_api
from admin.invoice_auto import automation
from admin.invoices_web import setup_invoices
from admin.keys_page import setup_keys
from admin.login import setup_login
from admin.middleware import admin_errors, security_headers
from admin.pages import setup_pages
from admin.render import setup_templates
from gateway.services import GATEWAY, Gateway

PREFIX = "/admin"
STATIC = Path(__file__).parent / "static"


def create_admin_app(gw: Gateway) -> web.Application:
    """The admin sub-application for ``gw``: mount it with ``app.add_subapp(PREFIX, ...)``.

    The gateway is handed over explicitly (and stored under the same typed key as in the
    main app), so admin views read ``request.app[GATEWAY]`` from their own application.
    """
    app = web.Application(middlewares=[admin_errors])
    app[GATEWAY] = gw
    app[AUTH] = AdminAuth(gw.settings)
    app.on_response_prepare.append(security_headers)
    setup_templates(app)
    setup_login(app)
    setup_pages(app)
    setup_budget(app)
    setup_alerts_page(app)
    setup_keys(app)
    setup_api(app)
    app.router.add_static("/static", STATIC, name="admin_static")
    setup_invoices(app)
    setup_history_api(app)
    app.cleanup_ctx.append(automation(app))
    return app
