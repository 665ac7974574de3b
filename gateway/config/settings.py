"""``Settings``: every section, frozen, plus the flat names older code reads.

New code reads sections (``settings.upstream.base_url``). The flat names
(``settings.upstream_url``) are the COMPATIBILITY SURFACE: read-only properties delegating to the
sections, also accepted as keyword arguments by ``Settings(...)`` and ``dataclasses.replace`` so
existing callers and tests keep working while other modules move to sections.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway.config.alerts import AlertSettings
from gateway.config.budgets import BudgetSettings
from gateway.config.fields import Section
from gateway.config.keys import VirtualKey
from gateway.config.rates import RateLimitSettings
from gateway.config.sections import (
    AdminSettings,
    GeneralSettings,
    InvoiceSettings,
    LedgerSettings,
    LimitsSettings,
    LoggingSettings,
    OverrideSettings,
    ServerSettings,
    UpstreamSettings,
)
from gateway.config.upstreams import UpstreamEntry

# flat name -> (section attribute, field): the compatibility surface, in one table.
FLAT: dict[str, tuple[str, str]] = {
    "host": ("server", "host"), "port": ("server", "port"),
    "upstream_url": ("upstream", "base_url"), "upstream_key": ("upstream", "api_key"),
    "upstream_key_env": ("upstream", "api_key_env"),
    "upstream_timeout_s": ("upstream", "timeout_s"),
    "upstream_connect_timeout_s": ("upstream", "connect_timeout_s"),
    "upstream_max_connections": ("upstream", "max_connections"),
    "database": ("ledger", "database"), "db_synchronous": ("ledger", "synchronous"),
    "db_pool_size": ("ledger", "pool_size"), "db_reclaim_after_s": ("ledger", "reclaim_after_s"),
    "logs_dir": ("general", "logs_dir"), "reports_dir": ("general", "reports_dir"),
    "pricing_path": ("general", "pricing"), "unknown_model": ("general", "unknown_model"),
    "admin_token": ("admin", "token"), "finance_token": ("admin", "finance_token"),
    "admin_secure_cookies": ("admin", "secure_cookies"),
    "admin_trusted_proxies": ("admin", "trusted_proxies"),
    "max_body_bytes": ("limits", "max_body_bytes"),
    "shutdown_grace_s": ("limits", "shutdown_grace_s"),
    "header_timeout_s": ("limits", "header_timeout_s"),
    "log_format": ("logging", "format"), "log_level": ("logging", "level"),
    "access_log": ("logging", "access"), "invoice_company": ("invoices", "company"),
    "invoices_auto": ("invoices", "auto"),
    "override_allow": ("override", "allow"),
}


@dataclass(frozen=True, init=False)
class Settings:
    """Everything costwall reads at start. Built by ``load_settings``; never mutated."""

    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    general: GeneralSettings = field(default_factory=GeneralSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    budgets: BudgetSettings = field(default_factory=BudgetSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    invoices: InvoiceSettings = field(default_factory=InvoiceSettings)
    override: OverrideSettings = field(default_factory=OverrideSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    rate_limits: RateLimitSettings = field(default_factory=RateLimitSettings)
    keys: tuple[VirtualKey, ...] = ()
    upstreams: tuple[UpstreamEntry, ...] = ()  # empty: the lone ``upstream`` section

    def __init__(self, **values: Any) -> None:
        """Sections by name, plus any flat name of ``FLAT`` (applied on top of them)."""
        flat = {name: values.pop(name) for name in list(values) if name in FLAT}
        for f in self.__dataclass_fields__.values():
            if f.name in values:
                value = values.pop(f.name)
            else:
                value = f.default if f.default_factory is MISSING else f.default_factory()
            object.__setattr__(self, f.name, value)
        if values:
            raise TypeError(f"Settings: unknown settings {', '.join(sorted(values))}")
        changes: dict[str, dict[str, Any]] = {}
        for name, value in flat.items():
            section, attr = FLAT[name]
            changes.setdefault(section, {})[attr] = value
        for section, attrs in changes.items():
            object.__setattr__(self, section, replace(getattr(self, section), **attrs))

    # -- compatibility surface: flat read-only names (new code reads the sections) --------------
    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def upstream_url(self) -> str:
        return self.upstream.base_url

    @property
    def upstream_key(self) -> str | None:
        return self.upstream.api_key

    @property
    def upstream_key_env(self) -> str:
        return self.upstream.api_key_env

    @property
    def upstream_timeout_s(self) -> float:
        return self.upstream.timeout_s

    @property
    def upstream_connect_timeout_s(self) -> float:
        return self.upstream.connect_timeout_s

    @property
    def upstream_max_connections(self) -> int:
        return self.upstream.max_connections

    @property
    def database(self) -> str:
        return self.ledger.database

    @property
    def db_synchronous(self) -> str:
        return self.ledger.synchronous

    @property
    def db_pool_size(self) -> int:
        return self.ledger.pool_size

    @property
    def db_reclaim_after_s(self) -> float:
        return self.ledger.reclaim_after_s

    @property
    def logs_dir(self) -> Path:
        return self.general.logs_dir

    @property
    def reports_dir(self) -> Path:
        return self.general.reports_dir

    @property
    def pricing_path(self) -> Path:
        return self.general.pricing

    @property
    def unknown_model(self) -> str:
        return self.general.unknown_model

    @property
    def admin_token(self) -> str | None:
        return self.admin.token

    @property
    def finance_token(self) -> str | None:
        return self.admin.finance_token

    @property
    def admin_secure_cookies(self) -> bool | None:
        return self.admin.secure_cookies

    @property
    def admin_trusted_proxies(self) -> tuple[str, ...]:
        return self.admin.trusted_proxies

    @property
    def max_body_bytes(self) -> int:
        return self.limits.max_body_bytes

    @property
    def shutdown_grace_s(self) -> float:
        return self.limits.shutdown_grace_s

    @property
    def header_timeout_s(self) -> float:
        return self.limits.header_timeout_s

    @property
    def log_format(self) -> str:
        return self.logging.format

    @property
    def log_level(self) -> str:
        return self.logging.level

    @property
    def access_log(self) -> bool:
        return self.logging.access

    @property
    def invoice_company(self) -> str:
        return self.invoices.company

    @property
    def invoices_auto(self) -> bool:
        return self.invoices.auto

    @property
    def override_allow(self) -> bool:
        return self.override.allow


# Settings attribute -> section class: what ``load_settings`` parses (``keys`` is a list).
SECTIONS: dict[str, type[Section]] = {
    "server": ServerSettings, "upstream": UpstreamSettings, "ledger": LedgerSettings,
    "general": GeneralSettings, "admin": AdminSettings, "budgets": BudgetSettings,
    "limits": LimitsSettings, "logging": LoggingSettings, "invoices": InvoiceSettings,
    "override": OverrideSettings, "alerts": AlertSettings, "rate_limits": RateLimitSettings,
}
assert {*SECTIONS, "keys", "upstreams"} == set(Settings.__dataclass_fields__)
