"""Talking to the upstream API: timeouts, telling a stream from a body, the 502 for a
refused gateway key, and the authenticated requests that cost nothing: ``GET /v1/models``
and the free routes (``POST /v1/messages/count_tokens``)."""

from __future__ import annotations

import functools
import re
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.config.upstreams import UpstreamEntry
from gateway.endpoints import FREE_ROUTES
from gateway.errors import NotFound, UpstreamAuthFailed, UpstreamTimeout, UpstreamUnavailable
from gateway.headers import client_response_headers, redact_key, upstream_request_headers
from gateway.inbound import REQUEST_ID_KEY, read_payload, route_model
from gateway.providers import KINDS, UpstreamKind
from gateway.services import GATEWAY

# A model id as OpenAI spells them (``gpt-4o``, ``ft:gpt-4o-mini:org::abc123``): no "/" or
# "..", so the pass-through cannot reach other upstream paths with the gateway's key.
_MODELS_PATH = re.compile(r"models(/[A-Za-z0-9][A-Za-z0-9._:@+-]{0,255})?")


def upstream_auth_failed(upstream: UpstreamEntry, kind: UpstreamKind,
                         headers: list[tuple[str, str]]) -> web.Response:
    """A 502 that says whose key failed: agents must not blame (or rotate) their virtual key.
    ``x-should-retry: false``: retrying cannot help until the operator fixes the key."""
    key_env = upstream.api_key_env
    where = f" (environment variable {key_env})" if key_env else " (none is configured)"
    error = UpstreamAuthFailed(
        f"The upstream API ({upstream.name}) rejected costwall's own upstream key; your "
        f"virtual key is fine. The gateway operator must fix the upstream key{where}.")
    headers = [(k, v) for k, v in headers
               if k.lower() not in ("content-type", "content-length", "content-encoding",
                                    "www-authenticate")]
    headers += [("X-Costwall-Upstream-Auth", "failed"), ("x-should-retry", "false")]
    return web.Response(status=error.status, body=kind.error_body(error), headers=headers,
                        content_type="application/json")


def is_stream(asked: bool, content_type: str) -> bool:
    """Relay as SSE: what says it is SSE, and whatever answers a ``stream: true`` request
    unless it is JSON (an upstream error, or an upstream that ignored ``stream``), whose
    usage is read from the body. Some upstreams label a stream ``text/plain``, or nothing."""
    return content_type == "text/event-stream" or (asked and content_type != "application/json")


@functools.lru_cache(maxsize=8)
def upstream_timeout(stream: bool, timeout_s: float, connect_s: float) -> aiohttp.ClientTimeout:
    """The upstream timeouts (immutable, so one object per setting serves every request)."""
    return aiohttp.ClientTimeout(total=None if stream else timeout_s, sock_connect=connect_s,
                                 sock_read=timeout_s)


def json_or_none(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


async def handle_models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models[/id]: authenticated, costs nothing. One upstream for every model: its
    list, passed through. Several upstreams: the priced models some upstream serves, listed
    by costwall itself (``GET /v1/models/{id}`` goes to that model's upstream)."""
    gw = request.app[GATEWAY]
    gw.keys.authenticate(request.headers.get("Authorization"), request.headers.get("x-api-key"))
    tail = request.match_info["tail"]
    if not _MODELS_PATH.fullmatch(tail):  # no "..": only /models[/id] upstream, never beyond
        raise NotFound(f"Unknown endpoint GET /v1/{tail[:100]}.")
    if not gw.router.several:
        upstream = gw.router.upstreams[0]
    elif tail == "models":
        return _priced_models(request)
    else:
        found = gw.router.route(tail.removeprefix("models/"))
        if found is None:
            raise NotFound(f"The model '{tail[7:107]}' is not served by any upstream.")
        upstream = found
    kind = KINDS[upstream.kind]
    headers = upstream_request_headers(request.headers.items(), upstream.api_key, kind.auth)
    return await _pass_through(request, "GET", upstream, kind, tail, headers, None)


def _priced_models(request: web.Request) -> web.Response:
    """The models of the price table an upstream serves, in the shape the client speaks
    (Anthropic's when it sends ``anthropic-version``)."""
    gw = request.app[GATEWAY]
    served = sorted((price.name, upstream.name) for price in gw.prices
                    if (upstream := gw.router.route(price.name)) is not None)
    if "anthropic-version" in request.headers:
        data: list[dict[str, Any]] = [
            {"type": "model", "id": name, "display_name": name,
             "created_at": "1970-01-01T00:00:00Z"} for name, _ in served]
        body: dict[str, Any] = {"data": data, "has_more": False,
                                "first_id": data[0]["id"] if data else None,
                                "last_id": data[-1]["id"] if data else None}
    else:
        body = {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": owner}
            for name, owner in served]}
    return web.Response(body=orjson.dumps(body), content_type="application/json",
                        headers={"X-Costwall-Request-Id": request[REQUEST_ID_KEY]})


async def handle_free(request: web.Request) -> web.StreamResponse:
    """POST of a free route (``/v1/messages/count_tokens``): authenticated, routed by its
    model to an upstream of the route's kind, forwarded with the gateway's key, never charged
    and never budgeted (the upstream does not bill it)."""
    gw = request.app[GATEWAY]
    gw.keys.authenticate(request.headers.get("Authorization"), request.headers.get("x-api-key"))
    path = request.path.removeprefix("/v1/")
    kind = FREE_ROUTES[path]
    body, payload = await read_payload(request, gw.settings.max_body_bytes)
    _, upstream = route_model(gw, payload, kind)
    headers = upstream_request_headers(request.headers.items(), upstream.api_key, kind.auth)
    return await _pass_through(request, "POST", upstream, kind, path, headers, body)


async def _pass_through(request: web.Request, method: str, upstream: UpstreamEntry,
                        kind: UpstreamKind, path: str, headers: list[tuple[str, str]],
                        body: bytes | None) -> web.Response:
    """Send one request upstream and relay its whole answer (the key redacted, a refused
    gateway key as costwall's 502)."""
    gw = request.app[GATEWAY]
    request_id = [("X-Costwall-Request-Id", request[REQUEST_ID_KEY])]
    try:
        async with gw.sessions[upstream.name].request(
                method, kind.url(upstream.base_url, path), data=body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=upstream.timeout_s)) as answer:
            key = upstream.api_key
            if answer.status == 401:  # costwall's key, not the agent's (see proxy.relay_body)
                return upstream_auth_failed(upstream, kind, request_id)
            response = web.Response(status=answer.status,
                                    body=redact_key(await answer.read(), key))
            for name, value in client_response_headers(answer.headers.items(), key):
                response.headers.add(name, value)
    except TimeoutError:
        raise UpstreamTimeout("The upstream API did not answer in time.") from None
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"The upstream API is unreachable ({type(exc).__name__}).") \
            from None
    response.headers["X-Costwall-Request-Id"] = request[REQUEST_ID_KEY]
    return response
