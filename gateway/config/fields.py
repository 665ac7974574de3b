"""How a setting is declared once (default, help, kind) and read from YAML and the environment.

A section is a frozen dataclass whose fields are made with ``setting(...)``: the field's default
is the one place that default lives, its help is what the README table must document, and its
kind validates a raw YAML (or environment) value, appending readable problems to a shared list
so ``costwall check`` can list every problem at once. Fields made with a plain ``field()`` are
internal: derived by the section's own ``parse`` (a secret read from the environment, the
budget caps), never a YAML key and never documented.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

SPEC = "costwall.setting"


class ConfigError(Exception):
    """The configuration has problems; ``problems`` lists every one of them.

    ``pricing_path`` is the price table the config names (when it could be read), so
    ``costwall check`` validates that table even when the rest of the config is wrong.
    """

    def __init__(self, problems: list[str], pricing_path: Path | None = None):
        super().__init__("\n".join(problems))
        self.problems = problems
        self.pricing_path = pricing_path


# Keys the contract names that this version does not implement yet, per section ("" is the top
# level, "budget_entry" a cap such as budgets.tenants.acme): they get their own message.
NOT_YET: dict[str, frozenset[str]] = {
    "": frozenset({"rate_limits", "alerts", "upstreams"}),
    "budgets": frozenset({"users", "users_default"}),
    "budget_entry": frozenset({"weekly_usd", "daily_usd", "hourly_usd"}),
    "invoices": frozenset({"auto", "email_to"}),
}


def reject_unknown(section: Mapping[Any, Any], known: Collection[str], later: Collection[str],
                   where: str, problems: list[str]) -> set[str]:
    """Report every key of ``section`` that costwall does not read; return the names suggested
    instead, so a caller can skip "required" for a field that is only misspelt."""
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


# -- kinds: how one raw value is validated and converted -----------------------------------------
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


# -- declaring a setting ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Spec:
    """What ``setting`` records on a field: everything but its name and default."""

    help: str
    kind: Kind
    env: str | None = None  # an environment variable that wins over the file
    label: str | None = None  # how problems name it, when not its YAML path
    root: bool = False  # a top-level YAML key (``database``) although it belongs to a section


def setting(default: Any, help: str, kind: Kind | None = None, *, env: str | None = None,
            label: str | None = None, root: bool = False) -> Any:
    """A declared setting: its default, a one-line help and how its raw value is checked."""
    spec = Spec(help, kind or Text(), env, label, root)
    return field(default=default, metadata={SPEC: spec})


def spec_of(f: Field[Any]) -> Spec | None:
    """The declaration of a field, None for an internal one."""
    spec = f.metadata.get(SPEC)
    return spec if isinstance(spec, Spec) else None


class Section:
    """Base of every section: the declared fields are its schema.

    ``KEY`` is the YAML mapping the section reads ("" for top-level keys), ``EXTRA`` the keys it
    reads that are not stored as one field (``budgets.tenants`` → the caps), with their help.
    """

    __slots__ = ()
    KEY: ClassVar[str] = ""
    EXTRA: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def declared(cls) -> list[tuple[str, Field[Any], Spec]]:
        """(YAML path, field, spec) for every declared (non-internal) field."""
        out = []
        for f in fields(cls):  # type: ignore[arg-type]
            spec = spec_of(f)
            if spec is not None:
                path = f.name if spec.root or not cls.KEY else f"{cls.KEY}.{f.name}"
                out.append((path, f, spec))
        return out

    @classmethod
    def known_keys(cls) -> frozenset[str]:
        """The keys the section's own mapping may hold (top-level fields excluded)."""
        own = {f.name for _, f, spec in cls.declared() if not spec.root}
        return frozenset(own | set(cls.EXTRA))

    @classmethod
    def default(cls, name: str) -> Any:
        """The declared default of ``name``: the one place it is written."""
        value = cls.__dataclass_fields__[name].default  # type: ignore[attr-defined]
        assert value is not MISSING, name
        return value

    @classmethod
    def parse(cls, ctx: Context) -> Self:
        """Read the section; sections with internal fields extend this."""
        return cls(**ctx.read(cls))


@dataclass
class Context:
    """One load: the parsed file, the environment, the file's folder, what went wrong."""

    raw: Mapping[str, Any]
    env: Mapping[str, str]
    base: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def mapping(self, section: type[Section]) -> Mapping[str, Any]:
        """The section's mapping (checked for unknown keys), or {} when absent or wrong."""
        if not section.KEY:
            return self.raw  # top-level keys are checked once, with the section names
        name, known = section.KEY, section.known_keys()
        value = self.raw.get(name) or {}
        if not isinstance(value, Mapping):
            self.problems.append(f"{name}: must be a mapping (of {', '.join(sorted(known))})")
            return {}
        reject_unknown(value, known, NOT_YET.get(name, ()), name, self.problems)
        return value

    def read(self, section: type[Section],
             own: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every declared field of ``section``: environment, else file, else default.
        ``own`` is the section's mapping when the caller already has it."""
        own = self.mapping(section) if own is None else own
        values: dict[str, Any] = {}
        for where, f, spec in section.declared():
            value, base = (self.raw if spec.root else own).get(f.name, MISSING), self.base
            from_env = self.env.get(spec.env) if spec.env else None
            if from_env is not None and (from_env or not spec.kind.env_blank_ignored):
                value, base = from_env, None
            if value is MISSING or (spec.kind.blank_is_default and base and not value):
                value = f.default
            values[f.name] = spec.kind.parse(value, spec.label or where, self.problems, base)
        return values


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
