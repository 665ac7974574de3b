"""Domain errors, each knowing its HTTP status and OpenAI error shape.

Raised anywhere on the request path and turned into a response by one middleware
(``gateway.app.error_middleware``), so handlers never build error bodies by hand.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.money import format_usd


class GatewayError(Exception):
    """An error the gateway itself answers with, in OpenAI's ``{"error": {...}}`` shape."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers (Retry-After, ...)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.body())


class BadRequest(GatewayError):
    status = 400
    code = "invalid_request"


class UnknownModel(GatewayError):
    status = 400
    code = "model_not_found"


class Unauthorized(GatewayError):
    status = 401
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "override_not_allowed"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "request_too_large"


class UnsupportedEncoding(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_content_encoding"


class UpstreamUnavailable(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "shutting_down"


class BudgetExceeded(GatewayError):
    """402: the request's upper-bound cost does not fit a window of a scope's budget.

    Never 429 or 5xx: the OpenAI SDK retries those, and a fleet would hammer the gateway.
    ``resets_at`` (when the refusing window's period ends) is filled in by the budget
    engine, which knows the time zone.
    """

    status = 402
    type = "budget_exceeded"
    code = "budget_exceeded"

    def __init__(
        self, *, scope: str, scope_id: str, period: str, limit: int, spent: int, reserved: int,
        estimate: int, window: str = "monthly", resets_at: datetime | None = None,
    ):
        self.scope, self.scope_id, self.period = scope, scope_id, period
        self.limit, self.spent, self.reserved, self.estimate = limit, spent, reserved, estimate
        self.window, self.resets_at = window, resets_at
        super().__init__(describe_budget(self))

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["budget"] = {
            "scope": self.scope,
            "id": self.scope_id,
            "period": self.period,
            "limit_usd": format_usd(self.limit),
            "spent_usd": format_usd(self.spent),
            "window": self.window,
            "resets_at": iso_utc(self.resets_at) if self.resets_at is not None else None,
        }  # SPEC's fields; reserved and the estimate are in the message
        # Repeated inside ``error``: the OpenAI SDK hands its users only the error object
        # (``APIStatusError.body``), so the top-level copy is out of their reach.
        body["error"]["budget"] = body["budget"]
        return body


class RateLimited(GatewayError):
    """429: over a rate limit (``gateway.ratelimit``). Unlike a budget, a rate limit frees
    within a minute, so a 429 with ``Retry-After`` is right: the SDK waits and retries."""

    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, headers: list[tuple[str, str]]):
        super().__init__(message)
        self.headers = tuple(headers)


class RatesUnavailable(ServiceUnavailable):
    """503: the shared rate-limit store is unreachable and ``rate_limits.on_store_error`` is
    ``closed``. ``x-should-retry: false`` keeps the openai SDK from retrying at once, so a fleet
    does not multiply its load on a gateway whose database is away."""

    code = "rate_limits_unavailable"
    headers = (("Retry-After", "5"), ("x-should-retry", "false"))


class UpstreamAuthFailed(GatewayError):
    """The upstream refused costwall's own key (401). Never relayed as a 401: the agent's
    virtual key is fine, and the upstream's message may quote part of the gateway's key."""

    status = 502
    type = "upstream_error"
    code = "upstream_auth_failed"


def iso_utc(moment: datetime) -> str:
    """``2026-11-29T15:00:00Z``: ISO 8601 in UTC, as the 402 body and the admin API give it."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_budget(exc: BudgetExceeded) -> str:
    """One sentence for the 402 message and the blocked-executions log."""
    where = exc.period if exc.window == "monthly" else f"the {exc.window} window {exc.period}"
    return (
        f"Budget exceeded for {exc.scope} '{exc.scope_id}' in {where}: limit "
        f"${format_usd(exc.limit)}, spent ${format_usd(exc.spent)}, reserved "
        f"${format_usd(exc.reserved)}; this request needs up to ${format_usd(exc.estimate)}."
    )
