"""Latency of the labeling server on a large database: p50/p95/p99 per endpoint with N labelers voting at once.

Fills a fresh database with ``--examples`` pairs (bulk SQL, the same rows and slots ``rlft label import`` writes),
optionally marks ``--prelabeled`` of them as already voted on (a database in the middle of a campaign), starts the
real server (``rlft label serve --no-ui``, one uvicorn process) and runs the request mix of
``tests/label/test_load.py``: every labeler asks for the next example (``POST /api/next``) the moment it has voted
(``POST /api/preferences``). Prints one JSON line of figures.

    python scripts/bench_label_store.py --examples 100000 --labelers 50 --votes 20 \\
        --dsn postgresql://rlft:rlft@127.0.0.1:5432/rlft_bench
    python scripts/bench_label_store.py --examples 100000 --labelers 50 --votes 20 --dsn /tmp/bench.db

A PostgreSQL ``--dsn`` names a database that is dropped and created again (its server must let the user do that);
an SQLite path is deleted first. ``--explain`` also prints the plans of the assignment and progress queries.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlft.label import store  # noqa: E402
from rlft.label.db import A, E, L, P, normalise_url, open_database, utcnow  # noqa: E402


def fresh_database(dsn: str) -> str:
    """Drop and recreate the database ``dsn`` names; return its SQLAlchemy URL."""
    url = normalise_url(dsn)
    if url.startswith("sqlite"):
        path = Path(make_url(url).database)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return url
    parsed = make_url(url)
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    admin.dispose()
    return url


def populate(url: str, examples: int, overlap: int, labelers: int, prelabeled: float, seed: int) -> list[str]:
    """Bulk-insert ``examples`` pairs with their slots and ``labelers`` labelers; return the labelers' tokens.

    The first ``prelabeled`` fraction of the examples is fully voted on, by the same labelers (example ``i``'s slot
    ``s`` by labeler ``(i + s) % labelers``), so the free slots start deep inside the table and every labeler has
    a history, as in a running campaign.
    """
    if not overlap <= labelers:
        raise SystemExit("--overlap must not exceed --labelers")
    engine = open_database(url)
    rng = random.Random(seed)
    now = utcnow()
    tokens = [store.add_labeler(engine, f"labeler{i}") for i in range(labelers)]
    with engine.connect() as conn:
        ids_by_name = dict(conn.execute(text("SELECT name, id FROM labelers")).all())
    labeler_ids = [ids_by_name[f"labeler{i}"] for i in range(labelers)]
    n_done = int(prelabeled * examples)
    chunk = 5000
    with engine.begin() as conn:
        for start in range(0, examples, chunk):
            ids = range(start + 1, min(examples, start + chunk) + 1)
            conn.execute(
                insert(E),
                [
                    {
                        "id": i,
                        "content_hash": f"{i:064x}",
                        "prompt_json": json.dumps([{"role": "user", "content": f"question {i} " + "x" * 200}]),
                        "response_a": f"answer A {i} " + "y" * 400,
                        "response_b": f"answer B {i} " + "z" * 400,
                        "model_a": "small",
                        "model_b": "big",
                        "category": rng.choice(["chat", "code", "math"]),
                        "overlap": overlap,
                        "created_at": now,
                    }
                    for i in ids
                ],
            )
            slots = []
            votes = []
            for i in ids:
                for s in range(overlap):
                    slot_id = (i - 1) * overlap + s + 1
                    done = i <= n_done
                    by = labeler_ids[(i + s) % labelers]
                    slots.append(
                        {
                            "id": slot_id,
                            "example_id": i,
                            "slot": s,
                            "labeler_id": by if done else None,
                            "swapped": False,
                            "leased_at": now if done else None,
                            "lease_expires_at": now if done else None,
                            "completed_at": now if done else None,
                        }
                    )
                    if done:
                        votes.append(
                            {
                                "id": slot_id,
                                "assignment_id": slot_id,
                                "example_id": i,
                                "labeler_id": by,
                                "choice": "a",
                                "shown_choice": "left",
                                "swapped": False,
                                "confidence": 3,
                                "created_at": now,
                            }
                        )
            conn.execute(insert(A), slots)
            if votes:
                conn.execute(insert(P), votes)
        if engine.dialect.name == "postgresql":  # explicit ids were inserted: move the sequences past them
            for table in (E, A, P):
                sequence = f"pg_get_serial_sequence('{table.name}', 'id')"
                conn.execute(text(f"SELECT setval({sequence}, (SELECT max(id) FROM {table.name}))"))
    store.refresh_statistics(engine)
    if engine.dialect.name == "postgresql":  # a long-lived database is vacuumed: no autovacuum of the fill mid-run
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()
    return tokens


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def post(client: httpx.AsyncClient, log: dict, path: str, **kwargs) -> httpx.Response:
    """POST, retrying once on a dropped connection as any real client would (counted)."""
    try:
        return await client.post(path, **kwargs)
    except httpx.TransportError:
        log["transport_retries"] += 1
        return await client.post(path, **kwargs)


async def labeler(client: httpx.AsyncClient, token: str, seed: int, votes: int, log: dict) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(votes):
        t0 = time.perf_counter()
        response = await post(client, log, "/api/next", headers=headers)
        log["next"].append(time.perf_counter() - t0)
        log["status"][response.status_code] += 1
        task = response.json()["task"]
        if task is None:
            return
        body = {"assignment_id": task["assignment_id"], "choice": rng.choice("ab"), "time_spent_s": rng.random()}
        t0 = time.perf_counter()
        response = await post(client, log, "/api/preferences", json=body, headers=headers)
        log["submit"].append(time.perf_counter() - t0)
        log["status"][response.status_code] += 1


def run_load(url: str, tokens: list[str], votes: int, concurrency: int) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "rlft", "label", "serve", "--db", url, "--port", str(port), "--no-ui"]
    cmd += ["--log-level", "warning", "--concurrency", str(concurrency)]
    log_file = tempfile.TemporaryFile("w+")
    server = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                log_file.seek(0)
                raise RuntimeError(f"server did not start:\n{log_file.read()}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        log = {"next": [], "submit": [], "status": Counter(), "transport_retries": 0}

        async def main() -> None:
            limits = httpx.Limits(max_connections=len(tokens), max_keepalive_connections=len(tokens))
            async with httpx.AsyncClient(base_url=base, timeout=120.0, limits=limits) as client:
                await asyncio.gather(*(labeler(client, t, i, votes, log) for i, t in enumerate(tokens)))

        gc.collect()  # as in tests/label/test_load.py: the load generator does not pause all "labelers" at once
        gc.freeze()
        gc.disable()
        try:
            started = time.perf_counter()
            asyncio.run(main())
            elapsed = time.perf_counter() - started
        finally:
            gc.enable()
            gc.unfreeze()
    finally:
        server.terminate()
        server.wait(timeout=30)
    everything = log["next"] + log["submit"]
    figures = {"requests": len(everything), "seconds": round(elapsed, 1)}
    figures["votes_per_s"] = round(len(log["submit"]) / elapsed, 1)
    for name, values in (("next", log["next"]), ("submit", log["submit"]), ("all", everything)):
        for q in (0.5, 0.95, 0.99):
            figures[f"{name}_p{int(q * 100)}_ms"] = round(1000 * percentile(values, q), 1)
    figures["max_ms"] = round(1000 * max(everything), 1)
    figures["status"] = dict(log["status"])
    figures["transport_retries"] = log["transport_retries"]
    return figures


def explain(url: str) -> None:
    """Print the plans of the per-request queries (PostgreSQL: EXPLAIN ANALYZE; SQLite: EXPLAIN QUERY PLAN)."""
    from rlft.label import queries

    engine = create_engine(url)
    with engine.connect() as conn:
        labeler_id = conn.execute(select_labeler()).scalar_one()
    for name, stmt in (
        ("claim (free slot)", store.candidate_query(labeler_id, A.c.labeler_id.is_(None), set())),
        ("progress", queries.progress_query(labeler_id, utcnow())),
    ):
        compiled = stmt.compile(engine, compile_kwargs={"literal_binds": True})
        prefix = "EXPLAIN ANALYZE " if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN "
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(prefix + str(compiled)).all()
        print(f"--- {name}")
        print("\n".join(" | ".join(str(c) for c in row) for row in rows))
    engine.dispose()


def select_labeler():
    from sqlalchemy import select

    return select(L.c.id).where(L.c.name == "labeler0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", required=True, help="SQLite file path or postgresql:// URL (recreated!)")
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--labelers", type=int, default=50)
    parser.add_argument("--votes", type=int, default=20, help="votes each labeler casts during the measurement")
    parser.add_argument("--overlap", type=int, default=2)
    parser.add_argument("--prelabeled", type=float, default=0.5, help="fraction of examples already voted on")
    parser.add_argument("--concurrency", type=int, default=2, help="rlft label serve --concurrency")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--explain", action="store_true", help="print the query plans too")
    parser.add_argument("--reuse", action="store_true", help="skip the fill: the database is already populated")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.reuse:
        url = normalise_url(args.dsn)
        engine = open_database(url)  # also migrates a database written by an older rlft
        tokens = [store.add_labeler(engine, f"bench{time.time_ns()}_{i}") for i in range(args.labelers)]
        engine.dispose()
    else:
        url = fresh_database(args.dsn)
        tokens = populate(url, args.examples, args.overlap, args.labelers, args.prelabeled, args.seed)
    fill_s = time.perf_counter() - started
    if args.explain:
        explain(url)
    figures = run_load(url, tokens, args.votes, args.concurrency)
    backend = "postgresql" if url.startswith("postgresql") else "sqlite"
    head = {"backend": backend, "examples": args.examples, "labelers": args.labelers, "fill_s": round(fill_s, 1)}
    print(json.dumps({**head, "date": dt.date.today().isoformat(), **figures}))


if __name__ == "__main__":
    main()
