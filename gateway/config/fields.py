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
from collections.abc import Collection, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self

from gateway.config.kinds import Kind, Text

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
    "": frozenset(),
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
            value = (self.raw if spec.root else own).get(f.name, MISSING)
            base: Path | None = self.base  # None: an environment value, used as given
            from_env = self.env.get(spec.env) if spec.env else None
            if from_env is not None and (from_env or not spec.kind.env_blank_ignored):
                value, base = from_env, None
            if value is MISSING or (spec.kind.blank_is_default and base and not value):
                value = f.default
            values[f.name] = spec.kind.parse(value, spec.label or where, self.problems, base)
        return values
