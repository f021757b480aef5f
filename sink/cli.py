"""Command line: `sink run`, `sink check`, `sink migrate`, `sink serve`."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Sequence
from datetime import datetime
from typing import Any

import structlog
from tqdm import tqdm

from sink import __version__, app, config
from sink.errors import SinkError
from sink.metering import backfill, usage
from sink.operations.logs import configure


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sink", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sink {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the worker until SIGTERM/SIGINT")
    run.add_argument("-c", "--config", required=True, help="YAML configuration file")
    run.add_argument(
        "--workers", type=int, default=1, help="worker processes (one consumer each, same group)"
    )
    run.add_argument(
        "--no-migrate", action="store_true", help="do not create missing tables at start"
    )

    check = commands.add_parser("check", help="validate configuration, reach dependencies")
    check.add_argument("-c", "--config", required=True)

    migrate = commands.add_parser(
        "migrate", help="apply schema migrations and meters, create the DLQ topic"
    )
    migrate.add_argument("-c", "--config", required=True)
    migrate.add_argument("--dry-run", action="store_true", help="print the SQL, run nothing")
    migrate.add_argument(
        "--drop-removed",
        action="store_true",
        help="drop the tables of meters no longer configured (data is lost)",
    )
    serve = commands.add_parser(
        "serve", help="serve usage over HTTP (OpenMeter's meter API) until SIGTERM/SIGINT"
    )
    serve.add_argument("-c", "--config", required=True, help="YAML configuration file")

    usage = commands.add_parser("usage", help="print a meter's usage per window")
    usage.add_argument("-c", "--config", required=True)
    usage.add_argument("--meter", required=True, help="meter slug")
    usage.add_argument("--namespace", help="customer namespace (default: all, per namespace)")
    usage.add_argument("--subject", action="append", default=[], help="repeatable")
    usage.add_argument("--from", dest="start", type=_moment, help="RFC 3339, inclusive")
    usage.add_argument("--to", dest="end", type=_moment, help="RFC 3339, exclusive")
    usage.add_argument(
        "--window", default="HOUR", type=str.upper, choices=["MINUTE", "HOUR", "DAY", "MONTH"]
    )
    usage.add_argument("--tz", default="UTC", help="IANA time zone the windows align to")
    usage.add_argument(
        "--group-by",
        action="append",
        default=[],
        help="subject or a group name of the meter; repeatable",
    )
    usage.add_argument("--format", default="table", choices=["table", "json", "csv"])
    return parser


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset, e.g. Z or +02:00")
    return moment


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = config.load(args.config)
        if getattr(args, "no_migrate", False):
            cfg = cfg.model_copy(
                update={"worker": cfg.worker.model_copy(update={"migrate_on_start": False})}
            )
        configure(cfg.worker.log_level, cfg.worker.log_format)
        if args.command == "run":
            if args.workers > 1:
                return supervise(args, cfg)
            _event_loop(app.run(cfg), cfg.worker.use_uvloop)
            return 0
        if args.command == "check":
            return _check(cfg)
        if args.command == "serve":
            from sink.api.server import serve  # the HTTP stack loads only for `serve`

            _event_loop(serve(cfg), cfg.worker.use_uvloop)
            return 0
        if args.command == "usage":
            return _usage(cfg, args)
        if args.command == "migrate":
            return _migrate(cfg, args.dry_run, args.drop_removed)
    except SinkError as exc:
        print(f"sink: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a worker task failed; it was logged with its cause
        print(f"sink: {exc}", file=sys.stderr)
        return 1
    return 2


def _event_loop(coro: Coroutine[Any, Any, Any], use_uvloop: bool) -> Any:
    if use_uvloop:
        try:
            import uvloop

            return uvloop.run(coro)
        except ImportError:
            pass
    return asyncio.run(coro)


def _migrate(cfg: config.Config, dry_run: bool, drop_removed: bool) -> int:
    if not dry_run:
        with _BackfillProgress() as progress:
            done = _event_loop(app.migrate(cfg, drop_removed, progress.update), False)
        print("\n".join(f"applied {v}" for v in done) or "nothing to do: schema is up to date")
        return 0
    plan = _event_loop(app.plan(cfg, drop_removed), False)
    for version, statements in plan.apply:
        print(f"-- {version}")
        for sql in statements:
            print(sql.strip() + ";\n")
    for slug in plan.dropped:
        print(f"-- drop meter {slug}: DROP TABLE meter_{slug}_mv, meter_{slug};\n")
    for slug in plan.kept_removed:
        print(f"-- meter {slug} is no longer configured; its data is kept (--drop-removed)")
    if not (plan.apply or plan.dropped):
        print("-- nothing to do: schema is up to date")
    return 0


class _BackfillProgress:
    """A backfill's progress: a bar per meter on a terminal, a log line per step otherwise."""

    def __init__(self) -> None:
        self.terminal = sys.stderr.isatty()
        self.bars: dict[str, tqdm[Any]] = {}

    def __enter__(self) -> _BackfillProgress:
        return self

    def __exit__(self, *_exc: object) -> None:
        for bar in self.bars.values():
            bar.close()

    def update(self, p: backfill.Progress) -> None:
        if not self.terminal:
            eta = p.eta()
            structlog.get_logger("sink.backfill").info(
                "backfill progress",
                meter=p.meter,
                rows=f"{p.rows_done} of {p.rows_total}",
                months=f"{p.months_done} of {p.months_total}",
                eta_seconds=None if eta is None else round(eta),
            )
            return
        bar = self.bars.get(p.meter)
        if bar is None:
            bar = self.bars[p.meter] = tqdm(
                total=p.rows_total,
                initial=p.rows_done,
                unit=" rows",
                unit_scale=True,
                desc=f"backfill {p.meter}",
                file=sys.stderr,
            )
        bar.set_postfix_str(f"months {p.months_done}/{p.months_total}")
        bar.update(p.rows_done - bar.n)


def _usage(cfg: config.Config, args: argparse.Namespace) -> int:
    meters = {m.slug: m for m in cfg.meters}
    if args.meter not in meters:
        known = ", ".join(sorted(meters)) or "none configured"
        print(f"sink: unknown meter {args.meter!r} (meters: {known})", file=sys.stderr)
        return 2

    async def run() -> list[usage.UsageRow]:
        ch = app.clickhouse(cfg)
        try:
            return await usage.query(
                ch,
                meters[args.meter],
                events_table=cfg.clickhouse.events_table,
                namespace=args.namespace,
                subjects=args.subject,
                start=args.start,
                end=args.end,
                window=args.window,
                tz=args.tz,
                group_by=args.group_by,
                cluster=cfg.clickhouse.cluster,
            )
        finally:
            await ch.close()

    try:
        rows = _event_loop(run(), False)
    except usage.UsageError as exc:
        print(f"sink: {exc}", file=sys.stderr)
        return 2
    print(usage.render(rows, args.format))
    return 0


def _check(cfg: config.Config) -> int:
    results, migrations = _event_loop(app.check(cfg), False)
    print("configuration: ok")
    for name, error in results.items():
        print(f"{name}: {'ok' if error is None else 'FAILED: ' + error}")
    for line in migrations:
        print(line)
    return 0 if all(error is None for error in results.values()) else 1


def supervise(args: argparse.Namespace, cfg: config.Config) -> int:
    """Run N worker processes of one group. Each serves HTTP on `http.port + index`; a child
    that dies is restarted; SIGTERM/SIGINT are passed on and waited for."""
    stopping = False

    def spawn(index: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["SINK__HTTP__PORT"] = str(cfg.http.port + index if cfg.http.port else 0)
        env["SINK__WORKER__ID"] = f"{cfg.worker.id}-{index}"
        command = [sys.executable, "-m", "sink", "run", "-c", args.config]
        if args.no_migrate or index > 0:
            command.append("--no-migrate")
        return subprocess.Popen(command, env=env)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    children = [spawn(0)]
    time.sleep(1.0)  # the first child migrates; the rest start behind it
    children += [spawn(i) for i in range(1, args.workers)]
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        alive = False
        for index, child in enumerate(children):
            code = child.poll()
            if code is None:
                alive = True
            elif not stopping:
                print(f"sink: worker {index} exited with {code}, restarting", file=sys.stderr)
                children[index] = spawn(index)
                alive = True
        if not alive:
            break
        time.sleep(0.2)
    return max((child.returncode or 0) for child in children)


if __name__ == "__main__":
    sys.exit(main())
