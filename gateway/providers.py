"""Upstream kinds: how costwall talks to one family of APIs; pure.

The request path is the same for every upstream; what differs between an OpenAI-compatible
upstream and Anthropic is small and lives here, one frozen ``UpstreamKind`` each: where a route
is on the upstream (``url``), how the gateway's own key is presented (``auth``), and the shape
of an error costwall answers with itself (``error_body``). The endpoint table
(``gateway.endpoints``) names the kind each route speaks; ``gateway.routing`` finds the
upstream of a model. Nothing else in the request path asks which provider it talks to.

>>> ANTHROPIC.url("https://api.anthropic.com", "messages")
'https://api.anthropic.com/v1/messages'
>>> ANTHROPIC.auth("sk-ant-x")
[('x-api-key', 'sk-ant-x')]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import GatewayError


def _bearer(key: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


def _x_api_key(key: str) -> list[tuple[str, str]]:
    return [("x-api-key", key)]


def _openai_error(error: GatewayError) -> dict[str, Any]:
    return error.body()


# Anthropic's error types by status (its "Errors" page); costwall's own types (the 402's
# ``budget_exceeded``) are kept as they are.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 415: "invalid_request_error",
                    429: "rate_limit_error", 502: "api_error", 503: "overloaded_error",
                    504: "timeout_error"}


def _anthropic_error(error: GatewayError) -> dict[str, Any]:
    """``{"type": "error", "error": {"type", "message"}}``; extra top-level fields of the
    OpenAI-shaped body (the 402's ``budget``) are kept, at the top and inside ``error``."""
    openai = error.body()
    inner = openai["error"]
    kind = inner.get("type")
    if kind in (None, "invalid_request_error", "server_error", "upstream_error",
                "permission_error"):
        kind = _ANTHROPIC_TYPES.get(error.status, "api_error")
    body: dict[str, Any] = {"type": "error", "error": {"type": kind,
                                                        "message": inner.get("message")}}
    if inner.get("code"):
        body["error"]["code"] = inner["code"]
    for name, value in openai.items():
        if name != "error":
            body[name] = value
            body["error"][name] = value
    return body


@dataclass(frozen=True, slots=True)
class UpstreamKind:
    """How costwall talks to one family of upstream APIs."""

    name: str
    api_prefix: str  # the path between an upstream's base URL and a route's path
    auth: Callable[[str], list[tuple[str, str]]]
    shape_error: Callable[[GatewayError], dict[str, Any]]

    def url(self, base_url: str, path: str) -> str:
        """The upstream URL of ``path`` (a route's path under ``/v1``)."""
        return f"{base_url}{self.api_prefix}/{path}"

    def error_body(self, error: GatewayError) -> bytes:
        """The JSON body of an error costwall answers on this kind's routes."""
        return orjson.dumps(self.shape_error(error))


# OpenAI-compatible: base URLs end in /v1 (``https://api.openai.com/v1``), bearer keys.
OPENAI = UpstreamKind("openai", "", _bearer, _openai_error)
# Anthropic: base URL without /v1 (``https://api.anthropic.com``), the key in x-api-key.
ANTHROPIC = UpstreamKind("anthropic", "/v1", _x_api_key, _anthropic_error)
KINDS: Mapping[str, UpstreamKind] = {kind.name: kind for kind in (OPENAI, ANTHROPIC)}
