"""Invoice rendering at volume: a month of N ledger rows (default 10,000) to PDF and CSV.

Fills a fresh SQLite ledger through its own write path, then times each step the admin route
and ``costwall invoice`` take: read + aggregate (``build_invoice``), ``render_csv`` and
``render_pdf``, for the all-tenant invoice and one tenant's; reports the peak Python memory of
each step (tracemalloc) and the process's max RSS. ``--campaigns 0`` gives every row its own
campaign (the worst case: the campaign table folds past ``MAX_LINES``).

    .venv/bin/python bench/invoice_bench.py [--rows 10000] [--campaigns 40]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from admin.invoices import build_invoice, render_csv, render_pdf
from gateway.config import Settings
from gateway.ledger import LedgerEntry
from gateway.store.interfaces import Ledger
from gateway.store.sqlite import SqliteLedger

PERIOD = "2026-10"
MODELS = ["gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o4-mini", "gpt-5", "text-embedding-3-small"]


@dataclass
class Source:
    settings: Settings
    ledger: Ledger
    clock: Callable[[], datetime]


def rows(n: int, campaigns: int, seed: int = 1) -> list[LedgerEntry]:
    rnd = random.Random(seed)
    start = datetime(2026, 10, 1, tzinfo=UTC)
    out = []
    for i in range(n):
        prompt, completion = rnd.randrange(20, 8000), rnd.randrange(0, 2000)
        campaign = f"campaign-{i:05d}" if campaigns == 0 else f"campaign-{rnd.randrange(campaigns)}"
        out.append(LedgerEntry(
            id=f"bench-{i:06d}", ts=start + timedelta(seconds=rnd.randrange(31 * 86400)),
            period=PERIOD, tenant=f"tenant-{rnd.randrange(5)}", key_name="bench",
            agent=f"agent-{rnd.randrange(8)}", campaign=campaign, task=f"task-{i % 97}",
            model=rnd.choice(MODELS), endpoint="chat.completions", state="settled", status=200,
            prompt_tokens=prompt, cached_tokens=rnd.randrange(0, prompt // 2 + 1),
            completion_tokens=completion, cost=prompt * 150_000 + completion * 600_000,
            usage_source="upstream"))
    return out


def measure(label: str, fn: Callable[[], Any]) -> Any:
    """Time one call twice (first and warm, untraced), then trace a third for peak memory."""
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    tracemalloc.start()  # slows Python ~10x, so never inside the timed calls
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    size = f"{len(result) / 1024:8.0f} KiB" if isinstance(result, bytes) else " " * 12
    print(f"  {label:<16} first {times[0]:5.2f} s, warm {times[1]:5.2f} s  "
          f"peak {peak / 2**20:5.1f} MiB  {size}")
    return result


async def main(n: int, campaigns: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ledger = SqliteLedger(Path(tmp) / "bench.db")
        await ledger.start()
        t0 = time.perf_counter()
        for e in rows(n, campaigns):
            ledger.settle(e)
        await ledger.flush()
        print(f"ledger: {await ledger.count()} rows for {PERIOD} written in "
              f"{time.perf_counter() - t0:.2f} s")
        settings = replace(Settings(), invoice_company="Bench Corp")
        source = Source(settings, ledger, lambda: datetime(2026, 11, 28, tzinfo=UTC))
        for tenant in (None, "tenant-0"):
            print(f"invoice {PERIOD} {'all tenants' if tenant is None else tenant}:")
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            invoice = await build_invoice(source, PERIOD, tenant)
            print(f"  build_invoice    {time.perf_counter() - t0:5.2f} s (read + aggregate "
                  f"{len(invoice.entries)} entries, total $ {invoice.total})")
            await loop.run_in_executor(None, measure, "render_csv", partial(render_csv, invoice))
            await loop.run_in_executor(None, measure, "render_pdf", partial(render_pdf, invoice))
        await ledger.close()
    print(f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--campaigns", type=int, default=40,
                        help="distinct campaigns (0: one per row)")
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.campaigns))
