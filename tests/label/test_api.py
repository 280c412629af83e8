"""Every API endpoint, its auth failures and malformed input, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from rlft.label import queries, store
from rlft.label.api import create_app
from rlft.label.db import SCHEMA_VERSION, open_database
from rlft.label.importing import parse_pair_rows

PAIRS = [
    {"prompt": "What is 2+2?", "response_a": "4", "response_b": "5", "model_a": "m1", "model_b": "m2"},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
        "response_a": "Lyon",
        "response_b": "Paris",
        "model_a": "m1",
        "model_b": "m2",
        "category": "geo",
    },
    {"prompt": "Say hi", "response_a": "hi", "response_b": "hello", "model_a": "m2", "model_b": "m1"},
]


@dataclass
class Ctx:
    client: TestClient
    engine: object
    admin: dict
    alice: dict
    bob: dict


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def ctx(db_url):
    engine = open_database(db_url)
    admin = bearer(store.add_labeler(engine, "root", admin=True))
    alice = bearer(store.add_labeler(engine, "alice"))
    bob = bearer(store.add_labeler(engine, "bob"))
    with TestClient(create_app(engine, ui=False, default_overlap=2)) as client:
        yield Ctx(client, engine, admin, alice, bob)
    engine.dispose()


def test_healthz_needs_no_token(ctx):
    assert ctx.client.get("/healthz").json() == {"ok": True, "schema_version": SCHEMA_VERSION}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/api/me", None),
        ("post", "/api/next", None),
        ("post", "/api/preferences", {"assignment_id": 1, "choice": "a"}),
        ("get", "/api/stats", None),
        ("post", "/api/labelers", {"name": "eve"}),
        ("post", "/api/import/pairs", {"rows": PAIRS}),
        (
            "post",
            "/api/import/generations",
            {"a": [{"prompt": "x", "completion": "y"}], "b": [{"prompt": "x", "completion": "z"}]},
        ),
        ("get", "/api/export/pairs", None),
        ("get", "/api/export/winrates", None),
    ],
)
def test_every_endpoint_rejects_missing_and_unknown_tokens(ctx, method, path, body):
    kwargs = {"json": body} if body is not None else {}
    missing = getattr(ctx.client, method)(path, **kwargs)
    assert missing.status_code == 401 and "Bearer" in missing.json()["detail"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = getattr(ctx.client, method)(path, headers=bearer("not-a-token"), **kwargs)
    assert wrong.status_code == 401 and wrong.json()["detail"] == "unknown token"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/api/labelers", {"name": "eve"}),
        ("post", "/api/import/pairs", {"rows": PAIRS}),
        (
            "post",
            "/api/import/generations",
            {"a": [{"prompt": "x", "completion": "y"}], "b": [{"prompt": "x", "completion": "z"}]},
        ),
        ("get", "/api/export/pairs", None),
        ("get", "/api/export/winrates", None),
    ],
)
def test_admin_endpoints_forbid_labelers(ctx, method, path, body):
    kwargs = {"json": body} if body is not None else {}
    response = getattr(ctx.client, method)(path, headers=ctx.alice, **kwargs)
    assert response.status_code == 403 and "admin" in response.json()["detail"]


def test_import_label_export_round_trip(ctx):
    c = ctx.client
    imported = c.post("/api/import/pairs", json={"rows": PAIRS}, headers=ctx.admin)
    assert imported.status_code == 201 and imported.json() == {"inserted": 3, "duplicates": 0, "slots": 6}
    again = c.post("/api/import/pairs", json={"rows": PAIRS[:1], "overlap": 1}, headers=ctx.admin).json()
    assert again == {"inserted": 0, "duplicates": 1, "slots": 0}

    assert c.get("/api/me", headers=ctx.alice).json() == {
        "name": "alice",
        "is_admin": False,
        "progress": {"done": 0, "remaining": 3},
    }
    seen: dict[str, list[int]] = {"alice": [], "bob": []}
    # alice prefers the *stored* response "Paris"/"4"/"hello"... by content; bob always clicks the left one.
    wanted = {"4", "Paris", "hello"}
    for name, headers in (("alice", ctx.alice), ("bob", ctx.bob)):
        while (task := c.post("/api/next", headers=headers).json()["task"]) is not None:
            seen[name].append(task["example_id"])
            assert task["prompt"][-1]["role"] == "user" and "model_a" not in task  # labelers are blind to models
            if name == "alice":
                choice = "a" if task["response_a"] in wanted else "b"
            else:
                choice = "a"
            r = c.post(
                "/api/preferences",
                json={"assignment_id": task["assignment_id"], "choice": choice, "confidence": 4, "reasoning": "ok"},
                headers=headers,
            )
            assert r.status_code == 201, r.text
    assert sorted(seen["alice"]) == sorted(seen["bob"]) == [1, 2, 3]
    assert c.get("/api/me", headers=ctx.bob).json()["progress"] == {"done": 3, "remaining": 0}

    votes = queries.load_votes(ctx.engine)
    assert len(votes) == 6
    alice_votes = {v.example_id: v.choice for v in votes if v.labeler == "alice"}
    assert alice_votes == {1: "a", 2: "b", 3: "b"}  # stored A/B, whatever side each was shown on
    for v in votes:  # stored choice is consistent with the recorded side and swap
        if v.choice != "tie":
            assert (v.shown_choice == "left") == ((v.choice == "a") != v.swapped)

    stats = c.get("/api/stats", headers=ctx.bob).json()
    assert stats["overview"] == {"examples": 3, "slots": 6, "completed": 6, "leased": 0, "labelers": 2}
    assert stats["quality"]["votes"] == 6 and len(stats["quality"]["labelers"]) == 2

    exported = c.get("/api/export/pairs", headers=ctx.admin)
    assert exported.status_code == 200
    summary = json.loads(exported.headers["x-export-summary"])
    rows = [json.loads(line) for line in exported.text.splitlines()]
    assert summary["written"] == len(rows) and summary["written"] + summary["split"] == 3
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["chosen"] in wanted  # wherever bob disagreed the item is a split and skipped

    rates = c.get("/api/export/winrates", headers=ctx.admin).json()
    assert len(rates) == 1 and rates[0]["model_x"] == "m1" and rates[0]["items"] == 3


def test_malformed_input_gets_clear_4xx(ctx):
    c = ctx.client
    bad_rows = [{"prompt": "", "response_a": "x", "response_b": "y"}, {"prompt": "p", "response_a": 3}, "text"]
    r = c.post("/api/import/pairs", json={"rows": bad_rows}, headers=ctx.admin)
    assert r.status_code == 422
    assert r.json()["errors"] == [
        "rows[0]: prompt: must not be empty",
        "rows[1]: response_a: expected a string, got int",
        "rows[2]: expected a JSON object, got str",
    ]
    assert c.post("/api/import/pairs", json={"rows": []}, headers=ctx.admin).status_code == 422
    assert c.post("/api/import/pairs", json={"rows": PAIRS, "overlap": 0}, headers=ctx.admin).status_code == 422
    assert c.post("/api/import/pairs", json={"rowz": PAIRS}, headers=ctx.admin).status_code == 422
    assert c.post("/api/import/pairs", content=b"{not json", headers=ctx.admin).status_code == 422

    c.post("/api/import/pairs", json={"rows": PAIRS}, headers=ctx.admin)
    task = c.post("/api/next", headers=ctx.alice).json()["task"]
    aid = task["assignment_id"]
    for body in (
        {"assignment_id": aid, "choice": "left"},
        {"assignment_id": aid, "choice": "a", "confidence": 6},
        {"assignment_id": aid, "choice": "a", "confidence": 0},
        {"assignment_id": aid, "choice": "a", "time_spent_s": -1},
        {"assignment_id": "x", "choice": "a"},
        {"choice": "a"},
        {"assignment_id": aid, "choice": "a", "extra": 1},
    ):
        r = c.post("/api/preferences", json=body, headers=ctx.alice)
        assert r.status_code == 422, body
    assert c.post("/api/preferences", json={"assignment_id": 9999, "choice": "a"}, headers=ctx.alice).status_code == 404
    not_yours = c.post("/api/preferences", json={"assignment_id": aid, "choice": "a"}, headers=ctx.bob)
    assert not_yours.status_code == 409 and "not leased to you" in not_yours.json()["detail"]
    assert (
        c.post("/api/preferences", json={"assignment_id": aid, "choice": "tie"}, headers=ctx.alice).status_code == 201
    )
    twice = c.post("/api/preferences", json={"assignment_id": aid, "choice": "a"}, headers=ctx.alice)
    assert twice.status_code == 409 and "already submitted" in twice.json()["detail"]
    assert len(queries.load_votes(ctx.engine)) == 1

    assert c.post("/api/labelers", json={"name": "alice"}, headers=ctx.admin).status_code == 409
    assert c.post("/api/labelers", json={"name": ""}, headers=ctx.admin).status_code == 422
    assert c.get("/api/export/pairs?min_agreement=2", headers=ctx.admin).status_code == 422


def test_admin_creates_labeler_whose_token_works(ctx):
    r = ctx.client.post("/api/labelers", json={"name": "eve"}, headers=ctx.admin)
    assert r.status_code == 201
    assert ctx.client.get("/api/me", headers=bearer(r.json()["token"])).json()["name"] == "eve"


def test_import_generations_reports_unmatched(ctx):
    a = [{"prompt": "p1", "completion": "a1"}, {"prompt": "p2", "response": "a2"}, {"prompt": "p3", "completion": "a3"}]
    b = [
        {"prompt": "p2", "completion": "b2", "model": "big"},
        {"prompt": "p1", "completion": "b1"},
        {"prompt": "p4", "completion": "b4"},
    ]
    r = ctx.client.post("/api/import/generations", json={"a": a, "b": b, "model_a": "small"}, headers=ctx.admin)
    assert r.status_code == 201
    body = r.json()
    assert (body["inserted"], body["unmatched_a"], body["unmatched_b"]) == (2, 1, 1)
    assert any("a[2]" in n for n in body["notes"]) and any("b[2]" in n for n in body["notes"])
    models = {(v["model_a"], v["model_b"]) for v in queries.load_examples(ctx.engine, [1, 2]).values()}
    assert models == {("small", "big"), ("small", "model_b")}
    bad = ctx.client.post("/api/import/generations", json={"a": [{"prompt": "x"}], "b": b}, headers=ctx.admin)
    assert bad.status_code == 422 and bad.json()["errors"] == [
        "a[0]: completion/response: missing (keys present: ['prompt'])"
    ]


def test_expired_lease_is_reassigned_and_late_submit_refused(db_url):
    engine = open_database(db_url)
    store.import_records(engine, parse_pair_rows([("rows[0]", PAIRS[0])]), overlap=1)
    alice, bob = (bearer(store.add_labeler(engine, n)) for n in ("alice", "bob"))
    with TestClient(create_app(engine, ui=False, lease_seconds=1.0)) as c:
        first = c.post("/api/next", headers=alice).json()["task"]
        assert c.post("/api/next", headers=bob).json()["task"] is None  # the only slot is leased to alice
        again = c.post("/api/next", headers=alice).json()["task"]
        assert again["assignment_id"] == first["assignment_id"]  # reload returns the same item, not a new slot
        time.sleep(1.3)
        taken = c.post("/api/next", headers=bob).json()["task"]
        assert taken is not None and taken["example_id"] == first["example_id"]
        late = c.post("/api/preferences", json={"assignment_id": first["assignment_id"], "choice": "a"}, headers=alice)
        assert late.status_code == 409
        ok = c.post("/api/preferences", json={"assignment_id": taken["assignment_id"], "choice": "b"}, headers=bob)
        assert ok.status_code == 201
        assert c.post("/api/next", headers=alice).json()["task"] is None
    assert [(v.labeler, v.example_id) for v in queries.load_votes(engine)] == [("bob", 1)]
    engine.dispose()
