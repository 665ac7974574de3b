"""Before/after: costwall at a git ref against the working tree, interleaved on one machine.

The numbers in optimisation commits come from here: both versions (and the bare proxy) run
side by side, each scenario alternates between them for ``--rounds`` rounds (which version
goes first alternates too: use an even number) and keeps each one's best, so outside load on
a shared machine hits both alike.

    python bench/ab.py HEAD~1 [--rounds 3] [--duration 3] [--after-config bench/after-rates.yaml]

``--after-config`` merges a YAML file into the "after" build's config only, for settings the
"before" build does not know (``bench/after-rates.yaml``: one rate limit on the bench key).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench

SCENARIOS = (  # (stream, delay ms, concurrency): the targets
    (False, 0, 64), (False, 50, 64), (True, 50, 16), (True, 0, 16),
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ref", help="git ref of the 'before' version")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--after-config", type=Path, default=None,
                   help="YAML merged into the 'after' build's config only")
    args = p.parse_args()
    extra = None
    if args.after_config is not None:
        import yaml

        extra = yaml.safe_load(args.after_config.read_text()) or {}
    cpus = sorted(bench.os.sched_getaffinity(0))
    load_cpu, proxy_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    with tempfile.TemporaryDirectory(prefix="costwall-ab-") as tmp:
        workdir = Path(tmp)
        tree = workdir / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), args.ref],
                       cwd=bench.ROOT, check=True)
        servers: dict[str, bench.Server] = {}
        try:
            up = servers["direct"] = bench.start_upstream(load_cpu, workdir)
            servers["bare"] = bench.start_bare(up, proxy_cpu, workdir)
            servers["before"] = bench.start_costwall(up, proxy_cpu, workdir, "-before", tree)
            servers["after"] = bench.start_costwall(up, proxy_cpu, workdir, "-after",
                                                    extra=extra)
            pids = [s.proc.pid for s in servers.values()]
            print(f"{'scenario':<24} {'target':<9}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}"
                  f"{'p99 ms':>9}{'ttfb50':>9}{'foreign':>9}{'cpu us':>9}")
            for stream, delay, conc in SCENARIOS:
                bench.set_delay(up, delay / 1000)
                rows: dict[str, Any] = {}
                for i in range(args.rounds):
                    # Both versions run pinned to one core, so the one measured second shares
                    # it with whatever the first still does after its load (flushes, timers):
                    # alternate who goes second, round by round.
                    order = ("before", "after") if i % 2 == 0 else ("after", "before")
                    for target in ("bare", *order):
                        one = bench.measure(servers[target], pids, 1, concurrency=conc,
                                            stream=stream, cpu=load_cpu,
                                            duration=args.duration, warmup=args.warmup)
                        rows[target] = bench.best_of(rows.get(target), one)
                name = bench.scenario_name(stream, delay, conc)
                for target in ("bare", "before", "after"):
                    bench.print_row(name, target, rows[target])
            for name in ("before", "after"):
                print(f"RSS {name}: {servers[name].rss_mb()} MiB")
        finally:
            for server in reversed(list(servers.values())):
                server.stop()
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=bench.ROOT,
                           check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
