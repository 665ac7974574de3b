"""The floor: a bare aiohttp pass-through proxy with nothing but forwarding in it.

One ``ClientSession`` for the process; the body and the end-to-end headers go upstream as they
came, non-streaming answers are read and sent back, SSE answers are relayed chunk by chunk.
No authentication, budgets, ledger, metrics or token counting: whatever costwall costs on
top of this is the price of what it does.

    python bench/bare_proxy.py --port 8081 --upstream http://127.0.0.1:8090
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "te", "transfer-encoding", "upgrade",
    "proxy-authenticate", "proxy-authorization", "trailer", "host", "content-length",
})
_RESPONSE_DROP = HOP_BY_HOP | {"server", "date"}  # bodies are relayed as received
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
    body = await request.read()
    async with session.request(request.method, request.app[UPSTREAM] + request.path_qs,
                               data=body or None, headers=headers) as upstream:
        relay = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _RESPONSE_DROP]
        if upstream.content_type == "text/event-stream":
            response = web.StreamResponse(status=upstream.status, headers=relay)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        return web.Response(status=upstream.status, body=await upstream.read(), headers=relay)


def create_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
            auto_decompress=False, skip_auto_headers=("User-Agent",))
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description="bare aiohttp pass-through proxy (benchmark floor)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8090")
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        pass
    else:
        uvloop.install()
    print(f"bare proxy listening on http://{args.host}:{args.port}", flush=True)
    web.run_app(create_app(args.upstream), host=args.host, port=args.port, access_log=None,
                print=None)


if __name__ == "__main__":
    main()
