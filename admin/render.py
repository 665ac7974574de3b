"""Jinja2 for the admin pages: autoescaped templates plus the context every page shares.

Autoescape is on for every template and nothing from a request is ever marked ``|safe``, so a
campaign id like ``<script>`` shows as text, in HTML and in inline SVG alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from admin import fmt
from admin.auth import AUTH, PRINCIPAL, secure_cookies
from gateway.money import format_usd
from gateway.services import GATEWAY

TEMPLATES = Path(__file__).parent / "templates"
JINJA = web.AppKey("costwall_admin_jinja", jinja2.Environment)
FLASH_COOKIE = "costwall_flash"
OUTGOING = web.RequestKey("costwall_admin_flash", list)
NAV = (("dashboard", "/admin", "Dashboard"), ("budget", "/admin/budget", "Budget"),
       ("invoices", "/admin/invoices", "Invoices"), ("logs", "/admin/logs", "Logs"),
       ("keys", "/admin/keys", "Keys"), ("alerts", "/admin/alerts", "Alerts"))


FILTERS: dict[str, Callable[..., str]] = {
    "usd": fmt.usd, "usd_exact": format_usd, "percent": fmt.percent, "share": fmt.share,
    "count": fmt.count, "plural": fmt.plural, "when": fmt.when,
}


def setup_templates(app: web.Application) -> None:
    aiohttp_jinja2.setup(
        app, app_key=JINJA, loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
        undefined=jinja2.StrictUndefined, default_helpers=False, trim_blocks=True,
        lstrip_blocks=True, filters=FILTERS,
    )


def flash(request: web.Request, message: str, level: str = "ok") -> None:
    """A one-time message for the next page this browser session sees (after a redirect).

    Sessions live in no server's memory, so the message travels in a short-lived cookie
    signed for this session (the admin middleware sets it with ``flash_cookie``; ``render``
    reads and clears it).
    """
    who = request.get(PRINCIPAL)
    if who is not None and who.session is not None:
        request.setdefault(OUTGOING, []).append((level, message))


def flash_cookie(request: web.Request, response: web.StreamResponse) -> None:
    """Put the messages ``flash`` queued into the signed flash cookie of ``response``."""
    outgoing = request.get(OUTGOING)
    if not outgoing:
        return
    who, signer = request.get(PRINCIPAL), request.app[AUTH].signer
    if who is not None and who.session is not None and signer is not None:
        response.set_cookie(FLASH_COOKIE, signer.sign_flash(who.session, outgoing),
                            max_age=300, path="/admin", httponly=True, samesite="Strict",
                            secure=secure_cookies(request))


def _take_flash(request: web.Request) -> list[tuple[str, str]]:
    who = request.get(PRINCIPAL)
    signer = request.app[AUTH].signer
    if who is None or who.session is None or signer is None:
        return []
    return signer.read_flash(who.session, request.cookies.get(FLASH_COOKIE))


def render(request: web.Request, template: str, context: Mapping[str, Any] | None = None,
           *, status: int = 200, active: str = "") -> web.Response:
    """Render ``template`` with the shared context: caller, override state, nav, messages."""
    gw = request.app[GATEWAY]
    who = request.get(PRINCIPAL)
    messages = _take_flash(request)
    base: dict[str, Any] = {
        "principal": who, "csrf": who.csrf if who else "", "override": gw.overrides.state,
        "nav": NAV if who else (), "active": active, "messages": messages, "error": None,
        "company": gw.settings.invoices.company,
    }
    base.update(context or {})
    response = aiohttp_jinja2.render_template(template, request, base, app_key=JINJA,
                                              status=status)
    if FLASH_COOKIE in request.cookies:  # shown once
        response.del_cookie(FLASH_COOKIE, path="/admin")
    return response
