"""The ``keys`` section: virtual keys agents present as their API key (only SHA-256 kept)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config.budgets import ID_HINT, ID_RE
from gateway.config.fields import Context, reject_unknown
from gateway.config.kinds import as_bool

# SHA-256 of "sk-cw-example-content-agent", the example key of the shipped config files: a
# warning (not an error, so the shipped config checks clean) while it is still in use.
EXAMPLE_KEY_SHA256 = "371d09da1820b4fa634ce0e09901aa81b3b2b3a37ca329a14718b808a81c1cda"
DEFAULT_AGENT = "default"
# The fields of one entry of `keys`, with their help (README documents them in its keys row).
ENTRY_KEYS = {
    "name": "a name for this key",
    "key": "the secret agents present (kept only as its SHA-256)",
    "key_sha256": "the secret's SHA-256 in hex, instead of key",
    "tenant": "the tenant this key's spending is billed to",
    "agent": "the agent type of its requests (default: default)",
    "agents": "further agent types X-Costwall-Agent may name; [\"*\"]: any",
    "can_override": "whether it may use the override header",
}


@dataclass(frozen=True, slots=True)
class VirtualKey:
    """A key agents present as their API key; only its SHA-256 is kept."""

    name: str
    key_sha256: str
    tenant: str
    agent: str = DEFAULT_AGENT
    can_override: bool = False
    # Agent types ``X-Costwall-Agent`` may name besides ``agent`` ("*": any, cooperative).
    agents: frozenset[str] = frozenset()

    def allows_agent(self, agent: str) -> bool:
        """Whether this key may attribute a request to ``agent`` (its own is always allowed)."""
        return agent == self.agent or agent in self.agents or "*" in self.agents


def hash_key(secret: str) -> str:
    """SHA-256 hex of a virtual key; keys are high-entropy, so a fast hash is enough."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_keys(ctx: Context) -> tuple[VirtualKey, ...]:
    """Every entry of ``keys``, plus the checks across entries and against the example key."""
    keys = _entries(ctx.raw.get("keys"), ctx.problems)
    for key in keys:
        if key.key_sha256 == hash_key(""):
            ctx.problems.append(f"keys.{key.name}: empty key")
        if key.key_sha256 == EXAMPLE_KEY_SHA256:
            ctx.warnings.append(f"keys.{key.name}: uses the example secret published in "
                                "config/costwall.yaml; anyone can present it, so replace it "
                                "before the gateway is reachable by others")
    return keys


def _entries(raw: Any, problems: list[str]) -> tuple[VirtualKey, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append("keys: must be a list of {name, key, tenant, agent} entries")
        return ()
    keys: list[VirtualKey] = []
    names: set[str] = set()
    for i, spec in enumerate(raw):
        key = _entry(spec, f"keys[{i}]", names, problems)
        if key is not None:
            keys.append(key)
    digests = [k.key_sha256 for k in keys]
    if len(digests) != len(set(digests)):
        problems.append("keys: two entries share the same secret")
    return tuple(keys)


def _entry(spec: Any, where: str, names: set[str], problems: list[str]) -> VirtualKey | None:
    if not isinstance(spec, Mapping):
        problems.append(f"{where}: must be a mapping such as "
                        "{name: content-agent, key: sk-cw-..., tenant: acme}")
        return None
    suggested = reject_unknown(spec, ENTRY_KEYS, (), where, problems)
    name = _id_field(spec, "name", where, problems, suggested)
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
        return None
    tenant = _id_field(spec, "tenant", where, problems, suggested)
    agent = str(spec.get("agent", DEFAULT_AGENT))
    if not ID_RE.match(agent):
        problems.append(f"{where}.agent: {agent[:60]!r} is not a valid id: {ID_HINT}")
    can_override = as_bool(spec.get("can_override", False), f"{where}.can_override", problems)
    agents = spec.get("agents", [])
    if not isinstance(agents, list) or not all(
            a == "*" or (isinstance(a, str) and ID_RE.match(a)) for a in agents):
        problems.append(f"{where}.agents: expected a list of agent types, e.g. "
                        f"[content, support] ({ID_HINT}), or [\"*\"] for any")
        agents = []
    return VirtualKey(name, digest, tenant, agent, can_override, frozenset(agents))


def _id_field(spec: Mapping[str, Any], field_name: str, where: str, problems: list[str],
              suggested: set[str]) -> str:
    """A required id such as a key's ``name`` or ``tenant``, with a message that says why."""
    value = spec.get(field_name)
    if value is None or value == "":
        if field_name not in suggested:  # a misspelt key already says what is wrong
            problems.append(f"{where}.{field_name}: required ({ENTRY_KEYS[field_name]})")
        return ""
    text = str(value)
    if not ID_RE.match(text):
        problems.append(f"{where}.{field_name}: {text[:60]!r} is not a valid id: {ID_HINT}")
    return text
