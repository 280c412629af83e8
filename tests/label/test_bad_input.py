"""Hostile and malformed values get a 422 that names the field, never a 500, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from rlft.label import store
from rlft.label.api import create_app
from rlft.label.db import open_database

PAIR = {"prompt": "2+2?", "response_a": "4", "response_b": "5", "model_a": "m1", "model_b": "m2"}


@pytest.fixture
def client(db_url):
    engine = open_database(db_url)
    admin = {"Authorization": f"Bearer {store.add_labeler(engine, 'root', admin=True)}"}
    alice = {"Authorization": f"Bearer {store.add_labeler(engine, 'alice')}"}
    with TestClient(create_app(engine, ui=False), raise_server_exceptions=False) as c:
        assert (
            c.post("/api/import/pairs", json={"rows": [PAIR, {**PAIR, "prompt": "3+3?"}]}, headers=admin).status_code
            == 201
        )
        yield c, admin, alice
    engine.dispose()


def _raw(c: TestClient, path: str, text: str, headers: dict):
    return c.post(path, content=text.encode(), headers={**headers, "Content-Type": "application/json"})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("time_spent_s", "NaN"),
        ("time_spent_s", "Infinity"),
        ("time_spent_s", "-Infinity"),
        ("time_spent_s", "1e308"),
        ("confidence", "NaN"),
        ("assignment_id", "99999999999999999999"),
        ("assignment_id", "-1"),
        ("reasoning", '"a\\u0000b"'),
    ],
)
def test_bad_vote_values_are_422_naming_the_field(client, field, value):
    c, _, alice = client
    aid = c.post("/api/next", headers=alice).json()["task"]["assignment_id"]
    body = {"assignment_id": str(aid), "choice": '"a"', field: value}
    text = "{" + ", ".join(f'"{k}": {v}' for k, v in body.items()) + "}"
    response = _raw(c, "/api/preferences", text, alice)
    assert response.status_code == 422, (field, value, response.text)
    assert field in str(response.json()["detail"]), response.text
    # the lease is intact: a good vote still goes through
    assert c.post("/api/preferences", json={"assignment_id": aid, "choice": "a"}, headers=alice).status_code == 201


def test_bad_import_and_labeler_values_are_422(client):
    c, admin, _ = client
    nul = c.post("/api/import/pairs", json={"rows": [{**PAIR, "response_a": "x\u0000y"}]}, headers=admin)
    assert nul.status_code == 422 and "rows[0].response_a" in nul.text
    assert _raw(c, "/api/import/pairs", '{"rows": [1], "overlap": NaN}', admin).status_code == 422
    assert c.post("/api/labelers", json={"name": "bad\u0000name"}, headers=admin).status_code == 422
