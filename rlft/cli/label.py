"""``rlft label``: serve the labeling UI/API, import examples, add labelers, print statistics, export pairs.

Typical session::

    rlft label import --db labels.db --pairs examples.jsonl --overlap 3
    rlft label add-labeler --db labels.db alice            # prints alice's token
    rlft label serve --db labels.db --port 8000            # open http://127.0.0.1:8000/ui/
    rlft label stats --db labels.db
    rlft label export --db labels.db --out pairs.jsonl --winrate winrates.json
    rlft fit -c configs/dpo/smollm2_lora.yaml --data.path pairs.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

DB_HELP = "SQLite file path (created if missing) or a database URL such as postgresql://user:pass@host/db"


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default="labels.db", help=f"{DB_HELP} (default: %(default)s)")


def _engine(args: argparse.Namespace):
    from rlft.label.db import open_database

    return open_database(args.db)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn
    from sqlalchemy import func, select

    from rlft.cli.options import check_listen
    from rlft.label import store
    from rlft.label.api import create_app
    from rlft.label.db import Labeler, read_only

    if not args.lease_minutes > 0 or args.lease_minutes == float("inf"):
        raise ValueError(f"--lease-minutes must be a finite number > 0, got {args.lease_minutes}")
    for flag, value in (("--concurrency", args.concurrency), ("--overlap", args.overlap)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    check_listen(args.host, args.port)
    engine = _engine(args)
    with read_only(engine) as conn:
        admins = conn.execute(select(func.count()).select_from(Labeler).where(Labeler.is_admin.is_(True))).scalar_one()
    if not admins:
        token = store.add_labeler(engine, "admin", admin=True)
        print(f"created admin 'admin' with token {token} (shown once; needed for import/export via the API)")
    app = create_app(
        engine,
        lease_seconds=args.lease_minutes * 60,
        default_overlap=args.overlap,
        ui=not args.no_ui,
        concurrency=args.concurrency,
    )
    where = f"http://{args.host}:{args.port}"
    print(f"labeling UI: {where}/ui/   API docs: {where}/docs   database: {args.db}", flush=True)
    # what exists now (app, ORM metadata, the UI) lives as long as the server: keep it out of every later full
    # garbage collection, whose pauses stall all requests in flight at once
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def cmd_import(args: argparse.Namespace) -> None:
    from rlft.label import store
    from rlft.label.importing import load_generations, load_pairs

    notes: list[str] = []
    if args.pairs:
        records = load_pairs(args.pairs)
        extra = ""
    else:
        joined = load_generations(args.generations[0], args.generations[1], args.model_a, args.model_b)
        records, notes = joined.records, joined.notes
        extra = f", unmatched prompts: {joined.unmatched_a} in A, {joined.unmatched_b} in B"
    if not records:
        raise ValueError(f"{args.pairs or ' and '.join(args.generations)}: no examples to import (empty file?)")
    summary = store.import_records(_engine(args), records, overlap=args.overlap)
    print(
        f"read {len(records)} examples: imported {summary.inserted}, already present {summary.duplicates}"
        f"{extra}; {summary.slots} labeling slots (overlap {args.overlap})"
    )
    for note in notes:
        print(f"  {note}")


def cmd_add_labeler(args: argparse.Namespace) -> None:
    from rlft.label import store

    token = store.add_labeler(_engine(args), args.name, admin=args.admin, token=args.token)
    role = "admin" if args.admin else "labeler"
    print(f"{role} {args.name!r} created; token (shown once, keep it secret):\n{token}")


def cmd_stats(args: argparse.Namespace) -> None:
    from rlft.label.api import stats_payload
    from rlft.label.export import format_win_rates
    from rlft.label.quality import format_report

    payload = stats_payload(_engine(args))
    if args.json:
        print(json.dumps(payload, indent=2))
        return
    print(format_report(payload["quality"], payload["overview"]))
    print("\n## Model win-rates\n")
    print(format_win_rates(payload["win_rates"]))


def cmd_export(args: argparse.Namespace) -> None:
    from rlft.label import queries
    from rlft.label.export import export_pairs, format_win_rates, win_rates

    if args.min_votes < 1:
        raise ValueError(f"--min-votes must be >= 1, got {args.min_votes}")
    engine = _engine(args)
    summary = export_pairs(
        engine, args.out, min_votes=args.min_votes, min_agreement=args.min_agreement, with_metadata=args.with_metadata
    )
    counts = summary.as_dict()
    skipped = ", ".join(f"{k}={counts[k]}" for k in ("too_few_votes", "all_ties", "split", "low_agreement"))
    print(f"wrote {summary.written} pairs to {args.out}; skipped: {skipped}; never labeled: {summary.unlabeled}")
    if args.winrate:
        results = win_rates(queries.load_votes(engine))
        with open(args.winrate, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
        print(format_win_rates(results))
        print(f"win-rates written to {args.winrate}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlft label",
        description="Human preference collection: a labeling web UI + API over SQLite or PostgreSQL.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve",
        help="run the labeling UI (/ui/) and HTTP API (/api, docs at /docs)",
        description="Serve the Gradio labeling UI at /ui/ and the JSON API at /api (OpenAPI docs at /docs). On the "
        "first start an 'admin' account is created and its token printed once. Labelers log in with the token "
        "from 'rlft label add-labeler'.",
    )
    _add_db(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument(
        "--lease-minutes",
        type=float,
        default=10.0,
        help="how long a fetched item stays reserved for its labeler (default: %(default)s)",
    )
    p.add_argument("--overlap", type=int, default=1, help="labelers per example for imports made through the API")
    p.add_argument("--no-ui", action="store_true", help="serve only the HTTP API")
    p.add_argument(
        "--concurrency",
        type=int,
        default=2,
        help="API requests served at once; the rest wait in arrival order, which keeps the slowest answers "
        "close to the typical one under load (default: %(default)s)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("import", help="import examples to label from JSONL")
    _add_db(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--pairs", metavar="FILE", help="JSONL of {prompt, response_a, response_b, model_a?, model_b?, category?}"
    )
    src.add_argument(
        "--generations",
        nargs=2,
        metavar=("A.jsonl", "B.jsonl"),
        help="two models' generations {prompt, completion|response, model?}, joined on the prompt",
    )
    p.add_argument("--model-a", help="model name for file A rows without a 'model' field (default: file stem)")
    p.add_argument("--model-b", help="model name for file B rows without a 'model' field (default: file stem)")
    p.add_argument("--overlap", type=int, default=1, help="how many different labelers see each example")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("add-labeler", help="create a labeler (or admin) and print their access token")
    _add_db(p)
    p.add_argument("name", help="unique labeler name")
    p.add_argument("--admin", action="store_true", help="may also import, export and create labelers via the API")
    p.add_argument("--token", help="use this token instead of a random one")
    p.set_defaults(func=cmd_add_labeler)

    p = sub.add_parser("stats", help="agreement (Cohen/Fleiss kappa, Krippendorff alpha), position bias, timing")
    _add_db(p)
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "export",
        help="write canonical DPO pairs (majority vote) and optional model win-rates",
        description="Export rules: majority over non-tie votes; all-tie, A/B-split and low-agreement items are "
        "skipped and counted (see rlft.label.export).",
    )
    _add_db(p)
    p.add_argument("--out", required=True, help="output JSONL of {prompt, chosen, rejected}")
    p.add_argument("--min-votes", type=int, default=1, help="skip items with fewer votes (default: %(default)s)")
    p.add_argument(
        "--min-agreement", type=float, default=0.5, help="skip items whose winner has a smaller share of all votes"
    )
    p.add_argument("--with-metadata", action="store_true", help="add example_id, votes, agreement, chosen_model")
    p.add_argument("--winrate", metavar="FILE.json", help="also write model-vs-model win-rates with 95%% CIs")
    p.set_defaults(func=cmd_export)
    return parser


def run(argv: list[str] | None = None) -> None:
    """``rlft label`` as the ``rlft`` router runs it: user errors propagate to its one error path
    (:func:`rlft.cli.run_tool_command`)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.func(args)


def main(argv: list[str] | None = None) -> None:
    """Entry point for direct callers (``argv`` excludes the ``label`` word): user errors exit 2 with one line."""
    from rlft.label.importing import ImportValidationError
    from rlft.label.store import LabelError

    try:
        run(argv)
    except (ImportValidationError, LabelError, FileNotFoundError, ValueError) as exc:
        print(f"rlft label: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
