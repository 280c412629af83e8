"""Load test: many labelers voting at once against the real server, on SQLite and PostgreSQL.

Default (CI): 50 labelers x 6 votes. Full size (``RLFT_LOAD_FULL=1``): 50 labelers x 100 votes (5,000 votes).
Checks: every accepted vote is stored (0 lost), no example gets more than ``overlap`` labelers, no labeler sees an
example twice, no 5xx, and the p99 request latency (printed; ``-s`` shows it) stays under the bound.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import time
from collections import Counter

import httpx

from rlft.label import queries, store
from rlft.label.db import open_database
from rlft.label.importing import PairRecord

FULL = os.environ.get("RLFT_LOAD_FULL") == "1"
LABELERS = 50
VOTES = 100 if FULL else 6
OVERLAP = 2
# the full run is held to 0.5 s; the small CI run only to a sanity bound (lock waits, retry storms), since CI
# machines are shared. RLFT_LOAD_P99_S overrides both.
P99_BOUND_S = float(os.environ.get("RLFT_LOAD_P99_S", "0.5" if FULL else "8.0"))


def _records(n: int) -> list[PairRecord]:
    return [PairRecord([{"role": "user", "content": f"q{i}"}], f"A{i}", f"B{i}", "small", "big") for i in range(n)]


async def _post(client: httpx.AsyncClient, log: dict, path: str, **kwargs) -> httpx.Response:
    """POST, retrying once on a dropped connection as any real client would (counted in ``log``)."""
    try:
        return await client.post(path, **kwargs)
    except httpx.TransportError:
        log["transport_retries"] += 1
        return await client.post(path, **kwargs)


async def _labeler(client: httpx.AsyncClient, token: str, seed: int, log: dict) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    votes = 0
    while votes < VOTES:
        t0 = time.perf_counter()
        response = await _post(client, log, "/api/next", headers=headers)
        log["next"].append(time.perf_counter() - t0)
        log["status"][response.status_code] += 1
        task = response.json()["task"]
        if task is None:
            log["starved"] += 1
            return
        log["fetched"].append((token, task["example_id"]))
        body = {"assignment_id": task["assignment_id"], "choice": rng.choice("ab"), "time_spent_s": rng.random()}
        t0 = time.perf_counter()
        response = await _post(client, log, "/api/preferences", json=body, headers=headers)
        log["submit"].append(time.perf_counter() - t0)
        log["status"][response.status_code] += 1
        # a retried submit whose first try got through answers 409 "already submitted": that vote is stored
        if response.status_code == 201 or (response.status_code == 409 and "already submitted" in response.text):
            votes += 1
            log["accepted"] += 1


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_fifty_labelers_lose_no_vote_and_stay_fast(db_url, serve):
    engine = open_database(db_url)
    # enough examples that nobody runs out: every labeler can cast exactly VOTES votes
    store.import_records(engine, _records(LABELERS * VOTES // OVERLAP + LABELERS), overlap=OVERLAP)
    tokens = [store.add_labeler(engine, f"labeler{i}") for i in range(LABELERS)]
    server = serve(db_url, "--no-ui")
    log = {
        "next": [],
        "submit": [],
        "fetched": [],
        "status": Counter(),
        "accepted": 0,
        "starved": 0,
        "transport_retries": 0,
    }

    async def main():
        limits = httpx.Limits(max_connections=LABELERS, max_keepalive_connections=LABELERS)
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0, limits=limits) as client:
            await asyncio.gather(*(_labeler(client, t, i, log) for i, t in enumerate(tokens)))

    # This one process stands in for 50 browsers. Its own full garbage collections (over pytest's heap: every module
    # other tests imported) would pause all 50 "labelers" at once, which a fleet of browsers never does, and add
    # up to ~1 s to the measured p99 (measured: 1.1 s client-side while the server answered every request within
    # 0.36 s). So the load generator collects nothing while it measures.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        started = time.perf_counter()
        asyncio.run(main())
        elapsed = time.perf_counter() - started
    finally:
        gc.enable()
        gc.unfreeze()
    everything = log["next"] + log["submit"]
    figures = {
        "backend": "postgres" if db_url.startswith("postgresql") else "sqlite",
        "votes": log["accepted"],
        "seconds": round(elapsed, 1),
        "votes_per_s": round(log["accepted"] / elapsed, 1),
        **{
            f"{name}_p{int(q * 100)}_ms": round(1000 * _percentile(values, q), 1)
            for name, values in (("next", log["next"]), ("submit", log["submit"]), ("all", everything))
            for q in (0.5, 0.95, 0.99)
        },
        "max_ms": round(1000 * max(everything), 1),
        "transport_retries": log["transport_retries"],
    }
    print(f"label load test: {figures}")
    votes = queries.load_votes(engine)
    assert log["accepted"] == LABELERS * VOTES and log["starved"] == 0
    assert len(votes) == log["accepted"], "votes were lost"
    assert not [code for code in log["status"] if code >= 500], log["status"]
    assert log["status"][409] <= log["transport_retries"], log["status"]
    assert max(Counter(log["fetched"]).values()) == 1, "a labeler was given the same example twice"
    per_example = Counter(v.example_id for v in votes)
    assert max(per_example.values()) <= OVERLAP, "an example went to more labelers than its overlap"
    assert figures["all_p99_ms"] / 1000 < P99_BOUND_S, figures
    engine.dispose()
