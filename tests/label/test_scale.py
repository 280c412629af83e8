"""The per-request queries of the labeling server do work that does not grow with the number of examples.

At 100k examples the p99 on PostgreSQL had reached 687 ms (issue 33): the claim merge-joined every labeled example,
the progress counts read every slot, and ``ORDER BY id LIMIT 1`` walked the primary key. Here a 20k-example
database, half of it labeled (as in a running campaign), is checked without a clock: on PostgreSQL by the rows
``EXPLAIN ANALYZE`` reports each plan node read (returned or filtered out, times loops), on SQLite by the virtual
machine instructions the query ran. Each must stay far below one pass over the slots (40k rows here).
``scripts/bench_label_store.py`` measures the latencies themselves (docs/labeling.md, Performance).
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import event, insert, select, text

from rlft.label import queries, store
from rlft.label.db import A, E, L, P, make_engine, open_database, utcnow

EXAMPLES = 20_000
OVERLAP = 2
LABELERS = 50
SLOTS = EXAMPLES * OVERLAP
# "does not grow with the examples": at most this many rows per query, against 40k for one pass over the slots
WORK_BOUND = 2_000


def _fill(engine) -> dict[str, int]:
    """EXAMPLES examples with OVERLAP slots; the first half fully voted on by LABELERS labelers (2 x 200 each)."""
    names = [f"l{i}" for i in range(LABELERS)]
    for name in names:
        store.add_labeler(engine, name)
    with engine.connect() as conn:
        ids = dict(conn.execute(select(L.c.name, L.c.id)).all())
    now = utcnow()
    done = EXAMPLES // 2
    with engine.begin() as conn:
        conn.execute(
            insert(E),
            [
                {"id": i, "content_hash": f"{i:064x}", "prompt_json": "[]", "response_a": "a", "response_b": "b"}
                | {"overlap": OVERLAP, "created_at": now}
                for i in range(1, EXAMPLES + 1)
            ],
        )
        slots, votes = [], []
        for i in range(1, EXAMPLES + 1):
            for s in range(OVERLAP):
                slot_id, by = (i - 1) * OVERLAP + s + 1, ids[names[(i + s) % LABELERS]]
                labeled = i <= done
                slots.append(
                    {"id": slot_id, "example_id": i, "slot": s, "swapped": False}
                    | {"labeler_id": by if labeled else None, "completed_at": now if labeled else None}
                    | {"leased_at": now if labeled else None, "lease_expires_at": now if labeled else None}
                )
                if labeled:
                    votes.append(
                        {"id": slot_id, "assignment_id": slot_id, "example_id": i, "labeler_id": by}
                        | {"choice": "a", "shown_choice": "left", "swapped": False, "confidence": 3, "created_at": now}
                    )
        conn.execute(insert(A), slots)
        conn.execute(insert(P), votes)
        if engine.dialect.name == "postgresql":
            for table in ("examples", "assignments", "preferences"):
                sequence = f"pg_get_serial_sequence('{table}', 'id')"
                conn.execute(text(f"SELECT setval({sequence}, (SELECT max(id) FROM {table}))"))
    store.refresh_statistics(engine)
    return ids


def _plan_rows(node: dict) -> float:
    """Rows a plan node and its children read: returned plus filtered out, times loops."""
    loops = node.get("Actual Loops", 1)
    own = sum(node.get(key, 0) for key in ("Actual Rows", "Rows Removed by Filter", "Rows Removed by Index Recheck"))
    return own * loops + sum(_plan_rows(child) for child in node.get("Plans", []))


def _work(engine, stmt) -> float:
    """PostgreSQL: rows read per EXPLAIN ANALYZE; SQLite: virtual machine instructions / 10 (about one per row)."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            sql = str(stmt.compile(engine, compile_kwargs={"literal_binds": True}))
            plan = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}").scalar_one()
            plan = json.loads(plan) if isinstance(plan, str) else plan
            result = _plan_rows(plan[0]["Plan"])
        else:
            steps = [0]

            def tick() -> int:
                steps[0] += 1
                return 0

            raw = conn.connection.dbapi_connection
            raw.set_progress_handler(tick, 100)
            try:
                conn.execute(stmt).all()
            finally:
                raw.set_progress_handler(None, 0)
            result = steps[0] * 10  # one tick per 100 instructions; ~10 instructions per row visited
        conn.rollback()  # the claim's FOR UPDATE took row locks
    return result


def _naive_remaining(engine, labeler_id: int) -> int:
    """What progress() must answer, counted the obvious way (every slot read)."""
    now = utcnow()
    with engine.connect() as conn:
        rows = conn.execute(select(A.c.example_id, A.c.labeler_id, A.c.completed_at, A.c.lease_expires_at)).all()
    touched = {r.example_id for r in rows if r.labeler_id == labeler_id}
    open_ = {
        r.example_id
        for r in rows
        if r.labeler_id is None
        or (r.completed_at is None and r.lease_expires_at is not None and r.lease_expires_at < now)
    }
    pending = sum(1 for r in rows if r.labeler_id == labeler_id and r.completed_at is None)
    return len(open_ - touched) + pending


@pytest.fixture
def big(db_url):
    engine = open_database(db_url)
    engine.dispose()
    engine = make_engine(db_url)
    ids = _fill(engine)
    yield engine, ids
    engine.dispose()


def test_per_request_queries_do_not_read_the_whole_database(big):
    engine, ids = big
    alice, bob = ids["l0"], ids["l1"]
    # a lease of bob's that has run out, so the expired-lease paths have something to find
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE assignments SET labeler_id = :b, leased_at = :t, lease_expires_at = :t "
                "WHERE example_id = :e AND slot = 0"
            ),
            {"b": bob, "t": utcnow().replace(year=2000), "e": EXAMPLES - 5},
        )
    now = utcnow()
    work = {
        "claim, free slot": _work(engine, store.candidate_query(alice, A.c.labeler_id.is_(None), set())),
        "claim, expired lease": _work(engine, store.candidate_query(alice, store.expired_lease(now), set())),
        "progress, labeler terms": _work(engine, queries.progress_query(alice, now, with_open=False)),
    }
    assert max(work.values()) < WORK_BOUND < SLOTS, work

    # the rewritten queries still answer what they did
    task = store.claim_next(engine, alice)
    assert task is not None and task.example_id == EXAMPLES // 2 + 1  # the first free slot in example order
    queries._open_cache.clear()
    assert queries.progress(engine, alice)["remaining"] == _naive_remaining(engine, alice)
    assert queries.progress(engine, bob)["remaining"] == _naive_remaining(engine, bob)
    expired = store.claim_next(engine, ids["l2"])
    assert expired is not None
    store.submit_preference(engine, alice, task.assignment_id, "a")
    assert queries.progress(engine, alice)["done"] == EXAMPLES // 2 * OVERLAP // LABELERS + 1


def test_the_database_wide_count_is_reused_for_a_moment_once_large(big, monkeypatch):
    engine, ids = big
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    counting = lambda: [s for s in statements if "count(" in s]  # noqa: E731 (not BEGIN, ROLLBACK)
    queries._open_cache.clear()
    first = queries.progress(engine, ids["l0"])
    second = queries.progress(engine, ids["l0"])
    assert first == second and first["remaining"] >= queries.OPEN_CACHE_MIN
    first_sql, second_sql = counting()
    assert "DISTINCT assignments.example_id" in first_sql and "DISTINCT assignments.example_id" not in second_sql
    # below the threshold every call counts afresh (small databases, the end of a campaign: exact)
    monkeypatch.setattr(queries, "OPEN_CACHE_MIN", 10**9)
    queries._open_cache.clear()
    queries.progress(engine, ids["l0"])
    queries.progress(engine, ids["l0"])
    assert all("DISTINCT assignments.example_id" in s for s in counting()[2:]) and len(counting()) == 4
