"""Many labelers at once against the real server (``rlft label serve`` on loopback), on SQLite and PostgreSQL.

Checks: no vote is lost, no item goes to more than ``overlap`` labelers, no labeler gets an item twice, no 5xx.
The measured figures are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections import Counter, defaultdict

import httpx

from rlft.label import queries, store
from rlft.label.db import open_database
from rlft.label.importing import PairRecord

N_LABELERS = 24
N_EXAMPLES = 40
OVERLAP = 3


def _records(n: int) -> list[PairRecord]:
    return [
        PairRecord([{"role": "user", "content": f"question {i}"}], f"answer A{i}", f"answer B{i}", "small", "big")
        for i in range(n)
    ]


def _labeler(base: str, token: str, barrier: threading.Barrier, seed: int, log: dict) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=60.0) as client:
        barrier.wait()
        for _ in range(N_EXAMPLES + 5):  # bounded: a labeler can never need more rounds than there are items
            t0 = time.perf_counter()
            response = client.post("/api/next")
            log["latency"].append(time.perf_counter() - t0)
            log["status"].append(response.status_code)
            task = response.json()["task"]
            if task is None:
                break
            log["fetched"].append(task["example_id"])
            choice = rng.choice(["a", "b", "tie"])
            body = {"assignment_id": task["assignment_id"], "choice": choice, "confidence": rng.randint(1, 5)}
            t0 = time.perf_counter()
            response = client.post("/api/preferences", json=body)
            log["latency"].append(time.perf_counter() - t0)
            log["status"].append(response.status_code)
            if response.status_code == 201:
                log["submitted"].append((task["example_id"], choice, task["response_a"]))


def test_parallel_labelers_lose_nothing_and_respect_overlap(db_url, serve):
    engine = open_database(db_url)
    store.import_records(engine, _records(N_EXAMPLES), overlap=OVERLAP)
    store.add_labeler(engine, "root", admin=True)
    tokens = {f"lab{i:02d}": store.add_labeler(engine, f"lab{i:02d}") for i in range(N_LABELERS)}
    server = serve(db_url, "--no-ui")

    barrier = threading.Barrier(N_LABELERS)
    logs = {name: defaultdict(list) for name in tokens}
    threads = [
        threading.Thread(target=_labeler, args=(server.url, token, barrier, i, logs[name]))
        for i, (name, token) in enumerate(tokens.items())
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    elapsed = time.perf_counter() - start
    assert not any(t.is_alive() for t in threads), "a labeler thread hung"

    statuses = Counter(s for log in logs.values() for s in log["status"])
    assert set(statuses) <= {200, 201}, f"unexpected HTTP statuses: {statuses}\n{server.output()[-3000:]}"

    holders: dict[int, set[str]] = defaultdict(set)
    for name, log in logs.items():
        assert len(log["fetched"]) == len(set(log["fetched"])), f"{name} got an item twice"
        for example_id in log["fetched"]:
            holders[example_id].add(name)
    assert max(len(h) for h in holders.values()) <= OVERLAP
    assert len(holders) == N_EXAMPLES and all(len(h) == OVERLAP for h in holders.values())

    votes = queries.load_votes(engine)
    submitted = {
        (name, ex): (choice, shown_a) for name, log in logs.items() for ex, choice, shown_a in log["submitted"]
    }
    assert len(votes) == len(submitted) == N_EXAMPLES * OVERLAP  # every vote the clients saw accepted is stored
    for vote in votes:
        choice, shown_a = submitted[vote.labeler, vote.example_id]
        left_is_a = shown_a.startswith("answer A")
        expected = choice if choice == "tie" or left_is_a else {"a": "b", "b": "a"}[choice]
        assert vote.choice == expected and vote.swapped == (not left_is_a)
    assert Counter(v.example_id for v in votes) == Counter({i: OVERLAP for i in range(1, N_EXAMPLES + 1)})
    assert queries.overview(engine)["leased"] == 0

    latencies = [x for log in logs.values() for x in log["latency"]]
    backend = db_url.split(":")[0] if "://" in db_url else "sqlite"
    print(
        f"\n[{backend}] {N_LABELERS} labelers, {len(votes)} votes, {len(latencies)} requests in "
        f"{elapsed:.2f}s ({len(latencies) / elapsed:.0f} req/s); latency p50 "
        f"{statistics.median(latencies) * 1000:.0f} ms, p95 {statistics.quantiles(latencies, n=20)[18] * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms"
    )
    engine.dispose()


def test_same_labeler_parallel_fetches_get_one_item(db_url, serve):
    """A labeler with several tabs open, all fetching at once, holds one lease, not one per tab."""
    engine = open_database(db_url)
    store.import_records(engine, _records(5), overlap=2)
    token = store.add_labeler(engine, "tabs")
    server = serve(db_url, "--no-ui")
    barrier = threading.Barrier(8)
    results: list[int] = []

    def fetch() -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            barrier.wait()
            results.append(client.post("/api/next").json()["task"]["assignment_id"])

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 8
    assert len(set(results)) == 1, f"parallel tabs of one labeler got different leases: {results}"
    with engine.connect() as conn:
        from sqlalchemy import select

        from rlft.label.db import Assignment

        held = conn.execute(select(Assignment.example_id).where(Assignment.labeler_id.is_not(None))).scalars().all()
    assert len(held) == len(set(held)) and set(results) <= set(range(1, 11))
    engine.dispose()
