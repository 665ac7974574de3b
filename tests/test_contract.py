"""The contract (SPEC.md) and its security promises, checked from the outside.

Names operators and outside suites rely on (env vars, the 402 body, headers, audit files and
columns, CSV columns, the command line as subprocesses) and the promises around them: every
admin route is authenticated, every state-changing form needs its CSRF token, nothing leaves
the folders it belongs in, bad bytes are 4xx and never 500, the upstream key never reaches a
client and the ``/v1/models`` pass-through cannot be steered to other upstream paths. Ends
with a bounded, seeded fuzz of the admin API (no 5xx).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import http.client
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from aiohttp import web

from gateway.audit import GENESIS, AuditTrail, verify_chain
from gateway.budget import month_after
from gateway.config import PACKAGED_PRICING, load_settings
from gateway.money import format_usd, to_pico
from tests.harness import (
    ADMIN_TOKEN,
    FINANCE_TOKEN,
    KEYS,
    ROOT,
    LoopThread,
    Response,
    Stack,
    free_port,
    http_request,
    test_env,
    write_config,
)
from tests.test_admin_api import Browser

MSG = [{"role": "user", "content": "One line about budgets, please."}]
XSS = "<script>alert(1)</script>"
UPSTREAM_KEY = "sk-upstream-secret"  # tests.harness.test_env gives the gateway this key
# Path parameters of the admin routes, for requests built from the router itself.
SAMPLE_PARAMS = {"scope": "tenant", "id": "acme", "kind": "blocked", "name": "acme-content",
                 "month": "2026-01"}
# POST routes under /admin that change no budget state, so the finance role may use them.
READ_ONLY_POSTS = {"/admin/login", "/admin/logout", "/admin/invoices/save"}


# -- helpers ------------------------------------------------------------------------------------
def raw_http(port: int, method: str, path: bytes, headers: bytes = b"", body: bytes = b"",
             ) -> tuple[int, bytes, bytes]:
    """Send bytes exactly as given (paths unnormalised, headers not re-encoded)."""
    request = (method.encode() + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers
               + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
               + body)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, payload


def bearer(token: str) -> bytes:
    return f"Authorization: Bearer {token}\r\n".encode()


def admin_routes(stack: Stack) -> list[tuple[str, str]]:
    """(method, concrete path) of every route under /admin, static files excepted."""
    routes = []
    for route in stack.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        if route.method == "HEAD" or "prefix" in info:  # HEAD mirrors GET; static: own test
            continue
        path = info.get("path") or info["formatter"]
        if path == "/admin" or path.startswith("/admin/"):
            routes.append((route.method, path.format(**SAMPLE_PARAMS)))
    return routes


def chat(stack: Stack, key: str = "acme-content", **headers: str) -> Any:
    return stack.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MSG, max_tokens=20, extra_headers=headers)


@pytest.fixture
def budget_stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path, budgets={"global": {"monthly_usd": "1"},
                                 "tenants": {"acme": {"monthly_usd": "0.01"}}})
    yield s
    s.close()


# -- configuration: every SPEC key and environment variable ------------------------------------
def test_environment_wins_for_every_spec_variable(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("""
upstream: {base_url: "https://yaml.example/v1", api_key_env: MY_UPSTREAM_KEY}
database: sqlite:///yaml.db
logs_dir: yaml-logs
reports_dir: yaml-reports
admin: {token_env: MY_ADMIN, finance_token_env: MY_FINANCE}
budgets: {global: {monthly_usd: 1000}}
override: {allow: false}
""")
    env = {"COSTWALL_UPSTREAM_URL": "http://env.example:9/v1", "COSTWALL_DB": "sqlite:///env.db",
           "COSTWALL_LOG_DIR": "env-logs", "COSTWALL_REPORTS_DIR": "env-reports",
           "MAX_MONTHLY_BUDGET": "12.5", "ALLOW_BUDGET_OVERRIDE": "true",
           "MY_UPSTREAM_KEY": "sk-up", "MY_ADMIN": "a" * 16, "MY_FINANCE": "f" * 16,
           "OPENAI_API_KEY": "not-this-one", "COSTWALL_ADMIN_TOKEN": "not-this-one-either"}
    settings, warnings = load_settings(path, env)
    assert settings.upstream_url == "http://env.example:9/v1"
    assert settings.database == "sqlite:///env.db"
    assert (settings.logs_dir, settings.reports_dir) == (Path("env-logs"), Path("env-reports"))
    assert settings.budgets.limits[("global", "global")]["monthly"] == to_pico("12.5")
    assert settings.override_allow is True
    assert (settings.upstream_key, settings.admin_token, settings.finance_token) == (
        "sk-up", "a" * 16, "f" * 16)
    assert warnings == []
    # the YAML values when the environment is silent; SPEC's defaults when both are
    settings, warnings = load_settings(path, {})
    # (relative paths in the file follow the file's folder; see tests/test_install.py)
    assert (settings.upstream_url, settings.database) == ("https://yaml.example/v1",
                                                          f"sqlite:///{tmp_path / 'yaml.db'}")
    assert settings.logs_dir == tmp_path / "yaml-logs" and not settings.override_allow
    assert [w.split(":")[0] for w in warnings] == ["upstream key", "admin token",
                                                   "finance token"]
    (tmp_path / "empty.yaml").write_text("{}\n")
    bare, _ = load_settings(tmp_path / "empty.yaml", {})
    assert (bare.host, bare.port, bare.database) == (
        "127.0.0.1", 8080, f"sqlite:///{tmp_path / 'data' / 'costwall.db'}")
    assert (bare.logs_dir, bare.reports_dir, bare.pricing_path) == (
        tmp_path / "logs", tmp_path / "reports", PACKAGED_PRICING)
    assert (bare.upstream_url, bare.upstream_key_env, bare.upstream_timeout_s) == (
        "https://api.openai.com/v1", "OPENAI_API_KEY", 600)
    assert (bare.unknown_model, bare.budgets.timezone, bare.budgets.near_cap) == (
        "reject", "UTC", "reject")
    assert bare.budgets.warn_at == (Decimal("0.8"),)


def test_check_lists_every_problem_and_missing_secrets_only_warn(tmp_path: Path) -> None:
    shipped = subprocess.run([sys.executable, "-m", "gateway.cli", "check"], cwd=ROOT,
                             capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    lines = shipped.stdout.splitlines()
    assert not [line for line in lines if line.startswith("error:")]
    for secret in ("upstream key: environment variable OPENAI_API_KEY",
                   "admin token: environment variable COSTWALL_ADMIN_TOKEN",
                   "finance token: environment variable COSTWALL_FINANCE_TOKEN"):
        assert any(line.startswith("warning: " + secret) for line in lines), secret
    # the shipped example key is public: a warning, so the shipped config still checks clean
    assert any("example secret" in line for line in lines)

    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: 70000}\nunknown_model: no-such-model\n"
                   f"pricing: {tmp_path / 'missing-prices.yaml'}\n"
                   "budgets: {timezone: Nowhere/Else, warn_at: [2]}\n")
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "check", "--config", str(bad)],
                         cwd=ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    errors = [line for line in out.stdout.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and "Traceback" not in out.stderr
    for fragment in ("server.port", "budgets.timezone", "budgets.warn_at[0]",
                     "missing-prices.yaml"):  # the configured table, not the default one
        assert any(fragment in e for e in errors), (fragment, errors)
    assert f"{len(errors)} problem(s) found" in out.stdout
    # credentials in the upstream URL would clash with the gateway's own Authorization header
    creds = tmp_path / "creds.yaml"
    creds.write_text("upstream: {base_url: 'https://user:hunter2@proxy.example/v1'}\n")
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "check", "--config", str(creds)],
                         cwd=ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 1 and "credentials in the URL" in out.stdout
    assert "hunter2" not in out.stdout + out.stderr


# -- the proxy's answers ----------------------------------------------------------------------
def test_402_body_names_exactly_the_contract_fields(tmp_path: Path) -> None:
    stack = Stack(tmp_path, budgets={"tenants": {"acme": {"monthly_usd": "0.000001"}}})
    try:
        resp = stack.request("POST", "/v1/chat/completions",
                             json={"model": "gpt-4o-mini", "messages": MSG},
                             headers={"Authorization": f"Bearer {KEYS['acme-content']['key']}"})
        assert resp.status == 402
        body = resp.json()
        assert set(body) == {"error", "budget"}
        assert set(body["error"]) == {"message", "type", "param", "code", "budget"}
        assert body["error"]["type"] == body["error"]["code"] == "budget_exceeded"
        month = stack.gw.budgets.current_period()
        after = month_after(month)
        assert body["budget"] == {"scope": "tenant", "id": "acme", "period": month,
                                  "limit_usd": "0.000001", "spent_usd": "0",
                                  "window": "monthly", "resets_at": f"{after}-01T00:00:00Z"}
        assert body["error"]["budget"] == body["budget"]  # what the SDK hands its users
        message = body["error"]["message"]
        assert "tenant 'acme'" in message and "$0.000001" in message and "spent $0" in message
        assert resp.headers["X-Costwall-Request-Id"].startswith("cw-")
        with pytest.raises(openai.APIStatusError) as refused:  # as SDK users see it
            stack.client().chat.completions.create(model="gpt-4o-mini", messages=MSG)
        assert refused.value.status_code == 402
        assert isinstance(refused.value.body, dict)
        assert refused.value.body["budget"] == body["budget"]
        assert refused.value.body["code"] == "budget_exceeded"
        assert stack.state.total_requests == 0  # nothing forwarded
    finally:
        stack.close()


def test_cost_and_remaining_headers_follow_the_tightest_scope(budget_stack: Stack) -> None:
    s = budget_stack
    first = chat(s)
    [row] = s.rows()
    assert first.headers["X-Costwall-Cost-Usd"] == format_usd(row.cost) and row.cost > 0
    # acme's $0.01 is tighter than the global $1: what acme has left after this request
    assert first.headers["X-Costwall-Budget-Remaining-Usd"] == format_usd(
        to_pico("0.01") - row.cost)
    assert first.headers["X-Costwall-Request-Id"] == row.id
    second = chat(s)
    spent = sum(r.cost for r in s.rows())
    assert second.headers["X-Costwall-Budget-Remaining-Usd"] == format_usd(
        to_pico("0.01") - spent)
    globex = chat(s, "globex-research")  # no tenant cap: the global scope is the tightest
    total = sum(r.cost for r in s.rows())
    assert globex.headers["X-Costwall-Budget-Remaining-Usd"] == format_usd(to_pico("1") - total)
    stream = s.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MSG, max_tokens=5, stream=True)
    assert stream.headers["X-Costwall-Request-Id"].startswith("cw-")
    list(stream.parse())
    unauthorized = s.request("POST", "/v1/chat/completions", json={"model": "gpt-4o-mini"})
    assert unauthorized.status == 401 and unauthorized.headers["X-Costwall-Request-Id"]


def test_the_upstream_key_never_reaches_a_client(tmp_path: Path) -> None:
    """Even an upstream that echoes the key it was given, in its body and its headers."""

    async def echo(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        status = 200 if request.method == "GET" else 401
        return web.json_response(
            {"error": {"message": f"Incorrect API key provided: {auth}", "type": "x",
                       "param": None, "code": "invalid_api_key"}, "object": "list", "data": []},
            status=status, headers={"X-Echo": auth, "WWW-Authenticate": f"Bearer {auth}"})

    lt = LoopThread()
    upstream = web.Application()
    upstream.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(upstream)
    lt.run(runner.setup())
    port = free_port()
    lt.run(web.TCPSite(runner, "127.0.0.1", port).start())
    stack = Stack(tmp_path, upstream={"base_url": f"http://127.0.0.1:{port}/v1"})
    try:
        answers = [
            stack.request("POST", "/v1/chat/completions",
                          json={"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 5},
                          headers={"Authorization": f"Bearer {KEYS['acme-content']['key']}"}),
            stack.request("GET", "/v1/models",
                          headers={"Authorization": f"Bearer {KEYS['acme-content']['key']}"}),
        ]
        for resp in answers:
            text = resp.body.decode() + "".join(f"{k}: {v}\n" for k, v in resp.headers.items())
            assert UPSTREAM_KEY not in text, text
            assert resp.headers["X-Echo"] == "Bearer [redacted]"
        assert "Incorrect API key provided" in answers[1].body.decode()  # other answers pass
        # an upstream 401 is about costwall's own key: a 502 that says so (tests/test_install.py)
        assert answers[0].status == 502 and answers[1].status == 200
    finally:
        stack.close()
        lt.run(runner.cleanup())
        lt.stop()


def test_models_passthrough_reaches_only_models(stack: Stack) -> None:
    auth = bearer(KEYS["acme-content"]["key"])
    status, _, body = raw_http(stack.port, "GET", b"/v1/models/gpt-4o-mini", auth)
    assert status == 200 and json.loads(body)["id"] == "gpt-4o-mini"
    forwarded = stack.state.total_requests
    for path in (b"/v1/models/../files", b"/v1/models/%2e%2e/files",
                 b"/v1/models/..%2f..%2fv1%2ffiles", b"/v1/models/x%2F..%2F..%2Ffiles",
                 b"/v1/models/%2e%2e%2f%2e%2e%2forganization/users", b"/v1/models/..",
                 b"/v1/models/x/../../files", b"/v1/models/%3Fx"):
        status, _, body = raw_http(stack.port, "GET", path, auth)
        assert status == 404, path
        error = json.loads(body)["error"]
        assert error["code"] == "not_found" and "Unknown endpoint" in error["message"], path
    assert stack.state.total_requests == forwarded  # none of them went upstream


def test_bytes_that_are_not_utf8_are_4xx_never_500(tmp_path: Path) -> None:
    stack = Stack(tmp_path, budgets={"global": {"monthly_usd": "0"}})
    chat_body = json.dumps({"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 5}).encode()
    json_type = b"Content-Type: application/json\r\n"
    try:
        for path, method in ((b"/v1/chat/completions", "POST"), (b"/v1/models", "GET"),
                             (b"/admin/api/budget", "GET")):
            status, _, body = raw_http(stack.port, method, path,
                                       b"Authorization: Bearer \xff\xfe\r\n" + json_type,
                                       chat_body if method == "POST" else b"")
            assert status == 401, path
            assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
        ops = bearer(KEYS["acme-ops"]["key"]) + json_type
        for reason in (b"caf\xc3\xa9 \xff", b"\xed\xa0\x80"):
            status, _, body = raw_http(stack.port, "POST", b"/v1/chat/completions",
                                       ops + b"X-Costwall-Override: " + reason + b"\r\n",
                                       chat_body)
            assert status == 400 and json.loads(body)["error"]["param"] == "X-Costwall-Override"
        assert stack.state.total_requests == 0
        status, _, _ = raw_http(stack.port, "POST", b"/v1/chat/completions",
                                ops + "X-Costwall-Override: café 4711\r\n".encode(), chat_body)
        assert status == 200  # printable UTF-8 is fine
        assert [r.override_reason for r in stack.rows()] == ["café 4711"]
        admin = bearer(ADMIN_TOKEN) + json_type
        for path, method, payload in (
                (b"/admin/api/override", "POST", b'{"enabled": true, "reason": "\\ud800"}'),
                (b"/admin/api/budgets/tenant/acme", "PUT",
                 b'{"monthly_usd": "1", "reason": "a\\u202eb"}'),
                (b"/admin/api/override", "POST", b'{"enabled": true, "reason": "a\\u0000b"}')):
            status, _, body = raw_http(stack.port, method, path, admin, payload)
            assert status == 400, payload
            assert json.loads(body)["error"]["param"] == "reason"
        stack.flush()
        report = stack.lt.run(stack.gw.audit.verify())
        assert report.ok and report.lines == 1  # the one override execution
    finally:
        stack.close()


def test_audit_events_never_fail_on_odd_text(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path)
    trail.record("admin", {"actor": "a\udcffb", "action": "x", "target": "t|<b>",
                           "detail": "line\nbreak", "reason": "ok"})
    [event] = trail.events("admin")
    assert event["actor"] == "a?b"
    assert verify_chain(tmp_path / "budget" / "events.jsonl").ok
    row = (tmp_path / "budget" / "admin-actions.md").read_text().splitlines()[-1]
    assert "t\\|&lt;b&gt;" in row and "line break" in row


def test_header_values_cannot_inject_lines_and_are_bounded(stack: Stack) -> None:
    auth = bearer(KEYS["acme-content"]["key"]) + b"Content-Type: application/json\r\n"
    body = json.dumps({"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 5}).encode()
    for header in (b"X-Costwall-Campaign: a\rX-Injected: 1", b"X-Costwall-Task: a\x00b",
                   b"X-Costwall-Agent: a\x1b[31mb", b"X-Costwall-Campaign: " + b"c" * 9000):
        status, head, _ = raw_http(stack.port, "POST", b"/v1/chat/completions",
                                   auth + header + b"\r\n", body)
        assert status == 400 and b"X-Injected" not in head, header[:40]
    status, _, answer = raw_http(stack.port, "POST", b"/v1/chat/completions",
                                 auth + b"X-Costwall-Campaign: " + b"c" * 129 + b"\r\n", body)
    assert status == 400 and json.loads(answer)["error"]["param"] == "X-Costwall-Campaign"
    assert stack.state.total_requests == 0
    # printable text with markup is data: stored as given, escaped where it is shown
    assert chat(stack, **{"X-Costwall-Campaign": "spring|<b>x</b>"}).http_response.status_code \
        == 200
    assert stack.rows()[-1].campaign == "spring|<b>x</b>"


def test_model_names_are_bounded(stack: Stack) -> None:
    """A model name is stored per request and cached by the price lookup: 256 characters."""
    auth = {"Authorization": f"Bearer {KEYS['acme-content']['key']}"}
    long = stack.request("POST", "/v1/chat/completions", headers=auth, json={
        "model": "gpt-4o-mini-" + "x" * 245, "messages": MSG, "max_tokens": 3})
    assert long.status == 400 and long.json()["error"]["param"] == "model"
    assert stack.state.total_requests == 0
    dated = stack.request("POST", "/v1/chat/completions", headers=auth, json={
        "model": "gpt-4o-mini-2024-07-18", "messages": MSG, "max_tokens": 3})
    assert dated.status == 200 and stack.rows()[-1].model == "gpt-4o-mini-2024-07-18"


def test_metric_families_carry_exactly_the_contract_labels(stack: Stack) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    stack.gw.settings.budgets.limits  # noqa: B018  (the harness config has no caps)
    stack.lt.run(stack.gw.budgets.set_limit(("tenant", "acme"), to_pico("5")))
    chat(stack, **{"X-Costwall-Campaign": "free-form-campaign-42"})
    stack.request("POST", "/v1/chat/completions", json={"model": "gpt-4o-mini"})  # rejected
    text = stack.request("GET", "/metrics").body.decode()
    labels: dict[str, set[frozenset[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names = frozenset(sample.labels) - {"le"}
            labels.setdefault(sample.name, set()).add(names)
    expected = {
        "costwall_requests_total": {"outcome", "model"},
        "costwall_spend_usd_total": {"tenant", "agent", "model"},
        "costwall_tokens_total": {"model", "kind"},
        # SPEC's labels plus the budget window (Contract additions: "Budget windows")
        "costwall_budget_limit_usd": {"scope", "id", "window"},
        "costwall_budget_spent_usd": {"scope", "id", "window"},
        "costwall_budget_utilization_ratio": {"scope", "id", "window"},
        "costwall_request_duration_seconds_bucket": {"endpoint"},
        "costwall_upstream_duration_seconds_bucket": {"endpoint"},
    }
    for name, names in expected.items():
        assert labels.get(name) == {frozenset(names)}, (name, labels.get(name))
    assert 'outcome="rejected"' in text and 'outcome="allowed"' in text
    assert "free-form-campaign-42" not in text and MSG[0]["content"] not in text


# -- audit files, ledger exports ----------------------------------------------------------------
EXECUTION_COLUMNS = ["time", "request_id", "tenant", "agent", "campaign", "task", "model",
                     "estimate_usd", "scope", "limit_usd", "spent_usd", "reason"]


def md_table(path: Path) -> list[list[str]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("| "):
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
            rows.append([c.strip() for c in cells])
    return rows


def test_audit_files_have_the_contract_columns_and_a_hash_chain(tmp_path: Path) -> None:
    stack = Stack(tmp_path, budgets={"global": {"monthly_usd": "0"}})
    try:
        with pytest.raises(openai.APIStatusError):
            stack.client().chat.completions.create(
                model="gpt-4o-mini", messages=MSG, max_tokens=5,
                extra_headers={"X-Costwall-Campaign": "c|" + XSS, "X-Costwall-Task": "t-1"})
        chat(stack, "acme-ops", **{"X-Costwall-Override": "incident 4711"})
        api = stack.request("PUT", "/admin/api/budgets/tenant/acme",
                            json={"monthly_usd": "5", "reason": "more room"},
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert api.status == 200
        stack.flush()  # the files are written from the database in the background
        folder = stack.settings.logs_dir / "budget"
        blocked = md_table(folder / "blocked-executions.md")
        assert blocked[0] == EXECUTION_COLUMNS and len(blocked) == 2
        row = dict(zip(blocked[0], blocked[1], strict=True))
        assert row["request_id"].startswith("cw-")
        assert (row["tenant"], row["agent"], row["task"], row["model"]) == (
            "acme", "content", "t-1", "gpt-4o-mini")
        assert row["campaign"] == "c\\|&lt;script&gt;alert(1)&lt;/script&gt;"
        assert (row["scope"], row["limit_usd"], row["spent_usd"]) == ("global:global", "0", "0")
        assert Decimal(row["estimate_usd"]) > 0 and "Budget exceeded" in row["reason"]
        override = md_table(folder / "override-executions.md")
        assert override[0] == EXECUTION_COLUMNS
        assert dict(zip(override[0], override[1], strict=True))["reason"] == "incident 4711"
        admin = md_table(folder / "admin-actions.md")
        assert admin[0][:4] == ["time", "actor", "action", "target"] and "reason" in admin[0]
        assert "cap.set" in admin[1] and "more room" in admin[1]
        lines = (folder / "events.jsonl").read_bytes().splitlines()
        assert [json.loads(line)["kind"] for line in lines] == ["blocked", "override", "admin"]
        prev, key = GENESIS, stack.gw.audit.key
        assert key is not None
        for n, line in enumerate(lines, start=1):
            record = json.loads(line)
            assert (record["n"], record["prev"]) == (n, prev)
            body = line[:line.rindex(b',"mac":"')] + b"}"  # HMAC-SHA256 of the line itself
            assert record["mac"] == hmac.new(key, body, hashlib.sha256).hexdigest()
            prev = record["mac"]
        everything = b"".join(p.read_bytes() for p in folder.iterdir())
        for secret in (KEYS["acme-content"]["key"], KEYS["acme-ops"]["key"], ADMIN_TOKEN,
                       UPSTREAM_KEY, MSG[0]["content"]):
            assert secret.encode() not in everything, secret
    finally:
        stack.close()


def test_invoice_csv_has_the_contract_columns(stack: Stack) -> None:
    chat(stack, **{"X-Costwall-Campaign": "=cmd|' /C calc'!A0"})
    month = stack.gw.budgets.current_period()
    resp = stack.request("GET", f"/admin/invoices/{month}.csv",
                         headers={"Authorization": f"Bearer {FINANCE_TOKEN}"})
    assert resp.status == 200
    header, row = list(csv.reader(io.StringIO(resp.body.decode())))[:2]
    spec = ["timestamp", "request_id", "tenant", "agent", "campaign", "task", "model",
            "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens",
            "cost_usd", "override"]
    assert header[:len(spec)] == spec
    assert dict(zip(header, row, strict=True))["campaign"] == "'=cmd|' /C calc'!A0"


# -- admin security -------------------------------------------------------------------------------
def test_every_admin_route_needs_credentials(tmp_path: Path) -> None:
    stack = Stack(tmp_path, budgets={"tenants": {"acme": {"monthly_usd": "7"}}})
    try:
        routes = admin_routes(stack)
        paths = {path for _, path in routes}
        assert {"/admin", "/admin/budget", "/admin/keys", "/admin/logs", "/admin/invoices",
                "/admin/api/budget", "/admin/api/usage", "/admin/api/keys",
                "/admin/api/override", "/admin/api/budgets/tenant/acme",
                "/admin/api/logs/blocked", "/admin/invoices/2026-01.pdf"} <= paths
        for method, path in routes:
            if path == "/admin/login":
                continue
            for headers in ({}, {"Cookie": "costwall_admin=forged-session-id"}):
                conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
                conn.request(method, path, body=b"{}" if method != "GET" else None,
                             headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                if path.startswith("/admin/api/"):
                    assert resp.status == 401, (method, path)
                    assert json.loads(body)["error"]["code"] == "unauthorized"
                else:
                    assert resp.status == 303, (method, path)
                    assert resp.headers["Location"].startswith("/admin/login?next=")
                assert b"acme" not in body and b"limit_usd" not in body, (method, path)
        stack.flush()
        assert list(stack.gw.audit.events()) == []
        assert stack.gw.budgets.limits.get(("tenant", "acme"), "monthly") == to_pico("7")
        # a wrong bearer token is refused too (and soon rate limited), never served
        for method, path in [r for r in routes if r[1] != "/admin/login"][:8]:
            resp = stack.request(method, path, headers={"Authorization": "Bearer " + "z" * 24})
            assert resp.status in (401, 429), (method, path)
    finally:
        stack.close()
    closed = Stack(tmp_path / "closed", env={"COSTWALL_ADMIN_TOKEN": ""})
    try:
        for method, path in admin_routes(closed):
            resp = closed.request(method, path, headers={"Authorization": f"Bearer "
                                                                         f"{FINANCE_TOKEN}"})
            assert resp.status == 503, (method, path)
    finally:
        closed.close()


def test_finance_cannot_write_through_any_route(admin_stack_with_session: Any) -> None:
    stack, finance = admin_stack_with_session
    token = finance.csrf("/admin/logs")
    writes = [(m, p) for m, p in admin_routes(stack)
              if m in ("POST", "PUT", "DELETE", "PATCH") and p not in READ_ONLY_POSTS]
    assert len(writes) >= 9
    for method, path in writes:
        if path.startswith("/admin/api/"):
            resp = stack.request(method, path, json={"enabled": True, "reason": "x",
                                                     "monthly_usd": "1", "name": "k9",
                                                     "tenant": "acme"},
                                 headers={"Authorization": f"Bearer {FINANCE_TOKEN}"})
            assert resp.status == 403, (method, path)
            assert resp.json()["error"]["type"] == "permission_error"
        else:
            form = {"csrf": token, "enabled": "on", "confirm": "yes", "reason": "x",
                    "scope": "tenant", "id": "acme", "monthly_usd": "1", "name": "acme-content",
                    "tenant": "acme"}
            assert finance.post(path, form).status == 403, path
    stack.flush()
    assert list(stack.gw.audit.events("admin")) == []
    assert not stack.gw.overrides.state.enabled


@pytest.fixture
def admin_stack_with_session(tmp_path: Path) -> Iterator[tuple[Stack, Browser]]:
    s = Stack(tmp_path, budgets={"tenants": {"acme": {"monthly_usd": "7"}}})
    finance = Browser(s.url)
    assert finance.login(FINANCE_TOKEN).status == 303
    yield s, finance
    s.close()


def test_every_state_changing_form_needs_its_csrf_token(tmp_path: Path) -> None:
    stack = Stack(tmp_path, budgets={"tenants": {"acme": {"monthly_usd": "7"}}})
    try:
        browser = Browser(stack.url)
        assert browser.login(ADMIN_TOKEN).status == 303
        good = browser.csrf()
        posts = [p for m, p in admin_routes(stack)
                 if m == "POST" and not p.startswith("/admin/api/") and p != "/admin/login"]
        assert {"/admin/budget/override", "/admin/budget/caps", "/admin/budget/caps/remove",
                "/admin/keys", "/admin/keys/revoke", "/admin/invoices/save",
                "/admin/logout"} <= set(posts)
        form = {"enabled": "on", "confirm": "yes", "reason": "x", "scope": "tenant",
                "id": "acme", "monthly_usd": "1", "name": "k-new", "tenant": "acme",
                "month": stack.gw.budgets.current_period()}
        for path in posts:
            for csrf in (None, "", "forged-" + good[7:], good.upper()):
                data = form if csrf is None else {**form, "csrf": csrf}
                resp = browser.post(path, data)
                assert resp.status == 403 and b"security token" in resp.body, (path, csrf)
        stack.flush()
        assert list(stack.gw.audit.events()) == []
        assert not stack.gw.overrides.state.enabled
        assert stack.gw.budgets.limits.get(("tenant", "acme"), "monthly") == to_pico("7")
        assert not (stack.settings.reports_dir / "invoices").exists()
        assert browser.get("/admin").status == 200  # logout without a token did not log out
    finally:
        stack.close()


def test_no_path_leaves_static_or_invoice_folders(stack: Stack) -> None:
    admin = bearer(ADMIN_TOKEN)
    for path in (b"/admin/static/../../gateway/config/__init__.py",
                 b"/admin/static/%2e%2e%2f%2e%2e%2fgateway%2fconfig%2f__init__.py",
                 b"/admin/static/..%2f..%2fgateway%2fconfig%2f__init__.py",
                 b"/admin/static/%2e%2e/__init__.py", b"/admin/static/..%5c__init__.py",
                 b"/admin/static/%252e%252e%252f__init__.py", b"/admin/static//etc/passwd",
                 b"/admin/static/%2fetc%2fpasswd", b"/admin/static/../templates/base.html",
                 b"/admin/invoices/..%2f..%2fgateway%2fconfig.pdf",
                 b"/admin/invoices/%2e%2e%2f2026-01.csv", b"/admin/invoices/2026-01.csv/../x",
                 b"/admin/invoices/2026-01.csv?tenant=..%2f..%2fetc",
                 b"/admin/invoices/2026-01.pdf?tenant=%2fetc%2fpasswd"):
        status, _, body = raw_http(stack.port, "GET", path, admin)
        assert status in (400, 404), path
        assert b"ConfigError" not in body and b"root:x:" not in body and b"{%" not in body
    status, _, body = raw_http(stack.port, "GET", b"/admin/static/admin.css")
    assert status == 200 and b"--accent" in body  # static files need no login
    browser = Browser(stack.url)
    browser.login(ADMIN_TOKEN)
    token = browser.csrf("/admin/invoices")
    for tenant in ("../../x", "/etc/passwd", "a/b"):
        saved = browser.post("/admin/invoices/save", {"csrf": token, "tenant": tenant,
                                                      "month": "2026-01"})
        assert saved.status == 400, tenant
    month = stack.gw.budgets.current_period()  # a month without activity has no invoice
    dotted = browser.post("/admin/invoices/save", {"csrf": token, "tenant": "..",
                                                   "month": month})
    assert dotted.status == 303  # a tenant named ".." gets a safe file name, inside the folder
    written = sorted(p.name for p in (stack.settings.reports_dir / "invoices").iterdir())
    stem = f"costwall_invoice_{month.replace('-', '_')}_"
    assert len(written) == 2 and all(n.startswith(stem) for n in written)
    assert all(".." not in n.removeprefix(stem) for n in written)


def test_reflected_request_text_is_escaped_on_error_and_login_pages(stack: Stack) -> None:
    browser = Browser(stack.url)
    page = browser.get("/admin/login?next=/admin/%22%3E%3Cscript%3Ealert(1)%3C/script%3E")
    assert page.status == 200 and b"<script>alert(1)" not in page.body
    browser.login(ADMIN_TOKEN)
    missing = browser.get("/admin/%3Cscript%3Ealert(1)%3C/script%3E")
    assert missing.status == 404 and b"<script>alert(1)" not in missing.body
    assert b"&lt;script&gt;alert(1)" in missing.body


def test_aiohttp_is_pinned_past_the_parser_fixes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "aiohttp>=3.14.5" in project["dependencies"]
    assert tuple(int(p) for p in version("aiohttp").split(".")[:3]) >= (3, 14, 5)


# -- the command line as real subprocesses ----------------------------------------------------
def wait_for(url: str, timeout: float = 30, headers: dict[str, str] | None = None) -> Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            resp = http_request("GET", url, timeout=2, headers=headers)
            if resp.status == 200:
                return resp
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> tuple[int, str]:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


ALLOWED = re.compile(r'^costwall_requests_total\{[^}]*outcome="allowed"[^}]*\} [1-9]', re.M)


def test_fake_upstream_serve_and_demo_start_answer_and_stop(tmp_path: Path) -> None:
    port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "gateway.cli", "fake-upstream", "--port",
                             str(port)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        models = wait_for(f"http://127.0.0.1:{port}/v1/models",
                          headers={"Authorization": "Bearer sk-x"})
        assert any(m["id"] == "gpt-4o-mini" for m in models.json()["data"])
        direct = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-x",
                               max_retries=0)
        answer = direct.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=4)
        assert answer.usage.completion_tokens == 4

        # costwall serve --config --host --port, with the subprocess simulator as upstream
        config = write_config(tmp_path, f"http://127.0.0.1:{port}/v1")
        gw_port = free_port()
        serve = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
             "--host", "127.0.0.1", "--port", str(gw_port)], cwd=ROOT, text=True,
            env={**os.environ, **test_env()}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        try:
            wait_for(f"http://127.0.0.1:{gw_port}/readyz")
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw_port}/v1",
                                   api_key=KEYS["acme-content"]["key"], max_retries=0)
            assert client.chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                                  max_tokens=3).usage.completion_tokens == 3
        finally:
            code, out = stop(serve, signal.SIGTERM)
        assert code == 0 and f"listening on http://127.0.0.1:{gw_port}" in out
        assert "Traceback" not in out
    finally:
        code, out = stop(fake, signal.SIGTERM)
    assert code == 0 and f"http://127.0.0.1:{port}/v1" in out

    demo_port = free_port()
    demo = subprocess.Popen([sys.executable, "-m", "gateway.cli", "demo", "--port",
                             str(demo_port), "--dir", str(tmp_path / "demo")], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{demo_port}/healthz")
        token = yaml.safe_load((tmp_path / "demo" / "secrets.yaml").read_text())["admin"]
        deadline = time.monotonic() + 20
        usage: dict[str, Any] = {}
        metrics = ""
        while time.monotonic() < deadline:  # the simulated agents send traffic on their own
            usage = http_request("GET", f"http://127.0.0.1:{demo_port}/admin/api/usage"
                                 "?group_by=agent",
                                 headers={"Authorization": f"Bearer {token}"}).json()
            metrics = http_request("GET", f"http://127.0.0.1:{demo_port}/metrics").body.decode()
            if usage["requests"] >= 3 and ALLOWED.search(metrics):
                break
            time.sleep(0.3)
        assert usage["requests"] >= 3 and Decimal(usage["total_usd"]) > 0
        assert ALLOWED.search(metrics)
        assert ('costwall_budget_limit_usd{id="acme",scope="tenant",window="monthly"} 2.0'
                in metrics)
    finally:
        code, out = stop(demo)
    assert code == 0 and "Traceback" not in out, out
    assert f"http://127.0.0.1:{demo_port}/admin" in out and token in out
    assert "costwall demo stopped" in out


# -- a bounded, seeded fuzz of the admin API ----------------------------------------------------
FUZZ_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**63, -(2**70), 0.1, 1e308, "", " ", "0", "12.50", "-3",
    "NaN", "Infinity", "1e999999", "$1,000", "acme", "global", "tenant", "..", "../../etc",
    XSS, "a" * 600, "é☃", "\u202e", "\x00", "\ud800", [], [1, "x"], {}, {"monthly_usd": "1"},
]
FUZZ_FIELDS = ["monthly_usd", "reason", "enabled", "name", "tenant", "agent", "can_override",
               "month", "x"]
FUZZ_SEGMENTS = ["acme", "global", "tenant", "campaign", "key", "agent", "blocked", "admin",
                 "override", "..", "%2e%2e", "%00", "%ff", "a%2Fb", "x" * 300,
                 "acme-content", "2026-01", "%3Cb%3E", "%20", "%C3%A9"]
FUZZ_QUERY = {"month": ["2026-01", "2026-13", "x", "", "9999-12"],
              "group_by": ["tenant", "agent", "campaign", "model", "day", "x", ""],
              "tenant": ["acme", "..", "<b>", ""], "limit": ["1", "0", "-1", "99999", "x"],
              "offset": ["0", "5", "-5", "1e9"], "date": ["2026-01-01", "2026-01", "x"],
              "scope": ["tenant:acme", "%", ""], "kind": ["all", "blocked", "x"],
              "page": ["1", "0", "x", "99999999"]}


def fuzz_body(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.1:
        return rng.choice([b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"a": NaN}', b"1" * 50,
                           b'{"monthly_usd": 1e999999}', b'{"reason": "\\ud800"}'])
    fields = rng.sample(FUZZ_FIELDS, rng.randint(0, len(FUZZ_FIELDS)))
    return json.dumps({f: rng.choice(FUZZ_VALUES) for f in fields}).encode()


def test_admin_api_fuzz_never_answers_5xx(tmp_path: Path) -> None:
    stack = Stack(tmp_path, budgets={"global": {"monthly_usd": "100"},
                                     "tenants": {"acme": {"monthly_usd": "7"}}})
    rng = random.Random(20261)
    try:
        chat(stack, **{"X-Costwall-Campaign": XSS})
        templates = []
        for route in stack.app.router.routes():
            info = route.resource.get_info() if route.resource is not None else {}
            path = info.get("path") or info.get("formatter") or ""
            if route.method != "HEAD" and path.startswith("/admin") and "prefix" not in info \
                    and path != "/admin/login":  # failed logins would rate-limit the rest
                templates.append((route.method, path))
        assert len(templates) >= 20
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
        started = time.monotonic()
        for i in range(400):
            method, template = rng.choice(templates)
            if rng.random() < 0.1:
                method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH"])
            path = re.sub(r"\{[^}]+\}", lambda _: rng.choice(FUZZ_SEGMENTS), template)
            if method == "GET" and rng.random() < 0.8:
                keys = rng.sample(list(FUZZ_QUERY), rng.randint(1, 4))
                path += "?" + "&".join(f"{k}={rng.choice(FUZZ_QUERY[k])}" for k in keys)
            token = ADMIN_TOKEN if i % 2 else FINANCE_TOKEN
            body = fuzz_body(rng) if method != "GET" else None
            headers = {"Authorization": f"Bearer {token}"}
            if body is not None:
                headers["Content-Type"] = rng.choice([
                    "application/json", "application/x-www-form-urlencoded",
                    "multipart/form-data", "text/plain; charset=latin-1"])
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status < 500, (method, path, body, data[:300])
            if resp.status >= 400 and path.startswith("/admin/api/"):
                assert set(json.loads(data)["error"]) == {"message", "type", "param", "code"}
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
        conn.close()
        assert time.monotonic() - started < 10
        stack.flush()
        assert stack.lt.run(stack.gw.audit.verify()).ok
        assert stack.request("GET", "/readyz").status == 200
    finally:
        stack.close()
