"""One frozen, typed settings object, loaded from YAML plus the environment and validated once.

``Settings`` holds one frozen section per part of the file (``settings.upstream.base_url``);
each section declares its settings once, with default, help and kind (``sections.py``), and
validates itself into a shared list of problems, so ``costwall check`` lists them all.
YAML floats are read as ``Decimal`` (see ``load_yaml``): money never passes through a float.
Missing secrets (upstream key, admin tokens) are warnings, not errors, so the shipped config
checks clean on a fresh machine.

Every section rejects keys it does not read, naming the closest known one (a typo such as
``server.prot`` must never silently fall back to a default). Relative paths in a config file
(``pricing``, ``logs_dir``, ``reports_dir``, a ``sqlite:///`` path, and their defaults) are
resolved against the config file's directory, so the current directory never matters; paths
given in environment variables are used as given (relative to the current directory, like any
path typed in a shell). Without ``pricing`` the price table shipped inside the package is used.

Modules: ``fields`` (how a setting is declared and read), ``kinds`` (value checks),
``sections``, ``budgets`` and ``keys`` (the sections), ``settings`` (``Settings`` and its flat
compatibility names), ``load`` (finding and reading the file).
"""

from __future__ import annotations

from gateway.config.budgets import SCOPES, BudgetSettings
from gateway.config.fields import NOT_YET, ConfigError
from gateway.config.keys import EXAMPLE_KEY_SHA256, VirtualKey, hash_key
from gateway.config.kinds import resolve_database, resolve_path
from gateway.config.load import (
    CONFIG_CANDIDATES,
    DEFAULT_CONFIG,
    SECTION_KEYS,
    find_config,
    load_settings,
    load_yaml,
    unknown_keys,
)
from gateway.config.sections import (
    PACKAGED_PRICING,
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
from gateway.config.settings import SECTIONS, Settings

# Older names for three declared defaults (the declarations are the one place they live).
DEFAULT_UPSTREAM: str = UpstreamSettings.default("base_url")
DEFAULT_DATABASE: str = LedgerSettings.default("database")
DEFAULT_MAX_BODY: int = LimitsSettings.default("max_body_bytes")


def is_loopback_url(url: str) -> bool:
    """True for an upstream on this machine (a local model server or the simulator)."""
    import ipaddress
    from urllib.parse import urlsplit

    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = [
    "CONFIG_CANDIDATES", "DEFAULT_CONFIG", "DEFAULT_DATABASE", "DEFAULT_MAX_BODY",
    "DEFAULT_UPSTREAM", "EXAMPLE_KEY_SHA256", "NOT_YET", "PACKAGED_PRICING", "SCOPES",
    "SECTIONS", "SECTION_KEYS", "AdminSettings", "BudgetSettings", "ConfigError",
    "GeneralSettings", "InvoiceSettings", "LedgerSettings", "LimitsSettings", "LoggingSettings",
    "OverrideSettings", "ServerSettings", "Settings", "UpstreamSettings", "VirtualKey",
    "find_config", "hash_key", "is_loopback_url", "load_settings", "load_yaml",
    "resolve_database", "resolve_path", "unknown_keys",
]
