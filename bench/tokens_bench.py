"""Micro-benchmark: counting a 10,000-token prompt, and what it does to the event loop.

The prompt is real, varied text (costwall's own source and docstrings, cut to exactly 10,000
tokens), not a repeated word, which tiktoken would count unrealistically fast. It goes through
``gateway.estimate.estimate`` like an admission does. ``count_ms`` is a prompt seen for the
first time; ``count_resent_ms`` the same prompt sent again (agents resend their conversation
every turn, and ``gateway.tokens`` keeps the counts of recent texts). The loop-stall part
(uncached) runs a heartbeat task beside the count, the way a small request waits on the same
loop, and reports the longest the heartbeat was kept waiting: with the count inline, and
offloaded with ``asyncio.to_thread`` as ``gateway.proxy`` does for bodies over
``OFFLOAD_BYTES`` (tiktoken releases the GIL while it encodes, so a thread really frees the
loop). Stalls are the median and the worst over 20 counts.

    python bench/tokens_bench.py [--tokens 10000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import tokens  # noqa: E402
from gateway.estimate import estimate  # noqa: E402
from gateway.pricing import load_price_table  # noqa: E402
from gateway.proxy import OFFLOAD_BYTES  # noqa: E402

MODEL = "gpt-4o"


def realistic_text(n_tokens: int) -> str:
    """Exactly ``n_tokens`` o200k tokens of varied text taken from the gateway's sources."""
    enc = tokens.encoding("o200k_base")
    sources = sorted((ROOT / "gateway").glob("*.py"))
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sources)
    ids = enc.encode_ordinary(text)
    while len(ids) < n_tokens:  # only for very large requests: repeat the corpus
        ids = ids + ids
    return enc.decode(ids[:n_tokens])


def payload_for(text: str) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 256, "messages": [
        {"role": "system", "content": "You review Python code for a payments team."},
        {"role": "user", "content": "Review this module and list concrete bugs:\n\n" + text},
    ]}


def time_counts(payload: dict[str, Any], runs: int, cached: bool = False) -> list[float]:
    """Milliseconds per admission estimate; uncached unless ``cached`` (a re-sent prompt)."""
    prices, _ = load_price_table(ROOT / "config" / "pricing.yaml")
    price = prices.lookup(MODEL)
    assert price is not None
    estimate("chat", payload, price)  # load the encoding (and, if cached, fill the cache)
    out = []
    for _ in range(runs):
        with uncached(not cached):
            start = time.perf_counter()
            estimate("chat", payload, price)
            out.append((time.perf_counter() - start) * 1000)
    return out


@contextlib.contextmanager
def uncached(active: bool = True) -> Iterator[None]:
    """Count as if every text were new (gateway.tokens keeps counts of recent texts)."""
    saved = tokens._counts
    if active:
        tokens._counts = tokens.CountCache(max_chars=0)
    try:
        yield
    finally:
        tokens._counts = saved


async def stall(payload: dict[str, Any], offload: bool, rounds: int = 20) -> list[float]:
    """Per count, the longest wait (ms) of a 0.2 ms heartbeat running beside it on the loop."""
    prices, _ = load_price_table(ROOT / "config" / "pricing.yaml")
    price = prices.lookup(MODEL)
    assert price is not None
    gaps: list[float] = []
    running = True

    async def heartbeat() -> None:
        while running:
            before = time.perf_counter()
            await asyncio.sleep(0.0002)
            gaps.append((time.perf_counter() - before - 0.0002) * 1000)

    beat = asyncio.create_task(heartbeat())
    await asyncio.to_thread(estimate, "chat", payload, price)  # start the worker thread
    await asyncio.sleep(0.01)
    worst = []
    for _ in range(rounds):
        first = len(gaps)
        if offload:
            await asyncio.to_thread(estimate, "chat", payload, price)
        else:
            estimate("chat", payload, price)
            await asyncio.sleep(0)
        await asyncio.sleep(0.002)
        worst.append(max(gaps[first:], default=0.0))
    running = False
    await beat
    return worst


def measure(n_tokens: int, runs: int = 30) -> dict[str, Any]:
    text = realistic_text(n_tokens)
    payload = payload_for(text)
    body = orjson.dumps(payload)
    times = time_counts(payload, runs)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    cached = time_counts(payload, runs, cached=True)
    with uncached():
        inline = run(stall(payload, offload=False))
        offloaded = run(stall(payload, offload=True))
    enc = tokens.encoding("o200k_base")
    return {
        "prompt_tokens": tokens.count_text(text, enc),
        "body_kib": round(len(body) / 1024, 1),
        "proxy_offloads": len(body) > OFFLOAD_BYTES,
        "offload_threshold_kib": OFFLOAD_BYTES // 1024,
        "count_ms": round(statistics.median(times), 2),
        "count_min_ms": round(min(times), 2),
        "count_max_ms": round(max(times), 2),
        "count_resent_ms": round(statistics.median(cached), 3),
        "stall_without_offload_ms": round(statistics.median(inline), 2),
        "stall_without_offload_max_ms": round(max(inline), 2),
        "stall_with_offload_ms": round(statistics.median(offloaded), 2),
        "stall_with_offload_max_ms": round(max(offloaded), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=10_000)
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    args = p.parse_args()
    result = measure(args.tokens)
    if args.json:
        print(orjson.dumps(result).decode())
        return
    for key, value in result.items():
        print(f"{key:>26}: {value}")


if __name__ == "__main__":
    main()
