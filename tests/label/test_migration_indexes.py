"""A version-3 labeling database is upgraded in place: the two indexes of schema version 4 appear, the data stays,
and upgrading again (or a database that has them already) changes nothing."""

from __future__ import annotations

from sqlalchemy import inspect, text

from rlft.label import queries, store
from rlft.label.db import PERFORMANCE_INDEXES, SCHEMA_VERSION, open_database, upgrade
from rlft.label.importing import PairRecord


def _indexes(engine) -> set[str]:
    return {index["name"] for index in inspect(engine).get_indexes("assignments")}


def test_version_3_database_gains_the_scale_indexes(db_url):
    engine = open_database(db_url)
    assert set(PERFORMANCE_INDEXES) <= _indexes(engine)  # a new database has them from the start
    store.import_records(engine, [PairRecord([{"role": "user", "content": "q"}], "a", "b", "m1", "m2")], overlap=2)
    token = store.add_labeler(engine, "alice")
    alice = store.authenticate(engine, token).id
    first = store.claim_next(engine, alice)
    with engine.begin() as conn:  # what rlft's schema version 3 wrote
        for name in PERFORMANCE_INDEXES:
            conn.execute(text(f"DROP INDEX {name}"))
        conn.execute(text("UPDATE schema_info SET version = 3"))
    engine.dispose()
    engine = open_database(db_url)
    assert set(PERFORMANCE_INDEXES) <= _indexes(engine) and SCHEMA_VERSION >= 4
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_info")).scalar_one() == SCHEMA_VERSION
    again = store.claim_next(engine, alice)  # the data stayed: alice gets her lease back
    assert again is not None and again.assignment_id == first.assignment_id
    assert queries.progress(engine, alice) == {"done": 0, "remaining": 1}
    with engine.begin() as conn:  # the step is idempotent (CREATE INDEX only where missing)
        conn.execute(text("UPDATE schema_info SET version = 3"))
    assert upgrade(engine) == SCHEMA_VERSION
    engine.dispose()
