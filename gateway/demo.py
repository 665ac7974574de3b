"""``costwall demo``: the gateway, the simulator as upstream, and a few simulated agents.

Everything runs in one process on a fresh machine with no OpenAI key, so a newcomer can open
the admin UI, watch budgets fill, see a request refused with 402, scrape /metrics and pull an
invoice. State lives under ``--dir`` (default: a per-user data folder, so the demo runs from any
directory, even a read-only one) and survives restarts. The port is checked before anything is
written, files are written atomically, and a folder this run created is removed again if the
start fails: a failed demo leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from gateway.app import create_app
from gateway.config import load_settings
from gateway.fake_upstream import FakeUpstreamState, start_fake_upstream
from gateway.files import write_atomic
from gateway.startup import require_free_port

AGENTS = [
    # (key name, tenant, agent type, models, campaigns)
    ("content-agent", "acme", "content", ["gpt-4o-mini", "gpt-4.1"], ["spring-launch", "blog"]),
    ("support-agent", "acme", "support", ["gpt-4o-mini", "o4-mini"], ["tickets"]),
    ("research-agent", "globex", "research", ["gpt-5", "o3"], ["market-scan", "spring-launch"]),
    # Speaks the Anthropic Messages API (like Claude Code): a second provider, same budgets.
    ("claude-agent", "globex", "coding", ["claude-haiku-4-5", "claude-sonnet-4-5"],
     ["refactor", "spring-launch"]),
]
PROMPTS = [
    "Draft a product announcement for the spring launch.",
    "Summarise this support ticket and suggest a reply.",
    "List three risks in the market report and rate them.",
    "Rewrite the paragraph in a friendlier tone.",
]


# Small caps, so the budgets visibly fill and a first 402 comes within a minute or so.
BUDGETS: dict[str, Any] = {
    "timezone": "UTC", "warn_at": ["0.5", "0.8"], "near_cap": "clamp",
    "global": {"monthly_usd": "5"},
    "tenants": {"acme": {"monthly_usd": "2"}, "globex": {"monthly_usd": "3"}},
    "agents": {"research": {"monthly_usd": "2.5", "daily_usd": "1", "hourly_usd": "0.4"}},
    "campaigns": {"spring-launch": {"monthly_usd": "0.5"}, "market-scan": {"monthly_usd": "0.01"}},
    # every end user (X-Costwall-User) of the simulated agents gets these
    "users_default": {"daily_usd": "0.3"},
}
USERS = [f"user-{i}" for i in range(1, 7)]


def default_demo_dir(env: Mapping[str, str]) -> Path:
    """$COSTWALL_DEMO_DIR, else the user's data folder (XDG): independent of the current
    directory, so `costwall demo` behaves the same wherever it is started."""
    if env.get("COSTWALL_DEMO_DIR"):
        return Path(env["COSTWALL_DEMO_DIR"]).expanduser()
    data = Path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME") else \
        Path.home() / ".local" / "share"
    return data / "costwall" / "demo"




def demo_config(directory: Path, upstream_url: str, keys: dict[str, str]) -> Path:
    """The demo's config; relative paths follow the file, and `pricing` is left out so the
    price table shipped inside the package is used."""
    config = {
        "server": {"host": "127.0.0.1", "port": 8080},
        # Two providers, both played by the simulator: OpenAI models and Claude models.
        "upstreams": [
            {"name": "openai", "kind": "openai", "base_url": upstream_url,
             "api_key_env": "COSTWALL_DEMO_UPSTREAM_KEY", "models": ["gpt-*", "o*"]},
            {"name": "anthropic", "kind": "anthropic", "base_url": upstream_url,
             "api_key_env": "COSTWALL_DEMO_UPSTREAM_KEY", "models": ["claude-*"]},
        ],
        "database": "sqlite:///costwall.db",
        "logs_dir": "logs",
        "reports_dir": "reports",
        "budgets": BUDGETS,
        "keys": [
            {"name": name, "key": keys[name], "tenant": tenant, "agent": agent,
             "can_override": name == "support-agent"}
            for name, tenant, agent, _, _ in AGENTS
        ],
    }
    path = directory / "costwall.yaml"
    write_atomic(path, yaml.safe_dump(config, sort_keys=False), 0o600)  # holds the keys
    return path


def _secrets(directory: Path) -> dict[str, Any]:
    """The demo's tokens and keys: kept from an earlier run, else fresh ones."""
    path = directory / "secrets.yaml"
    if path.exists():
        stored = yaml.safe_load(path.read_text())
        if isinstance(stored, dict) and {"admin", "finance", "keys"} <= set(stored) and \
                all(name in stored["keys"] for name, *_ in AGENTS):
            return stored
    stored = {"admin": secrets.token_urlsafe(18), "finance": secrets.token_urlsafe(18),
              "keys": {name: "sk-cw-demo-" + secrets.token_urlsafe(12) for name, *_ in AGENTS}}
    write_atomic(path, yaml.safe_dump(stored), 0o600)
    return stored


def _windows(spec: Mapping[str, str]) -> str:
    """``$2.5 a month, $1 a day`` for a cap entry."""
    per = {"monthly_usd": "a month", "weekly_usd": "a week", "daily_usd": "a day",
           "hourly_usd": "an hour"}
    return ", ".join(f"${spec[k]} {v}" for k, v in per.items() if k in spec)


def _caps() -> list[str]:
    """The demo's budgets, one line per scope, for the banner."""
    lines = [f"global {_windows(BUDGETS['global'])}"]
    for section in ("tenants", "agents", "campaigns"):
        for ident, spec in BUDGETS[section].items():
            lines.append(f"{section[:-1]} {ident} {_windows(spec)}")
    lines.append(f"every end user {_windows(BUDGETS['users_default'])}")
    return lines


async def simulated_agent(base: str, key: str, models: list[str], campaigns: list[str],
                          rng: random.Random) -> None:
    """Send requests forever, some streaming, with attribution headers: chat completions,
    or the Messages API the way Claude Code sends it (``x-api-key``, ``anthropic-version``)
    for Claude models."""
    async with aiohttp.ClientSession() as session:
        while True:
            stream = rng.random() < 0.3
            model = rng.choice(models)
            body = {"model": model, "stream": stream,
                    "max_tokens": rng.choice([64, 256, 1024]),
                    "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}
            headers = {"X-Costwall-Campaign": rng.choice(campaigns),
                       "X-Costwall-Task": f"task-{rng.randint(1, 40)}",
                       "X-Costwall-User": rng.choice(USERS)}
            if model.startswith("claude-"):
                path = "messages"
                headers |= {"x-api-key": key, "anthropic-version": "2023-06-01"}
            else:
                path = "chat/completions"
                headers["Authorization"] = f"Bearer {key}"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.post(f"{base}/v1/{path}", json=body,
                                        headers=headers) as resp:
                    await resp.read()
            await asyncio.sleep(rng.uniform(0.5, 2.0))


async def run_demo(port: int, directory: Path, agents: bool = True) -> None:
    """Start everything, print where it is, run until Ctrl-C or SIGTERM."""
    require_free_port("127.0.0.1", port)  # before a single file is written
    created = not directory.exists()
    runner: web.AppRunner | None = None
    upstream_runner: web.AppRunner | None = None
    tasks: list[asyncio.Task[None]] = []
    started = False
    try:
        directory.mkdir(parents=True, exist_ok=True)
        stored = _secrets(directory)
        state = FakeUpstreamState(chunk_delay_s=0.02, delay_s=0.05)
        upstream_runner, upstream_url, _ = await start_fake_upstream(state=state)
        path = demo_config(directory, upstream_url, stored["keys"])
        env = {"COSTWALL_ADMIN_TOKEN": stored["admin"],
               "COSTWALL_FINANCE_TOKEN": stored["finance"],
               "COSTWALL_DEMO_UPSTREAM_KEY": "sk-demo-upstream"}
        settings, _ = load_settings(path, env)
        app = create_app(settings)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        started = True
        _banner(f"http://127.0.0.1:{port}", directory, path, stored, upstream_url, agents)
        base = f"http://127.0.0.1:{port}"
        rng = random.Random(7)
        tasks = [
            asyncio.create_task(simulated_agent(base, stored["keys"][name], models, campaigns,
                                                random.Random(rng.random())))
            for name, _, _, models, campaigns in AGENTS
        ] if agents else []
        stop = asyncio.Event()  # Ctrl-C or SIGTERM: stop cleanly (ledger flushed, no traceback)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        # The gateway first: it drains its in-flight requests while the agents are still
        # connected (an agent cut first would leave a stream with no one to relay it to).
        if runner is not None:
            await runner.cleanup()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if upstream_runner is not None:
            await upstream_runner.cleanup()
        if not started and created:  # a failed first start leaves nothing behind
            shutil.rmtree(directory, ignore_errors=True)
    print("costwall demo stopped", flush=True)


def _banner(base: str, directory: Path, config: Path, stored: dict[str, Any],
            upstream_url: str, agents: bool) -> None:
    keys = "\n".join(f"  {name:<16}{stored['keys'][name]}   (tenant {tenant}, agent {agent})"
                     for name, tenant, agent, _, _ in AGENTS)
    caps = "\n".join(f"  {line}" for line in _caps())
    first_key = stored["keys"][AGENTS[0][0]]
    print(f"""
costwall demo is running (state in {directory})

  Admin UI      {base}/admin          admin token:   {stored['admin']}
                                             finance token: {stored['finance']}
  Proxy         {base}/v1             (simulated OpenAI and Anthropic at {upstream_url})
  Metrics       {base}/metrics
  Invoices      {base}/admin/invoices   or: costwall invoice --config {config}

Virtual keys:
{keys}

Caps (campaign market-scan is tiny: expect its first 402 within a minute):
{caps}

Point an agent at it:
  export OPENAI_BASE_URL={base}/v1
  export OPENAI_API_KEY={first_key}
or Claude Code / the anthropic SDK:
  export ANTHROPIC_BASE_URL={base}
  export ANTHROPIC_AUTH_TOKEN={stored['keys']['claude-agent']}

{"Four simulated agents (OpenAI and Anthropic) are sending traffic; " if agents else ""}\
press Ctrl-C to stop.
""", flush=True)
