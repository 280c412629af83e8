"""FairAdmission: at most `limit` API requests run at once, the rest are admitted in arrival order."""

from __future__ import annotations

import asyncio

import pytest

from rlft.label.api import FairAdmission


def test_requests_run_at_most_limit_at_once_and_in_arrival_order():
    running, started, peak = set(), [], [0]

    async def app(scope, receive, send):
        running.add(scope["path"])
        started.append(scope["path"])
        peak[0] = max(peak[0], len(running))
        await asyncio.sleep(0.01)
        running.discard(scope["path"])

    gate = FairAdmission(app, limit=2)

    async def main():
        calls = []
        for i in range(8):
            calls.append(asyncio.create_task(gate({"type": "http", "path": f"/api/{i}"}, None, None)))
            await asyncio.sleep(0)  # request i arrives before request i + 1
        calls.append(asyncio.create_task(gate({"type": "http", "path": "/healthz"}, None, None)))
        await asyncio.gather(*calls)

    asyncio.run(main())
    assert peak[0] == 3  # two API requests, plus /healthz, which never waits behind them
    assert [p for p in started if p.startswith("/api/")] == [f"/api/{i}" for i in range(8)]
    assert started.index("/healthz") < started.index("/api/2")
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        FairAdmission(app, limit=0)
