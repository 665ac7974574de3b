"""``costwall init [DIR]``: a commented starter ``costwall.yaml`` and an ``.env.example``.

The starter is valid as written (``costwall check`` passes; missing secrets are warnings), keeps
every path relative to its own folder, and carries a fresh virtual key whose secret is shown
once and stored only as its SHA-256. Existing files are never overwritten without ``--force``.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from gateway.config import hash_key
from gateway.files import write_atomic

CONFIG_NAME = "costwall.yaml"
ENV_NAME = ".env.example"

STARTER = """\
# costwall configuration, written by `costwall init`. Check it with
#   costwall check --config {config}
# Relative paths below are relative to THIS file's folder, wherever costwall is started from.
# Unknown keys are errors (`costwall check` names the closest known one). Environment
# variables named in the comments win over the values here. Reference: the "Configuration"
# section of costwall's README.

server: {{host: 127.0.0.1, port: 8080}}          # COSTWALL_HOST, COSTWALL_PORT

upstream:
  base_url: https://api.openai.com/v1            # COSTWALL_UPSTREAM_URL
  api_key_env: OPENAI_API_KEY                    # the gateway's own key for the upstream;
                                                 # "" declares a keyless (local) upstream
  timeout_s: 600                                 # longest gap between two reads of an answer

database: sqlite:///data/costwall.db             # COSTWALL_DB; or postgresql://user@host/db
                                                 #   (pip install 'costwall[postgres]')
logs_dir: logs                                   # COSTWALL_LOG_DIR: the audit trail
reports_dir: reports                             # COSTWALL_REPORTS_DIR: invoices
# pricing: my-prices.yaml                        # default: the table shipped with costwall
unknown_model: reject                            # or a model name whose prices to apply

admin:
  token_env: COSTWALL_ADMIN_TOKEN                # full admin (UI at /admin and the API)
  finance_token_env: COSTWALL_FINANCE_TOKEN      # read-only: dashboards, logs, invoices

budgets:
  timezone: UTC                                  # calendar boundaries (hour, day, week, month)
  warn_at: [0.8]                                 # soft warning thresholds (fractions)
  near_cap: reject                               # or clamp (shrink max_tokens to fit)
  global: {{monthly_usd: "100"}}                 # MAX_MONTHLY_BUDGET
  tenants: {{my-team: {{monthly_usd: "50"}}}}
  # agents:    {{research: {{monthly_usd: "20", daily_usd: "2", hourly_usd: "0.5"}}}}
  # campaigns: {{launch: {{monthly_usd: "5"}}}}
  # users_default: {{daily_usd: "1"}}            # every end user (X-Costwall-User)

override:
  allow: false                                   # ALLOW_BUDGET_OVERRIDE

# rate_limits:                                   # past a limit: 429 with Retry-After
#   keys: {{first-agent: {{rpm: 600, tpm: 200000, concurrent: 20}}}}
#   users_default: {{rpm: 30}}                     # each end user (X-Costwall-User)

keys:                                            # virtual keys agents present as their API key
  - name: first-agent
    # SHA-256 of the key `costwall init` printed once (or give `key: sk-cw-...` in clear).
    # More keys: add entries here, or create them on /admin/keys (stored in the database).
    key_sha256: {digest}
    tenant: my-team
    agent: default
    can_override: false
"""

ENV_EXAMPLE = """\
# Environment for costwall, written by `costwall init`. costwall reads the environment, not
# this file: copy it to .env, fill it in, and load it (`set -a; . ./.env; set +a`) or give
# these to your service manager. Never commit the filled-in copy.

# The gateway's own key for the upstream (agents never see it; they use virtual keys).
OPENAI_API_KEY=

# Admin tokens (at least 16 characters, different from each other). Fresh random values:
COSTWALL_ADMIN_TOKEN={admin}
COSTWALL_FINANCE_TOKEN={finance}

# Optional overrides of the config file (relative paths here follow the current directory):
# COSTWALL_PORT=8080
# COSTWALL_DB=sqlite:///data/costwall.db
# MAX_MONTHLY_BUDGET=100
"""


class InitError(Exception):
    """``init`` refused; the message says why."""


def write_starter(directory: Path, *, force: bool = False) -> tuple[list[Path], str]:
    """Write both files into ``directory``; returns their paths and the new virtual key."""
    config, env = directory / CONFIG_NAME, directory / ENV_NAME
    existing = [p for p in (config, env) if p.exists()]
    if existing and not force:
        names = " and ".join(str(p) for p in existing)
        raise InitError(f"{names} already exist{'s' if len(existing) == 1 else ''}; "
                        "pass --force to overwrite")
    key = "sk-cw-" + secrets.token_urlsafe(24)
    texts = {
        config: STARTER.format(config=config, digest=hash_key(key)),
        env: ENV_EXAMPLE.format(admin=secrets.token_urlsafe(24),
                                finance=secrets.token_urlsafe(24)),
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path, text in texts.items():
            write_atomic(path, text, 0o600 if path == env else 0o644)
    except OSError as exc:
        raise InitError(f"cannot write to {directory}: {exc.strerror or exc}") from None
    return [config, env], key


