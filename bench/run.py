"""The side-by-side benchmark: simulator upstream, bare proxy and costwall, same load for each.

``./dev bench`` starts, as separate processes, the OpenAI simulator (``costwall
fake-upstream``), a bare aiohttp pass-through proxy (``bench/bare_proxy.py``, the floor) and
``costwall serve`` with budgets, a SQLite ledger and metrics on. Then, for every scenario
(non-streaming and streaming chat; concurrency 1, 16, 64; upstream delay 0 ms and 50 ms) it
drives the simulator directly, the bare proxy and costwall with the same closed-loop load from
``bench/load.py`` (its own process), prints a table and writes ``bench/results/latest.json``.

On a 2-core machine the load generator and the simulator share core 0 and the proxy under
test gets core 1 to itself (``os.sched_setaffinity``); both proxies are measured the same way.
``--no-pin`` lets the scheduler place everything. ``--soak [N]`` adds an N-request soak
(default 100,000) through a fresh costwall, sampling its RSS as it goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results" / "latest.json"
PY = sys.executable
VIRTUAL_KEY = "sk-cw-bench-0123456789abcdef"
UPSTREAM_KEY = "sk-bench-upstream-key"
HUGE_USD = "1000000000"  # caps that never bind, so admission runs on every request
CONCURRENCY = (1, 16, 64)
DELAYS_MS = (0, 50)
TARGETS = ("direct", "bare", "costwall")


# -- processes --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pinned(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str  # base URL without /v1

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def rss_mb(pid: int) -> float:
    """Resident set size of a process from /proc (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def start(name: str, cmd: list[str], ready_path: str, port: int, cpu: int | None,
          workdir: Path, env: dict[str, str] | None = None, source: Path = ROOT) -> Server:
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - kept open for the child
    proc = subprocess.Popen(cmd, cwd=source, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, preexec_fn=_pinned(cpu))
    server = Server(name, proc, f"http://127.0.0.1:{port}")
    wait_ready(server.url + ready_path, proc)
    return server


def start_upstream(cpu: int | None, workdir: Path) -> Server:
    port = free_port()
    # The simulator runs under uvloop like both proxies, so the core it shares with the load
    # generator spends as little as possible on it.
    code = ("import sys, uvloop; uvloop.install(); from gateway.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    return start("upstream", [PY, "-c", code, "fake-upstream", "--port", str(port)],
                 "/_fake/config", port, cpu, workdir)


def start_bare(upstream: Server, cpu: int | None, workdir: Path) -> Server:
    port = free_port()
    return start("bare", [PY, str(BENCH / "bare_proxy.py"), "--port", str(port), "--upstream",
                          upstream.url], "/_fake/config", port, cpu, workdir)


def costwall_config(directory: Path, upstream: Server, port: int, source: Path = ROOT,
                    extra: dict[str, Any] | None = None) -> Path:
    """A config with budgets on every scope a request touches, a SQLite ledger and one key;
    ``extra`` is merged in (one level deep: ``budgets`` or ``rate_limits`` entries)."""
    import yaml

    budget = {"monthly_usd": HUGE_USD}
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "upstream": {"base_url": upstream.url + "/v1", "api_key_env": "COSTWALL_BENCH_KEY",
                     "timeout_s": 60},
        "database": f"sqlite:///{directory / 'costwall.db'}",
        "logs_dir": str(directory / "logs"),
        "reports_dir": str(directory / "reports"),
        # The checkout's own table: an older version may not read a newer table's fields.
        "pricing": str(source / "config" / "pricing.yaml"),
        "budgets": {"timezone": "UTC", "warn_at": ["0.8"], "near_cap": "reject",
                    "global": budget, "tenants": {"bench": budget},
                    "agents": {"bench-agent": budget}},
        "keys": [{"name": "bench", "key": VIRTUAL_KEY, "tenant": "bench",
                  "agent": "bench-agent"}],
    }
    for name, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = value
    path = directory / "costwall.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_costwall(upstream: Server, cpu: int | None, workdir: Path, tag: str = "",
                   source: Path = ROOT, extra: dict[str, Any] | None = None) -> Server:
    """``costwall serve``; ``source`` is the checkout it runs from (``bench/ab.py``),
    ``extra`` config merged into the benchmark's own (``costwall_config``)."""
    port = free_port()
    directory = workdir / f"costwall{tag}"
    directory.mkdir()
    config = costwall_config(directory, upstream, port, source, extra)
    return start(f"costwall{tag}", [PY, "-m", "gateway.cli", "serve", "--config", str(config)],
                 "/healthz", port, cpu, workdir, env={"COSTWALL_BENCH_KEY": UPSTREAM_KEY},
                 source=source)


def set_delay(upstream: Server, seconds: float) -> None:
    req = urllib.request.Request(upstream.url + "/_fake/config",
                                 data=json.dumps({"delay_s": seconds}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert json.loads(resp.read())["delay_s"] == seconds


# -- CPU used by processes outside the benchmark ---------------------------------------------
def _busy_ticks() -> int:
    """Non-idle clock ticks of the whole machine since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return user + nice + system + irq + softirq + steal


def _proc_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


class ForeignCpu:
    """How much CPU other processes on the machine used during a run, in cores.

    The machine is shared (other test suites may run); a run with foreign load is slower for
    reasons that are not costwall's, so each run reports it and ``--rounds`` keeps the best.
    """

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.hz = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> ForeignCpu:
        self.t0 = time.monotonic()
        self.busy0 = _busy_ticks()
        self.ours0 = sum(_proc_ticks(p) for p in [os.getpid(), *self.pids])
        self.children0 = os.times().children_user + os.times().children_system
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _busy_ticks() - self.busy0
        ours = sum(_proc_ticks(p) for p in [os.getpid(), *self.pids]) - self.ours0
        children = (os.times().children_user + os.times().children_system) - self.children0
        foreign = busy - ours - children * self.hz
        self.cores = round(max(foreign, 0) / self.hz / (time.monotonic() - self.t0), 2)


# -- load ------------------------------------------------------------------------------------
def run_load(url: str, *, concurrency: int, stream: bool, cpu: int | None, duration: float,
             warmup: float, requests: int | None = None, progress_every: int = 0,
             on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run ``bench/load.py`` against ``url`` and return its summary."""
    cmd = [PY, str(BENCH / "load.py"), "--url", url + "/v1/chat/completions", "--key",
           VIRTUAL_KEY, "--concurrency", str(concurrency), "--duration", str(duration),
           "--warmup", str(warmup)]
    if stream:
        cmd.append("--stream")
    if requests is not None:
        cmd += ["--requests", str(requests), "--progress-every", str(progress_every)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=_pinned(cpu))
    assert proc.stdout is not None
    last = ""
    for line in proc.stdout:
        if line.startswith("PROGRESS ") and on_progress is not None:
            on_progress(int(line.split()[1]))
        elif line.strip():
            last = line
    if proc.wait() != 0 or not last:
        raise RuntimeError(f"load generator failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(last)
    bad = {k: v for k, v in result["statuses"].items() if k != "200"}
    if bad or result["errors"]:
        raise RuntimeError(f"non-200 answers or errors from {url}: {bad} {result['errors']}")
    return result


def scenario_name(stream: bool, delay_ms: int, concurrency: int) -> str:
    return f"{'stream' if stream else 'non-stream'} d={delay_ms}ms c={concurrency}"


def compare(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios and added latency of one scenario (costwall vs bare, and each vs direct)."""
    c, b, d = rows["costwall"], rows["bare"], rows["direct"]

    def diff(x: dict[str, Any], y: dict[str, Any], k: str) -> float | None:
        return None if x.get(k) is None or y.get(k) is None else round(x[k] - y[k], 3)

    return {
        "rps_ratio": round(c["rps"] / b["rps"], 3) if b["rps"] else None,
        # Throughput each proxy would have on its core alone: a steadier ratio on a busy host.
        "cpu_capacity_ratio": round(b["cpu_us_per_request"] / c["cpu_us_per_request"], 3)
        if c.get("cpu_us_per_request") else None,
        "added_p50_ms": diff(c, b, "p50_ms"), "added_p99_ms": diff(c, b, "p99_ms"),
        "added_ttfb_p50_ms": diff(c, b, "ttfb_p50_ms"),
        "costwall_vs_direct_p50_ms": diff(c, d, "p50_ms"),
        "costwall_vs_direct_p99_ms": diff(c, d, "p99_ms"),
        "costwall_vs_direct_ttfb_p50_ms": diff(c, d, "ttfb_p50_ms"),
        "bare_vs_direct_p50_ms": diff(b, d, "p50_ms"),
        "bare_vs_direct_p99_ms": diff(b, d, "p99_ms"),
    }


def _fmt(value: Any, width: int, digits: int = 2) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float):
        return f"{value:.{digits}f}".rjust(width)
    return str(value).rjust(width)


def print_row(scenario: str, target: str, r: dict[str, Any]) -> None:
    foreign = max(x["foreign_cpu_cores"] for x in r["rounds"])
    print(f"{scenario:<24} {target:<9}{_fmt(r['rps'], 9, 0)}{_fmt(r['p50_ms'], 9)}"
          f"{_fmt(r['p90_ms'], 9)}{_fmt(r['p99_ms'], 9)}{_fmt(r['ttfb_p50_ms'], 9)}"
          f"{_fmt(foreign, 9)}{_fmt(r.get('cpu_us_per_request'), 9)}", flush=True)


def print_compare(cmp: dict[str, Any]) -> None:
    print(f"{'':<24} {'costwall/bare':<14} rps x{_fmt(cmp['rps_ratio'], 5)} (by CPU x"
          f"{_fmt(cmp['cpu_capacity_ratio'], 5)})  added p50 "
          f"{_fmt(cmp['added_p50_ms'], 6)} ms  p99 {_fmt(cmp['added_p99_ms'], 6)} ms  "
          f"ttfb {_fmt(cmp['added_ttfb_p50_ms'], 6)} ms", flush=True)


# -- the run ---------------------------------------------------------------------------------
def measure(server: Server, pids: list[int], rounds: int, **load: Any) -> dict[str, Any]:
    """Best of ``rounds`` runs (lowest p90): outside load only ever makes a run slower."""
    runs = []
    for _ in range(rounds):
        before = _proc_ticks(server.proc.pid)
        with ForeignCpu(pids) as cpu:
            result = run_load(server.url, **load)
        used = (_proc_ticks(server.proc.pid) - before) / cpu.hz
        result["foreign_cpu_cores"] = cpu.cores
        # CPU the server spent per request: unlike req/s, barely moved by other processes.
        result["cpu_us_per_request"] = round(used / max(result["requests_with_warmup"], 1) * 1e6)
        runs.append(result)
    best = min(runs, key=lambda r: r["p90_ms"])
    best["rounds"] = [{k: r[k] for k in ("rps", "p50_ms", "p90_ms", "p99_ms",
                                          "foreign_cpu_cores", "cpu_us_per_request")}
                      for r in runs]
    return best


def best_of(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    if old is None:
        return new
    best = dict(min((old, new), key=lambda r: r["p90_ms"]))
    best["rounds"] = old["rounds"] + new["rounds"]
    best["cpu_us_per_request"] = min(r["cpu_us_per_request"] for r in best["rounds"])
    return best


def matrix(servers: dict[str, Server], upstream: Server, load_cpu: int | None, duration: float,
           warmup: float, rounds: int) -> list[dict[str, Any]]:
    print(f"{'scenario':<24} {'target':<9}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
          f"{'ttfb50':>9}{'foreign':>9}{'cpu us':>9}")
    scenarios = []
    for delay_ms in DELAYS_MS:
        set_delay(upstream, delay_ms / 1000)
        for stream in (False, True):
            for concurrency in CONCURRENCY:
                name = scenario_name(stream, delay_ms, concurrency)
                rows = {}
                pids = [s.proc.pid for s in servers.values()]
                for _ in range(rounds):  # interleaved, so a burst of outside load hits all
                    for target in TARGETS:
                        one = measure(servers[target], pids, 1, concurrency=concurrency,
                                      stream=stream, cpu=load_cpu, duration=duration,
                                      warmup=warmup)
                        rows[target] = best_of(rows.get(target), one)
                for target in TARGETS:
                    print_row(name, target, rows[target])
                cmp = compare(rows)
                print_compare(cmp)
                scenarios.append({"name": name, "stream": stream, "delay_ms": delay_ms,
                                  "concurrency": concurrency, "results": rows, "compare": cmp})
    set_delay(upstream, 0)
    return scenarios


def soak(upstream: Server, requests: int, proxy_cpu: int | None, load_cpu: int | None,
         workdir: Path) -> dict[str, Any]:
    """``requests`` non-streaming requests at c=64 through a fresh costwall, RSS sampled."""
    set_delay(upstream, 0)
    server = start_costwall(upstream, proxy_cpu, workdir, tag="-soak")
    try:
        samples = [(0, server.rss_mb())]
        every = max(1, requests // 20)

        def sample(done: int) -> None:
            samples.append((done, server.rss_mb()))

        started = time.perf_counter()
        result = run_load(server.url, concurrency=64, stream=False, cpu=load_cpu, duration=0,
                          warmup=0, requests=requests, progress_every=every,
                          on_progress=sample)
        elapsed = time.perf_counter() - started
        end = server.rss_mb()
        mid = min(samples, key=lambda s: abs(s[0] - requests // 2))[1]
    finally:
        server.stop()
    return {
        "requests": requests, "seconds": round(elapsed, 1), "rps": result["rps"],
        "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
        "rss_start_mb": samples[0][1], "rss_mid_mb": mid, "rss_end_mb": end,
        "growth_second_half_pct": round((end - mid) / mid * 100, 1) if mid else None,
        "rss_samples_mb": [*samples, (requests, end)],
    }


def profile(server: Server, seconds: float, load_cpu: int | None, out: Path) -> list[str]:
    """Sample ``server`` with py-spy under non-streaming c=64 load; top functions by share.

    Writes py-spy's collapsed stacks (``--format raw``, one line per stack, feed them to any
    flame-graph tool) next to the JSON, and returns the functions that take the most samples
    (inclusive, all threads).
    """
    spy = Path(PY).with_name("py-spy")
    if not spy.exists():
        return ["py-spy is not installed in the venv (.venv/bin/pip install py-spy)"]
    run_load(server.url, concurrency=64, stream=False, cpu=load_cpu, duration=1, warmup=0.5)
    recorder = subprocess.Popen([str(spy), "record", "--pid", str(server.proc.pid), "--rate",
                                 "250", "--duration", str(int(seconds)), "--format", "raw",
                                 "--nonblocking", "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    run_load(server.url, concurrency=64, stream=False, cpu=load_cpu, duration=seconds,
             warmup=0)
    recorder.wait()
    shares: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        for frame in {f.split(" (")[0] + " (" + f.split("/")[-1].split(":")[0]
                      for f in stack.split(";") if "(" in f}:
            shares[frame] = shares.get(frame, 0) + int(count)
    top = sorted(shares.items(), key=lambda kv: -kv[1])[:40]
    return [f"{100 * n / max(total, 1):5.1f}%  {name})" for name, n in top]


def tokens_micro() -> dict[str, Any]:
    out = subprocess.run([PY, str(BENCH / "tokens_bench.py"), "--json"], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_targets(scenarios: list[dict[str, Any]], soak_result: dict[str, Any] | None,
                  tokens: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it holds."""
    by = {s["name"]: s["compare"] for s in scenarios}
    checks = []

    def add(what: str, value: Any, ok: bool | None) -> None:
        checks.append({"target": what, "value": value, "ok": ok})

    c = by.get(scenario_name(False, 0, 64))
    if c:
        add("throughput non-stream d=0 c=64 >= 70% of bare", c["rps_ratio"],
            c["rps_ratio"] is not None and c["rps_ratio"] >= 0.70)
        add("same, from CPU per request (capacity on one core)", c["cpu_capacity_ratio"],
            c["cpu_capacity_ratio"] is not None and c["cpu_capacity_ratio"] >= 0.70)
    c = by.get(scenario_name(False, 50, 64))
    if c:
        add("added p50 non-stream d=50ms c=64 <= 1 ms (vs bare)", c["added_p50_ms"],
            c["added_p50_ms"] is not None and c["added_p50_ms"] <= 1.0)
        add("added p99 non-stream d=50ms c=64 <= 5 ms (vs bare)", c["added_p99_ms"],
            c["added_p99_ms"] is not None and c["added_p99_ms"] <= 5.0)
    c = by.get(scenario_name(True, 50, 16))
    if c:
        add("added TTFB p50 stream d=50ms c=16 <= 1 ms (vs bare)", c["added_ttfb_p50_ms"],
            c["added_ttfb_p50_ms"] is not None and c["added_ttfb_p50_ms"] <= 1.0)
    if soak_result:
        add("RSS after soak <= 120 MB", soak_result["rss_end_mb"],
            soak_result["rss_end_mb"] <= 120)
        growth = soak_result["growth_second_half_pct"]
        add("RSS growth over soak's second half <= 10%", growth,
            growth is not None and growth <= 10)
    if tokens:
        add("10k-token prompt counting time (ms)", tokens["count_ms"], None)
        add("loop stall for a small request with offload (ms)",
            tokens["stall_with_offload_ms"], tokens["stall_with_offload_ms"] <= tokens["count_ms"])
    return checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short durations: a smoke run")
    p.add_argument("--duration", type=float, help="measured seconds per run (default 3)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds per run (default 1)")
    p.add_argument("--rounds", type=int, help="runs per target and scenario, best kept "
                   "(default 2; 1 with --quick)")
    p.add_argument("--soak", type=int, nargs="?", const=100_000, default=None,
                   help="also run an N-request soak through costwall (default N 100000)")
    p.add_argument("--no-matrix", action="store_true", help="skip the scenario matrix")
    p.add_argument("--profile", type=float, nargs="?", const=10.0, default=None,
                   help="py-spy costwall for N seconds (default 10) under c=64 load")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


@contextlib.contextmanager
def stack(proxy_cpu: int | None, load_cpu: int | None, workdir: Path,
          ) -> Iterator[dict[str, Server]]:
    servers: dict[str, Server] = {}
    try:
        servers["direct"] = start_upstream(load_cpu, workdir)
        servers["bare"] = start_bare(servers["direct"], proxy_cpu, workdir)
        servers["costwall"] = start_costwall(servers["direct"], proxy_cpu, workdir)
        yield servers
    finally:
        for server in reversed(list(servers.values())):
            server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM (or a SIGINT, which a shell's background job ignores) still stops the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    duration = args.duration or (1.0 if args.quick else 3.0)
    warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 1.0)
    rounds = args.rounds or (1 if args.quick else 2)
    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    load_cpu, proxy_cpu = (cpus[0], cpus[1]) if pin else (None, None)
    print(f"costwall bench: {len(cpus)} cpus, "
          + (f"load generator + simulator on cpu {load_cpu}, proxy under test on cpu "
             f"{proxy_cpu}" if pin else "no pinning")
          + f"; {duration:g} s measured after {warmup:g} s warm-up per run, best of {rounds} "
          "(foreign = cores used by other processes during the worst round)", flush=True)
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": len(cpus), "python": platform.python_version(),
                    "platform": platform.platform(), "pinned": pin, "load_cpu": load_cpu,
                    "proxy_cpu": proxy_cpu},
        "settings": {"duration_s": duration, "warmup_s": warmup, "rounds": rounds,
                     "concurrency": CONCURRENCY, "delays_ms": DELAYS_MS, "quick": args.quick},
    }
    with tempfile.TemporaryDirectory(prefix="costwall-bench-") as tmp:
        workdir = Path(tmp)
        scenarios: list[dict[str, Any]] = []
        with stack(proxy_cpu, load_cpu, workdir) as servers:
            if not args.no_matrix:
                time.sleep(0.5)
                idle = {n: servers[n].rss_mb() for n in ("bare", "costwall")}
                scenarios = matrix(servers, servers["direct"], load_cpu, duration, warmup,
                                   rounds)
                after = {n: servers[n].rss_mb() for n in ("bare", "costwall")}
                report["rss_mb"] = {n: {"idle": idle[n], "after_load": after[n]} for n in idle}
                print("\nRSS (MiB)   idle  after load")
                for n in idle:
                    print(f"{n:<10}{idle[n]:>6.1f}{after[n]:>12.1f}")
            report["scenarios"] = scenarios
            soak_result = None
            if args.soak:
                print(f"\nsoak: {args.soak} non-streaming requests at c=64 through a fresh "
                      "costwall ...", flush=True)
                soak_result = soak(servers["direct"], args.soak, proxy_cpu, load_cpu, workdir)
                print(f"soak: {soak_result['rps']:.0f} req/s, RSS start "
                      f"{soak_result['rss_start_mb']} MiB, mid {soak_result['rss_mid_mb']} MiB, "
                      f"end {soak_result['rss_end_mb']} MiB, second-half growth "
                      f"{soak_result['growth_second_half_pct']}%")
            report["soak"] = soak_result
            if args.profile:
                stacks = args.out.with_name("profile.txt")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                report["profile"] = profile(servers["costwall"], args.profile, load_cpu, stacks)
                print(f"\nprofile of costwall (non-streaming, c=64, delay 0; {stacks.name}):")
                print("\n".join(report["profile"][:30]))
    tokens = tokens_micro()
    report["tokens"] = tokens
    print(f"\ntoken counting: {tokens['prompt_tokens']}-token prompt in {tokens['count_ms']} ms; "
          f"loop stall for a small request: {tokens['stall_without_offload_ms']} ms inline, "
          f"{tokens['stall_with_offload_ms']} ms offloaded")
    report["targets"] = check_targets(scenarios, soak_result, tokens)
    print("\ntargets")
    for t in report["targets"]:
        mark = {True: "ok  ", False: "MISS", None: "info"}[t["ok"]]
        print(f"  {mark} {t['target']}: {t['value']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
