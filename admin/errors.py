"""Admin errors: each knows its status and JSON shape, so views raise and never build bodies.

They subclass ``GatewayError`` to share its ``{"error": {"message", "type", "param",
"code"}}`` shape; ``admin.middleware`` turns them into JSON under ``/admin/api/`` and into an
HTML page elsewhere under ``/admin``.
"""

from __future__ import annotations

from gateway.errors import GatewayError, NotFound, PayloadTooLarge

# 404 (no such cap, key, log kind or route) and 413 are the gateway's own errors, under the
# names the admin views use.
Missing = NotFound
TooLarge = PayloadTooLarge


class BadInput(GatewayError):
    """400: a value in the request is malformed (money, scope, month, JSON...)."""

    status = 400
    code = "invalid_request"


class NotAuthenticated(GatewayError):
    """401: no valid admin or finance credentials."""

    status = 401
    type = "authentication_error"
    code = "unauthorized"


class ReadOnly(GatewayError):
    """403: the finance role, or a form without a valid CSRF token."""

    status = 403
    type = "permission_error"
    code = "forbidden"


class Conflict(GatewayError):
    """409: the change clashes with existing state (duplicate key name, config key)."""

    status = 409
    code = "conflict"


class RateLimited(GatewayError):
    """429 with ``Retry-After``: too many failed logins from one address."""

    status = 429
    type = "rate_limit_error"
    code = "too_many_failed_logins"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class AdminClosed(GatewayError):
    """503: no admin token is configured, so the admin side stays shut."""

    status = 503
    type = "server_error"
    code = "admin_disabled"
