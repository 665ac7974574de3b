"""The configuration's sections, one frozen dataclass each: every setting declared once.

To add a setting, add one ``setting(default, help, kind)`` field to its section and a row to
README.md's configuration table (``tests/test_config_sections.py`` fails until both exist).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from gateway.config.fields import Context, Section, setting
from gateway.config.kinds import (
    Addresses,
    AutoBool,
    Bool,
    Choice,
    DatabaseUrl,
    EnvName,
    FsPath,
    HttpUrl,
    Int,
    Networks,
    Seconds,
    Text,
)

# The price table shipped inside the package (a copy of config/pricing.yaml, kept identical
# by tools/gen_pricing.py --write); used when a config does not set `pricing`.
PACKAGED_PRICING = Path(__file__).resolve().parent.parent / "data" / "pricing.yaml"


@dataclass(frozen=True, slots=True)
class ServerSettings(Section):
    KEY = "server"
    host: str = setting("127.0.0.1", "listen address", env="COSTWALL_HOST")
    port: int = setting(8080, "listen port", Int(0, 65535), env="COSTWALL_PORT")


@dataclass(frozen=True, slots=True)
class UpstreamSettings(Section):
    KEY = "upstream"
    base_url: str = setting("https://api.openai.com/v1", "the OpenAI-compatible upstream",
                            HttpUrl(), env="COSTWALL_UPSTREAM_URL")
    api_key_env: str = setting("OPENAI_API_KEY", "variable holding the gateway's own upstream "
                               "key; \"\": a keyless upstream", EnvName())
    timeout_s: float = setting(600.0, "total time for answers; longest gap between stream reads",
                               Seconds())
    connect_timeout_s: float = setting(10.0, "time to open an upstream connection", Seconds())
    max_connections: int = setting(1000, "upstream connection pool size", Int(1, 100_000))
    # internal: the secret itself, read from the variable api_key_env names
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, ctx: Context) -> Self:
        values = ctx.read(cls)
        key_env = values["api_key_env"]
        api_key = (ctx.env.get(key_env) or None) if key_env else None
        if api_key is None and key_env:
            ctx.warnings.append(
                f"upstream key: environment variable {key_env} is not set (`costwall serve` "
                "refuses to start without it unless the upstream is on this machine; declare a "
                "keyless upstream with api_key_env: \"\")")
        return cls(**values, api_key=api_key)


@dataclass(frozen=True, slots=True)
class LedgerSettings(Section):
    KEY = "ledger"
    database: str = setting("sqlite:///data/costwall.db", "sqlite:///PATH or "
                            "postgresql://USER@HOST/DB", DatabaseUrl(), env="COSTWALL_DB",
                            root=True)
    synchronous: str = setting("NORMAL", "SQLite: NORMAL survives crashes, FULL power loss",
                               Choice(("NORMAL", "FULL"), upper=True))
    pool_size: int = setting(10, "PostgreSQL connection pool", Int(1, 1000))
    # PostgreSQL: a replica not seen for this long is presumed dead and its open requests
    # are charged at their reserved cost by the others.
    reclaim_after_s: float = setting(10.0, "PostgreSQL: a silent replica is presumed dead "
                                     "after this long", Seconds(2, 3600))


@dataclass(frozen=True, slots=True)
class GeneralSettings(Section):
    """The top-level keys that are not sections."""

    KEY = ""
    logs_dir: Path = setting(Path("logs"), "audit trail folder", FsPath(),
                             env="COSTWALL_LOG_DIR")
    reports_dir: Path = setting(Path("reports"), "invoices folder", FsPath(),
                                env="COSTWALL_REPORTS_DIR")
    pricing: Path = setting(PACKAGED_PRICING, "the price table", FsPath())
    unknown_model: str = setting("reject", "or a model whose prices apply to unpriced models")


@dataclass(frozen=True, slots=True)
class AdminSettings(Section):
    KEY = "admin"
    token_env: str = setting("COSTWALL_ADMIN_TOKEN", "variable holding the full admin token")
    finance_token_env: str = setting("COSTWALL_FINANCE_TOKEN", "variable holding the "
                                     "read-only finance token")
    # Admin cookies' Secure flag: None = when the request came over HTTPS (directly, or per
    # X-Forwarded-Proto from one of trusted_proxies); True/False = always/never.
    secure_cookies: bool | None = setting(None, "Secure session cookies: true, false or auto",
                                          AutoBool())
    trusted_proxies: tuple[str, ...] = setting((), "proxies whose X-Forwarded-Proto is believed",
                                               Networks())
    # internal: the tokens themselves, read from the variables named above
    token: str | None = field(default=None, repr=False)
    finance_token: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, ctx: Context) -> Self:
        values = ctx.read(cls)
        token_env, finance_env = values["token_env"], values["finance_token_env"]
        token, finance = ctx.env.get(token_env) or None, ctx.env.get(finance_env) or None
        if token is None:
            ctx.warnings.append(f"admin token: environment variable {token_env} is not set "
                                "(admin UI and API are closed)")
        if finance is None:
            ctx.warnings.append(f"finance token: environment variable {finance_env} is not set")
        for name, tok in ((token_env, token), (finance_env, finance)):
            if tok is not None and len(tok) < 16:
                ctx.problems.append(f"{name}: admin tokens must be at least 16 characters")
        if token and token == finance:
            ctx.problems.append("admin and finance tokens must differ")
        return cls(**values, token=token, finance_token=finance)


@dataclass(frozen=True, slots=True)
class LimitsSettings(Section):
    KEY = "limits"
    max_body_bytes: int = setting(32 * 1024 * 1024, "larger request bodies get 413",
                                  Int(1024, 2**31))
    shutdown_grace_s: float = setting(30.0, "how long SIGTERM waits for in-flight streams",
                                      Seconds())
    # A connection must send a complete request head within this long of opening (or of its
    # previous response), else it is closed: slowloris clients cannot pin connections.
    header_timeout_s: float = setting(30.0, "time to send a request head; idle keep-alive",
                                      Seconds())


@dataclass(frozen=True, slots=True)
class LoggingSettings(Section):
    KEY = "logging"
    format: str = setting("text", "text, or json for one object per line",
                          Choice(("text", "json")))
    level: str = setting("INFO", "log level",
                         Choice(("DEBUG", "INFO", "WARNING", "ERROR"), upper=True))
    access: bool = setting(True, "one line per proxied request", Bool())


@dataclass(frozen=True, slots=True)
class InvoiceSettings(Section):
    KEY = "invoices"
    company: str = setting("costwall", "name on invoices", Text())
    auto: bool = setting(False, "issue last month's invoices once the month has closed (one "
                         "replica, no cron)", Bool())
    email_to: tuple[str, ...] = setting((), "mail issued invoices (PDF and CSV) to these "
                                        "addresses (uses alerts.smtp)", Addresses())


@dataclass(frozen=True, slots=True)
class OverrideSettings(Section):
    KEY = "override"
    allow: bool = setting(False, "initial global override", Bool(), env="ALLOW_BUDGET_OVERRIDE",
                          label="override.allow / ALLOW_BUDGET_OVERRIDE")
