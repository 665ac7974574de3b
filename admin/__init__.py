"""The admin side of costwall: web UI, JSON admin API and invoices.

``setup(app)`` adds everything under ``/admin`` to the gateway's app: templates, auth,
pages, the JSON API, static files and (when its module is present) the invoice pages.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "static"


def setup(app: web.Application) -> None:
    """Wire the admin UI and API into ``app`` (called by ``gateway.app.create_app``)."""
    from admin.api import setup_api
    from admin.auth import AUTH, AdminAuth
    from admin.budget_page import setup_budget
    from admin.history_api import setup_history_api
    from admin.keys_page import setup_keys
    from admin.login import setup_login
    from admin.middleware import admin_errors, security_headers
    from admin.pages import setup_pages
    from admin.render import setup_templates
    from gateway.services import GATEWAY

    app[AUTH] = AdminAuth(app[GATEWAY].settings)
    app.middlewares.append(admin_errors)
    app.on_response_prepare.append(security_headers)
    setup_templates(app)
    setup_login(app)
    setup_pages(app)
    setup_budget(app)
    setup_keys(app)
    setup_api(app)
    setup_history_api(app)
    app.router.add_static("/admin/static", STATIC, name="admin_static")
    if importlib.util.find_spec("admin.invoices_web") is not None:
        from admin.invoice_auto import automation
        from admin.invoices_web import setup_invoices

        setup_invoices(app)
        app.cleanup_ctx.append(automation(app))
