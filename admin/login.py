"""Login and logout pages: a token in, a session cookie out."""

from __future__ import annotations

import logging

from aiohttp import web

from admin.auth import (
    AUTH,
    CLOSED_MESSAGE,
    COOKIE,
    client_ip,
    form_text,
    principal,
    read_form,
    requires,
    secure_cookies,
)
from admin.errors import RateLimited
from admin.render import render
from admin.sessions import SESSION_TTL_S, revoke
from gateway.services import GATEWAY

log = logging.getLogger("costwall.admin")
MAX_TOKEN_CHARS = 1024


def safe_next(value: str | None) -> str:
    """Only redirect back into the admin UI (no open redirect to another site)."""
    if value and (value == "/admin" or value.startswith("/admin/")) and "//" not in value \
            and "\\" not in value and value.isprintable():
        return value
    return "/admin"


async def login_page(request: web.Request) -> web.Response:
    auth = request.app[AUTH]
    if auth.closed:
        return render(request, "login.html", {"error": CLOSED_MESSAGE, "next": "/admin",
                                              "closed": True}, status=503)
    if await auth.session_of(request) is not None:
        raise web.HTTPSeeOther(safe_next(request.query.get("next")))
    return render(request, "login.html", {"next": safe_next(request.query.get("next")),
                                          "closed": False})


async def login_submit(request: web.Request) -> web.Response:
    auth = request.app[AUTH]
    if auth.closed:
        return render(request, "login.html", {"error": CLOSED_MESSAGE, "next": "/admin",
                                              "closed": True}, status=503)
    ip = client_ip(request)
    if (request.content_length or 0) > 16 * 1024:
        raise web.HTTPRequestEntityTooLarge(16 * 1024, request.content_length or 0)
    form = await read_form(request)
    target = safe_next(form_text(form, "next"))
    try:
        auth.check_attempt(ip)
    except RateLimited as exc:
        response = render(request, "login.html", {"error": exc.message, "next": target,
                                                  "closed": False}, status=429)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    token = form.get("token")
    role = None
    if isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_CHARS:
        role = auth.role_for(token.strip())
    if role is None:
        auth.record_failure(ip, "login")
        return render(request, "login.html", {"error": "That token is not valid.",
                                              "next": target, "closed": False}, status=401)
    signer = await auth.load_signer(request.app[GATEWAY].ledger)
    cookie, _ = signer.issue(role)
    log.info("admin login: role %s from %s", role, ip)
    response = web.HTTPSeeOther(target)
    response.set_cookie(COOKIE, cookie, max_age=SESSION_TTL_S, path="/admin",
                        httponly=True, samesite="Strict", secure=secure_cookies(request))
    raise response


@requires("read")
async def logout(request: web.Request) -> web.Response:
    who = principal(request)
    if who.session is not None:  # ends it on every replica, not only this one
        await revoke(request.app[GATEWAY].ledger, who.session)
    response = web.HTTPSeeOther("/admin/login")
    response.del_cookie(COOKIE, path="/admin")
    raise response


def setup_login(app: web.Application) -> None:
    """Routes of ``/admin/login`` and ``/admin/logout`` (paths relative to the admin mount)."""
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login_submit)
    app.router.add_post("/logout", logout)
