"""Ids are 64-bit end to end: past 2**31 on PostgreSQL (whose INTEGER is 32-bit), an old database migrated in place,
and one bound in the API (1 <= id <= 2**63 - 1) so an out-of-range id is a 422 naming the field, never a 500."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text

from rlft.label import store
from rlft.label.api import create_app
from rlft.label.db import ID_COLUMNS, MAX_ID, SCHEMA_VERSION, open_database
from rlft.label.importing import PairRecord
from rlft.label.rankings import ensure_tables

PAIR = {"prompt": "2+2?", "response_a": "4", "response_b": "5", "model_a": "m1", "model_b": "m2"}
RANKING = {"prompt": "Best fruit?", "responses": ["apple", "pear", "plum"]}
PAST_32_BITS = 2**31 + 10


PLACEHOLDERS = {  # SQLite gives max(rowid) + 1: one row at the start of each table moves its ids past 32 bits
    "labelers": "(id, name, token_hash, is_admin, created_at) VALUES (:id, 'placeholder', 'x', 0, CURRENT_TIMESTAMP)",
    "examples": "(id, content_hash, prompt_json, response_a, response_b, overlap, created_at) "
    "VALUES (:id, 'x', '[]', 'a', 'b', 1, CURRENT_TIMESTAMP)",
    "assignments": "(id, example_id, slot, swapped) VALUES (:id, :id, 0, 0)",
    "ranking_tasks": "(id, content_hash, prompt_json, responses_json, created_at) "
    "VALUES (:id, 'x', '[]', '[]', CURRENT_TIMESTAMP)",
}


def _start_ids_past_32_bits(engine) -> None:
    """Make every table's next id larger than a 32-bit column holds."""
    with engine.begin() as conn:
        for table in ID_COLUMNS:
            if engine.dialect.name == "postgresql":
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {PAST_32_BITS})"))
            elif table in PLACEHOLDERS:
                conn.execute(text(f"INSERT INTO {table} {PLACEHOLDERS[table]}"), {"id": PAST_32_BITS})


def _drop_placeholders(engine) -> None:
    """Once real rows follow them, the placeholders go (so none is handed out as work)."""
    if engine.dialect.name == "sqlite":
        with engine.begin() as conn:
            for table in ("assignments", "examples", "ranking_tasks"):
                conn.execute(text(f"DELETE FROM {table} WHERE id = :id"), {"id": PAST_32_BITS})


@pytest.fixture
def client(db_url):
    engine = open_database(db_url)
    ensure_tables(engine)
    _start_ids_past_32_bits(engine)
    admin = {"Authorization": f"Bearer {store.add_labeler(engine, 'root', admin=True)}"}
    alice = {"Authorization": f"Bearer {store.add_labeler(engine, 'alice')}"}
    with TestClient(create_app(engine, ui=False), raise_server_exceptions=False) as c:
        assert c.post("/api/import/pairs", json={"rows": [PAIR]}, headers=admin).status_code == 201
        assert c.post("/api/import/rankings", json={"rows": [RANKING]}, headers=admin).status_code == 201
        _drop_placeholders(engine)
        yield c, admin, alice, engine
    engine.dispose()


def test_labeling_works_with_ids_past_32_bits(client):
    c, admin, alice, _ = client
    task = c.post("/api/next", headers=alice).json()["task"]
    assert task["assignment_id"] > 2**31 and task["example_id"] > 2**31
    vote = c.post("/api/preferences", json={"assignment_id": task["assignment_id"], "choice": "a"}, headers=alice)
    assert vote.status_code == 201, vote.text
    ranking = c.post("/api/rankings/next", headers=alice).json()["task"]
    assert ranking["task_id"] > 2**31
    ranked = c.post("/api/rankings", json={"task_id": ranking["task_id"], "order": [0, 1, 2]}, headers=alice)
    assert ranked.status_code == 201, ranked.text
    assert c.get("/api/export/rankings", headers=admin).status_code == 200


@pytest.mark.parametrize("value", [MAX_ID + 1, 2**64, 0, -1])
def test_ids_out_of_range_are_422_naming_the_field(client, value):
    c, _, alice, _ = client
    vote = c.post("/api/preferences", json={"assignment_id": value, "choice": "a"}, headers=alice)
    assert vote.status_code == 422 and "assignment_id" in vote.text, vote.text
    ranked = c.post("/api/rankings", json={"task_id": value, "order": [0, 1, 2]}, headers=alice)
    assert ranked.status_code == 422 and "task_id" in ranked.text, ranked.text
    index = value if value != 0 else 9  # the response indices' bound is 0..8
    order = c.post("/api/rankings", json={"task_id": 1, "order": [0, index]}, headers=alice)
    assert order.status_code == 422 and "order" in order.text, order.text


def test_the_largest_id_is_looked_up_not_overflowed(client):
    c, _, alice, _ = client
    vote = c.post("/api/preferences", json={"assignment_id": MAX_ID, "choice": "a"}, headers=alice)
    assert vote.status_code == 404, vote.text
    ranked = c.post("/api/rankings", json={"task_id": MAX_ID, "order": [0, 1, 2]}, headers=alice)
    assert ranked.status_code == 404, ranked.text


def _id_types(engine) -> dict[str, str]:
    found = {}
    for table, columns in ID_COLUMNS.items():
        types = {c["name"]: str(c["type"]) for c in inspect(engine).get_columns(table)}
        found.update({f"{table}.{column}": types[column] for column in columns})
    return found


def test_a_version_2_database_gets_64_bit_ids_in_place(db_url):
    engine = open_database(db_url)
    ensure_tables(engine)
    store.import_records(engine, [PairRecord([{"role": "user", "content": "q"}], "a", "b", "m1", "m2")], overlap=1)
    token = store.add_labeler(engine, "alice")
    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as conn:  # what rlft's schema version 2 wrote: 32-bit ids and sequences on PostgreSQL
        if postgres:
            for table, columns in ID_COLUMNS.items():
                conn.execute(
                    text(f"ALTER TABLE {table} " + ", ".join(f"ALTER COLUMN {c} TYPE INTEGER" for c in columns))
                )
                conn.execute(text(f"ALTER SEQUENCE {table}_id_seq AS INTEGER"))
        conn.execute(text("UPDATE schema_info SET version = 2"))
    if postgres:
        assert set(_id_types(engine).values()) == {"INTEGER"}
    engine.dispose()
    engine = open_database(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_info")).scalar_one() == SCHEMA_VERSION >= 3
    if postgres:
        assert set(_id_types(engine).values()) == {"BIGINT"}
    _start_ids_past_32_bits(engine)
    assert store.authenticate(engine, token).name == "alice"  # the data stayed
    assert store.authenticate(engine, store.add_labeler(engine, "bob")).id > 2**31
    engine.dispose()
