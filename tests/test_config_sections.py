"""The configuration's declarations: README table, derived key tables, defaults, flat names.

Each setting is declared once (gateway/config/sections.py, budgets.py, keys.py); these tests
hold the README's configuration table, the unknown-key tables and the older flat attribute
names to those declarations.
"""

from __future__ import annotations

import re
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.config import (
    NOT_YET,
    PACKAGED_PRICING,
    SECTION_KEYS,
    SECTIONS,
    ConfigError,
    Settings,
    load_settings,
)
from gateway.config import budgets as budget_section
from gateway.config import keys as key_section
from gateway.config.settings import FLAT
from gateway.config.upstreams import ENTRY_KEYS as UPSTREAM_ENTRY_KEYS

ROOT = Path(__file__).resolve().parent.parent
# Keys the README's table names as a group, with their entries described in the meaning column.
LIST_SECTIONS = {"keys", "upstreams"}


def readme_rows() -> list[list[str]]:
    """The cells of each row of the table under README.md's "## Configuration"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert lines and lines[0].replace(" ", "") == "|key|env|default|meaning|", lines[:1]
    return [[cell.strip() for cell in line.strip()[1:-1].split("|")] for line in lines[2:]]


def documented_keys(cell: str) -> list[tuple[str, str]]:
    """(section-level key, the code span it came from) for a first-column cell:
    `budgets.tenants/agents.<id>.monthly_usd` names budgets.tenants and budgets.agents."""
    out = []
    for span in re.findall(r"`([^`]+)`", cell):
        parts = span.removesuffix("[]").split(".")
        if len(parts) == 1:
            out.append((parts[0], span))
            continue
        out += [(f"{parts[0]}.{name}", span) for name in parts[1].split("/")]
    return out


def declared_keys() -> dict[str, str | None]:
    """Every key a config file may set, with the environment variable that overrides it."""
    keys: dict[str, str | None] = {name: None for name in LIST_SECTIONS}
    for section in SECTIONS.values():
        keys |= {path: spec.env for path, _, spec in section.declared()}
        keys |= {f"{section.KEY}.{name}": None for name in section.EXTRA}
    return keys


def test_readme_table_documents_every_declared_setting_and_nothing_else() -> None:
    rows = readme_rows()
    documented: dict[str, list[str]] = {}
    for row in rows:
        assert len(row) == 4, row
        for key, _ in documented_keys(row[0]):
            documented[key] = row
    declared = declared_keys()
    assert sorted(set(documented) - set(declared)) == [], "README documents unknown keys"
    assert sorted(set(declared) - set(documented)) == [], "settings missing from README table"
    for key, env in declared.items():  # an overriding variable is named in its row
        if env is not None:
            assert f"`{env}`" in documented[key][1], (key, env)
    # the entries of a cap and of a key: every field named in the table
    caps = [span for row in rows for key, span in documented_keys(row[0])
            if key.startswith("budgets.")]
    for name in budget_section.ENTRY_KEYS:
        assert any(span.endswith(f".{name}") for span in caps), name
    keys_row = documented["keys"]
    for name in key_section.ENTRY_KEYS:
        assert f"`{name}`" in keys_row[3], name
    for name in UPSTREAM_ENTRY_KEYS:  # every field of an upstreams entry is named
        assert name in documented["upstreams"][3], name


def test_every_declaration_has_help_and_a_default_that_passes_its_own_check() -> None:
    for section in SECTIONS.values():
        for where, f, spec in section.declared():
            assert spec.help.strip(), where
            problems: list[str] = []
            spec.kind.parse(f.default, where, problems, Path("/etc/costwall"))  # from a file
            as_given = spec.kind.parse(f.default, where, problems, None)  # from the environment
            assert problems == [] and as_given == f.default, (where, problems)


def test_unknown_key_tables_are_derived_from_the_declarations_and_unchanged() -> None:
    """The table written by hand before the sections existed, key for key."""
    by_hand = {
        "": frozenset({"server", "upstream", "database", "logs_dir", "reports_dir", "pricing",
                       "unknown_model", "admin", "budgets", "override", "keys", "logging",
                       "limits", "invoices", "ledger", "alerts", "upstreams", "rate_limits"}),
        "alerts": frozenset({"channels", "rules", "allow_private_targets", "anomaly", "smtp",
                             "timeout_s", "lease_s", "retry_s", "max_attempts", "give_up_s"}),
        "server": frozenset({"host", "port"}),
        "upstream": frozenset({"base_url", "api_key_env", "timeout_s", "connect_timeout_s",
                               "max_connections"}),
        "ledger": frozenset({"synchronous", "pool_size", "reclaim_after_s"}),
        "admin": frozenset({"token_env", "finance_token_env", "secure_cookies",
                            "trusted_proxies"}),
        "budgets": frozenset({"timezone", "warn_at", "near_cap", "min_output_tokens",
                              "max_tool_calls", "global", "tenants", "agents", "campaigns",
                              "keys", "users", "users_default"}),
        "budget_entry": frozenset({"monthly_usd", "weekly_usd", "daily_usd", "hourly_usd"}),
        "key": frozenset({"name", "key", "key_sha256", "tenant", "agent", "agents",
                          "can_override"}),
        "limits": frozenset({"max_body_bytes", "shutdown_grace_s", "header_timeout_s"}),
        "logging": frozenset({"format", "level", "access"}),
        "invoices": frozenset({"company", "auto", "email_to"}),
        "override": frozenset({"allow"}),
        "upstream_entry": frozenset({"name", "kind", "base_url", "api_key_env", "models",
                                     "timeout_s", "connect_timeout_s", "max_connections"}),
        "rate_limits": frozenset({"global", "tenants", "agents", "keys", "users",
                                  "users_default", "on_store_error"}),
    }
    assert by_hand == SECTION_KEYS
    for kind, later in NOT_YET.items():  # a key is either read or "not yet", never both
        assert not later & SECTION_KEYS[kind], kind


def test_defaults_are_the_ones_before_the_sections() -> None:
    s = Settings()
    assert (s.host, s.port, s.upstream_url, s.upstream_key, s.upstream_key_env) == (
        "127.0.0.1", 8080, "https://api.openai.com/v1", None, "OPENAI_API_KEY")
    assert (s.upstream_timeout_s, s.upstream_connect_timeout_s,
            s.upstream_max_connections) == (600.0, 10.0, 1000)
    assert (s.database, s.db_synchronous, s.db_pool_size, s.db_reclaim_after_s) == (
        "sqlite:///data/costwall.db", "NORMAL", 10, 10.0)
    assert (s.logs_dir, s.reports_dir, s.pricing_path, s.unknown_model) == (
        Path("logs"), Path("reports"), PACKAGED_PRICING, "reject")
    assert (s.admin_token, s.finance_token, s.admin_secure_cookies,
            s.admin_trusted_proxies) == (None, None, None, ())
    b = s.budgets
    assert (b.timezone, b.warn_at, b.near_cap, b.min_output_tokens, b.max_tool_calls,
            dict(b.limits)) == ("UTC", (Decimal("0.8"),), "reject", 16, 16, {})
    assert (s.max_body_bytes, s.shutdown_grace_s, s.header_timeout_s) == (
        32 * 1024 * 1024, 30.0, 30.0)
    assert (s.log_format, s.log_level, s.access_log, s.invoice_company, s.override_allow,
            s.keys) == ("text", "INFO", True, "costwall", False, ())


def test_an_empty_file_loads_the_declared_defaults(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("{}\n")
    loaded, _ = load_settings(tmp_path / "c.yaml", {})
    plain = Settings()
    for name in SECTIONS:
        if name != "general":  # paths are resolved against the file's folder
            expected = getattr(plain, name)
            if name == "ledger":
                expected = replace(expected, database=f"sqlite:///{tmp_path}/data/costwall.db")
            assert getattr(loaded, name) == expected, name
    assert (loaded.logs_dir, loaded.reports_dir, loaded.pricing_path) == (
        tmp_path / "logs", tmp_path / "reports", PACKAGED_PRICING)


def test_flat_names_read_and_replace_through_the_sections() -> None:
    """The compatibility surface: each flat name is its section's field, both ways."""
    for flat, (section, attr) in FLAT.items():
        marker = object()
        settings = Settings(**{flat: marker})
        assert getattr(settings, flat) is marker, flat
        assert getattr(getattr(settings, section), attr) is marker, flat
        other = replace(Settings(), **{flat: marker})
        assert getattr(other, flat) is marker and other == settings, flat
    base = Settings(upstream_url="https://x.example/v1")
    moved = replace(base, port=9)
    assert (moved.port, moved.upstream.base_url, base.port) == (9, "https://x.example/v1", 8080)
    with pytest.raises(TypeError, match="prot"):
        Settings(prot=9)
    with pytest.raises(AttributeError):
        base.port = 1  # type: ignore[misc]


def test_every_section_reports_into_one_list(tmp_path: Path) -> None:
    """One bad value per section: all listed together, each named by its YAML path."""
    (tmp_path / "c.yaml").write_text("""
server: {port: x}
upstream: {timeout_s: -1}
database: mysql://x
ledger: {reclaim_after_s: 1}
admin: {trusted_proxies: nope}
budgets: {min_output_tokens: 0}
limits: {header_timeout_s: zero}
logging: {level: loud}
override: {allow: maybe}
""")
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "c.yaml", {})
    assert info.value.problems == [
        "server.port: expected a whole number, got 'x'",
        "upstream.timeout_s: must be positive",
        "database: expected sqlite:///PATH or postgresql://USER@HOST/DB, got 'mysql://x'",
        "ledger.reclaim_after_s: must be between 2 and 3600 seconds",
        "admin.trusted_proxies: must be a list of IP addresses or networks",
        "budgets.min_output_tokens: must be between 1 and 2147483648, got 0",
        "limits.header_timeout_s: expected a number of seconds, got 'zero'",
        "logging.level: must be DEBUG, INFO, WARNING or ERROR",
        "override.allow / ALLOW_BUDGET_OVERRIDE: expected true or false, got 'maybe'",
    ]
