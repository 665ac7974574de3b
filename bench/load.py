"""Closed-loop HTTP load: ``--concurrency`` workers each send one request after the other.

Runs as its own process so that the client's CPU is never counted as the proxy's. Records
each request's latency (send to last byte) and, for streams, its time to the first body
chunk, and prints one JSON object with the summary on the last line of stdout. With
``--progress-every N`` it also prints ``PROGRESS <done>`` lines, which ``run.py`` uses to
sample the server's memory during a soak.

    python bench/load.py --url http://127.0.0.1:8080/v1/chat/completions --key sk-... \\
        --concurrency 16 --duration 5 [--stream] [--requests 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

SYSTEM = (
    "You are a careful assistant for a logistics company. Answer in plain English, cite the "
    "shipment identifiers you were given, and never invent tracking numbers or delivery dates."
)
USER = (
    "Shipment BX-4471 left Rotterdam on 3 March with 14 pallets of ceramic tiles; the customs "
    "broker flagged two pallets for inspection. Summarise what the warehouse team should do "
    "today, in three short bullet points, and say whom to call if the inspection is delayed."
)


def chat_body(stream: bool, model: str = "gpt-4o-mini", max_tokens: int = 32) -> bytes:
    """A small, realistic chat request (about 110 prompt tokens, 32 output tokens)."""
    payload: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
        "max_tokens": max_tokens,
        "temperature": 0.2,
    }
    if stream:
        payload["stream"] = True
    return orjson.dumps(payload)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


@dataclass
class Samples:
    latencies: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    done: int = 0


async def one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
              stream: bool) -> tuple[int, float, float | None]:
    """Send one request; return (status, latency, time to first body chunk)."""
    start = time.perf_counter()
    first: float | None = None
    async with session.post(url, data=body, headers=headers) as resp:
        if stream:
            chunk = await resp.content.readany()
            first = time.perf_counter() - start
            while chunk:
                chunk = await resp.content.readany()
        else:
            await resp.read()
        status = resp.status
    return status, time.perf_counter() - start, first


async def run(args: argparse.Namespace) -> dict[str, Any]:
    body = chat_body(args.stream)
    headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
    samples = Samples()
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    loop_start = time.perf_counter()
    warm_end = loop_start + args.warmup
    deadline = warm_end + args.duration if args.requests is None else float("inf")
    budget = {"left": args.requests if args.requests is not None else -1}

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            if args.requests is not None:
                if budget["left"] <= 0:
                    return
                budget["left"] -= 1
            elif time.perf_counter() >= deadline:
                return
            started = time.perf_counter()
            try:
                status, latency, first = await one(session, args.url, body, headers,
                                                   args.stream)
            except (aiohttp.ClientError, TimeoutError) as exc:
                name = type(exc).__name__
                samples.errors[name] = samples.errors.get(name, 0) + 1
                continue
            samples.done += 1
            if args.progress_every and samples.done % args.progress_every == 0:
                print(f"PROGRESS {samples.done}", flush=True)
            if args.requests is None and started < warm_end:
                continue  # warm-up: connections, caches, first-period book
            samples.statuses[status] = samples.statuses.get(status, 0) + 1
            samples.latencies.append(latency)
            if first is not None:
                samples.ttfb.append(first)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     skip_auto_headers=("User-Agent",)) as session:
        await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
    finished = time.perf_counter()
    window = finished - (loop_start if args.requests is not None else warm_end)
    lat = sorted(samples.latencies)
    ttfb = sorted(samples.ttfb)
    ms = 1000.0

    def pct(values: list[float], q: float) -> float | None:
        v = percentile(values, q)
        return None if v is None else round(v * ms, 3)

    return {
        "requests": len(lat),
        "requests_with_warmup": samples.done,
        "seconds": round(window, 3),
        "rps": round(len(lat) / window, 1) if window > 0 else 0.0,
        "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99),
        "max_ms": pct(lat, 100),
        "ttfb_p50_ms": pct(ttfb, 50), "ttfb_p99_ms": pct(ttfb, 99),
        "statuses": {str(k): v for k, v in sorted(samples.statuses.items())},
        "errors": samples.errors,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument("--requests", type=int, help="a fixed number of requests instead of time")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--progress-every", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
