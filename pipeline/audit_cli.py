"""``vigil audit verify|anchor|trail``: what compliance runs against the ledger."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.settings import (
    ConfigError,
    Settings,
    config_option,
    output_file,
    parse_date,
    write_output,
)

SHOW_BREAKS = 20


def cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 when every chain verifies, 1 when any break is found (2 on errors)."""
    from pipeline.config import load_config
    from pipeline.ledger import AnchorError, Verdict, read_anchor, verify
    from pipeline.progress import Every
    from pipeline.store import open_store, unheld

    config = load_config(settings.config_path, os.environ)
    anchor = []
    if args.anchor:
        path = Path(args.anchor)
        try:
            anchor = read_anchor(json.loads(path.read_text()), str(path))
        except OSError as exc:
            raise ConfigError(f"--anchor {path}: cannot read it ({exc.strerror})") from None
        except AnchorError as exc:
            raise ConfigError(str(exc)) from None
        except ValueError as exc:  # not JSON, or not UTF-8
            raise ConfigError(f"--anchor {path}: not an anchor file ({exc})") from None
    since = parse_date(args.since) if args.since else None
    every = Every(2.0)

    def progress(verdict: Verdict, chains: int) -> None:
        if every.due():
            print(f"verify: {verdict.rows:,} rows read ({chains} chains)...", file=sys.stderr)

    store = open_store(settings)
    try:
        verdict = verify(
            store, config.retention, tenant=args.tenant, since=since, anchor=anchor,
            progress=progress,
        )  # fmt: skip
        # a mistyped tenant was "OK: 0 rows", and nothing more
        missing = [] if verdict.rows else unheld(store, "vigil.audit_log", "event",
                                                 tenant_id=args.tenant)  # fmt: skip
    finally:
        store.close()
    for b in verdict.breaks[:SHOW_BREAKS]:
        print(f"BREAK {b}")
    if len(verdict.breaks) > SHOW_BREAKS:
        print(f"... and {len(verdict.breaks) - SHOW_BREAKS} more")
    print(verdict.line())
    for said in missing:
        print(f"vigil audit verify: {said}", file=sys.stderr)
    return 0 if verdict.ok else 1


def cmd_audit_anchor(args: argparse.Namespace, settings: Settings) -> int:
    """Write every chain head and a digest over them to --out (or stdout)."""
    from pipeline.ledger import make_anchor
    from pipeline.store import open_store

    out = output_file(args.out) if args.out else None
    store = open_store(settings)
    try:
        anchor = make_anchor(store)
    finally:
        store.close()
    text = json.dumps(anchor, indent=1) + "\n"
    if out is not None:
        write_output(out, text)
        print(
            f"anchored {len(anchor['heads'])} chain head(s) to {args.out}, digest "
            f"{anchor['digest']}; keep a copy outside this database",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(text)
    return 0


def cmd_audit_trail(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.store import open_store, unheld
    from pipeline.trail import Selector, render, trail

    if args.trace:
        selector = Selector("trace", args.trace, args.tenant)
    elif args.unit:
        if ":" not in args.unit:
            raise ConfigError(f"--unit: expected TYPE:ID (e.g. ticket:T-1001), got {args.unit!r}")
        selector = Selector("unit", args.unit, args.tenant)
    else:
        selector = Selector("user", args.user, args.tenant)
    store = open_store(settings)
    try:
        about, rows = trail(store, selector)  # about: None if no events
        if args.format == "json":
            for r in rows:
                line = json.dumps({**r, "ts": r["ts"].isoformat()}, default=str, ensure_ascii=False)
                sys.stdout.write(line + "\n")
        else:
            sys.stdout.writelines(render(selector, about, rows))
        missing = [] if about is not None else unheld(store, "vigil.audit_log", "event",
                                                      tenant_id=args.tenant)  # fmt: skip
    finally:
        store.close()
    for said in missing:
        print(f"vigil audit trail: {said}", file=sys.stderr)
    return 0 if about is not None else 1


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    audit = sub.add_parser("audit", help="verify, anchor and read the audit ledger")
    audit_sub = audit.add_subparsers(dest="action", required=True)
    ver = audit_sub.add_parser("verify", help="recompute the hash chains; exit 1 on any break")
    ver.add_argument("--tenant", help="only this tenant's chains")
    ver.add_argument("--since", help="only chains of this month on (YYYY-MM-DD)")
    ver.add_argument("--anchor", help="an anchor file written earlier by `vigil audit anchor`")
    config_option(ver, "the tenants' retention (what expired is not a break)")
    ver.set_defaults(func=cmd_audit_verify)
    anc = audit_sub.add_parser("anchor", help="write the chain heads with a digest over them")
    anc.add_argument("--out", help="file to write (default: stdout)")
    anc.set_defaults(func=cmd_audit_anchor)
    tr = audit_sub.add_parser("trail", help="the story of one trace, unit of work or user")
    which = tr.add_mutually_exclusive_group(required=True)
    which.add_argument("--trace", help="a trace id")
    which.add_argument("--unit", help="TYPE:ID, e.g. ticket:T-1001")
    which.add_argument("--user", help="a user or reviewer id")
    tr.add_argument("--tenant", help="only this tenant's events")
    tr.add_argument("--format", choices=["text", "json"], default="text",
                    help="text (default) or json (one event a line)")  # fmt: skip
    tr.set_defaults(func=cmd_audit_trail)
