"""Talking to the upstream API: timeouts, telling a stream from a body, the 502 for a
refused gateway key, and the authenticated ``GET /v1/models`` pass-through (costs nothing)."""

from __future__ import annotations

import functools
import re
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.errors import NotFound, UpstreamAuthFailed, UpstreamTimeout, UpstreamUnavailable
from gateway.headers import client_response_headers, redact_key, upstream_request_headers
from gateway.inbound import REQUEST_ID_KEY
from gateway.services import GATEWAY

# A model id as OpenAI spells them (``gpt-4o``, ``ft:gpt-4o-mini:org::abc123``): no "/" or
# "..", so the pass-through cannot reach other upstream paths with the gateway's key.
_MODELS_PATH = re.compile(r"models(/[A-Za-z0-9][A-Za-z0-9._:@+-]{0,255})?")


def upstream_auth_failed(key_env: str, headers: list[tuple[str, str]]) -> web.Response:
    """A 502 that says whose key failed: agents must not blame (or rotate) their virtual key.
    ``x-should-retry: false``: retrying cannot help until the operator fixes the key."""
    where = f" (environment variable {key_env})" if key_env else " (none is configured)"
    error = UpstreamAuthFailed(
        "The upstream API rejected costwall's own upstream key; your virtual key is fine. "
        f"The gateway operator must fix the upstream key{where}.")
    headers = [(k, v) for k, v in headers
               if k.lower() not in ("content-type", "content-length", "content-encoding",
                                    "www-authenticate")]
    headers += [("X-Costwall-Upstream-Auth", "failed"), ("x-should-retry", "false")]
    return web.Response(status=error.status, body=error.to_json(), headers=headers,
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
    """GET /v1/models[/id]: authenticated pass-through, costs nothing."""
    gw = request.app[GATEWAY]
    gw.keys.authenticate(request.headers.get("Authorization"))
    tail = request.match_info["tail"]
    if not _MODELS_PATH.fullmatch(tail):  # no "..": only /models[/id] upstream, never beyond
        raise NotFound(f"Unknown endpoint GET /v1/{tail[:100]}.")
    url = f"{gw.settings.upstream_url}/{tail}"
    headers = upstream_request_headers(request.headers.items(), gw.settings.upstream_key)
    try:
        async with gw.session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(
                total=gw.settings.upstream_timeout_s)) as upstream:
            key = gw.settings.upstream_key
            if upstream.status == 401:  # costwall's key, not the agent's (see proxy.relay_body)
                return upstream_auth_failed(gw.settings.upstream_key_env, [
                    ("X-Costwall-Request-Id", request[REQUEST_ID_KEY])])
            response = web.Response(status=upstream.status,
                                    body=redact_key(await upstream.read(), key))
            for name, value in client_response_headers(upstream.headers.items(), key):
                response.headers.add(name, value)
    except TimeoutError:
        raise UpstreamTimeout("The upstream API did not answer in time.") from None
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"The upstream API is unreachable ({type(exc).__name__}).") \
            from None
    response.headers["X-Costwall-Request-Id"] = request[REQUEST_ID_KEY]
    return response
