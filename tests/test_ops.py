"""Operations: SIGTERM drain of live streams, /readyz, log hygiene, Prometheus config and rules
(promtool and a real Prometheus server), the Dockerfile and docker-compose.yml."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from gateway.config import load_settings
from gateway.fake_upstream import FakeUpstreamState, start_fake_upstream
from tests.harness import (
    ADMIN_TOKEN,
    KEYS,
    ROOT,
    LoopThread,
    ServeProcess,
    Stack,
    free_port,
    http_request,
    test_env,
    write_config,
)

PROM_DIR = ROOT / "config" / "prometheus"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus'; .ci/run "
    "installs it)")


@pytest.fixture
def upstream() -> Iterator[tuple[LoopThread, FakeUpstreamState, str]]:
    """The simulator alone, for tests that run ``costwall serve`` as a subprocess."""
    lt = LoopThread()
    state = FakeUpstreamState()
    runner, url, _ = lt.run(start_fake_upstream(state=state))
    yield lt, state, url
    lt.run(runner.cleanup())
    lt.stop()


def metric(url: str, name: str) -> float:
    body = http_request("GET", f"{url}/metrics").body.decode()
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


# -- graceful shutdown ------------------------------------------------------------------------
def test_sigterm_lets_inflight_streams_finish_and_settles_them(
        tmp_path: Path, upstream: tuple[LoopThread, FakeUpstreamState, str]) -> None:
    _, state, url = upstream
    state.chunk_delay_s = 0.25  # 40 tokens = 10 content chunks: a stream takes ~2.5-3 s
    config = write_config(tmp_path, url, limits={"shutdown_grace_s": 20})
    server = ServeProcess(config, test_env())
    server.start()
    n = 6
    results: list[dict[str, Any] | BaseException | None] = [None] * n

    def stream(i: int) -> None:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS["acme-content"]["key"],
                               max_retries=0, timeout=30)
        try:
            text, usage, finish = [], None, None
            for chunk in client.chat.completions.create(
                    model="gpt-4o-mini", max_tokens=40, stream=True,
                    stream_options={"include_usage": True},
                    messages=[{"role": "user", "content": f"story {i}"}]):
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage is not None:
                    usage = chunk.usage
            results[i] = {"text": "".join(text), "usage": usage, "finish": finish}
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while metric(server.url, "costwall_inflight_requests") < n:
        assert time.monotonic() < deadline, "streams did not start"
        time.sleep(0.05)
    assert server.proc is not None
    sent = time.monotonic()
    server.proc.send_signal(15)  # SIGTERM mid-stream

    # The listening socket closes at once, while the streams are still flowing.
    refused = False
    while time.monotonic() - sent < 2 and not refused:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=0.5).close()
            time.sleep(0.05)
        except OSError:
            refused = True
    assert refused, "the gateway kept accepting connections after SIGTERM"
    assert any(r is None for r in results), "streams finished before the listener closed"

    assert server.proc.wait(30) == 0
    drained = time.monotonic() - sent
    for t in threads:
        t.join(10)
    for r in results:
        assert isinstance(r, dict), r
        assert r["finish"] == "length" and r["usage"].completion_tokens == 40
        assert len(r["text"].split()) == 40  # the whole answer arrived
    assert drained < 15

    db = f"file:{tmp_path / 'costwall.db'}?mode=ro"
    with sqlite3.connect(db, uri=True) as conn:
        rows = conn.execute("SELECT state, usage_source, cost, completion_tokens, stream "
                            "FROM requests").fetchall()
    assert len(rows) == n
    for row_state, source, cost, completion, streamed in rows:
        assert (row_state, source, completion, streamed) == ("settled", "upstream", 40, 1)
        assert cost > 0


def test_streams_past_the_grace_period_are_cut_and_charged_what_they_streamed(
        tmp_path: Path, upstream: tuple[LoopThread, FakeUpstreamState, str]) -> None:
    _, state, url = upstream
    state.chunk_delay_s = 0.3  # 100 tokens = 25 chunks: ~7.5 s, far past a 1 s grace
    config = write_config(tmp_path, url, limits={"shutdown_grace_s": 1})
    server = ServeProcess(config, test_env())
    server.start()
    received: list[str] = []
    errors: list[BaseException] = []

    def stream() -> None:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS["acme-content"]["key"],
                               max_retries=0, timeout=30)
        try:
            for chunk in client.chat.completions.create(
                    model="gpt-4o-mini", max_tokens=100, stream=True,
                    messages=[{"role": "user", "content": "a long story"}]):
                if chunk.choices:
                    received.append(chunk.choices[0].delta.content or "")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=stream)
    thread.start()
    deadline = time.monotonic() + 10
    while len(received) < 4:
        assert time.monotonic() < deadline, "the stream did not start"
        time.sleep(0.05)
    assert server.proc is not None
    sent = time.monotonic()
    server.proc.send_signal(15)
    assert server.proc.wait(15) == 0
    assert time.monotonic() - sent < 4  # the grace period, not the stream, bounded the exit
    thread.join(10)
    streamed = len("".join(received).split())
    assert 0 < streamed < 100

    with sqlite3.connect(f"file:{tmp_path / 'costwall.db'}?mode=ro", uri=True) as conn:
        [(row_state, source, completion, cost, reserved)] = conn.execute(
            "SELECT state, usage_source, completion_tokens, cost, reserved FROM requests")
    assert (row_state, source) == ("settled", "counted")
    assert streamed <= completion < 100  # what was produced (the client may miss the last bit)
    assert 0 < cost < reserved


# -- readiness --------------------------------------------------------------------------------
def test_readyz_fails_when_the_database_is_unreachable(stack: Stack) -> None:
    ready = stack.request("GET", "/readyz")
    assert (ready.status, ready.json()["status"]) == (200, "ready")
    stack.lt.run(stack.gw.ledger.close())
    ready = stack.request("GET", "/readyz")
    assert (ready.status, ready.json()) == (503, {"status": "database unreachable"})
    assert stack.request("GET", "/healthz").status == 200  # the process itself is fine


# -- logging ----------------------------------------------------------------------------------
PROMPT = "PROMPT-SENTINEL-5d1e9c the secret plan for the quarter"
BAD_KEY = "sk-cw-KEY-SENTINEL-0a7f31"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_logs_carry_request_ids_and_never_prompts_completions_or_keys(
        tmp_path: Path, upstream: tuple[LoopThread, FakeUpstreamState, str], fmt: str) -> None:
    _, state, url = upstream
    config = write_config(tmp_path, url, logging={"format": fmt, "level": "INFO"},
                          budgets={"tenants": {"acme": {"monthly_usd": "0.0001"}}})
    server = ServeProcess(config, test_env())
    server.start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS["acme-content"]["key"],
                           max_retries=0)
    messages = [{"role": "user", "content": PROMPT}]
    ids, completions = [], []
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=messages, max_tokens=20)
        ids.append(raw.headers["x-costwall-request-id"])
        completions.append(raw.parse().choices[0].message.content)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions
                           .create(model="gpt-4o-mini", messages=messages, max_tokens=20,
                                   stream=True) if c.choices)
        completions.append(streamed)
        with pytest.raises(openai.APIStatusError):  # 402: no max_tokens, tiny budget
            client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        ops = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS["acme-ops"]["key"],
                            max_retries=0)
        ops.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                    extra_headers={"X-Costwall-Override": "incident 4711"})
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key=BAD_KEY, max_retries=0) \
                .chat.completions.create(model="gpt-4o-mini", messages=messages)
        bad = http_request("POST", f"{server.url}/v1/chat/completions",
                           data=f'{{"model": "gpt-4o-mini", "messages": "{PROMPT}'.encode(),
                           headers={"Authorization": f"Bearer {KEYS['acme-content']['key']}"})
        assert bad.status == 400
        state.fail_status, state.fail_next = 500, 1
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=5)
        http_request("GET", f"{server.url}/admin/api/budget",
                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    finally:
        server.terminate()
    assert server.proc is not None and server.proc.stderr is not None
    log = server.proc.stderr.read().decode()

    secrets = [PROMPT, "PROMPT-SENTINEL", BAD_KEY, "KEY-SENTINEL", *completions,
               *(k["key"] for k in KEYS.values()), ADMIN_TOKEN, "sk-upstream-secret"]
    for secret in secrets:
        assert secret and secret not in log, f"{secret!r} leaked into the log"
    audit = "".join(p.read_text() for p in (tmp_path / "logs").rglob("*") if p.is_file())
    for secret in secrets:
        assert secret not in audit, f"{secret!r} leaked into the audit trail"

    access = [line for line in log.splitlines() if "costwall.access" in line]
    assert len(access) >= 6
    if fmt == "json":
        records = [json.loads(line) for line in log.splitlines() if line.strip()]
        settled = [r for r in records if r.get("message") == "settled"]
        assert ids[0] in {r.get("request_id") for r in settled}
        first = next(r for r in settled if r.get("request_id") == ids[0])
        assert first["tenant"] == "acme" and first["key"] == "acme-content"
        assert first["model"] == "gpt-4o-mini" and first["status"] == 200
        assert first["outcome"] == "allowed" and first["usage_source"] == "upstream"
        assert {r.get("outcome") for r in settled} >= {"allowed", "override", "upstream_error"}
        refused = {r.get("status") for r in records if r.get("message", "").startswith(
            "answered")}
        assert refused >= {400, 401, 402}
        assert all("request_id" in r for r in records if r["logger"] == "costwall.access")
    else:
        assert any(f"[{ids[0]}]" in line and "outcome=allowed" in line for line in access)


# -- Prometheus: promtool and a real server ---------------------------------------------------
def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@needs_promtool
@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-replicas.yml"])
def test_promtool_checks_scrape_config(name: str) -> None:
    result = promtool("check", "config", PROM_DIR / name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_checks_and_unit_tests_alert_rules() -> None:
    result = promtool("check", "rules", PROM_DIR / "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout
    result = promtool("test", "rules", ROOT / "tests" / "prometheus" / "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert names >= {"CostwallBudgetWarning", "CostwallBudgetExhausted",
                     "CostwallRequestsBlocked", "CostwallUpstreamErrors", "CostwallGatewayDown",
                     "CostwallLedgerUnavailable"}
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert len(rule["annotations"]["summary"]) > 20
            assert len(rule["annotations"]["description"]) > 80


def prom_query(base: str, query: str) -> list[dict[str, Any]]:
    resp = http_request("GET", f"{base}/api/v1/query?query={urllib.parse.quote(query)}",
                        timeout=5)
    body = resp.json()
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus server binary not installed "
                    "(Debian package 'prometheus')")
def test_real_prometheus_scrapes_spend_from_a_gateway(tmp_path: Path, make_stack: Any) -> None:
    stack: Stack = make_stack(budgets={"tenants": {"acme": {"monthly_usd": "0.01"}}})
    for i in range(3):
        stack.client().chat.completions.create(
            model="gpt-4o-mini", max_tokens=20 + i,
            messages=[{"role": "user", "content": "count to three"}])
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROM_DIR / "alerts.yml")],
        "scrape_configs": [{"job_name": "costwall",
                            "static_configs": [{"targets": [f"127.0.0.1:{stack.port}"]}]}],
    }))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    assert PROMETHEUS is not None
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        spend: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                spend = prom_query(base, "costwall_spend_usd_total")
            except OSError:
                spend = []
            if spend and float(spend[0]["value"][1]) > 0:
                break
            time.sleep(0.5)
        assert spend, "Prometheus never returned costwall_spend_usd_total"
        stack.flush()
        total = sum(r.cost for r in stack.rows()) / 1e12
        [series] = spend
        assert series["metric"]["job"] == "costwall"
        assert (series["metric"]["tenant"], series["metric"]["agent"],
                series["metric"]["model"]) == ("acme", "content", "gpt-4o-mini")
        assert abs(float(series["value"][1]) - total) < 1e-12
        [ratio] = prom_query(base, 'costwall_budget_utilization_ratio{scope="tenant"}')
        assert abs(float(ratio["value"][1]) - total / 0.01) < 1e-9
        [up] = prom_query(base, 'up{job="costwall"}')
        assert up["value"][1] == "1"
        rules = http_request("GET", f"{base}/api/v1/rules").json()["data"]["groups"]
        assert {g["name"] for g in rules} == {"costwall-budgets", "costwall-traffic",
                                              "costwall-availability"}
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]
                   if r.get("lastEvaluation", "").startswith("2")), rules
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- container files --------------------------------------------------------------------------
def compose_command() -> list[str] | None:
    """``docker compose`` (v2 plugin) if it works, else Debian's ``docker-compose``."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True,
                               timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


COMPOSE = compose_command()


@pytest.mark.skipif(COMPOSE is None, reason="neither 'docker compose' nor 'docker-compose' "
                    "is installed")
@pytest.mark.parametrize("profile", [None, "postgres"])
def test_docker_compose_config_is_valid(profile: str | None) -> None:
    assert COMPOSE is not None
    args = [*COMPOSE, *(["--profile", profile] if profile else []), "config"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                 "HOME": os.environ.get("HOME", "/root"),
                                 "OPENAI_API_KEY": "sk-test"})
    assert result.returncode == 0, result.stderr
    model = yaml.safe_load(result.stdout)
    assert {"gateway", "prometheus"} <= set(model["services"])
    assert model["services"]["gateway"]["environment"]["OPENAI_API_KEY"] == "sk-test"


def profile_services(compose: dict[str, Any], profile: str) -> set[str]:
    return {name for name, svc in compose["services"].items()
            if profile in svc.get("profiles", [])}


def test_compose_profiles_wire_gateways_prometheus_and_postgres() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert all(svc.get("profiles") for svc in services.values()), "every service is profiled"
    dotenv = dict(line.split("=", 1) for line in (ROOT / ".env").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert dotenv["COMPOSE_PROFILES"] == "sqlite"  # the default profile

    assert profile_services(compose, "sqlite") == {"gateway", "prometheus"}
    assert profile_services(compose, "postgres") == {"postgres", "gateway-1", "gateway-2",
                                                     "prometheus-replicas"}
    assert "costwall-data:/data" in services["gateway"]["volumes"]
    assert "COSTWALL_DB" not in services["gateway"]["environment"]  # the image's SQLite
    for name in ("gateway-1", "gateway-2"):
        svc = services[name]
        assert svc["environment"]["COSTWALL_DB"] == "postgresql://costwall@postgres/costwall"
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert svc["stop_grace_period"] == "45s"
    settings, _ = load_settings(ROOT / "config" / "compose" / "costwall.yaml", env={})
    assert settings.shutdown_grace_s < 45 and settings.log_format == "json"
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)

    # Each Prometheus scrapes exactly the gateways of its profile, with the alert rules.
    for prom, gateways in (("prometheus", {"gateway"}),
                           ("prometheus-replicas", {"gateway-1", "gateway-2"})):
        mounts = dict(v.rsplit(":", 2)[:2] for v in services[prom]["volumes"]
                      if v.startswith("./"))
        config_file = next(src for src, dst in mounts.items()
                           if dst == "/etc/prometheus/prometheus.yml")
        assert mounts["./config/prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
        config = yaml.safe_load((ROOT / config_file).read_text())
        assert config["rule_files"] == ["alerts.yml"]
        [job] = config["scrape_configs"]
        assert job["job_name"] == "costwall"
        targets = {t for sc in job["static_configs"] for t in sc["targets"]}
        assert targets == {f"{g}:8080" for g in gateways}


def test_dockerfile_builds_a_non_root_image_with_data_volume_and_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip()
             and not line.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(line.startswith("RUN pip install \".[postgres,fast]\"") for line in lines)
    assert 'VOLUME ["/data"]' in lines
    assert "USER costwall" in lines and "useradd --system --uid 10001" in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert lines[-1] == ('CMD ["costwall", "serve", "--config", "/etc/costwall/costwall.yaml", '
                         '"--host", "0.0.0.0"]')
    for line in lines:  # every COPY source exists in the build context
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "data" in ignored
