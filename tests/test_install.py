"""Installable anywhere, impossible to misconfigure (issue 12).

Every command runs as a real subprocess (``python -m gateway.cli``) from a folder outside the
checkout, so the current directory can never help; the last test builds the wheel, installs it
into a fresh venv and runs ``init``, ``check``, ``demo`` and ``invoice`` from there.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from aiohttp import web

from gateway.config import PACKAGED_PRICING, ConfigError, load_settings
from gateway.startup import StartupError, require_upstream_key
from tests.harness import (
    ADMIN_TOKEN,
    FINANCE_TOKEN,
    KEYS,
    ROOT,
    Stack,
    free_port,
    http_request,
)

SECRETS = {"COSTWALL_ADMIN_TOKEN": ADMIN_TOKEN, "COSTWALL_FINANCE_TOKEN": FINANCE_TOKEN,
           "OPENAI_API_KEY": "sk-upstream-test"}


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything costwall reads, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("COSTWALL_", "OPENAI_", "MAX_MONTHLY", "ALLOW_BUDGET"))
           and k != "PYTHONPATH"}
    env.update(extra)
    return env


def costwall(*args: str, cwd: Path, env: dict[str, str] | None = None,
             timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, text=True,
                          capture_output=True, env=env or clean_env(**SECRETS), timeout=timeout)


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    return info.value.problems


# -- unknown keys and readable messages ---------------------------------------------------------
def test_every_section_rejects_unknown_keys_naming_the_closest(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("""
server: {prot: 9000}
upstream: {base_ulr: "https://x.example/v1"}
ledger: {pool_sise: 3}
admin: {token_evn: X}
budgets:
  timezon: UTC
  tenants: {acme: {montly_usd: 200}}
keys:
  - {name: a, key: sk-cw-a, tenat: acme}
limits: {max_body_byte: 5}
logging: {levl: INFO}
invoices: {compnay: x}
override: {allwo: true}
pricng: x.yaml
""")
    problems = problems_of(path)
    for where, suggestion in [
            ("server.prot", "port"), ("upstream.base_ulr", "base_url"),
            ("ledger.pool_sise", "pool_size"), ("admin.token_evn", "token_env"),
            ("budgets.timezon", "timezone"), ("budgets.tenants.acme.montly_usd", "monthly_usd"),
            ("keys[0].tenat", "tenant"), ("limits.max_body_byte", "max_body_bytes"),
            ("logging.levl", "level"), ("invoices.compnay", "company"),
            ("override.allwo", "allow"), ("pricng", "pricing")]:
        assert f"{where}: unknown setting; did you mean `{suggestion}`?" in problems, where
    # a misspelt required field is reported once, as the typo, not also as "required"
    assert not [p for p in problems if "required" in p or "None" in p], problems
    assert len(problems) == 12, problems


def test_contract_keys_not_built_yet_say_so_and_missing_fields_read_well(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("""
rate_limits: {global: {rpm: 0}}
budgets:
  agents: {research: {weekly_usd: 150}}
  users_default: {daily_usd: 2}
  tenants: {acme: {monthly_usd: null}, beta: {}, gamma: {monthly_usd: lots}}
invoices: {email_to: [finance-at-example.com]}
keys:
  - {name: a, key: sk-cw-a}
  - {key: sk-cw-b, tenant: t, agents: content}
""")
    problems = problems_of(path)
    for expected in [
            "rate_limits.global.rpm: must be a positive whole number, got 0 (leave it out for "
            "no limit)",
            "invoices.email_to: expected a list of e-mail addresses",
            'budgets.tenants.acme.monthly_usd: expected an amount in USD such as 200 or "12.50",'
            " got nothing",
            "budgets.tenants.beta: needs at least one of monthly_usd, weekly_usd, daily_usd, "
            "hourly_usd (e.g. monthly_usd: 200)",
            "keys[0].tenant: required (the tenant this key's spending is billed to)",
            "keys[1].name: required (a name for this key)"]:
        assert expected in problems, (expected, problems)
    assert any(p.startswith("budgets.tenants.gamma.monthly_usd: expected an amount")
               for p in problems)
    assert any(p.startswith("keys[1].agents: expected a list of agent types") for p in problems)
    assert len(problems) == 8, problems


def test_a_valid_config_with_every_key_entry_field_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("keys:\n  - {name: a, key: sk-cw-a, tenant: t, agent: content, "
                    "agents: [content, support], can_override: true}\n"
                    "budgets: {keys: {a: {monthly_usd: '1.5'}}}\n")
    settings, _ = load_settings(path, {})
    [key] = settings.keys
    assert (key.name, key.tenant, key.agent, key.can_override) == ("a", "t", "content", True)
    assert set(key.agents) == {"content", "support"}


def test_check_lists_every_problem_and_exit_code(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("server: {prot: 9000}\n"
                                     "budgets: {tenants: {acme: {montly_usd: 200}}}\n")
    out = costwall("check", "--config", "c.yaml", cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "error: server.prot: unknown setting; did you mean `port`?" in out.stdout
    assert "did you mean `monthly_usd`?" in out.stdout and "2 problem(s) found" in out.stdout
    assert "ok: configuration valid" not in out.stdout


# -- paths follow the config file ---------------------------------------------------------------
def test_relative_paths_follow_the_config_file_env_paths_the_current_directory(
        tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    shutil.copy(PACKAGED_PRICING, folder / "prices.yaml")
    (folder / "costwall.yaml").write_text(
        "database: sqlite:///db/costwall.db\nlogs_dir: audit\nreports_dir: ../out\n"
        "pricing: prices.yaml\n")
    settings, _ = load_settings(folder / "costwall.yaml", {})
    assert settings.database == f"sqlite:///{folder / 'db' / 'costwall.db'}"
    assert settings.logs_dir == folder / "audit"
    assert settings.reports_dir == folder / ".." / "out"
    assert settings.pricing_path == folder / "prices.yaml"
    # absolute paths stay; unset ones default next to the file; no pricing: the packaged table
    (folder / "bare.yaml").write_text("database: sqlite:////var/x.db\n")
    bare, _ = load_settings(folder / "bare.yaml", {})
    assert bare.database == "sqlite:////var/x.db"
    assert (bare.logs_dir, bare.reports_dir) == (folder / "logs", folder / "reports")
    assert bare.pricing_path == PACKAGED_PRICING
    (folder / "empty.yaml").write_text("{}\n")
    assert load_settings(folder / "empty.yaml", {})[0].database == \
        f"sqlite:///{folder / 'data' / 'costwall.db'}"
    # environment variables are used as given (relative to the current directory)
    env = {"COSTWALL_DB": "sqlite:///here.db", "COSTWALL_LOG_DIR": "l", "COSTWALL_REPORTS_DIR": "r"}
    from_env, _ = load_settings(folder / "costwall.yaml", env)
    assert (from_env.database, from_env.logs_dir, from_env.reports_dir) == (
        "sqlite:///here.db", Path("l"), Path("r"))


def test_serve_from_another_directory_uses_the_files_folder(tmp_path: Path) -> None:
    """The shipped repository config, served from elsewhere: price table, database and logs
    land next to config/, not in the current directory."""
    folder = tmp_path / "project" / "config"
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "config" / "costwall.yaml", folder / "costwall.yaml")
    shutil.copy(ROOT / "config" / "pricing.yaml", folder / "pricing.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config",
         str(folder / "costwall.yaml"), "--port", str(port)],
        cwd=elsewhere, env=clean_env(**SECRETS), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/readyz", proc, 30)
        assert (tmp_path / "project" / "data" / "costwall.db").exists()
        assert list(elsewhere.iterdir()) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert f"costwall listening on http://127.0.0.1:{port}" in proc.stdout.read()  # type: ignore[union-attr]


# -- the packaged price table -------------------------------------------------------------------
def test_packaged_price_table_is_the_repository_table() -> None:
    """tools/gen_pricing.py --write keeps both identical; this fails when only one changed."""
    assert PACKAGED_PRICING.read_bytes() == (ROOT / "config" / "pricing.yaml").read_bytes(), (
        "gateway/data/pricing.yaml differs from config/pricing.yaml: regenerate both with "
        "`python tools/gen_pricing.py --write PRICES.json` (or copy one onto the other)")


# -- costwall init ------------------------------------------------------------------------------
def test_init_writes_a_starter_that_checks_clean_and_never_overwrites(tmp_path: Path) -> None:
    out = costwall("check", cwd=tmp_path)  # nothing here yet: says what to do
    assert out.returncode == 1 and "costwall init" in out.stdout
    out = costwall("init", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    config, env_file = tmp_path / "costwall.yaml", tmp_path / ".env.example"
    key = next(line.strip() for line in out.stdout.splitlines()
               if line.strip().startswith("sk-cw-"))
    assert key not in config.read_text()  # only its hash is stored
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                  if line and not line.startswith("#"))
    assert set(values) == {"OPENAI_API_KEY", "COSTWALL_ADMIN_TOKEN", "COSTWALL_FINANCE_TOKEN"}
    assert len(values["COSTWALL_ADMIN_TOKEN"]) >= 16
    # checks clean as written, with the secrets missing (warnings) and with them set
    bare = costwall("check", cwd=tmp_path, env=clean_env())
    assert bare.returncode == 0 and "warning: upstream key" in bare.stdout, bare.stdout
    assert not [line for line in bare.stdout.splitlines() if line.startswith("error")]
    full = costwall("check", "--config", str(config), cwd=ROOT.parent,
                    env=clean_env(**{k: v for k, v in values.items() if v}, OPENAI_API_KEY="sk"))
    assert full.returncode == 0 and "warning" not in full.stdout, full.stdout
    # the key it printed is the key in the config
    settings, _ = load_settings(config, {})
    from gateway.config import hash_key
    assert settings.keys[0].key_sha256 == hash_key(key)
    # a second init refuses, changes nothing; --force rewrites
    before = config.read_text()
    again = costwall("init", str(tmp_path), cwd=ROOT.parent)
    assert again.returncode == 1 and "--force" in again.stderr and "Traceback" not in again.stderr
    assert config.read_text() == before
    forced = costwall("init", str(tmp_path), "--force", cwd=ROOT.parent)
    assert forced.returncode == 0 and config.read_text() != before
    # into a new folder
    assert costwall("init", "sub/dir", cwd=tmp_path).returncode == 0
    assert (tmp_path / "sub" / "dir" / "costwall.yaml").is_file()


# -- start-up failures: one line, non-zero, at once ---------------------------------------------
def wait_http(url: str, proc: subprocess.Popen[Any], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if http_request("GET", url, timeout=1).status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def assert_one_line_failure(out: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert out.returncode not in (0, None), out
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("costwall: "), out.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def timed(*args: str, cwd: Path, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    out = costwall(*args, cwd=cwd, env=env, timeout=30)
    assert time.monotonic() - started < 15, "start-up failure took too long to exit"
    return out


def test_serve_startup_failures_are_one_line_and_exit_at_once(tmp_path: Path,
                                                              busy_port: int) -> None:
    def write(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return name

    ok = write("ok.yaml", "logs_dir: logs\n")
    assert_one_line_failure(timed("serve", "--config", ok, "--port", str(busy_port),
                                  cwd=tmp_path), f"127.0.0.1:{busy_port}", "in use")
    assert_one_line_failure(timed("serve", "--config", write("p.yaml", "pricing: none.yaml\n"),
                                  cwd=tmp_path), "price table", "none.yaml", "not found")
    write("broken.yaml", "models: {gpt-x: {input: abc}}\n")
    assert_one_line_failure(timed("serve", "--config", write("b.yaml", "pricing: broken.yaml\n"),
                                  cwd=tmp_path), "price table", "gpt-x")
    (tmp_path / "dir.db").mkdir()
    port = str(free_port())
    assert_one_line_failure(timed("serve", "--config", write("d.yaml", "database: "
                                  "sqlite:///dir.db\n"), "--port", port, cwd=tmp_path),
                            "database", "cannot be used")
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    assert_one_line_failure(timed("serve", "--config", write("j.yaml", "database: "
                                  "sqlite:///junk.db\n"), "--port", port, cwd=tmp_path),
                            "database", "not a database")
    down = f"postgresql://costwall:hunter2@127.0.0.1:{free_port()}/costwall"
    out = timed("serve", "--config", write("pg.yaml", f"database: {down}\n"), "--port", port,
                cwd=tmp_path)
    assert_one_line_failure(out, "database postgresql://costwall:***@127.0.0.1")
    assert "hunter2" not in out.stderr
    # the PostgreSQL extra missing: an asyncpg that cannot be imported shadows the real one
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "asyncpg.py").write_text("raise ImportError('No module named asyncpg')\n")
    out = timed("serve", "--config", "pg.yaml", "--port", port, cwd=tmp_path,
                env=clean_env(**SECRETS, PYTHONPATH=str(shadow)))
    assert_one_line_failure(out, "pip install 'costwall[postgres]'")
    # a remote upstream without the gateway's key: refused before anything starts
    no_key = {k: v for k, v in SECRETS.items() if k != "OPENAI_API_KEY"}
    out = timed("serve", "--config", ok, "--port", port, cwd=tmp_path, env=clean_env(**no_key))
    assert_one_line_failure(out, "OPENAI_API_KEY", 'api_key_env: ""')
    assert not (tmp_path / "data").exists()  # refused before the database was created
    # nothing above left a half-started database behind in the current directory
    assert not (tmp_path / "data" / "costwall.db").exists()


def test_missing_upstream_key_rules() -> None:
    from dataclasses import replace

    from gateway.config import Settings

    remote = Settings(upstream_url="https://api.openai.com/v1", upstream_key=None)
    with pytest.raises(StartupError, match="OPENAI_API_KEY"):
        require_upstream_key(remote)
    require_upstream_key(replace(remote, upstream_key_env=""))  # declared keyless
    require_upstream_key(replace(remote, upstream_url="http://127.0.0.1:8000/v1"))  # local
    require_upstream_key(replace(remote, upstream_url="http://localhost:8000/v1"))
    require_upstream_key(replace(remote, upstream_key="sk-x"))


def test_keyless_upstream_is_declared_with_an_empty_env_name(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("upstream: {base_url: 'http://llm.internal/v1', "
                                     "api_key_env: ''}\n")
    settings, warnings = load_settings(tmp_path / "c.yaml", {"OPENAI_API_KEY": "unused"})
    assert settings.upstream_key is None and settings.upstream_key_env == ""
    assert not [w for w in warnings if w.startswith("upstream key")]


def test_demo_on_a_busy_port_leaves_nothing_and_exits(tmp_path: Path, busy_port: int) -> None:
    state = tmp_path / "demo-state"
    out = timed("demo", "--port", str(busy_port), "--dir", str(state), cwd=tmp_path)
    assert_one_line_failure(out, f"127.0.0.1:{busy_port}", "in use")
    assert not state.exists() and list(tmp_path.iterdir()) == []


def test_demo_runs_anywhere_and_stops_on_sigterm_and_ctrl_c(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cwd = tmp_path / "ro"
    cwd.mkdir()
    cwd.chmod(0o555)  # the current directory is not even writable
    for sig in (signal.SIGTERM, signal.SIGINT):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "demo", "--port",
                                 str(port)], cwd=cwd, env=clean_env(XDG_DATA_HOME=str(home)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_http(f"http://127.0.0.1:{port}/healthz", proc, 30), proc.stderr
        finally:
            proc.send_signal(sig)
            started = time.monotonic()
            code = proc.wait(20)
        assert code == 0 and time.monotonic() - started < 15
        stdout, stderr = proc.communicate()
        assert "Traceback" not in stderr, stderr
        assert f"state in {home / 'costwall' / 'demo'}" in stdout
        assert "costwall demo stopped" in stdout
    assert (home / "costwall" / "demo" / "costwall.db").exists()
    secrets = yaml.safe_load((home / "costwall" / "demo" / "secrets.yaml").read_text())
    for name in ("content-agent", "support-agent", "research-agent"):  # all keys are shown
        assert secrets["keys"][name] in stdout
    assert "campaign market-scan $0.01" in stdout


# -- the upstream refusing the gateway's own key ------------------------------------------------
def test_upstream_401_becomes_502_upstream_auth_failed(tmp_path: Path) -> None:
    """OpenAI's 401 quotes part of the key it got: the agent sees neither that nor a 401 that
    would make it blame its own virtual key."""
    seen: list[str] = []

    async def refuse(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response(status=401, data={"error": {
            "message": "Incorrect API key provided: sk-upstr*******cret. You can find your "
                       "API key at https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})

    async def start() -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_post("/v1/{tail:.*}", refuse)
        app.router.add_get("/v1/{tail:.*}", refuse)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    stack = Stack(tmp_path)
    runner, port = stack.lt.run(start())
    stack.config_overrides = {"upstream": {"base_url": f"http://127.0.0.1:{port}/v1"}}
    stack.restart()
    try:
        client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEYS["acme-content"]["key"],
                               max_retries=2, timeout=30)  # the SDK's default retries
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(model="gpt-4o-mini", stream=stream,
                                               messages=[{"role": "user", "content": "hi"}])
            err = info.value
            assert err.status_code == 502 and not isinstance(err, openai.AuthenticationError)
            assert err.body["code"] == "upstream_auth_failed"  # type: ignore[index]
            assert "your virtual key is fine" in err.message
            assert "COSTWALL_TEST_UPSTREAM_KEY" in err.message
            assert "sk-upstr" not in err.message
            assert err.response.headers["X-Costwall-Upstream-Auth"] == "failed"
        with pytest.raises(openai.APIStatusError) as info:  # GET /v1/models too
            client.models.list()
        assert info.value.status_code == 502 and "your virtual key is fine" in info.value.message
        assert len(seen) == 3  # x-should-retry: false, so no SDK retry hit the upstream
        assert all(h == "Bearer sk-upstream-secret" for h in seen)
        rows = stack.rows()
        assert [(r.status, r.cost) for r in rows] == [(401, 0), (401, 0)]
        # the gateway's own 401 (a bad virtual key) stays a 401 with its own code
        bad = stack.request("POST", "/v1/chat/completions", json={"model": "gpt-4o-mini"},
                            headers={"Authorization": "Bearer sk-cw-nope"})
        assert bad.status == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert "X-Costwall-Upstream-Auth" not in bad.headers
    finally:
        stack.lt.run(runner.cleanup())
        stack.close()


# -- the wheel, installed in a fresh venv, used from outside the checkout ------------------------
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("gateway", "admin"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            str(dist), str(src)], capture_output=True, text=True, timeout=180)
    assert built.returncode == 0, built.stderr
    [wheel] = dist.glob("costwall-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    # Dependencies come from the test venv's site-packages (offline, fast); costwall itself
    # only from the wheel: a .pth path line does not run the test venv's editable hook.
    [site] = (venv / "lib").glob("python3*/site-packages")
    import aiohttp
    (site / "deps.pth").write_text(str(Path(aiohttp.__file__).parent.parent) + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" /
                                "python"), "install", "--no-deps", "--no-index", "-q",
                                str(wheel)], capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr
    exe = str(venv / "bin" / "costwall")
    work = tmp_path / "work"
    work.mkdir()
    env = clean_env(**SECRETS)

    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout)

    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import gateway.config as c; print(c.PACKAGED_PRICING)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site)), where.stdout  # not the checkout
    assert run("init").returncode == 0
    out = run("check")
    assert out.returncode == 0 and "ok: configuration valid" in out.stdout, out.stdout
    (work / "elsewhere").mkdir()
    out = subprocess.run([exe, "check", "--config", "../costwall.yaml"], cwd=work / "elsewhere",
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout

    port = free_port()
    state = work / "demo"
    demo = subprocess.Popen([exe, "demo", "--port", str(port), "--dir", str(state)], cwd=work,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/healthz", demo, 30)
        # a first 402 from the simulated agents (the demo's tiny market-scan campaign)
        blocked = state / "logs" / "budget" / "blocked-executions.md"
        deadline = time.monotonic() + 60
        while not blocked.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert blocked.exists(), "no 402 within a minute"
    finally:
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(20) == 0
    stdout, stderr = demo.communicate()
    assert "Traceback" not in stderr and "costwall demo stopped" in stdout
    out = run("invoice", "--config", str(state / "costwall.yaml"), "--out", str(work / "inv"))
    assert out.returncode == 0, out.stderr
    assert sorted(p.suffix for p in (work / "inv").iterdir()) == [".csv", ".pdf"]
