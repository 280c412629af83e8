"""A version-1 labeling database is upgraded in place: the free-slot index appears, the data stays."""

from __future__ import annotations

from sqlalchemy import inspect, text

from rlft.label import queries, store
from rlft.label.db import SCHEMA_VERSION, open_database
from rlft.label.importing import PairRecord


def test_version_1_database_gains_the_free_slot_index(db_url):
    engine = open_database(db_url)
    store.import_records(engine, [PairRecord([{"role": "user", "content": "q"}], "a", "b", "m1", "m2")], overlap=2)
    with engine.begin() as conn:  # what a database written by the previous rlft looks like
        conn.execute(text("DROP INDEX ix_assignments_free"))
        conn.execute(text("UPDATE schema_info SET version = 1"))
    engine.dispose()
    engine = open_database(db_url)
    names = {index["name"] for index in inspect(engine).get_indexes("assignments")}
    assert "ix_assignments_free" in names and SCHEMA_VERSION >= 2
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_info")).scalar_one() == SCHEMA_VERSION
    token = store.add_labeler(engine, "alice")
    task = store.claim_next(engine, store.authenticate(engine, token).id)
    assert task is not None and queries.progress(engine, store.authenticate(engine, token).id)["remaining"] == 1
    engine.dispose()
