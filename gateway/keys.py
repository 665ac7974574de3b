"""Virtual keys: configured ones plus those admins create, looked up by SHA-256."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.config import VirtualKey, hash_key
from gateway.errors import Unauthorized
from gateway.ledger import KeyRecord


class KeyRing:
    """Maps a presented secret to its key. Rebuilt (not mutated) when admins change keys."""

    def __init__(self, configured: Iterable[VirtualKey], stored: Iterable[KeyRecord] = ()):
        self.configured = tuple(configured)
        self.reload(stored)

    def reload(self, stored: Iterable[KeyRecord]) -> None:
        by_hash = {k.key_sha256: k for k in self.configured}
        for r in stored:
            if r.revoked_at is None:
                by_hash[r.key_sha256] = VirtualKey(r.name, r.key_sha256, r.tenant, r.agent,
                                                   r.can_override, frozenset(r.agents))
        self._by_hash = by_hash
        self.tenants = frozenset(k.tenant for k in by_hash.values())
        self.agents = frozenset(k.agent for k in by_hash.values()).union(
            *(k.agents - {"*"} for k in by_hash.values()))
        self.names = frozenset(k.name for k in by_hash.values())

    def authenticate(self, authorization: str | None,
                     api_key: str | None = None) -> VirtualKey:
        """The key behind an ``Authorization: Bearer`` header, else an ``x-api-key`` header
        (how the ``anthropic`` SDK and Claude Code send it), or 401."""
        if authorization and authorization[:7].lower() == "bearer ":
            secret = authorization[7:].strip()
        elif not authorization and api_key and api_key.strip():
            secret = api_key.strip()
        else:
            raise Unauthorized(
                "Missing API key. Send your costwall virtual key as 'Authorization: Bearer "
                "<key>' (or as 'x-api-key: <key>')."
            )
        try:
            digest = hash_key(secret)
        except UnicodeEncodeError:  # bytes that are not UTF-8 cannot be a key
            digest = ""
        key = self._by_hash.get(digest)
        if key is None:
            raise Unauthorized("Incorrect API key provided: not a known costwall virtual key.")
        return key
