"""Kinds: how one raw YAML (or environment) value is validated and converted.

A kind never raises: it appends a readable problem (naming the setting by its YAML path) to
the shared list and returns a value, so one load reports every problem at once.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


@dataclass(frozen=True)
class Kind:
    """Converts a raw value; ``base`` is the config file's folder, None for an environment value
    (used as given). A kind never raises: it appends to ``problems`` and returns a value."""

    env_blank_ignored: ClassVar[bool] = False  # an empty environment variable counts as unset
    blank_is_default: ClassVar[bool] = False  # an empty or null YAML value means the default

    def parse(self, value: Any, where: str, problems: list[str], base: Path | None) -> Any:
        return value


@dataclass(frozen=True)
class Text(Kind):
    def parse(self, value: Any, where: str, problems: list[str], base: Path | None) -> str:
        return str(value)


@dataclass(frozen=True)
class EnvName(Kind):
    """The name of an environment variable; null or "" means "none"."""

    def parse(self, value: Any, where: str, problems: list[str], base: Path | None) -> str:
        return "" if value is None else str(value)


@dataclass(frozen=True)
class Int(Kind):
    lo: int = 0
    hi: int = 2**31

    def parse(self, value: Any, where: str, problems: list[str], base: Path | None) -> int:
        return as_int(value, where, problems, self.lo, self.hi)


@dataclass(frozen=True)
class Seconds(Kind):
    """A positive duration (not money: a float is fine), optionally within [lo, hi]."""

    lo: float | None = None
    hi: float | None = None

    def parse(self, value: Any, where: str, problems: list[str], base: Path | None) -> float:
        number = as_seconds(value, where, problems)
        if self.lo is not None and self.hi is not None and (
                0 < number < self.lo or number > self.hi):
            problems.append(f"{where}: must be between {self.lo:g} and {self.hi:g} seconds")
        return number


@dataclass(frozen=True)
class Choice(Kind):
    """One of ``options``; ``upper`` folds case first, ``echo`` quotes them and the bad value."""

    options: tuple[str, ...]
    upper: bool = False
    echo: bool = False

    def parse(self, value: Any, where: str, problems: list[str], base: Path | None) -> str:
        text = str(value).upper() if self.upper else str(value)
        if text not in self.options:
            names = [repr(o) if self.echo else o for o in self.options]
            listed = f"{', '.join(names[:-1])} or {names[-1]}"
            problems.append(f"{where}: must be {listed}" + (f", got {text!r}" if self.echo
                                                            else ""))
        return text


@dataclass(frozen=True)
class Bool(Kind):
    def parse(self, value: Any, where: str, problems: list[str], base: Path | None) -> bool:
        return as_bool(value, where, problems)


@dataclass(frozen=True)
class AutoBool(Kind):
    """true, false, or ``auto`` (None: decided per request)."""

    def parse(self, value: Any, where: str, problems: list[str],
              base: Path | None) -> bool | None:
        if value in ("auto", None):
            return None
        return as_bool(value, f"{where} (true, false or auto)", problems)


@dataclass(frozen=True)
class Networks(Kind):
    """A list of IP addresses or CIDR networks (``10.0.0.0/8``), kept as normalised text."""

    def parse(self, value: Any, where: str, problems: list[str],
              base: Path | None) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: must be a list of IP addresses or networks")
            return ()
        out = []
        for item in value:
            try:
                out.append(str(ipaddress.ip_network(str(item), strict=False)))
            except ValueError:
                problems.append(f"{where}: {str(item)[:60]!r} is not an IP address or network")
        return tuple(out)


@dataclass(frozen=True)
class Fractions(Kind):
    """A fraction in (0, 1] or a list of them, kept exact and sorted without duplicates."""

    def parse(self, value: Any, where: str, problems: list[str],
              base: Path | None) -> tuple[Decimal, ...]:
        items = value if isinstance(value, (list, tuple)) else [value]
        out: list[Decimal] = []
        for i, item in enumerate(items):
            try:
                d = Decimal(str(item))
                if not Decimal(0) < d <= Decimal(1):
                    raise ValueError
                out.append(d)
            except (ArithmeticError, ValueError):
                problems.append(f"{where}[{i}]: expected a fraction in (0, 1], got {item!r}")
        return tuple(sorted(set(out)))


@dataclass(frozen=True)
class TimeZone(Kind):
    def parse(self, value: Any, where: str, problems: list[str], base: Path | None) -> str:
        name = str(value)
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            problems.append(f"{where}: unknown time zone {name!r}")
        return name


@dataclass(frozen=True)
class HttpUrl(Kind):
    """An http(s) base URL without credentials, trailing slash removed."""

    def parse(self, value: Any, where: str, problems: list[str], base: Path | None) -> str:
        url = str(value)
        if re.match(r"^https?://[^/]*@", url):  # checked first: never echo a password
            problems.append(f"{where}: credentials in the URL are not supported (the gateway "
                            "sends its own Authorization); use upstream.api_key_env")
        elif not re.match(r"^https?://[^/\s]+", url):
            problems.append(f"{where}: expected an http(s) URL, got {url!r}")
        return url.rstrip("/")


@dataclass(frozen=True)
class FsPath(Kind):
    """A file or folder: relative ones follow the config file, environment ones are as given."""

    env_blank_ignored = True
    blank_is_default = True

    def parse(self, value: Any, where: str, problems: list[str], base: Path | None) -> Path:
        return Path(value) if base is None else resolve_path(str(value), base)


@dataclass(frozen=True)
class DatabaseUrl(Kind):
    env_blank_ignored = True

    def parse(self, value: Any, where: str, problems: list[str], base: Path | None) -> str:
        url = str(value) if base is None else resolve_database(str(value), base)
        if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            problems.append(f"{where}: expected sqlite:///PATH or postgresql://USER@HOST/DB, "
                            f"got {url!r}")
        return url


# -- plain value readers (also used by sections with their own rules) ----------------------------
def as_bool(value: Any, where: str, problems: list[str]) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    problems.append(f"{where}: expected true or false, got {value!r}")
    return False


def as_int(value: Any, where: str, problems: list[str], lo: int = 0, hi: int = 2**31) -> int:
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


def as_seconds(value: Any, where: str, problems: list[str]) -> float:
    """Durations are not money: a float is fine here."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        problems.append(f"{where}: expected a number of seconds, got {value!r}")
        return 0.0
    if number <= 0:
        problems.append(f"{where}: must be positive")
    return number


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


@dataclass(frozen=True)
class Addresses(Kind):
    """A list of e-mail addresses (a single string is one address)."""

    def parse(self, value: Any, where: str, problems: list[str],
              base: Path | None) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or any(
                not isinstance(a, str) or not re.fullmatch(r"[^@\s]+@[^@\s]+", a)
                for a in items):
            problems.append(f"{where}: expected a list of e-mail addresses")
            return ()
        return tuple(items)
