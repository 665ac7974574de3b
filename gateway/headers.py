"""Header hygiene for the proxy: pure functions over header pairs.

RFC 9110 section 7.6.1: hop-by-hop headers (and every header ``Connection`` names) belong to one
connection and are never forwarded. ``Host`` and ``Authorization`` are replaced: the upstream
never sees a virtual key, and agents never see the upstream key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "te", "transfer-encoding", "upgrade",
    "proxy-authenticate", "proxy-authorization", "trailer", "trailers",
})
# Replaced or recomputed by the gateway, or meaningful only to it. The body is forwarded
# uncompressed (the server inflated a gzip/deflate body), so its Content-Encoding goes too.
_REQUEST_DROP = HOP_BY_HOP | {
    "host", "authorization", "x-api-key", "content-length", "accept-encoding", "cookie",
    "content-encoding", "openai-organization", "openai-project", "x-forwarded-for", "forwarded",
}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "content-encoding", "server", "date"}


def _split(
    headers: Iterable[tuple[str, str]], drop: frozenset[str]
) -> tuple[list[tuple[str, str, str]], set[str] | None]:
    """One pass: ``(lowercase name, name, value)`` not in ``drop``, and the names that
    ``Connection`` headers list (``None`` when there is none; ``connection`` is always in
    ``drop``)."""
    kept: list[tuple[str, str, str]] = []
    named: set[str] | None = None
    for name, value in headers:
        lower = name.lower()
        if lower in drop:
            if lower == "connection":
                named = named or set()
                named.update(v.strip().lower() for v in value.split(",") if v.strip())
            continue
        kept.append((lower, name, value))
    return kept, named


def _bearer(key: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


def upstream_request_headers(
    headers: Iterable[tuple[str, str]], upstream_key: str | None,
    auth: Callable[[str], list[tuple[str, str]]] = _bearer,
) -> list[tuple[str, str]]:
    """Client headers to send upstream: hop-by-hop and costwall's own dropped, key swapped.

    Both places a client may put its virtual key (``Authorization``, ``x-api-key``) are
    dropped; ``auth`` presents the gateway's key the upstream's way (``gateway.providers``).
    Everything else passes, ``anthropic-version`` and ``anthropic-beta`` included.
    """
    kept, named = _split(headers, _REQUEST_DROP)
    out = [
        (name, value)
        for lower, name, value in kept
        if not lower.startswith("x-costwall-") and (named is None or lower not in named)
    ]
    # Ask for an uncompressed body: the gateway reads usage from it and relays it as is.
    out.append(("Accept-Encoding", "identity"))
    if upstream_key:
        out.extend(auth(upstream_key))
    return out


def client_response_headers(
    headers: Iterable[tuple[str, str]], upstream_key: str | None = None
) -> list[tuple[str, str]]:
    """Upstream response headers to relay to the client (Retry-After and the rest included).

    An upstream that echoes the gateway's key in a header gets it redacted (``redact_key``).
    """
    kept, named = _split(headers, _RESPONSE_DROP)
    if upstream_key:
        return [(name, value.replace(upstream_key, REDACTED) if upstream_key in value
                 else value) for lower, name, value in kept
                if named is None or lower not in named]
    return [(name, value) for lower, name, value in kept if named is None or lower not in named]


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
