"""Reading and attributing a client request before anything is forwarded.

The body (size limit, encodings aiohttp inflates, a JSON object), the model and its price,
the attribution headers and the override header. Each check answers with a clear
OpenAI-shaped 4xx (``gateway.errors``), never a 500.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from gateway.config import VirtualKey
from gateway.config.upstreams import UpstreamEntry
from gateway.errors import BadRequest, Forbidden, PayloadTooLarge, UnknownModel, UnsupportedEncoding
from gateway.pricing import ModelPrice
from gateway.providers import OPENAI, UpstreamKind

if TYPE_CHECKING:
    from gateway.services import Gateway

REQUEST_ID_KEY = web.RequestKey("costwall_request_id", str)  # set by gateway.app's middleware
_HEADER_VALUE_MAX = 128
_MODEL_MAX = 256


def _decoded_encodings() -> frozenset[str]:
    """The request ``Content-Encoding`` values aiohttp inflates before the handler reads."""
    from aiohttp import http_parser

    found = {"gzip", "deflate"}
    if getattr(http_parser, "HAS_BROTLI", False):
        found.add("br")
    if getattr(http_parser, "HAS_ZSTD", False):
        found.add("zstd")
    return frozenset(found)


DECODED_ENCODINGS = _decoded_encodings()


def check_content_encoding(request: web.Request) -> None:
    """415 for a compressed body aiohttp does not inflate (``compress``, a list, ``br``
    without Brotli...): its bytes would otherwise be parsed, or forwarded, as they are."""
    encoding = request.headers.get("Content-Encoding")
    if encoding is None:
        return
    value = encoding.lower()  # as aiohttp matches it (it has stripped the value)
    if value in ("", "identity") or value in DECODED_ENCODINGS:
        return
    raise UnsupportedEncoding(
        f"Content-Encoding '{encoding[:50]}' is not supported; send the body uncompressed "
        f"or as one of: {', '.join(sorted(DECODED_ENCODINGS))}.", param="Content-Encoding")


async def read_payload(request: web.Request, limit: int) -> tuple[bytes, dict[str, Any]]:
    """The body as bytes and as a JSON object; 413 past ``limit``, 400 if not a JSON object.

    A gzip or deflate body arrives inflated (aiohttp decodes it); it is forwarded inflated,
    without the ``Content-Encoding`` header (``headers.upstream_request_headers``).
    """
    check_content_encoding(request)
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Request body is larger than the {limit}-byte limit.")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"Request body is larger than the {limit}-byte limit.") from None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("We could not parse the JSON body of your request (it must be "
                         "UTF-8 encoded JSON).") from None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body, payload


def _header(request: web.Request, name: str) -> str | None:
    value = request.headers.get(name)
    if value is None or not value.strip():
        return None
    value = value.strip()
    if len(value) > _HEADER_VALUE_MAX or not value.isprintable():
        raise BadRequest(f"Header {name} must be at most {_HEADER_VALUE_MAX} printable "
                         "characters.", param=name)
    return value


def route_model(gw: Gateway, payload: dict[str, Any], kind: UpstreamKind
                ) -> tuple[str, UpstreamEntry]:
    """The model a request names and the upstream that serves it, which must speak ``kind``
    (400 naming the model otherwise: nothing is translated between APIs)."""
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter.", param="model")
    if len(model) > _MODEL_MAX:  # it is stored per request and cached by the price lookup
        raise BadRequest(f"The model name is longer than {_MODEL_MAX} characters.",
                         param="model")
    upstream = gw.router.route(model)
    if upstream is None:
        raise UnknownModel(f"The model '{model[:100]}' is not served by any upstream "
                           "costwall is configured with (upstreams[].models).", param="model")
    if upstream.kind != kind.name:
        raise BadRequest(f"The model '{model[:100]}' is served by upstream '{upstream.name}' "
                         f"({upstream.kind} API), which does not serve this endpoint.",
                         param="model")
    return model, upstream


def resolve_model(gw: Gateway, payload: dict[str, Any],
                  kind: UpstreamKind = OPENAI) -> tuple[str, ModelPrice, UpstreamEntry]:
    """The model, its price and its upstream; 400 for a model costwall cannot budget."""
    model, upstream = route_model(gw, payload, kind)
    price = gw.prices.lookup(model)
    if price is None and gw.settings.unknown_model != "reject":
        price = gw.prices.lookup(gw.settings.unknown_model)
    if price is None:
        raise UnknownModel(
            f"The model '{model[:100]}' has no price in costwall's price table, so it "
            "cannot be budgeted.", param="model")
    return model, price, upstream


def requested_override(request: web.Request, key: VirtualKey) -> str | None:
    """The per-request override reason, if the header is present and the key may use it."""
    if "X-Costwall-Override" not in request.headers:
        return None
    if not key.can_override:
        raise Forbidden(f"Key '{key.name}' is not allowed to override budgets "
                        "(X-Costwall-Override needs a key with can_override: true).")
    reason = request.headers["X-Costwall-Override"].strip()
    if not reason.isprintable():  # control characters or bytes that are not UTF-8
        raise BadRequest("X-Costwall-Override must be printable UTF-8 text.",
                         param="X-Costwall-Override")
    if not reason:
        raise BadRequest("X-Costwall-Override needs a reason, e.g. "
                         "'X-Costwall-Override: incident 4711'.", param="X-Costwall-Override")
    return reason[:200]


def attribute(request: web.Request, key: VirtualKey) -> tuple[str, str | None, str | None]:
    """(agent, campaign, task) of a request: the key's agent unless a header names one the
    key allows (else a header could leave a capped agent scope)."""
    agent = _header(request, "X-Costwall-Agent")
    if agent is None:
        agent = key.agent
    elif not key.allows_agent(agent):
        raise Forbidden(f"Key '{key.name}' may not attribute requests to agent type "
                        f"'{agent}' (X-Costwall-Agent may name only the agent types in the "
                        "key's agents list).", param="X-Costwall-Agent",
                        code="agent_not_allowed")
    return agent, _header(request, "X-Costwall-Campaign"), _header(request, "X-Costwall-Task")


def end_user(request: web.Request, payload: dict[str, Any]) -> str | None:
    """The end user a request is for: ``X-Costwall-User``, else the body's ``user`` (the
    OpenAI field for it). At most 128 printable characters, like every attribution value:
    it is stored per request and may carry a cap (``budgets.users``)."""
    user = _header(request, "X-Costwall-User")
    if user is not None:
        return user
    value = payload.get("user")
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest("The 'user' field must be a string (the end user's id).", param="user")
    value = value.strip()
    if not value:
        return None
    if len(value) > _HEADER_VALUE_MAX or not value.isprintable():
        raise BadRequest(f"The 'user' field must be at most {_HEADER_VALUE_MAX} printable "
                         "characters.", param="user")
    return value


def new_request_id() -> str:
    """A fresh id for a request (``X-Costwall-Request-Id``, the ledger row)."""
    return "cw-" + secrets.token_hex(12)
