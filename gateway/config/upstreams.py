"""The ``upstreams`` list: several upstreams, each serving the models its patterns match.

A lone ``upstream:`` section keeps meaning one OpenAI-compatible upstream for every model
(``resolved`` turns it into a one-entry list named ``openai``). ``upstreams:`` replaces it:

    upstreams:
      - {name: openai, kind: openai, base_url: "https://api.openai.com/v1",
         api_key_env: OPENAI_API_KEY, models: ["gpt-*", "o*", "text-embedding-*"]}
      - {name: anthropic, kind: anthropic, base_url: "https://api.anthropic.com",
         api_key_env: ANTHROPIC_API_KEY, models: ["claude-*"]}
      - {name: local, kind: openai, base_url: "http://127.0.0.1:8000/v1", api_key_env: "",
         models: ["llama-*"]}

A request goes to the first upstream whose pattern (shell-style, ``fnmatch``, case-sensitive)
matches its model. Secrets are read from the environment into internal fields and never echoed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.config.fields import Context, reject_unknown
from gateway.config.kinds import Choice, EnvName, HttpUrl, Int, Seconds
from gateway.config.sections import UpstreamSettings

if TYPE_CHECKING:
    from gateway.config.settings import Settings

KINDS = ("openai", "anthropic")
ENTRY_KEYS = frozenset({"name", "kind", "base_url", "api_key_env", "models", "timeout_s",
                        "connect_timeout_s", "max_connections"})
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LONE_NAME = "openai"  # the provider name of a lone ``upstream:`` section


@dataclass(frozen=True, slots=True)
class UpstreamEntry:
    """One upstream: where it is, how to talk to it (``kind``), which models it serves."""

    name: str
    kind: str
    base_url: str
    models: tuple[str, ...] = ("*",)
    api_key_env: str = ""
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    max_connections: int = 1000
    api_key: str | None = field(default=None, repr=False)


def resolved(settings: Settings) -> tuple[UpstreamEntry, ...]:
    """The upstreams requests are routed to: ``upstreams``, else the lone ``upstream``."""
    if settings.upstreams:
        return settings.upstreams
    lone = settings.upstream
    return (UpstreamEntry(LONE_NAME, "openai", lone.base_url, ("*",), lone.api_key_env,
                          lone.timeout_s, lone.connect_timeout_s, lone.max_connections,
                          lone.api_key),)


def parse_upstreams(ctx: Context) -> tuple[UpstreamEntry, ...]:
    """Read ``upstreams`` (a list), every problem into ``ctx.problems``."""
    raw = ctx.raw.get("upstreams")
    if raw is None:
        return ()
    if "upstream" in ctx.raw:
        ctx.problems.append("upstreams: replaces `upstream` (a lone OpenAI upstream); give one "
                            "or the other, not both")
    if not isinstance(raw, list) or not raw:
        ctx.problems.append("upstreams: must be a non-empty list of {name, kind, base_url, "
                            "api_key_env, models}")
        return ()
    if ctx.env.get("COSTWALL_UPSTREAM_URL"):
        ctx.warnings.append("COSTWALL_UPSTREAM_URL is ignored: the config lists `upstreams`")
    entries: list[UpstreamEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        entry = _entry(ctx, item, f"upstreams[{i}]")
        if entry is None:
            continue
        if entry.name in seen:
            ctx.problems.append(f"upstreams[{i}].name: '{entry.name}' is used twice")
        seen.add(entry.name)
        entries.append(entry)
    return tuple(entries)


def _entry(ctx: Context, item: Any, where: str) -> UpstreamEntry | None:
    problems = ctx.problems
    if not isinstance(item, Mapping):
        problems.append(f"{where}: must be a mapping ({', '.join(sorted(ENTRY_KEYS))})")
        return None
    reject_unknown(item, ENTRY_KEYS, (), where, problems)
    for required in ("name", "kind", "base_url", "models"):
        if required not in item:
            problems.append(f"{where}.{required}: required")
    name = str(item.get("name", ""))
    if "name" in item and not _NAME.fullmatch(name):
        problems.append(f"{where}.name: letters, digits, '.', '_' or '-' (at most 64), got "
                        f"{name[:40]!r}")
    kind = Choice(KINDS, echo=True).parse(item.get("kind", "openai"), f"{where}.kind",
                                          problems, None)
    base_url = HttpUrl().parse(item.get("base_url", "http://missing"), f"{where}.base_url",
                               problems, None)
    if kind == "anthropic" and base_url.endswith("/v1"):
        base_url = base_url[:-3]  # the Anthropic convention: the base without /v1
    models = _models(item.get("models"), f"{where}.models", problems)
    key_env = EnvName().parse(item.get("api_key_env", DEFAULT_KEY_ENV.get(kind, "")),
                              f"{where}.api_key_env", problems, None)
    default = UpstreamSettings.default
    timeout = Seconds().parse(item.get("timeout_s", default("timeout_s")),
                              f"{where}.timeout_s", problems, None)
    connect = Seconds().parse(item.get("connect_timeout_s", default("connect_timeout_s")),
                              f"{where}.connect_timeout_s", problems, None)
    pool = Int(1, 100_000).parse(item.get("max_connections", default("max_connections")),
                                 f"{where}.max_connections", problems, None)
    api_key = (ctx.env.get(key_env) or None) if key_env else None
    if api_key is None and key_env:
        ctx.warnings.append(
            f"upstream '{name}' key: environment variable {key_env} is not set (`costwall "
            "serve` refuses to start without it unless the upstream is on this machine; "
            "declare a keyless upstream with api_key_env: \"\")")
    return UpstreamEntry(name, kind, base_url, models, key_env, timeout, connect, pool, api_key)


def _models(raw: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or any(
            not isinstance(p, str) or not p.strip() for p in raw):
        problems.append(f"{where}: must be a non-empty list of model name patterns "
                        "(\"gpt-*\", \"claude-*\", \"*\")")
        return ()
    return tuple(p.strip() for p in raw)
