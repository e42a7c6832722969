"""``vigil``: the command line. Each command reads Settings once and passes them down."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pipeline import hscache
from pipeline.logs import hold_back_repeats, leave_unreached_to_the_command
from pipeline.settings import (
    WORKER_ROLES,
    ConfigError,
    Settings,
    config_option,
    count_argument,
    output_file,
    port_argument,
    seconds_argument,
    write_output,
)

if TYPE_CHECKING:
    from pipeline.events import Event


def _local_kafka(settings: Settings):  # type: ignore[no-untyped-def]
    from pipeline.devkafka import LocalKafka, fetch_jars

    return LocalKafka(
        settings.home / "kafka", fetch_jars(settings.cache_dir), settings.dev_kafka_port
    )


def cmd_dev_kafka(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.devkafka import fetch_jars

    if args.action == "fetch":
        print(f"Kafka jars ready in {fetch_jars(settings.cache_dir)}")
        return 0
    broker = _local_kafka(settings)
    if args.action == "start":
        broker.start(detached=True)  # until `vigil dev kafka stop`
        print(f"Kafka broker {broker.status()}; log: {broker.log_path}")
    elif args.action == "stop":
        print("Kafka broker stopped" if broker.stop() else "Kafka broker was not running")
    else:
        print(f"Kafka broker {broker.status()}")
        return 0 if broker.pid() is not None else 3
    return 0


def cmd_kafka_acls(args: argparse.Namespace, settings: Settings) -> int:
    """Print the ACLs of the principals named, one a line; with --apply, create them."""
    from pipeline.acls import create, gateway_grants, principal, producer_grants, worker_grants

    if args.worker is None and args.gateway is None and not args.producer:
        raise ConfigError(
            "vigil kafka acls: name a principal with --worker, --gateway or --producer"
        )
    grants = []
    if args.worker is not None:
        grants += worker_grants(settings, principal(args.worker, "--worker"))
    if args.gateway is not None:
        grants += gateway_grants(settings, principal(args.gateway, "--gateway"))
    for producer in args.producer:
        grants += producer_grants(settings, principal(producer, "--producer"))
    for grant in grants:
        print(grant)
    if args.apply:
        print(f"created {create(settings, grants)} ACL(s) on Kafka at {settings.kafka}")
    return 0


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Each finding as it is made; exit 1 if one failed."""
    from pipeline.check import FAIL, WARN, check
    from pipeline.logs import RDKAFKA_LOGGER

    # the findings say what librdkafka's lines would, each stamped and above the finding naming
    # it (as ``main`` leaves the ClickHouse client's about a server it cannot reach)
    RDKAFKA_LOGGER.setLevel(logging.CRITICAL)
    findings = []
    for finding in check(settings, args.role, args.timeout):
        print(finding, flush=True)
        findings.append(finding.status)
    failed, warned = findings.count(FAIL), findings.count(WARN)
    print(f"vigil check ({args.role}): {failed} failed, {warned} to look at")
    return 1 if failed else 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.worker import run_worker

    run_worker(settings, loglevel=args.loglevel, role=args.role)
    return 0


def cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.config import load_config
    from pipeline.gateway import run_gateway

    config = load_config(settings.config_path, os.environ)
    grpc_port = None if args.no_grpc else args.grpc_port
    run_gateway(settings, config, args.host, args.port, grpc_port, hangups=args.hangups)
    return 0


def hangups_kept() -> list[int]:
    """From now on, a SIGHUP is kept in the list returned until the gateway's event loop takes
    the signal over (``gateway._read_again_at_sighup``), which then reads the policy again. By
    default a SIGHUP ends a process, and a reloader sends one whenever vigil.yaml changes,
    also while a gateway is still importing and connecting."""
    kept: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, _frame: kept.append(signum))
    return kept


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.access import apply_policies, apply_service_users
    from pipeline.config import load_config
    from pipeline.store import connect, ensure_not_owned, migrate

    config = load_config(settings.config_path, os.environ)
    ensure_not_owned(settings, "the worker migrated it at start")
    store = connect(settings.clickhouse_dsn)
    users = []
    try:
        applied = migrate(store, starting=lambda name: print(f"applying {name} ...", flush=True))
        apply_policies(store, config, server=not store.embedded)
        if not store.embedded:
            users = apply_service_users(store, os.environ)
    finally:
        store.close()
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    if users:
        print(f"users made or updated: {', '.join(users)}")
    return 0


def cmd_sql(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.store import open_store

    store = open_store(settings, migrated=False)  # SHOW DATABASES works before migrating
    # written as it comes: an export of the ledger held whole took 4 times its size in memory
    try:
        with closing(store.stream_raw(args.query, args.format)) as pieces:
            for piece in pieces:
                sys.stdout.buffer.write(piece)
    finally:
        store.close()
    sys.stdout.flush()
    return 0


def _events_in(
    lines: Iterable[str], reasons: Counter[str], check: Callable[[Event], Event] = lambda e: e
) -> Iterator[tuple[int, Event]]:
    """(line number, event) for each line of JSON events that ``check`` passes; every other
    non-empty line is named on stderr with its number and reason, and counted in ``reasons``
    by reason code."""
    from pipeline.events import InvalidEvent, event_from_json, json_line

    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, check(event_from_json(json_line(line)))
        except InvalidEvent as exc:
            reasons[exc.code] += 1
            print(f"line {number}: {exc.code}: {exc.reason}", file=sys.stderr)


def _rejected(reasons: Counter[str]) -> str:
    summary = ", ".join(f"{code}={n}" for code, n in reasons.most_common()) or "none"
    return f"{sum(reasons.values())} rejected ({summary})"


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    """JSON events on stdin, one per line -> valid ones (normalised) on stdout; every
    rejection on stderr with its line number and reason."""
    from pipeline.codec import Registry
    from pipeline.events import event_to_json
    from pipeline.validate import check_event

    now = datetime.now(UTC)
    registry = Registry.load()

    def check(event: Event) -> Event:
        event = check_event(event, settings.limits, now)
        registry.encode_checked(event)  # as the pipeline would reject what the SDK cannot encode
        return event

    reasons: Counter[str] = Counter()
    valid = 0
    for _, event in _events_in(sys.stdin, reasons, check):
        valid += 1
        print(json.dumps(event_to_json(event)))
    print(f"{valid} valid, {_rejected(reasons)}", file=sys.stderr)
    return 0 if not reasons else 1


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    """JSON events, one per line (a file, or stdin), published to the raw topic as the SDK
    publishes them, for the pipeline to judge; a line that is not an event is named on stderr
    and not sent. Progress on stderr every ``settings.progress_seconds``; exit 1 if a line was
    not sent or an event not delivered."""
    from connectors.sdk import DeliveryError, Emitter
    from pipeline.progress import Every

    source: TextIO = sys.stdin
    if args.file:
        try:  # bytes that are not UTF-8 kept, so that their line is named (events.json_line)
            source = open(args.file, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"{args.file}: cannot read it ({exc.strerror})") from None
    reasons: Counter[str] = Counter()
    emitter = Emitter.from_settings(settings)
    sent, every = 0, Every(settings.progress_seconds)
    with source as lines:
        for _, event in _events_in(lines, reasons):
            emitter.emit(event)  # one the schema cannot hold goes as unencodable, for the DLQ
            sent += 1
            if every.due():
                print(f"vigil send: {sent:,} sent, {emitter.delivered:,} delivered so far",
                      file=sys.stderr, flush=True)  # fmt: skip
    try:
        emitter.close(timeout=60)
        undelivered = ""
    except DeliveryError as exc:
        undelivered = f"; {exc}"
    print(f"{sent:,} sent to {settings.topics.raw} at {settings.kafka}, {emitter.delivered:,} "
          f"delivered, {_rejected(reasons)}{undelivered}", file=sys.stderr)  # fmt: skip
    return 0 if not reasons and not undelivered else 1


def _walk(value: Any, path: str, redact_string: Callable[[str, str], str | None]) -> Any:
    if isinstance(value, str):
        return redact_string(path, value)
    if isinstance(value, dict):
        return {k: _walk(v, f"{path}.{k}" if path else k, redact_string) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, f"{path}[{i}]", redact_string) for i, v in enumerate(value)]
    return value


def _timed_out(number: int, exc: Exception) -> int:
    print(f"vigil: error: line {number}: redaction_timeout: {exc}; stopping so no line is "
          "skipped", file=sys.stderr)  # fmt: skip
    return 2


def cmd_redact(args: argparse.Namespace, settings: Settings) -> int:
    """JSON objects on stdin -> the same objects redacted, in order, keys unchanged; what was
    found on stderr. Events go through the pipeline's redact stage exactly; other objects have
    every string scanned with the same policy."""
    from pipeline.config import load_config
    from pipeline.detectors import PatternTimeout
    from pipeline.events import InvalidEvent, event_from_json, event_to_json, json_line
    from pipeline.redact import Policy, redact, redact_text_or_drop

    path = settings.config_path
    config = load_config(path, os.environ)
    if args.tenant and config.tenant_policy and args.tenant not in config.tenant_policy:
        # a mistyped tenant is checked against the default policy, and looked right
        print(f"vigil redact: tenant {args.tenant!r} is not in {path} (its tenants: "
              f"{', '.join(sorted(config.tenant_policy))}): redacting with the default policy, "
              "as the worker does for a tenant it does not list", file=sys.stderr)  # fmt: skip
    found: Counter[str] = Counter()
    lines = events = others = 0
    for number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        lines += 1
        try:
            obj = json_line(line)
        except InvalidEvent as exc:
            print(
                f"vigil: error: line {number}: {exc.code}: {exc}; stopping so no line is skipped",
                file=sys.stderr,
            )
            return 2
        tenant = args.tenant or (obj.get("tenant_id") if isinstance(obj, dict) else None) or ""
        policy = config.policy_for(tenant)
        try:
            event = redact(event_from_json(obj), policy)
        except PatternTimeout as exc:  # the worker sends such an event to the DLQ
            return _timed_out(number, exc)
        except InvalidEvent:
            others += 1

            def redact_string(
                path: str, value: str, policy: Policy = policy, tenant: str = tenant
            ) -> str | None:
                counts: Counter[str] = Counter()
                result = redact_text_or_drop(value, policy, tenant, counts)
                found.update(counts)
                return result

            try:
                out = _walk(obj, "", redact_string)
            except RecursionError:  # read, but too deep for the walk (its two frames a level)
                print(f"vigil: error: line {number}: bad_json: nested too deeply to be redacted; "
                      "stopping so no line is skipped", file=sys.stderr)  # fmt: skip
                return 2
            except PatternTimeout as exc:
                return _timed_out(number, exc)
        else:
            events += 1
            for r in event.redactions:
                found[r.type] += r.count
            redacted = event_to_json(event)
            out = {k: redacted.get(k, v) if k != "ts" else v for k, v in obj.items()}
        print(json.dumps(out, ensure_ascii=False))
    summary = ", ".join(f"{kind}={n}" for kind, n in found.most_common()) or "nothing"
    print(
        f"{lines} line(s): {events} event(s), {others} other object(s); redacted {summary}",
        file=sys.stderr,
    )
    return 0


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.config import load_config
    from pipeline.report import render
    from pipeline.store import open_store

    out = output_file(args.out)
    config = load_config(settings.config_path, os.environ)
    store = open_store(settings)
    try:
        page = render(store, config.rules.budgets)
    finally:
        store.close()
    write_output(out, page)
    print(
        f"wrote {out.resolve()} ({len(page) / 1024:.0f} KiB, self-contained: open it in a browser)"
    )
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.demo import run_demo

    return run_demo(settings, events=args.events, seed=args.seed)


DESCRIPTION = (
    "Vigil: AI agents' interaction, cost, drift, eval and decision events, validated, redacted "
    "and priced on their way from Kafka to ClickHouse; an audit ledger, cost per unit of work "
    "and alerts over them."
)
EPILOG = (
    "Settings come from VIGIL_* environment variables, policies and alert rules from vigil.yaml "
    "(a command's --config, or the file VIGIL_CONFIG names): README.md, 'Configuration'. "
    "'vigil COMMAND -h' for a command's options."
)


class _Commands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Subcommands whose ``-h`` opens with what the command does: its line in the list of
    commands, unless it is given a description of its own."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if "help" in kwargs:
            kwargs.setdefault("description", kwargs["help"])
        parser: argparse.ArgumentParser = super().add_parser(name, **kwargs)
        parser.register("action", "parsers", _Commands)  # and so on down
        return parser


class _Version(argparse.Action):
    """``--version``: the installed package's version (pyproject.toml's), looked up only when
    asked (the lookup takes some 60 ms, which every command paid as argparse's ``version``)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("vigil-pipeline")
        except PackageNotFoundError:
            found = "(not installed: run from a checkout)"
        print(f"vigil {found}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from pipeline.alerts_cli import add_parsers as add_alerts_parsers
    from pipeline.audit_cli import add_parsers as add_audit_parsers
    from pipeline.cost_cli import (
        REPORT_SQL,
        cmd_cost_project,
        cmd_cost_report,
        cmd_cost_reprice,
        cmd_enrich,
    )
    from pipeline.dlq_cli import add_parsers as add_dlq_parsers
    from pipeline.spool_cli import add_parsers as add_spool_parsers

    parser = argparse.ArgumentParser(prog="vigil", description=DESCRIPTION, epilog=EPILOG)
    parser.register("action", "parsers", _Commands)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action=_Version, help="the installed version, and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the main job on the embedded default and summarise it")
    demo.add_argument("--events", type=count_argument, default=20_000,
                      help="valid events to produce")  # fmt: skip
    demo.add_argument("--seed", type=int, default=7, help="the workload's random seed (7)")
    config_option(demo, "the policies, prices and rules",
                  "VIGIL_CONFIG, else ./vigil.yaml, else the demo's own")  # fmt: skip
    demo.set_defaults(func=cmd_demo)

    dev = sub.add_parser("dev", help="local development services")
    dev_sub = dev.add_subparsers(dest="service", required=True)
    kafka = dev_sub.add_parser("kafka", help="the local Apache Kafka broker (KRaft)")
    kafka.add_argument("action", choices=["start", "stop", "status", "fetch"],
                       help="fetch resolves the jars only; start runs it until stop")  # fmt: skip
    kafka.set_defaults(func=cmd_dev_kafka)

    acl = (
        sub.add_parser("kafka", help="Kafka cluster set-up")
        .add_subparsers(dest="kafka_command", required=True)
        .add_parser(
            "acls", help="the ACLs Vigil's principals need on a cluster that authorizes requests"
        )
    )
    acl.add_argument("--worker", metavar="User:NAME", help="the worker's principal")
    acl.add_argument("--gateway", metavar="User:NAME", help="the OTLP gateway's principal")
    acl.add_argument(
        "--producer", metavar="User:NAME", action="append", default=[],
        help="a principal that sends events (SDK, exporter, dlq replay): the raw topic only",
    )  # fmt: skip
    acl.add_argument(
        "--apply", action="store_true",
        help="create them, signed in as the VIGIL_KAFKA_* settings say (an ACL administrator)",
    )  # fmt: skip
    acl.set_defaults(func=cmd_kafka_acls)

    chk = sub.add_parser(
        "check", help="whether a worker or gateway could start where the settings point"
    )
    chk.add_argument("--role", choices=["worker", "gateway"], default="worker",
                     help="what would start: a worker (default) or a gateway")  # fmt: skip
    chk.add_argument(
        "--timeout", type=seconds_argument, default=10.0, metavar="SECONDS",
        help="how long to wait for Kafka to answer (10)",
    )  # fmt: skip
    config_option(chk, "the tenants, policies and routes to check")
    chk.set_defaults(func=cmd_check)

    worker = sub.add_parser("worker", help="run the Faust stream processors")
    worker.add_argument("--loglevel", default="WARNING",
                        help="DEBUG, INFO (with a progress line), WARNING or ERROR")  # fmt: skip
    worker.add_argument(
        "--role",
        choices=WORKER_ROLES,
        default="all",
        help="all agents (default); or split in two processes: store (ledger, DLQ; owns "
        "ClickHouse) and validate (validate, redact, enrich; any number of them)",
    )
    config_option(worker, "the tenants, policies, prices and alert rules")
    worker.set_defaults(func=cmd_worker)

    gw = sub.add_parser("gateway", help="receive OTLP traces and logs (HTTP, gRPC) from any SDK")
    gw.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    gw.add_argument("--port", type=port_argument, default=4318, help="port (4318, OTLP/HTTP's)")
    gw.add_argument("--grpc-port", type=port_argument, default=4317,
                    help="OTLP/gRPC's port (4317)")  # fmt: skip
    gw.add_argument("--no-grpc", action="store_true", help="serve OTLP/HTTP only")
    config_option(gw, "the tenants' API keys, policies and rate limits")
    gw.set_defaults(func=cmd_gateway)

    mig = sub.add_parser("migrate", help="apply the numbered ClickHouse DDL")
    config_option(mig, "the tenants' retention and the budgets (to the budgets table)")
    mig.set_defaults(func=cmd_migrate)

    sql = sub.add_parser("sql", help="run a read-only query against the store")
    sql.add_argument("query", help="one read-only statement (SELECT, WITH, SHOW, ...)")
    sql.add_argument(
        "--format",
        default="PrettyCompact",
        help="ClickHouse output format: PrettyCompact, CSV, JSONEachRow, TSV...",
    )
    sql.set_defaults(func=cmd_sql)

    val = sub.add_parser("validate", help="validate JSON events (one per line) from stdin")
    val.set_defaults(func=cmd_validate)

    snd = sub.add_parser("send", help="publish JSON events (one per line) to the raw topic")
    snd.add_argument("file", nargs="?", help="a file of JSON events (default: stdin)")
    snd.set_defaults(func=cmd_send)

    enr = sub.add_parser("enrich", help="price JSON events (one per line) from stdin")
    config_option(enr, "agents and prices")
    enr.set_defaults(func=cmd_enrich)

    cost = sub.add_parser("cost", help="what agents cost")
    cost_sub = cost.add_subparsers(dest="action", required=True)
    report = cost_sub.add_parser("report", help="spend by unit of work, agent, team or model")
    report.add_argument("--by", choices=sorted(REPORT_SQL), default="unit",
                        help="per unit of work (default), agent, team or model")  # fmt: skip
    report.add_argument("--tenant", help="only this tenant's spend")
    report.add_argument("--since", help="a date or time, e.g. 2026-11-01")
    report.add_argument("--format", choices=["table", "csv", "json"], default="table",
                        help="table (default), csv or json (one object a line)")  # fmt: skip
    report.set_defaults(func=cmd_cost_report)
    proj = cost_sub.add_parser("project", help="what N more units of work will cost")
    proj.add_argument("--agent", required=True, help="the agent whose units are projected")
    proj.add_argument("--units", type=count_argument, required=True, help="how many more units")
    proj.add_argument("--period", default="month", help="what the units are counted over (a label)")
    proj.add_argument("--tenant", help="only this tenant's units of the agent")
    proj.add_argument("--unit-type", help="only units of this type (ticket, document...)")
    proj.set_defaults(func=cmd_cost_project)
    rep = cost_sub.add_parser("reprice", help="recompute history under another price catalog")
    rep.add_argument(
        "--catalog", required=True, help="a price catalog file (prices/default.yaml format)"
    )
    rep.add_argument("--since", help="only events from this date on (YYYY-MM-DD)")
    config_option(rep, "the catalog's model aliases")
    rep.set_defaults(func=cmd_cost_reprice)

    red = sub.add_parser(
        "redact", help="redact JSON objects (one per line) from stdin, as the worker would"
    )
    config_option(red, "the policies")
    red.add_argument("--tenant", help="apply this tenant's policy to every line")
    red.set_defaults(func=cmd_redact)
    add_audit_parsers(sub)
    add_dlq_parsers(sub)
    add_spool_parsers(sub)
    rep_html = sub.add_parser("report", help="a self-contained HTML report of cost, drift, alerts")
    rep_html.add_argument("--out", default="report.html", help="file to write (report.html)")
    config_option(rep_html, "the budgets")
    rep_html.set_defaults(func=cmd_report)
    add_alerts_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is cmd_gateway:  # before the imports and the policy: seconds, at times
        args.hangups = hangups_kept()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    hold_back_repeats()
    if args.func not in (cmd_worker, cmd_gateway) and not args.verbose:
        leave_unreached_to_the_command()  # the command's error says it (-v shows them)
    # JSON read from stdin may hold a lone surrogate ("\ud800"), which UTF-8 cannot write:
    # written back as that escape (valid JSON for the same string), not a traceback
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    # bytes on stdin that are not UTF-8: kept, so that the line holding them is named as not
    # UTF-8 (events.json_line), rather than a UnicodeDecodeError under a strict locale
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")
    from pipeline.acls import AclError
    from pipeline.devkafka import BrokerError
    from pipeline.services import ServiceError
    from pipeline.store import StoreError
    from pipeline.topics import TopicError

    try:
        settings = Settings.from_env()
        if getattr(args, "config", None):  # a command's --config, over VIGIL_CONFIG
            settings = dataclasses.replace(settings, config_path=Path(args.config).resolve())
        hscache.keep_in(settings.cache_dir / "hyperscan")  # the prefilters compiled at start
        return int(args.func(args, settings))
    except (ConfigError, StoreError, BrokerError, TopicError, AclError, ServiceError) as exc:
        print(f"vigil: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout's reader left (`vigil sql ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush
        return 141


if __name__ == "__main__":
    sys.exit(main())
