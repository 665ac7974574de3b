"""Which upstream serves a model: the first whose ``models`` pattern matches; pure.

One dict lookup per request once a model name has been seen (the answer is cached per model,
bounded like the price table's cache), so several upstreams cost an OpenAI-only gateway
nothing. A lone ``upstream:`` is one entry matching ``*``.

>>> from gateway.config.upstreams import UpstreamEntry
>>> router = Router([UpstreamEntry("anthropic", "anthropic", "http://a", ("claude-*",)),
...                  UpstreamEntry("openai", "openai", "http://o/v1", ("gpt-*", "o*"))])
>>> router.route("claude-opus-4-8").name, router.route("o3").name, router.route("llama-3")
('anthropic', 'openai', None)
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from gateway.config.upstreams import UpstreamEntry
from gateway.providers import KINDS, UpstreamKind

_CACHE_MAX = 10_000  # model names come from clients: the cache must stay bounded


class Router:
    """The configured upstreams in order, and the upstream of each model name."""

    def __init__(self, upstreams: Iterable[UpstreamEntry]):
        self.upstreams = tuple(upstreams)
        self.by_name = {u.name: u for u in self.upstreams}
        self._everything = (self.upstreams[0] if len(self.upstreams) == 1
                            and self.upstreams[0].models == ("*",) else None)
        self._cache: dict[str, UpstreamEntry | None] = {}

    def route(self, model: str) -> UpstreamEntry | None:
        """The first upstream whose pattern matches ``model``, or None."""
        if self._everything is not None:
            return self._everything
        try:
            return self._cache[model]
        except KeyError:
            pass
        found = next((u for u in self.upstreams
                      if any(fnmatchcase(model, p) for p in u.models)), None)
        if len(self._cache) < _CACHE_MAX:
            self._cache[model] = found
        return found

    @staticmethod
    def kind(upstream: UpstreamEntry) -> UpstreamKind:
        return KINDS[upstream.kind]

    @property
    def several(self) -> bool:
        """Configured with ``upstreams`` (or one that does not take every model)."""
        return self._everything is None
