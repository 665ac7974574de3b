"""The ``costwall`` command: serve, check, invoice, demo, fake-upstream."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from gateway.config import ConfigError, Settings, load_settings


def _load(path: str | None) -> tuple[Settings, list[str]]:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"costwall: configuration has {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def setup_logging(settings: Settings) -> None:
    from gateway.logs import configure

    configure(settings.log_format, settings.log_level, access=settings.access_log)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from aiohttp import web

    from gateway.app import create_app

    settings, warnings = _load(args.config)
    if args.host:
        settings = replace(settings, host=args.host)
    if args.port is not None:
        settings = replace(settings, port=args.port)
    setup_logging(settings)
    for warning in warnings:
        logging.getLogger("costwall").warning("%s", warning)
    _install_uvloop()
    app = create_app(settings)
    print(f"costwall listening on http://{settings.host}:{settings.port} "
          f"(upstream {settings.upstream_url}, database {settings.database.split('://')[0]})",
          flush=True)
    web.run_app(app, host=settings.host, port=settings.port, access_log=None, print=None,
                shutdown_timeout=settings.shutdown_grace_s, handler_cancellation=False)
    return 0


def _configured_pricing(config: str | None) -> Path:
    """The price table a config names, read even when the config has other problems, so
    ``check`` validates that table and not the default one."""
    import os

    from gateway.config import DEFAULT_CONFIG, load_yaml

    try:
        raw = load_yaml(Path(config or os.environ.get("COSTWALL_CONFIG", DEFAULT_CONFIG)))
    except Exception:  # unreadable or not YAML: that problem is listed already
        raw = None
    pricing = raw.get("pricing") if isinstance(raw, dict) else None
    return Path(str(pricing)) if pricing else Path("config/pricing.yaml")


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.pricing import load_price_table
    from gateway.tokens import EncodingFileError, encoding

    problems: list[str] = []
    warnings: list[str] = []
    settings: Settings | None = None
    try:
        settings, warnings = load_settings(args.config)
    except ConfigError as exc:
        problems.extend(exc.problems)
    pricing_path = settings.pricing_path if settings else _configured_pricing(args.config)
    prices, price_problems = load_price_table(pricing_path)
    problems.extend(price_problems)
    if settings is not None and settings.unknown_model != "reject" and \
            prices.lookup(settings.unknown_model) is None:
        problems.append(f"unknown_model: {settings.unknown_model!r} is not in the price table")
    for enc_name in sorted({p.encoding for p in prices}):
        try:
            encoding(enc_name)
        except EncodingFileError as exc:
            problems.append(str(exc))
    if args.audit:
        problems.extend(_check_audit(settings))
    for warning in warnings:
        print(f"warning: {warning}")
    for problem in problems:
        print(f"error: {problem}")
    if problems:
        print(f"{len(problems)} problem(s) found")
        return 1
    print(f"ok: configuration valid, {len(prices)} priced models")
    return 0


def _check_audit(settings: Settings | None) -> list[str]:
    """Verify the audit files against the key and the database's anchor; print the verdict."""
    from gateway.audit import verify_chain
    from gateway.audit_store import read_state

    if settings is None:
        return ["audit trail: not checked (the configuration has problems)"]
    state = read_state(settings.database)
    problems = []
    if state.problem:
        problems.append(f"audit trail: {state.problem}")
    if state.key is None:
        problems.append("audit trail: no audit key (set COSTWALL_AUDIT_KEY, or keep audit.key "
                        "beside the SQLite database); MACs not checked")
    report = verify_chain(settings.logs_dir / "budget" / "events.jsonl", state.key,
                          state.anchor)
    problems += [f"audit trail: {p}" for p in report.problems]
    if not problems:
        print(f"audit trail: {report.message}")
    if state.backlog:
        print(f"audit trail: {state.backlog} events stored in the database are not in the "
              "files yet (the gateway writes them when it can)")
    return problems


def cmd_fake_upstream(args: argparse.Namespace) -> int:
    from gateway.fake_upstream import main

    main(args.port, args.host)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    _install_uvloop()
    asyncio.run(run_demo(args.port, Path(args.dir)))
    return 0


def cmd_invoice(args: argparse.Namespace) -> int:
    from admin.invoices import invoice_command

    settings, _ = _load(args.config)
    return asyncio.run(invoice_command(settings, args.month, args.tenant,
                                       Path(args.out) if args.out else None))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="costwall", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("check", help="validate config and price table")
    p.add_argument("--config")
    p.add_argument("--audit", action="store_true", help="also verify the audit hash chain")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("invoice", help="write a month's invoice as PDF and CSV")
    p.add_argument("month", nargs="?", help="YYYY-MM (default: current month)")
    p.add_argument("--tenant")
    p.add_argument("--out")
    p.add_argument("--config")
    p.set_defaults(func=cmd_invoice)
    p = sub.add_parser("demo", help="gateway + simulated upstream + simulated agents")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--dir", default="data/demo", help="where the demo keeps its state")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("fake-upstream", help="run the OpenAI-compatible simulator")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(func=cmd_fake_upstream)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
