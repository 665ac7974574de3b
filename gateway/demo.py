"""``costwall demo``: the gateway, the simulator as upstream, and a few simulated agents.

Everything runs in one process on a fresh machine with no OpenAI key, so a newcomer can open
the admin UI, watch budgets fill, see a request refused with 402, scrape /metrics and pull an
invoice. State lives under ``--dir`` (default ``data/demo``) and survives restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import signal
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from gateway.app import create_app
from gateway.config import load_settings
from gateway.fake_upstream import FakeUpstreamState, start_fake_upstream

ROOT = Path(__file__).resolve().parent.parent
AGENTS = [
    # (key name, tenant, agent type, models, campaigns)
    ("content-agent", "acme", "content", ["gpt-4o-mini", "gpt-4.1"], ["spring-launch", "blog"]),
    ("support-agent", "acme", "support", ["gpt-4o-mini", "o4-mini"], ["tickets"]),
    ("research-agent", "globex", "research", ["gpt-5", "o3"], ["market-scan", "spring-launch"]),
]
PROMPTS = [
    "Draft a product announcement for the spring launch.",
    "Summarise this support ticket and suggest a reply.",
    "List three risks in the market report and rate them.",
    "Rewrite the paragraph in a friendlier tone.",
]


def demo_config(directory: Path, upstream_url: str, keys: dict[str, str]) -> Path:
    pricing = ROOT / "config" / "pricing.yaml"
    config = {
        "server": {"host": "127.0.0.1", "port": 8080},
        "upstream": {"base_url": upstream_url, "api_key_env": "COSTWALL_DEMO_UPSTREAM_KEY"},
        "database": f"sqlite:///{directory / 'costwall.db'}",
        "logs_dir": str(directory / "logs"),
        "reports_dir": str(directory / "reports"),
        "pricing": str(pricing),
        "budgets": {
            "timezone": "UTC", "warn_at": ["0.5", "0.8"], "near_cap": "clamp",
            "global": {"monthly_usd": "5"},
            "tenants": {"acme": {"monthly_usd": "2"}, "globex": {"monthly_usd": "3"}},
            "agents": {"research": {"monthly_usd": "2.5"}},
            "campaigns": {"spring-launch": {"monthly_usd": "0.5"}},
        },
        "keys": [
            {"name": name, "key": keys[name], "tenant": tenant, "agent": agent,
             "can_override": name == "support-agent"}
            for name, tenant, agent, _, _ in AGENTS
        ],
    }
    path = directory / "costwall.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def simulated_agent(base: str, key: str, models: list[str], campaigns: list[str],
                          rng: random.Random) -> None:
    """Send chat requests forever, some streaming, with attribution headers."""
    async with aiohttp.ClientSession() as session:
        while True:
            stream = rng.random() < 0.3
            body = {"model": rng.choice(models), "stream": stream,
                    "max_tokens": rng.choice([64, 256, 1024]),
                    "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}
            headers = {"Authorization": f"Bearer {key}",
                       "X-Costwall-Campaign": rng.choice(campaigns),
                       "X-Costwall-Task": f"task-{rng.randint(1, 40)}"}
            with contextlib.suppress(aiohttp.ClientError):
                async with session.post(f"{base}/v1/chat/completions", json=body,
                                        headers=headers) as resp:
                    await resp.read()
            await asyncio.sleep(rng.uniform(0.5, 2.0))


async def run_demo(port: int, directory: Path, agents: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    secrets_file = directory / "secrets.yaml"
    if secrets_file.exists():
        stored = yaml.safe_load(secrets_file.read_text())
    else:
        stored = {"admin": secrets.token_urlsafe(18), "finance": secrets.token_urlsafe(18),
                  "keys": {name: "sk-cw-demo-" + secrets.token_urlsafe(12)
                           for name, *_ in AGENTS}}
        secrets_file.write_text(yaml.safe_dump(stored))
        secrets_file.chmod(0o600)
    state = FakeUpstreamState(chunk_delay_s=0.02, delay_s=0.05)
    upstream_runner, upstream_url, _ = await start_fake_upstream(state=state)
    path = demo_config(directory, upstream_url, stored["keys"])
    env = {"COSTWALL_ADMIN_TOKEN": stored["admin"], "COSTWALL_FINANCE_TOKEN": stored["finance"],
           "COSTWALL_DEMO_UPSTREAM_KEY": "sk-demo-upstream"}
    settings, _ = load_settings(path, env)
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    first_key = stored["keys"][AGENTS[0][0]]
    print(f"""
costwall demo is running (state in {directory})

  Admin UI      {base}/admin          admin token:   {stored['admin']}
                                             finance token: {stored['finance']}
  Proxy         {base}/v1             (simulated OpenAI upstream at {upstream_url})
  Metrics       {base}/metrics
  Invoices      {base}/admin/invoices

Point an agent at it:
  export OPENAI_BASE_URL={base}/v1
  export OPENAI_API_KEY={first_key}

{"Three simulated agents are sending traffic; " if agents else ""}press Ctrl-C to stop.
""", flush=True)
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
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await runner.cleanup()
        await upstream_runner.cleanup()
    print("costwall demo stopped", flush=True)
