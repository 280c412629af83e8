"""Ranking collection through the API: import K-response tasks, rank them as shown (shuffled), export ranked
records that rlft trains on directly."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from rlft.data.formats import convert
from rlft.data.sources import Row
from rlft.label import store
from rlft.label.api import create_app
from rlft.label.db import open_database

TASKS = [
    {"prompt": "Best fruit?", "responses": ["apple", "pear", "plum"]},
    {"prompt": [{"role": "user", "content": "Say hi"}], "responses": ["hi", "hello", "hey", "yo"]},
]


@pytest.fixture
def api(tmp_path):
    engine = open_database(str(tmp_path / "labels.db"))
    tokens = {
        name: {"Authorization": f"Bearer {store.add_labeler(engine, name, admin=name == 'root')}"}
        for name in ("root", "alice", "bob")
    }
    with TestClient(create_app(engine, ui=False)) as client:
        yield client, tokens
    engine.dispose()


def _rank(client, who: dict, preferred: list[str]) -> None:
    """Rank the next task so that the replies come out in ``preferred`` order (whatever order they are shown in)."""
    task = client.post("/api/rankings/next", headers=who).json()["task"]
    order = [task["responses"].index(r) for r in preferred]
    response = client.post("/api/rankings", json={"task_id": task["task_id"], "order": order}, headers=who)
    assert response.status_code == 201, response.text


def test_rank_and_export_ranked_records(api):
    client, t = api
    assert client.post("/api/import/rankings", json={"rows": TASKS}, headers=t["root"]).json() == {
        "inserted": 2,
        "duplicates": 0,
    }
    assert client.post("/api/import/rankings", json={"rows": TASKS[:1]}, headers=t["root"]).json()["duplicates"] == 1
    _rank(client, t["alice"], ["pear", "apple", "plum"])
    _rank(client, t["bob"], ["pear", "plum", "apple"])
    _rank(client, t["alice"], ["hello", "hi", "hey", "yo"])
    assert client.post("/api/rankings/next", headers=t["alice"]).json() == {"task": None}
    exported = client.get("/api/export/rankings", headers=t["root"])
    lines = [r for r in exported.text.splitlines()]
    import json

    records = [json.loads(x) for x in lines]
    # mean positions: pear 0, apple 1.5, plum 1.5 -> tie broken by stored order (apple first)
    assert records[0] == {"prompt": "Best fruit?", "responses": ["pear", "apple", "plum"], "votes": 2}
    assert records[1]["responses"] == ["hello", "hi", "hey", "yo"]
    rows = [Row(r, "export", i + 1) for i, r in enumerate(records)]
    pairs, report = convert(rows, kind="pairs")
    assert report.format == "ranked" and len(pairs) == 3 + 6  # every (better, worse) pair
    assert json.loads(exported.headers["X-Export-Summary"]) == {"exported": 2, "unranked": 0, "too_few_votes": 0}
    two = client.get("/api/export/rankings", params={"min_votes": 2}, headers=t["root"])
    assert len(two.text.splitlines()) == 1


def test_bad_rankings_are_rejected_with_a_reason(api):
    client, t = api
    bad = client.post(
        "/api/import/rankings", json={"rows": [{"prompt": "q", "responses": ["a", "a"]}]}, headers=t["root"]
    )
    assert bad.status_code == 422 and "rows[0].responses" in bad.json()["detail"]
    assert client.post("/api/import/rankings", json={"rows": TASKS}, headers=t["alice"]).status_code == 403
    client.post("/api/import/rankings", json={"rows": TASKS}, headers=t["root"])
    task = client.post("/api/rankings/next", headers=t["bob"]).json()["task"]
    wrong = client.post("/api/rankings", json={"task_id": task["task_id"], "order": [0, 0, 1]}, headers=t["bob"])
    assert wrong.status_code == 422 and "permutation" in wrong.json()["detail"]
    ok = client.post("/api/rankings", json={"task_id": task["task_id"], "order": [2, 1, 0]}, headers=t["bob"])
    assert ok.status_code == 201
    again = client.post("/api/rankings", json={"task_id": task["task_id"], "order": [2, 1, 0]}, headers=t["bob"])
    assert again.status_code == 409
    assert client.post("/api/rankings", json={"task_id": 99, "order": [0, 1]}, headers=t["bob"]).status_code == 404
