"""Header hygiene for the proxy: pure functions over header pairs.

RFC 9110 section 7.6.1: hop-by-hop headers (and every header ``Connection`` names) belong to one
connection and are never forwarded. ``Host`` and ``Authorization`` are replaced: the upstream
never sees a virtual key, and agents never see the upstream key.
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "te", "transfer-encoding", "upgrade",
    "proxy-authenticate", "proxy-authorization", "trailer", "trailers",
})
# Replaced or recomputed by the gateway, or meaningful only to it.
_REQUEST_DROP = HOP_BY_HOP | {
    "host", "authorization", "content-length", "accept-encoding", "cookie",
    "openai-organization", "openai-project", "x-forwarded-for", "forwarded",
}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "content-encoding", "server", "date"}


def _named_by_connection(headers: Iterable[tuple[str, str]]) -> set[str]:
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            named.update(v.strip().lower() for v in value.split(",") if v.strip())
    return named


def upstream_request_headers(
    headers: Iterable[tuple[str, str]], upstream_key: str | None
) -> list[tuple[str, str]]:
    """Client headers to send upstream: hop-by-hop and costwall's own dropped, key swapped."""
    pairs = list(headers)
    drop = _REQUEST_DROP | _named_by_connection(pairs)
    out = [
        (name, value)
        for name, value in pairs
        if name.lower() not in drop and not name.lower().startswith("x-costwall-")
    ]
    # Ask for an uncompressed body: the gateway reads usage from it and relays it as is.
    out.append(("Accept-Encoding", "identity"))
    if upstream_key:
        out.append(("Authorization", f"Bearer {upstream_key}"))
    return out


def client_response_headers(
    headers: Iterable[tuple[str, str]], upstream_key: str | None = None
) -> list[tuple[str, str]]:
    """Upstream response headers to relay to the client (Retry-After and the rest included).

    An upstream that echoes the gateway's key in a header gets it redacted (``redact_key``).
    """
    pairs = list(headers)
    drop = _RESPONSE_DROP | _named_by_connection(pairs)
    out = [(name, value) for name, value in pairs if name.lower() not in drop]
    if upstream_key:
        out = [(name, value.replace(upstream_key, REDACTED)) for name, value in out]
    return out


REDACTED = "[redacted]"


def redact_key(body: bytes, upstream_key: str | None) -> bytes:
    """``body`` with every copy of the upstream key replaced: agents never see that key.

    Some OpenAI-compatible upstreams echo the presented key in their error messages; the
    gateway relays errors unchanged otherwise, so this is the one place the key is scrubbed.
    """
    if not upstream_key or not body:
        return body
    needle = upstream_key.encode()
    return body.replace(needle, REDACTED.encode()) if needle in body else body
