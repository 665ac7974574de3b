"""The one place admin errors become responses, plus the security headers of every answer.

Under ``/admin/api/`` an error is JSON (``{"error": {"message", "type", "param", "code"}}``);
elsewhere under ``/admin`` it is a small HTML page. Either way: a 4xx for bad input, never a
traceback.
"""

from __future__ import annotations

import logging

from aiohttp import web

from admin.auth import Handler
from admin.errors import NotAuthenticated, RateLimited
from admin.render import flash_cookie, render
from gateway.errors import GatewayError

log = logging.getLogger("costwall.admin")

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def error_response(request: web.Request, exc: GatewayError) -> web.Response:
    headers: dict[str, str] = {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    if request.path.startswith("/admin/api/"):
        if isinstance(exc, NotAuthenticated):
            headers["WWW-Authenticate"] = 'Bearer realm="costwall-admin"'
        return web.Response(status=exc.status, body=exc.to_json(),
                            content_type="application/json", headers=headers)
    response = render(request, "error.html", {"status": exc.status, "message": exc.message},
                      status=exc.status)
    response.headers.update(headers)
    return response


def _from_http(exc: web.HTTPException, request: web.Request) -> GatewayError:
    if exc.status == 404:
        message = f"Nothing at {request.path[:200]}."
    elif exc.status == 405:
        message = f"Method {request.method} is not allowed on {request.path[:200]}."
    else:
        message = exc.reason
    error = GatewayError(message, code=exc.reason.lower().replace(" ", "_"))
    error.status = exc.status
    return error


@web.middleware
async def admin_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admin errors to JSON or HTML (the admin sub-app's middleware: admin paths only)."""
    try:
        response = await handler(request)
    except GatewayError as exc:
        return error_response(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            flash_cookie(request, exc)  # a redirect after a change carries its message
            raise
        return error_response(request, _from_http(exc, request))
    except Exception:
        log.exception("admin request %s %s failed", request.method, request.path[:200])
        error = GatewayError("Internal error; the details are in the gateway log.",
                             code="internal_error")
        error.status, error.type = 500, "server_error"
        return error_response(request, error)
    flash_cookie(request, response)
    return response


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """CSP and friends on every admin answer; nothing admin-side is cached but static files."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if not request.path.startswith("/admin/static/"):
        response.headers["Cache-Control"] = "no-store"
