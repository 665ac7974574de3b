"""Jinja2 for the admin pages: autoescaped templates plus the context every page shares.

Autoescape is on for every template and nothing from a request is ever marked ``|safe``, so a
campaign id like ``<script>`` shows as text, in HTML and in inline SVG alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from admin import fmt
from admin.auth import PRINCIPAL
from gateway.money import format_usd
from gateway.services import GATEWAY

TEMPLATES = Path(__file__).parent / "templates"
JINJA = web.AppKey("costwall_admin_jinja", jinja2.Environment)
NAV = (("dashboard", "/admin", "Dashboard"), ("budget", "/admin/budget", "Budget"),
       ("invoices", "/admin/invoices", "Invoices"), ("logs", "/admin/logs", "Logs"),
       ("keys", "/admin/keys", "Keys"))


def setup_templates(app: web.Application) -> None:
    aiohttp_jinja2.setup(
        app, app_key=JINJA, loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
        undefined=jinja2.StrictUndefined, default_helpers=False, trim_blocks=True,
        lstrip_blocks=True,
        filters={"usd": fmt.usd, "usd_exact": format_usd, "percent": fmt.percent,
                 "share": fmt.share, "count": fmt.count},
    )


def flash(request: web.Request, message: str, level: str = "ok") -> None:
    """A one-time message for the next page this browser session sees."""
    who = request.get(PRINCIPAL)
    if who is not None and who.session is not None:
        who.session.flash.append((level, message))


def render(request: web.Request, template: str, context: Mapping[str, Any] | None = None,
           *, status: int = 200, active: str = "") -> web.Response:
    """Render ``template`` with the shared context: caller, override state, nav, messages."""
    gw = request.app[GATEWAY]
    who = request.get(PRINCIPAL)
    messages: list[tuple[str, str]] = []
    if who is not None and who.session is not None:
        messages, who.session.flash[:] = list(who.session.flash), []
    base: dict[str, Any] = {
        "principal": who, "csrf": who.csrf if who else "", "override": gw.overrides.state,
        "nav": NAV if who else (), "active": active, "messages": messages, "error": None,
        "company": gw.settings.invoice_company,
    }
    base.update(context or {})
    return aiohttp_jinja2.render_template(template, request, base, app_key=JINJA,
                                          status=status)
