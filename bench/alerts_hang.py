"""The request path while an alert receiver hangs: costwall with alerts going to receivers
that accept connections and never answer, against the same costwall without alert channels
and the bare proxy, under the same load, interleaved, in one run.

    python bench/alerts_hang.py [--rounds 3] [--duration 5] [--events-per-s 20]

Processes (as in ``bench/run.py``, whose helpers this uses): the simulator, the bare proxy,
``costwall serve`` twice with the same config (budgets on three scopes, SQLite ledger,
metrics, audit, access log) except that ``hang`` also has two alert channels, a signed
webhook and an email channel, both pointing at a TCP server in this process that accepts
every connection and never sends a byte (the webhook never gets an answer, the SMTP client
never gets a greeting). While a gateway is measured, a thread here makes alert events
through its admin API at ``--events-per-s``: ``alert.test`` to each channel in turn and
every third event a cap change (``cap.changed``, to both channels). ``quiet`` gets the same
admin calls (its answer to a test is 404: it has no channels), so the two differ only in the
alerts. The load generator and the simulator share core 0, each gateway runs alone on core 1.

Prints p50/p90/p99 and CPU per request for each target and scenario, then what the hanging
channels did (attempts, retries, connections the silent server is holding).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench

sys.path.insert(0, str(bench.ROOT))
from tests.silent import SilentServer

ADMIN_TOKEN = "bench-admin-token-0123456789"
SECRET = "whsec_" + base64.b64encode(b"bench-webhook-secret-0123456789a").decode()
SCENARIOS = ((False, 50, 64), (False, 0, 64), (True, 50, 16))  # (stream, delay ms, c)
TARGETS = ("bare", "quiet", "hang")


def start_gateway(name: str, upstream: bench.Server, cpu: int | None, workdir: Path,
                  alerts: dict[str, Any] | None) -> bench.Server:
    """``costwall serve`` with ``bench/run.py``'s config, plus an admin token and ``alerts``."""
    port = bench.free_port()
    directory = workdir / name
    directory.mkdir()
    path = bench.costwall_config(directory, upstream, port)
    config = yaml.safe_load(path.read_text())
    if alerts is not None:
        config["alerts"] = alerts
    path.write_text(yaml.safe_dump(config))
    env = {"COSTWALL_BENCH_KEY": bench.UPSTREAM_KEY, "COSTWALL_ADMIN_TOKEN": ADMIN_TOKEN,
           "BENCH_WEBHOOK_SECRET": SECRET}
    return bench.start(name, [bench.PY, "-m", "gateway.cli", "serve", "--config", str(path)],
                       "/healthz", port, cpu, workdir, env=env)


def admin(url: str, method: str, path: str, body: dict[str, Any]) -> int:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method=method,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@contextlib.contextmanager
def events(url: str, per_s: float) -> Iterator[dict[str, int]]:
    """Alert events through ``url``'s admin API at ``per_s`` while the block runs; yields
    the count of answers by status."""
    stop = threading.Event()
    answers: dict[str, int] = {}

    def loop() -> None:
        n = 0
        next_at = time.monotonic()
        while not stop.is_set():
            if n % 3 == 2:
                status = admin(url, "PUT", "/admin/api/budgets/campaign/bench-alerts",
                               {"monthly_usd": str(1000 + n)})
            else:
                status = admin(url, "POST", "/admin/api/alerts/test",
                               {"channel": ("hook", "mail")[n % 2]})
            answers[str(status)] = answers.get(str(status), 0) + 1
            n += 1
            next_at += 1 / per_s
            stop.wait(max(0.0, next_at - time.monotonic()))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield answers
    finally:
        stop.set()
        thread.join(15)


def alert_counts(server: bench.Server) -> dict[str, float]:
    """``costwall_alerts_total`` summed by channel and outcome."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("costwall_alerts_total{"):
            labels, value = line.rsplit(" ", 1)
            fields = dict(p.split("=", 1) for p in labels[len("costwall_alerts_total{"):-1]
                          .split(","))
            key = f"{fields['channel'].strip(chr(34))}/{fields['outcome'].strip(chr(34))}"
            out[key] = out.get(key, 0) + float(value)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--events-per-s", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=bench.BENCH / "results" / "alerts_hang.json")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cpus = sorted(os.sched_getaffinity(0))
    load_cpu, proxy_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    silent = SilentServer()
    alerts = {"allow_private_targets": True,
              "smtp": {"host": "127.0.0.1", "port": silent.port},
              "channels": [{"name": "hook", "type": "webhook",
                            "url": f"http://127.0.0.1:{silent.port}/hook",
                            "secret_env": "BENCH_WEBHOOK_SECRET"},
                           {"name": "mail", "type": "email", "to": ["ops@example.com"]}]}
    print(f"alerts_hang: {len(cpus)} cpus, load + simulator on cpu {load_cpu}, gateway on cpu "
          f"{proxy_cpu}; {args.duration:g} s measured after {args.warmup:g} s, best of "
          f"{args.rounds} interleaved rounds; {args.events_per_s:g} alert events/s to 'quiet' "
          "and 'hang' while they are measured (foreign = cores other processes used)",
          flush=True)
    report: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "settings": vars(args) | {"out": str(args.out)}, "scenarios": []}
    servers: dict[str, bench.Server] = {}
    sent: dict[str, dict[str, int]] = {"quiet": {}, "hang": {}}
    with tempfile.TemporaryDirectory(prefix="costwall-alerts-hang-") as tmp:
        workdir = Path(tmp)
        try:
            up = servers["direct"] = bench.start_upstream(load_cpu, workdir)
            servers["bare"] = bench.start_bare(up, proxy_cpu, workdir)
            servers["quiet"] = start_gateway("quiet", up, proxy_cpu, workdir, None)
            servers["hang"] = start_gateway("hang", up, proxy_cpu, workdir, alerts)
            pids = [s.proc.pid for s in servers.values()]
            print(f"{'scenario':<24} {'target':<9}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}"
                  f"{'p99 ms':>9}{'ttfb50':>9}{'foreign':>9}{'cpu us':>9}", flush=True)
            for stream, delay, conc in SCENARIOS:
                bench.set_delay(up, delay / 1000)
                rows: dict[str, Any] = {}
                for _ in range(args.rounds):
                    for target in TARGETS:
                        gen = events(servers[target].url, args.events_per_s) \
                            if target != "bare" else contextlib.nullcontext({})
                        with gen as answers:
                            one = bench.measure(servers[target], pids, 1, concurrency=conc,
                                                stream=stream, cpu=load_cpu,
                                                duration=args.duration, warmup=args.warmup)
                        for status, count in answers.items():
                            sent[target][status] = sent[target].get(status, 0) + count
                        rows[target] = bench.best_of(rows.get(target), one)
                name = bench.scenario_name(stream, delay, conc)
                for target in TARGETS:
                    bench.print_row(name, target, rows[target])
                q, h = rows["quiet"], rows["hang"]
                diff = {k: round(h[k] - q[k], 3) if h[k] is not None and q[k] is not None
                        else None for k in ("p50_ms", "p90_ms", "p99_ms", "cpu_us_per_request")}
                print(f"{'':<24} hang-quiet  p50 {diff['p50_ms']} ms  p90 {diff['p90_ms']} ms  "
                      f"p99 {diff['p99_ms']} ms  cpu {diff['cpu_us_per_request']} us/request",
                      flush=True)
                report["scenarios"].append({"name": name, "results": rows,
                                            "hang_minus_quiet": diff})
            counts = alert_counts(servers["hang"])
            report["alerts"] = {"admin_answers": sent, "hang_alerts_total": counts,
                                "connections_held": len(silent.held),
                                "rss_mb": {n: servers[n].rss_mb() for n in TARGETS}}
            print(f"\nadmin calls answered: quiet {sent['quiet']}, hang {sent['hang']}")
            print("hang's costwall_alerts_total by channel/outcome: "
                  + ", ".join(f"{k} {v:g}" for k, v in sorted(counts.items())))
            print(f"connections the silent receiver accepted and held: {len(silent.held)}")
            print("RSS MiB: " + ", ".join(f"{n} {servers[n].rss_mb()}" for n in TARGETS))
        finally:
            for server in reversed(list(servers.values())):
                server.stop()
            silent.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
