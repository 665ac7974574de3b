"""The ``costwall`` command: serve, check, invoice, demo, init, fake-upstream.

Start-up failures print one line (``costwall: ...``) on stderr and exit non-zero: never a
traceback, never a process left alive without listening.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from gateway.config import (
    PACKAGED_PRICING,
    ConfigError,
    LedgerSettings,
    ServerSettings,
    Settings,
    load_settings,
)


def _load(path: str | None) -> tuple[Settings, list[str]]:
    try:
        return load_settings(path)
    except ConfigError as exc:
        if len(exc.problems) == 1:
            print(f"costwall: {exc.problems[0]}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"costwall: configuration has {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def _fail(message: str, code: int = 1) -> int:
    """One line on stderr; the caller returns the exit code."""
    print(f"costwall: {message}", file=sys.stderr, flush=True)
    return code


def _die(exc: BaseException, settings: Settings) -> NoReturn:
    """A failure once things are open: one line, then exit at once. ``os._exit`` because a
    half-started ledger may hold a non-daemon thread that would keep the process alive."""
    from gateway.startup import describe

    logging.getLogger("costwall").debug("start-up failed", exc_info=exc)
    _fail(describe(exc, settings))
    sys.stdout.flush()
    os._exit(1)


def setup_logging(settings: Settings) -> None:
    from gateway.logs import configure

    log = settings.logging
    configure(log.format, log.level, access=log.access)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from aiohttp import web

    from gateway import startup
    from gateway.app import create_app

    settings, warnings = _load(args.config)
    if args.host:
        settings = replace(settings, server=replace(settings.server, host=args.host))
    if args.port is not None:
        settings = replace(settings, server=replace(settings.server, port=args.port))
    server = settings.server
    setup_logging(settings)
    try:  # everything that can fail before a file or connection is opened
        startup.require_upstream_key(settings)
        startup.require_database_driver(settings.ledger.database)
        prices = startup.load_prices(settings)
        startup.require_free_port(server.host, server.port)
    except startup.StartupError as exc:
        return _fail(str(exc))
    for warning in warnings:
        logging.getLogger("costwall").warning("%s", warning)
    _install_uvloop()
    banner = (f"costwall listening on http://{server.host}:{server.port} (upstream "
              f"{settings.upstream.base_url}, database {settings.ledger.database.split('://')[0]})")
    try:
        app = create_app(settings, prices=prices)
        # The banner is printed once the port is bound (run_app's print hook), not before.
        web.run_app(app, host=server.host, port=server.port, access_log=None,
                    print=lambda *_: print(banner, flush=True),
                    shutdown_timeout=settings.limits.shutdown_grace_s,
                    handler_cancellation=False)
    except Exception as exc:  # the database, recovery, a port taken meanwhile: one line
        _die(exc, settings)
    return 0


def _configured_pricing(exc: ConfigError | None) -> Path:
    """The price table a config names, known even when the config has other problems, so
    ``check`` validates that table and not the default one."""
    return exc.pricing_path if exc is not None and exc.pricing_path else PACKAGED_PRICING


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.pricing import load_price_table
    from gateway.tokens import EncodingFileError, encoding

    problems: list[str] = []
    warnings: list[str] = []
    settings: Settings | None = None
    error: ConfigError | None = None
    try:
        settings, warnings = load_settings(args.config)
    except ConfigError as exc:
        problems.extend(exc.problems)
        error = exc
    pricing_path = settings.general.pricing if settings else _configured_pricing(error)
    prices, price_problems = load_price_table(pricing_path)
    problems.extend(price_problems)
    unknown_model = settings.general.unknown_model if settings else "reject"
    if unknown_model != "reject" and prices.lookup(unknown_model) is None:
        problems.append(f"unknown_model: {unknown_model!r} is not in the price table")
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
    state = read_state(settings.ledger.database)
    problems = []
    if state.problem:
        problems.append(f"audit trail: {state.problem}")
    if state.key is None:
        problems.append("audit trail: no audit key (set COSTWALL_AUDIT_KEY, or keep audit.key "
                        "beside the SQLite database); MACs not checked")
    report = verify_chain(settings.general.logs_dir / "budget" / "events.jsonl", state.key,
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
    from gateway.demo import default_demo_dir, run_demo
    from gateway.startup import StartupError, describe

    _install_uvloop()
    directory = Path(args.dir).expanduser() if args.dir else default_demo_dir(os.environ)
    try:
        asyncio.run(run_demo(args.port, directory))
    except StartupError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:  # Ctrl-C while starting: everything is closed already
        return 130
    except Exception as exc:
        _fail(describe(exc, Settings(
            server=ServerSettings(port=args.port),
            ledger=LedgerSettings(database=f"sqlite:///{directory / 'costwall.db'}"))))
        sys.stdout.flush()
        os._exit(1)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from gateway.init import InitError, write_starter

    try:
        written, key = write_starter(Path(args.dir).expanduser(), force=args.force)
    except InitError as exc:
        return _fail(str(exc))
    for path in written:
        print(f"wrote {path}")
    config = written[0]
    print(f"""
First virtual key (only its SHA-256 is in the config; give it to an agent as its API key):
  {key}

Next:
  1. edit {config} (budgets, keys) and put real secrets in the environment
     (see {written[1]}: OPENAI_API_KEY, COSTWALL_ADMIN_TOKEN, COSTWALL_FINANCE_TOKEN)
  2. costwall check --config {config}
  3. costwall serve --config {config}""")
    return 0


def cmd_invoice(args: argparse.Namespace) -> int:
    from admin.invoice_cli import invoice_command
    from gateway.startup import StartupError, require_database_driver

    settings, _ = _load(args.config)
    try:
        require_database_driver(settings.ledger.database)
        return asyncio.run(invoice_command(settings, args.month, args.tenant,
                                           Path(args.out) if args.out else None))
    except StartupError as exc:
        return _fail(str(exc))
    except Exception as exc:  # the database cannot be opened, ...: one line, not a traceback
        _die(exc, settings)


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
    p.add_argument("--dir", help="where the demo keeps its state (default: "
                   "$COSTWALL_DEMO_DIR, else $XDG_DATA_HOME/costwall/demo, "
                   "i.e. ~/.local/share/costwall/demo)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("init", help="write a starter costwall.yaml and .env.example")
    p.add_argument("dir", nargs="?", default=".", help="folder to write into (default: .)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_init)
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
