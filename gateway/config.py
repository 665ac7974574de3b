"""One frozen, typed settings object, loaded from YAML plus the environment and validated once.

Every problem is collected before anything starts, so ``costwall check`` can list them all.
YAML floats are read as ``Decimal`` (see ``load_yaml``): money never passes through a float.
Missing secrets (upstream key, admin tokens) are warnings, not errors, so the shipped config
checks clean on a fresh machine.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from gateway.money import MoneyError, to_pico

DEFAULT_CONFIG = Path("config/costwall.yaml")
DEFAULT_UPSTREAM = "https://api.openai.com/v1"
DEFAULT_DATABASE = "sqlite:///data/costwall.db"
DEFAULT_MAX_BODY = 32 * 1024 * 1024
SCOPES = ("global", "tenant", "agent", "campaign", "key")
_SCOPE_SECTIONS = {"tenants": "tenant", "agents": "agent", "campaigns": "campaign", "keys": "key"}
# SHA-256 of "sk-cw-example-content-agent", the example key of the shipped config files: a
# warning (not an error, so the shipped config checks clean) while it is still in use.
EXAMPLE_KEY_SHA256 = "371d09da1820b4fa634ce0e09901aa81b3b2b3a37ca329a14718b808a81c1cda"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


class ConfigError(Exception):
    """The configuration has problems; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _DecimalLoader(yaml.SafeLoader):
    """SafeLoader that reads YAML floats as exact Decimals."""


def _decimal(loader: yaml.SafeLoader, node: yaml.Node) -> Decimal:
    return Decimal(str(loader.construct_scalar(node)).replace("_", ""))  # type: ignore[arg-type]


_DecimalLoader.add_constructor("tag:yaml.org,2002:float", _decimal)


def load_yaml(path: Path) -> Any:
    """Parse a YAML file with floats kept exact."""
    with open(path, encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_DecimalLoader)


@dataclass(frozen=True, slots=True)
class VirtualKey:
    """A key agents present as their API key; only its SHA-256 is kept."""

    name: str
    key_sha256: str
    tenant: str
    agent: str = "default"
    can_override: bool = False


@dataclass(frozen=True, slots=True)
class BudgetSettings:
    timezone: str = "UTC"
    warn_at: tuple[Decimal, ...] = (Decimal("0.8"),)
    near_cap: str = "reject"
    min_output_tokens: int = 16
    # (scope, id) -> monthly limit in pico-USD; scope "global" uses id "global".
    limits: Mapping[tuple[str, str], int] = field(default_factory=dict)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything costwall reads at start. Built by ``load_settings``; never mutated."""

    host: str = "127.0.0.1"
    port: int = 8080
    upstream_url: str = "https://api.openai.com/v1"
    upstream_key: str | None = None
    upstream_key_env: str = "OPENAI_API_KEY"
    upstream_timeout_s: float = 600.0
    upstream_connect_timeout_s: float = 10.0
    upstream_max_connections: int = 1000
    database: str = "sqlite:///data/costwall.db"
    db_synchronous: str = "NORMAL"
    db_pool_size: int = 10
    # PostgreSQL: a replica not seen for this long is presumed dead and its open requests
    # are charged at their reserved cost by the others.
    db_reclaim_after_s: float = 10.0
    logs_dir: Path = Path("logs")
    reports_dir: Path = Path("reports")
    pricing_path: Path = Path("config/pricing.yaml")
    unknown_model: str = "reject"
    max_body_bytes: int = 32 * 1024 * 1024
    admin_token: str | None = None
    finance_token: str | None = None
    # Admin cookies' Secure flag: None = when the request came over HTTPS (directly, or per
    # X-Forwarded-Proto from one of admin_trusted_proxies); True/False = always/never.
    admin_secure_cookies: bool | None = None
    admin_trusted_proxies: tuple[str, ...] = ()
    budgets: BudgetSettings = field(default_factory=BudgetSettings)
    override_allow: bool = False
    keys: tuple[VirtualKey, ...] = ()
    log_format: str = "text"
    log_level: str = "INFO"
    access_log: bool = True  # one line per proxied request (logging.access)
    invoice_company: str = "costwall"
    shutdown_grace_s: float = 30.0


def hash_key(secret: str) -> str:
    """SHA-256 hex of a virtual key; keys are high-entropy, so a fast hash is enough."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _bool(value: Any, where: str, problems: list[str]) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    problems.append(f"{where}: expected true or false, got {value!r}")
    return False


def _int(value: Any, where: str, problems: list[str], lo: int = 0, hi: int = 2**31) -> int:
    try:
        if isinstance(value, (bool, float)):
            raise ValueError
        number = int(value)
        if isinstance(value, Decimal) and number != value:
            raise ValueError
    except (TypeError, ValueError, ArithmeticError):
        problems.append(f"{where}: expected a whole number, got {value!r}")
        return lo
    if not lo <= number <= hi:
        problems.append(f"{where}: must be between {lo} and {hi}, got {number}")
    return number


def _number(value: Any, where: str, problems: list[str]) -> float:
    """Durations are not money: a float is fine here."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        problems.append(f"{where}: expected a number of seconds, got {value!r}")
        return 0.0
    if number <= 0:
        problems.append(f"{where}: must be positive")
    return number


def _money(value: Any, where: str, problems: list[str]) -> int | None:
    if isinstance(value, Mapping):
        value = value.get("monthly_usd")
    try:
        return to_pico(value)
    except MoneyError as exc:
        problems.append(f"{where}: {exc}")
        return None


def _networks(value: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    """A list of IP addresses or CIDR networks (``10.0.0.0/8``), kept as normalised text."""
    if not isinstance(value, list):
        problems.append(f"{where}: must be a list of IP addresses or networks")
        return ()
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_network(str(item), strict=False)))
        except ValueError:
            problems.append(f"{where}: {str(item)[:60]!r} is not an IP address or network")
    return tuple(out)


def _section(raw: Mapping[str, Any], name: str, problems: list[str]) -> Mapping[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        problems.append(f"{name}: must be a mapping")
        return {}
    return value


def _parse_budgets(
    raw: Mapping[str, Any], env: Mapping[str, str], problems: list[str]
) -> BudgetSettings:
    limits: dict[tuple[str, str], int] = {}
    tz = str(raw.get("timezone", "UTC"))
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        problems.append(f"budgets.timezone: unknown time zone {tz!r}")
        tz = "UTC"
    warn_raw = raw.get("warn_at", [Decimal("0.8")])
    if not isinstance(warn_raw, list):
        warn_raw = [warn_raw]
    warn: list[Decimal] = []
    for i, w in enumerate(warn_raw):
        try:
            d = Decimal(str(w))
            if not Decimal(0) < d <= Decimal(1):
                raise ValueError
            warn.append(d)
        except (ArithmeticError, ValueError):
            problems.append(f"budgets.warn_at[{i}]: expected a fraction in (0, 1], got {w!r}")
    near_cap = str(raw.get("near_cap", "reject"))
    if near_cap not in ("reject", "clamp"):
        problems.append(f"budgets.near_cap: must be 'reject' or 'clamp', got {near_cap!r}")
    min_out = _int(raw.get("min_output_tokens", 16), "budgets.min_output_tokens", problems, 1)

    global_raw = env.get("MAX_MONTHLY_BUDGET", raw.get("global"))
    if global_raw is not None:
        where = ("MAX_MONTHLY_BUDGET" if "MAX_MONTHLY_BUDGET" in env
                 else "budgets.global.monthly_usd")
        pico = _money(global_raw, where, problems)
        if pico is not None:
            limits[("global", "global")] = pico
    for section, scope in _SCOPE_SECTIONS.items():
        entries = raw.get(section) or {}
        if not isinstance(entries, Mapping):
            problems.append(f"budgets.{section}: must be a mapping of id to {{monthly_usd: ...}}")
            continue
        for ident, spec in entries.items():
            where = f"budgets.{section}.{ident}"
            if not _ID_RE.match(str(ident)):
                problems.append(f"{where}: ids use letters, digits and . _ : @ - only")
            pico = _money(spec, f"{where}.monthly_usd", problems)
            if pico is not None:
                limits[(scope, str(ident))] = pico
    return BudgetSettings(tz, tuple(sorted(set(warn))), near_cap, min_out, limits)


def _parse_keys(raw: Any, problems: list[str]) -> tuple[VirtualKey, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append("keys: must be a list")
        return ()
    keys: list[VirtualKey] = []
    names: set[str] = set()
    for i, spec in enumerate(raw):
        where = f"keys[{i}]"
        if not isinstance(spec, Mapping):
            problems.append(f"{where}: must be a mapping")
            continue
        name = str(spec.get("name", ""))
        if not _ID_RE.match(name):
            problems.append(f"{where}.name: required; letters, digits and . _ : @ - only")
        if name in names:
            problems.append(f"{where}.name: duplicate key name {name!r}")
        names.add(name)
        if spec.get("key"):
            digest = hash_key(str(spec["key"]))
        elif spec.get("key_sha256"):
            digest = str(spec["key_sha256"]).lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                problems.append(f"{where}.key_sha256: must be 64 hex characters")
        else:
            problems.append(f"{where}: needs 'key' or 'key_sha256'")
            continue
        tenant = str(spec.get("tenant", ""))
        if not _ID_RE.match(tenant):
            problems.append(f"{where}.tenant: required; letters, digits and . _ : @ - only")
        agent = str(spec.get("agent", "default"))
        can_override = _bool(spec.get("can_override", False), f"{where}.can_override", problems)
        keys.append(VirtualKey(name, digest, tenant, agent, can_override))
    digests = [k.key_sha256 for k in keys]
    if len(digests) != len(set(digests)):
        problems.append("keys: two entries share the same secret")
    return tuple(keys)


def load_settings(
    path: Path | str | None = None, env: Mapping[str, str] | None = None
) -> tuple[Settings, list[str]]:
    """Load and validate; returns (settings, warnings) or raises ConfigError with every problem."""
    env = os.environ if env is None else env
    path = Path(path) if path is not None else Path(env.get("COSTWALL_CONFIG", DEFAULT_CONFIG))
    problems: list[str] = []
    warnings: list[str] = []
    try:
        raw = load_yaml(path) or {}
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    if not isinstance(raw, Mapping):
        raise ConfigError([f"{path}: top level must be a mapping"])
    known = {"server", "upstream", "database", "logs_dir", "reports_dir", "pricing",
             "unknown_model", "admin", "budgets", "override", "keys", "logging", "limits",
             "invoices", "ledger"}
    for extra in sorted(set(map(str, raw)) - known):
        problems.append(f"{extra}: unknown setting (known: {', '.join(sorted(known))})")

    server = _section(raw, "server", problems)
    upstream = _section(raw, "upstream", problems)
    admin = _section(raw, "admin", problems)
    override = _section(raw, "override", problems)
    logging_ = _section(raw, "logging", problems)
    limits = _section(raw, "limits", problems)
    ledger = _section(raw, "ledger", problems)
    invoices = _section(raw, "invoices", problems)

    host = str(env.get("COSTWALL_HOST", server.get("host", "127.0.0.1")))
    port = _int(env.get("COSTWALL_PORT", server.get("port", 8080)), "server.port", problems, 0,
                65535)
    upstream_url = str(env.get("COSTWALL_UPSTREAM_URL", upstream.get("base_url", DEFAULT_UPSTREAM)))
    if re.match(r"^https?://[^/]*@", upstream_url):  # checked first: never echo a password
        problems.append("upstream.base_url: credentials in the URL are not supported (the "
                        "gateway sends its own Authorization); use upstream.api_key_env")
    elif not re.match(r"^https?://[^/\s]+", upstream_url):
        problems.append(f"upstream.base_url: expected an http(s) URL, got {upstream_url!r}")
    key_env = str(upstream.get("api_key_env", "OPENAI_API_KEY"))
    upstream_key = env.get(key_env) or None
    if upstream_key is None:
        warnings.append(f"upstream key: environment variable {key_env} is not set "
                        "(requests are forwarded without an upstream key)")
    timeout = _number(upstream.get("timeout_s", 600), "upstream.timeout_s", problems)
    connect = _number(upstream.get("connect_timeout_s", 10), "upstream.connect_timeout_s",
                      problems)
    max_conn = _int(upstream.get("max_connections", 1000), "upstream.max_connections", problems,
                    1, 100_000)

    database = str(env.get("COSTWALL_DB", raw.get("database", DEFAULT_DATABASE)))
    if not database.startswith(("sqlite:///", "postgresql://", "postgres://")):
        problems.append("database: expected sqlite:///PATH or postgresql://USER@HOST/DB, "
                        f"got {database!r}")
    synchronous = str(ledger.get("synchronous", "NORMAL")).upper()
    if synchronous not in ("NORMAL", "FULL"):
        problems.append("ledger.synchronous: must be NORMAL or FULL")
    pool = _int(ledger.get("pool_size", 10), "ledger.pool_size", problems, 1, 1000)
    reclaim = _number(ledger.get("reclaim_after_s", 10), "ledger.reclaim_after_s", problems)
    if 0 < reclaim < 2 or reclaim > 3600:
        problems.append("ledger.reclaim_after_s: must be between 2 and 3600 seconds")

    token_env = str(admin.get("token_env", "COSTWALL_ADMIN_TOKEN"))
    finance_env = str(admin.get("finance_token_env", "COSTWALL_FINANCE_TOKEN"))
    admin_token = env.get(token_env) or None
    finance_token = env.get(finance_env) or None
    if admin_token is None:
        warnings.append(f"admin token: environment variable {token_env} is not set "
                        "(admin UI and API are closed)")
    if finance_token is None:
        warnings.append(f"finance token: environment variable {finance_env} is not set")
    for name, tok in ((token_env, admin_token), (finance_env, finance_token)):
        if tok is not None and len(tok) < 16:
            problems.append(f"{name}: admin tokens must be at least 16 characters")
    if admin_token and admin_token == finance_token:
        problems.append("admin and finance tokens must differ")
    secure_raw = admin.get("secure_cookies", "auto")
    secure_cookies = None if secure_raw in ("auto", None) else _bool(
        secure_raw, "admin.secure_cookies (true, false or auto)", problems)
    trusted_proxies = _networks(admin.get("trusted_proxies", []), "admin.trusted_proxies",
                                problems)

    unknown_model = str(raw.get("unknown_model", "reject"))
    pricing_path = Path(str(raw.get("pricing", "config/pricing.yaml")))
    budgets_raw = _section(raw, "budgets", problems)
    budgets = _parse_budgets(budgets_raw, env, problems)
    override_allow = _bool(env.get("ALLOW_BUDGET_OVERRIDE", override.get("allow", False)),
                           "override.allow / ALLOW_BUDGET_OVERRIDE", problems)
    keys = _parse_keys(raw.get("keys"), problems)
    for key in keys:
        if key.key_sha256 == hash_key(""):
            problems.append(f"keys.{key.name}: empty key")
        if key.key_sha256 == EXAMPLE_KEY_SHA256:
            warnings.append(f"keys.{key.name}: uses the example secret published in "
                            "config/costwall.yaml; anyone can present it, so replace it before "
                            "the gateway is reachable by others")

    log_format = str(logging_.get("format", "text"))
    if log_format not in ("text", "json"):
        problems.append("logging.format: must be text or json")
    log_level = str(logging_.get("level", "INFO")).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append("logging.level: must be DEBUG, INFO, WARNING or ERROR")
    access_log = _bool(logging_.get("access", True), "logging.access", problems)
    max_body = _int(limits.get("max_body_bytes", DEFAULT_MAX_BODY),
                    "limits.max_body_bytes", problems, 1024, 2**31)
    grace = _number(limits.get("shutdown_grace_s", 30), "limits.shutdown_grace_s", problems)

    settings = Settings(
        host=host, port=port, upstream_url=upstream_url.rstrip("/"), upstream_key=upstream_key,
        upstream_key_env=key_env, upstream_timeout_s=timeout, upstream_connect_timeout_s=connect,
        upstream_max_connections=max_conn, database=database, db_synchronous=synchronous,
        db_pool_size=pool, db_reclaim_after_s=reclaim,
        logs_dir=Path(env.get("COSTWALL_LOG_DIR", str(raw.get("logs_dir", "logs")))),
        reports_dir=Path(env.get("COSTWALL_REPORTS_DIR", str(raw.get("reports_dir", "reports")))),
        pricing_path=pricing_path, unknown_model=unknown_model, max_body_bytes=max_body,
        admin_token=admin_token, finance_token=finance_token, budgets=budgets,
        admin_secure_cookies=secure_cookies, admin_trusted_proxies=trusted_proxies,
        override_allow=override_allow, keys=keys, log_format=log_format, log_level=log_level,
        access_log=access_log, invoice_company=str(invoices.get("company", "costwall")),
        shutdown_grace_s=grace,
    )
    if problems:
        raise ConfigError(problems)
    return settings, warnings
