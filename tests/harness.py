"""Real servers on real ports for tests: the simulator upstream and the gateway.

Both run on one event loop in a background thread, so tests can drive them with the official
``openai`` SDK's sync and async clients alike. Config goes through the real loader from a YAML
file, so tests exercise what operators write.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from typing import Any

import openai
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.config import load_settings
from gateway.fake_upstream import FakeUpstreamState, start_fake_upstream
from gateway.services import GATEWAY, Gateway

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "admin-token-0123456789abcdef"
FINANCE_TOKEN = "finance-token-0123456789abcdef"
KEYS = {
    "acme-content": {"key": "sk-cw-acme-content", "tenant": "acme", "agent": "content"},
    "acme-ops": {"key": "sk-cw-acme-ops", "tenant": "acme", "agent": "ops",
                 "can_override": True},
    "globex-research": {"key": "sk-cw-globex", "tenant": "globex", "agent": "research"},
}


class Response:
    """A plain HTTP response: status, headers (case-insensitive get) and body."""

    def __init__(self, status: int, headers: Any, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return jsonlib.loads(self.body)


def http_request(method: str, url: str, json: Any = None, data: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 30) -> Response:
    """One HTTP request with the standard library; 4xx/5xx are returned, not raised."""
    headers = dict(headers or {})
    if json is not None:
        data = jsonlib.dumps(json).encode()
        headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Response(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.headers, exc.read())


class LoopThread:
    """An asyncio loop in a daemon thread; ``run`` executes a coroutine on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(directory: Path, upstream_url: str, **overrides: Any) -> Path:
    """A config file for tests: the three KEYS, a SQLite ledger and logs under ``directory``."""
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "upstream": {"base_url": upstream_url, "api_key_env": "COSTWALL_TEST_UPSTREAM_KEY",
                     "timeout_s": 30},
        # A test module can run on PostgreSQL instead (tests/test_budgets_pg.py does).
        "database": os.environ.get("COSTWALL_TEST_DATABASE")
        or f"sqlite:///{directory / 'costwall.db'}",
        "logs_dir": str(directory / "logs"),
        "reports_dir": str(directory / "reports"),
        "pricing": str(ROOT / "config" / "pricing.yaml"),
        "budgets": {},  # the declared defaults (gateway/config/budgets.py)
        "keys": [{"name": name, **spec} for name, spec in KEYS.items()],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    if "upstreams" in overrides:  # several upstreams replace the lone one; "{sim}" is ours
        del config["upstream"]
        config["upstreams"] = [{**u, "base_url": str(u["base_url"]).replace("{sim}", upstream_url)}
                               for u in overrides["upstreams"]]
    path = directory / "costwall.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_env(**extra: str) -> dict[str, str]:
    env = {"COSTWALL_TEST_UPSTREAM_KEY": "sk-upstream-secret",
           "COSTWALL_TEST_ANTHROPIC_KEY": "sk-ant-upstream-secret",
           "COSTWALL_ADMIN_TOKEN": ADMIN_TOKEN, "COSTWALL_FINANCE_TOKEN": FINANCE_TOKEN}
    env.update(extra)
    return env


test_env.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


class Stack:
    """A running simulator and gateway for one test (or module)."""

    def __init__(self, directory: Path, clock: Callable[[], datetime] | None = None,
                 env: dict[str, str] | None = None, **config: Any):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.lt = LoopThread()
        self.state = FakeUpstreamState()
        self.upstream_runner, self.upstream_url, _ = self.lt.run(
            start_fake_upstream(state=self.state))
        self.clock = clock
        self.config_overrides = config
        self.env = test_env(**(env or {}))
        self.runner: web.AppRunner | None = None
        self.start()

    def start(self) -> None:
        path = write_config(self.dir, self.upstream_url, **self.config_overrides)
        self.settings, _ = load_settings(path, self.env)
        parts: dict[str, Any] = {"registry": CollectorRegistry()}
        if self.clock is not None:
            parts["clock"] = self.clock
        self.app = create_app(self.settings, **parts)
        self.gw: Gateway = self.app[GATEWAY]

        async def start() -> tuple[web.AppRunner, int]:
            runner = web.AppRunner(self.app, access_log=None, handler_cancellation=False)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        self.runner, self.port = self.lt.run(start())
        self.url = f"http://127.0.0.1:{self.port}"

    def stop_gateway(self) -> None:
        if self.runner is not None:
            self.lt.run(self.runner.cleanup())
            self.runner = None

    def restart(self) -> None:
        self.stop_gateway()
        self.start()

    def close(self) -> None:
        self.stop_gateway()
        self.lt.run(self.upstream_runner.cleanup())
        self.lt.stop()

    # -- clients -----------------------------------------------------------------------------
    def client(self, key: str = "acme-content", **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEYS[key]["key"], timeout=30,
                             **kwargs)

    def async_client(self, key: str = "acme-content", **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=KEYS[key]["key"],
                                  timeout=30, **kwargs)

    def anthropic(self, key: str = "acme-content", **kwargs: Any) -> Any:
        """The official ``anthropic`` SDK's client, pointed at the gateway."""
        import anthropic

        kwargs.setdefault("max_retries", 0)
        return anthropic.Anthropic(base_url=self.url, api_key=KEYS[key]["key"], timeout=30,
                                   **kwargs)

    def async_anthropic(self, key: str = "acme-content", **kwargs: Any) -> Any:
        import anthropic

        kwargs.setdefault("max_retries", 0)
        return anthropic.AsyncAnthropic(base_url=self.url, api_key=KEYS[key]["key"],
                                        timeout=30, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> Response:
        return http_request(method, self.url + path, **kwargs)

    def flush(self) -> None:
        """Every queued ledger write committed and every stored audit event in the files."""
        self.lt.run(self.gw.ledger.flush())
        self.lt.run(self.gw.audit.flush())

    def rows(self) -> list[Any]:
        self.flush()
        period = self.gw.budgets.current_period()
        return self.lt.run(self.gw.ledger.entries(period))

    def call(self, fn: Callable[[Gateway], Coroutine[Any, Any, Any]]) -> Any:
        return self.lt.run(fn(self.gw))


class ServeProcess:
    """``costwall serve`` as a real subprocess (for kill -9 and multi-replica tests)."""

    def __init__(self, config: Path, env: dict[str, str], port: int | None = None):
        self.port = port or free_port()
        self.config, self.env = config, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config),
             "--port", str(self.port)], env=env, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if http_request("GET", f"{self.url}/readyz", timeout=1).status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode() if self.proc.stderr else "")
            time.sleep(0.1)
        raise RuntimeError("costwall serve did not become ready")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def serve_replicas(directory: Path, upstream_url: str, database: str,
                   env: dict[str, str] | None = None, **config: Any) -> list[ServeProcess]:
    """Two ``costwall serve`` processes (``a`` and ``b``, folders under ``directory``) on one
    database, started; if one cannot start, none is left running. Logging is at WARNING
    unless ``config`` says otherwise: stderr is a pipe nobody reads while they run."""
    config.setdefault("logging", {"level": "WARNING"})
    replicas = []
    for name in ("a", "b"):
        (directory / name).mkdir()
        path = write_config(directory / name, upstream_url, database=database, **config)
        replicas.append(ServeProcess(path, env or test_env()))
    try:
        for r in replicas:
            r.start()
    except BaseException:
        stop_replicas(replicas)
        raise
    return replicas


def stop_replicas(replicas: list[ServeProcess]) -> None:
    """SIGTERM the ones still running (waiting for each), close their stderr pipes."""
    for r in replicas:
        if r.proc is not None and r.proc.poll() is None:
            r.terminate()
        if r.proc is not None and r.proc.stderr is not None:
            r.proc.stderr.close()
