"""Reading a config file: find it, parse it with exact decimals, let every section parse itself.

Every problem is collected before anything starts, so ``costwall check`` can list them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from gateway.config.budgets import ENTRY_KEYS as BUDGET_ENTRY_KEYS
from gateway.config.fields import NOT_YET, ConfigError, Context, reject_unknown
from gateway.config.keys import ENTRY_KEYS as KEY_ENTRY_KEYS
from gateway.config.keys import parse_keys
from gateway.config.settings import SECTIONS, Settings
from gateway.config.upstreams import ENTRY_KEYS as UPSTREAM_ENTRY_KEYS
from gateway.config.upstreams import parse_upstreams

DEFAULT_CONFIG = Path("config/costwall.yaml")
# Looked for in this order when neither --config nor COSTWALL_CONFIG names a file: the
# repository layout, then the file `costwall init` writes into the current directory.
CONFIG_CANDIDATES = (DEFAULT_CONFIG, Path("costwall.yaml"))


def _section_keys() -> dict[str, frozenset[str]]:
    """What each section reads, derived from the declarations ("" is the top level)."""
    top = {"keys", "upstreams", *(cls.KEY for cls in SECTIONS.values() if cls.KEY)}
    top |= {f.name for cls in SECTIONS.values() for _, f, spec in cls.declared()
            if spec.root or not cls.KEY}
    table = {"": frozenset(top)}
    table |= {cls.KEY: cls.known_keys() for cls in SECTIONS.values() if cls.KEY}
    table["budget_entry"] = frozenset(BUDGET_ENTRY_KEYS)
    table["key"] = frozenset(KEY_ENTRY_KEYS)
    table["upstream_entry"] = UPSTREAM_ENTRY_KEYS
    return table


# What each section reads. A key outside these is an error naming the closest known key;
# a key of the contract that this version does not implement yet gets its own message.
SECTION_KEYS: dict[str, frozenset[str]] = _section_keys()


def unknown_keys(section: Mapping[Any, Any], kind: str, where: str,
                 problems: list[str]) -> set[str]:
    """Report every key of ``section`` outside ``SECTION_KEYS[kind]`` (see ``reject_unknown``)."""
    return reject_unknown(section, SECTION_KEYS[kind], NOT_YET.get(kind, ()), where, problems)


def find_config(env: Mapping[str, str]) -> Path | None:
    """The config file to use when none is given: COSTWALL_CONFIG, else the first candidate
    that exists (None when there is none)."""
    if env.get("COSTWALL_CONFIG"):
        return Path(env["COSTWALL_CONFIG"])
    return next((p for p in CONFIG_CANDIDATES if p.is_file()), None)


class _DecimalLoader(yaml.SafeLoader):
    """SafeLoader that reads YAML floats as exact Decimals."""


def _decimal(loader: yaml.SafeLoader, node: yaml.Node) -> Decimal:
    return Decimal(str(loader.construct_scalar(node)).replace("_", ""))  # type: ignore[arg-type]


_DecimalLoader.add_constructor("tag:yaml.org,2002:float", _decimal)


def load_yaml(path: Path) -> Any:
    """Parse a YAML file with floats kept exact."""
    with open(path, encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_DecimalLoader)


def load_settings(
    path: Path | str | None = None, env: Mapping[str, str] | None = None
) -> tuple[Settings, list[str]]:
    """Load and validate; returns (settings, warnings) or raises ConfigError with every problem."""
    env = os.environ if env is None else env
    path = _config_path(path, env)
    raw = _read(path)
    ctx = Context(raw, env, path.absolute().parent)  # relative paths in the file follow it
    unknown_keys(raw, "", "", ctx.problems)
    sections = {name: cls.parse(ctx) for name, cls in SECTIONS.items()}
    settings = Settings(**sections, keys=parse_keys(ctx), upstreams=parse_upstreams(ctx))
    if ctx.problems:
        raise ConfigError(ctx.problems, pricing_path=settings.general.pricing)
    return settings, ctx.warnings


def _config_path(path: Path | str | None, env: Mapping[str, str]) -> Path:
    if path is None:
        path = find_config(env)
        if path is None:
            raise ConfigError([
                f"no config file: looked for {' and '.join(map(str, CONFIG_CANDIDATES))} "
                "(write a starter one with `costwall init`, or pass --config PATH)"])
    return Path(path)


def _read(path: Path) -> Mapping[str, Any]:
    """The file's top-level mapping, or a ConfigError saying in one line why not."""
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
    return raw
