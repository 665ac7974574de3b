"""One frozen, typed settings object, loaded from YAML plus the environment and validated once.

Every problem is collected before anything starts, so ``costwall check`` can list them all.
YAML floats are read as ``Decimal`` (see ``load_yaml``): money never passes through a float.
Missing secrets (upstream key, admin tokens) are warnings, not errors, so the shipped config
checks clean on a fresh machine.

Every section rejects keys it does not read, naming the closest known one (a typo such as
``server.prot`` must never silently fall back to a default). Relative paths in a config file
(``pricing``, ``logs_dir``, ``reports_dir``, a ``sqlite:///`` path, and their defaults) are
resolved against the config file's directory, so the current directory never matters; paths
given in environment variables are used as given (relative to the current directory, like any
path typed in a shell). Without ``pricing`` the price table shipped inside the package is used.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from gateway.money import MoneyError, to_pico

DEFAULT_CONFIG = Path("config/costwall.yaml")
# Looked for in this order when neither --config nor COSTWALL_CONFIG names a file: the
# repository layout, then the file `costwall init` writes into the current directory.
CONFIG_CANDIDATES = (DEFAULT_CONFIG, Path("costwall.yaml"))
# The price table shipped inside the package (a copy of config/pricing.yaml, kept identical
# by tools/gen_pricing.py --write); used when a config does not set `pricing`.
PACKAGED_PRICING = Path(__file__).resolve().parent / "data" / "pricing.yaml"
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
    """The configuration has problems; ``problems`` lists every one of them.

    ``pricing_path`` is the price table the config names (when it could be read), so
    ``costwall check`` validates that table even when the rest of the config is wrong.
    """

    def __init__(self, problems: list[str], pricing_path: Path | None = None):
        super().__init__("\n".join(problems))
        self.problems = problems
        self.pricing_path = pricing_path


# What each section reads. A key outside these is an error naming the closest known key;
# a key of the contract that this version does not implement yet gets its own message.
SECTION_KEYS: dict[str, frozenset[str]] = {
    "": frozenset({"server", "upstream", "database", "logs_dir", "reports_dir", "pricing",
                   "unknown_model", "admin", "budgets", "override", "keys", "logging",
                   "limits", "invoices", "ledger"}),
    "server": frozenset({"host", "port"}),
    "upstream": frozenset({"base_url", "api_key_env", "timeout_s", "connect_timeout_s",
                           "max_connections"}),
    "ledger": frozenset({"synchronous", "pool_size", "reclaim_after_s"}),
    "admin": frozenset({"token_env", "finance_token_env", "secure_cookies",
                         "trusted_proxies"}),
    "budgets": frozenset({"timezone", "warn_at", "near_cap", "min_output_tokens",
                          "max_tool_calls", "global", "tenants", "agents", "campaigns", "keys"}),
    "budget_entry": frozenset({"monthly_usd"}),
    "key": frozenset({"name", "key", "key_sha256", "tenant", "agent", "agents",
                      "can_override"}),
    "limits": frozenset({"max_body_bytes", "shutdown_grace_s", "header_timeout_s"}),
    "logging": frozenset({"format", "level", "access"}),
    "invoices": frozenset({"company", "auto"}),
    "override": frozenset({"allow"}),
}
NOT_YET: dict[str, frozenset[str]] = {
    "": frozenset({"rate_limits", "alerts", "upstreams"}),
    "budgets": frozenset({"users", "users_default"}),
    "budget_entry": frozenset({"weekly_usd", "daily_usd", "hourly_usd"}),
    "invoices": frozenset({"email_to"}),
}


def unknown_keys(section: Mapping[Any, Any], kind: str, where: str,
                 problems: list[str]) -> set[str]:
    """Report every key of ``section`` that costwall does not read; return the names suggested
    instead, so a caller can skip "required" for a field that is only misspelt."""
    known: Collection[str] = SECTION_KEYS[kind]
    later = NOT_YET.get(kind, frozenset())
    suggested: set[str] = set()
    for raw_name in section:
        name = str(raw_name)
        if name in known:
            continue
        path = f"{where}.{name}" if where else name
        if name in later:
            problems.append(f"{path}: not supported by this version of costwall yet")
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        if close:
            suggested.add(close[0])
            problems.append(f"{path}: unknown setting; did you mean `{close[0]}`?")
        else:
            problems.append(f"{path}: unknown setting (known: {', '.join(sorted(known))})")
    return suggested


def find_config(env: Mapping[str, str]) -> Path | None:
    """The config file to use when none is given: COSTWALL_CONFIG, else the first candidate
    that exists (None when there is none)."""
    if env.get("COSTWALL_CONFIG"):
        return Path(env["COSTWALL_CONFIG"])
    return next((p for p in CONFIG_CANDIDATES if p.is_file()), None)


def resolve_path(value: str, base: Path) -> Path:
    """A path from a config file: ``~`` expanded, relative ones joined to the file's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def resolve_database(url: str, base: Path) -> str:
    """``sqlite:///relative.db`` from a config file, made relative to the file's folder."""
    if not url.startswith("sqlite:///"):
        return url
    rest = url.removeprefix("sqlite:///")
    if rest == ":memory:" or not rest:
        return url
    return f"sqlite:///{resolve_path(rest, base)}"


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
    # Agent types ``X-Costwall-Agent`` may name besides ``agent`` ("*": any, cooperative).
    agents: frozenset[str] = frozenset()

    def allows_agent(self, agent: str) -> bool:
        """Whether this key may attribute a request to ``agent`` (its own is always allowed)."""
        return agent == self.agent or agent in self.agents or "*" in self.agents


@dataclass(frozen=True, slots=True)
class BudgetSettings:
    timezone: str = "UTC"
    warn_at: tuple[Decimal, ...] = (Decimal("0.8"),)
    near_cap: str = "reject"
    min_output_tokens: int = 16
    # (scope, id) -> monthly limit in pico-USD; scope "global" uses id "global".
    limits: Mapping[tuple[str, str], int] = field(default_factory=dict)
    max_tool_calls: int = 16  # built-in tool calls bounded when a request sets no max_tool_calls

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
    pricing_path: Path = PACKAGED_PRICING
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
    invoices_auto: bool = False  # issue last month's invoices once the month has closed
    shutdown_grace_s: float = 30.0
    # A connection must send a complete request head within this long of opening (or of its
    # previous response), else it is closed: slowloris clients cannot pin connections.
    header_timeout_s: float = 30.0


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
    """A monthly cap at ``where``: ``{monthly_usd: 200}`` (or a bare amount), reported
    readably."""
    field_where = where
    if isinstance(value, Mapping):
        before = len(problems)
        unknown_keys(value, "budget_entry", where, problems)
        if "monthly_usd" not in value:
            if len(problems) == before:  # a misspelt or later window already says why
                problems.append(f"{where}: needs monthly_usd (the cap in USD per calendar "
                                "month, e.g. monthly_usd: 200)")
            return None
        field_where, value = f"{where}.monthly_usd", value["monthly_usd"]
    if value is None:
        problems.append(f"{field_where}: expected an amount in USD such as 200 or \"12.50\", "
                        "got nothing")
        return None
    try:
        return to_pico(value)
    except MoneyError as exc:
        problems.append(f"{field_where}: expected an amount in USD such as 200 or \"12.50\" "
                        f"({exc})")
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
        problems.append(f"{name}: must be a mapping (of {', '.join(sorted(SECTION_KEYS[name]))})")
        return {}
    unknown_keys(value, name, name, problems)
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
    max_calls = _int(raw.get("max_tool_calls", 16), "budgets.max_tool_calls", problems, 0, 1000)

    global_raw = env.get("MAX_MONTHLY_BUDGET", raw.get("global"))
    if global_raw is not None:
        where = "MAX_MONTHLY_BUDGET" if "MAX_MONTHLY_BUDGET" in env else "budgets.global"
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
            pico = _money(spec, where, problems)
            if pico is not None:
                limits[(scope, str(ident))] = pico
    return BudgetSettings(tz, tuple(sorted(set(warn))), near_cap, min_out, limits,
                          max_tool_calls=max_calls)


_ID_HINT = "letters, digits and . _ : @ - only (at most 128)"


def _id_field(spec: Mapping[str, Any], field_name: str, where: str, problems: list[str],
              suggested: set[str], what: str) -> str:
    """A required id such as a key's ``name`` or ``tenant``, with a message that says why."""
    value = spec.get(field_name)
    if value is None or value == "":
        if field_name not in suggested:  # a misspelt key already says what is wrong
            problems.append(f"{where}.{field_name}: required ({what})")
        return ""
    text = str(value)
    if not _ID_RE.match(text):
        problems.append(f"{where}.{field_name}: {text[:60]!r} is not a valid id: {_ID_HINT}")
    return text


def _parse_keys(raw: Any, problems: list[str]) -> tuple[VirtualKey, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append("keys: must be a list of {name, key, tenant, agent} entries")
        return ()
    keys: list[VirtualKey] = []
    names: set[str] = set()
    for i, spec in enumerate(raw):
        where = f"keys[{i}]"
        if not isinstance(spec, Mapping):
            problems.append(f"{where}: must be a mapping such as "
                            "{name: content-agent, key: sk-cw-..., tenant: acme}")
            continue
        suggested = unknown_keys(spec, "key", where, problems)
        name = _id_field(spec, "name", where, problems, suggested, "a name for this key")
        if name and name in names:
            problems.append(f"{where}.name: duplicate key name {name!r}")
        names.add(name)
        if spec.get("key"):
            digest = hash_key(str(spec["key"]))
        elif spec.get("key_sha256"):
            digest = str(spec["key_sha256"]).lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                problems.append(f"{where}.key_sha256: must be 64 hex characters")
        else:
            if not suggested & {"key", "key_sha256"}:
                problems.append(f"{where}: needs 'key' (the secret agents present) or "
                                "'key_sha256' (its SHA-256 in hex)")
            continue
        tenant = _id_field(spec, "tenant", where, problems, suggested,
                           "the tenant this key's spending is billed to")
        agent = str(spec.get("agent", "default"))
        if not _ID_RE.match(agent):
            problems.append(f"{where}.agent: {agent[:60]!r} is not a valid id: {_ID_HINT}")
        can_override = _bool(spec.get("can_override", False), f"{where}.can_override", problems)
        agents = spec.get("agents", [])
        if not isinstance(agents, list) or not all(
                a == "*" or (isinstance(a, str) and _ID_RE.match(a)) for a in agents):
            problems.append(f"{where}.agents: expected a list of agent types, e.g. "
                            f"[content, support] ({_ID_HINT}), or [\"*\"] for any")
            agents = []
        keys.append(VirtualKey(name, digest, tenant, agent, can_override, frozenset(agents)))
    digests = [k.key_sha256 for k in keys]
    if len(digests) != len(set(digests)):
        problems.append("keys: two entries share the same secret")
    return tuple(keys)


def load_settings(
    path: Path | str | None = None, env: Mapping[str, str] | None = None
) -> tuple[Settings, list[str]]:
    """Load and validate; returns (settings, warnings) or raises ConfigError with every problem."""
    env = os.environ if env is None else env
    if path is None:
        path = find_config(env)
        if path is None:
            raise ConfigError([
                f"no config file: looked for {' and '.join(map(str, CONFIG_CANDIDATES))} "
                "(write a starter one with `costwall init`, or pass --config PATH)"])
    path = Path(path)
    problems: list[str] = []
    warnings: list[str] = []
    try:
        raw = load_yaml(path) or {}
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found (write a starter one with "
                           "`costwall init`)"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a config file"]) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    if not isinstance(raw, Mapping):
        raise ConfigError([f"{path}: top level must be a mapping"])
    base = path.absolute().parent  # relative paths in the file follow the file
    pricing_raw = raw.get("pricing")
    pricing_path = resolve_path(str(pricing_raw), base) if pricing_raw else PACKAGED_PRICING
    try:
        return _settings(raw, base, pricing_path, env, problems, warnings)
    except ConfigError as exc:
        exc.pricing_path = pricing_path
        raise


def _settings(raw: Mapping[str, Any], base: Path, pricing_path: Path, env: Mapping[str, str],
              problems: list[str], warnings: list[str]) -> tuple[Settings, list[str]]:
    unknown_keys(raw, "", "", problems)

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
    key_env = upstream.get("api_key_env", "OPENAI_API_KEY")
    key_env = "" if key_env is None else str(key_env)  # "" (or null): a keyless upstream
    upstream_key = (env.get(key_env) or None) if key_env else None
    if upstream_key is None and key_env:
        warnings.append(
            f"upstream key: environment variable {key_env} is not set (`costwall serve` refuses "
            "to start without it unless the upstream is on this machine; declare a keyless "
            "upstream with api_key_env: \"\")")
    timeout = _number(upstream.get("timeout_s", 600), "upstream.timeout_s", problems)
    connect = _number(upstream.get("connect_timeout_s", 10), "upstream.connect_timeout_s",
                      problems)
    max_conn = _int(upstream.get("max_connections", 1000), "upstream.max_connections", problems,
                    1, 100_000)

    if env.get("COSTWALL_DB"):
        database = str(env["COSTWALL_DB"])
    else:
        database = resolve_database(str(raw.get("database", DEFAULT_DATABASE)), base)
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
    header_timeout = _number(limits.get("header_timeout_s", 30), "limits.header_timeout_s",
                             problems)

    settings = Settings(
        host=host, port=port, upstream_url=upstream_url.rstrip("/"), upstream_key=upstream_key,
        upstream_key_env=key_env, upstream_timeout_s=timeout, upstream_connect_timeout_s=connect,
        upstream_max_connections=max_conn, database=database, db_synchronous=synchronous,
        db_pool_size=pool, db_reclaim_after_s=reclaim,
        logs_dir=_dir(env, "COSTWALL_LOG_DIR", raw, "logs_dir", "logs", base),
        reports_dir=_dir(env, "COSTWALL_REPORTS_DIR", raw, "reports_dir", "reports", base),
        pricing_path=pricing_path, unknown_model=unknown_model, max_body_bytes=max_body,
        admin_token=admin_token, finance_token=finance_token, budgets=budgets,
        admin_secure_cookies=secure_cookies, admin_trusted_proxies=trusted_proxies,
        override_allow=override_allow, keys=keys, log_format=log_format, log_level=log_level,
        access_log=access_log, invoice_company=str(invoices.get("company", "costwall")),
        invoices_auto=_bool(invoices.get("auto", False), "invoices.auto", problems),
        shutdown_grace_s=grace, header_timeout_s=header_timeout,
    )
    if problems:
        raise ConfigError(problems)
    return settings, warnings


def _dir(env: Mapping[str, str], var: str, raw: Mapping[str, Any], key: str, default: str,
         base: Path) -> Path:
    """A directory setting: the environment as given, else the file's (or default) value
    resolved against the config file's folder."""
    if env.get(var):
        return Path(env[var])
    return resolve_path(str(raw.get(key) or default), base)
