"""Read-only queries over the preference database: a labeler's progress, database counts, votes and examples for
statistics and export (the writes — import, claim, submit — are in :mod:`rlft.label.store`)."""

from __future__ import annotations

import datetime as dt
import json
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import and_, exists, func, select
from sqlalchemy.engine import Engine

from rlft.label.db import A, E, L, P, read_only, utcnow


@dataclass(frozen=True)
class Vote:
    """One stored preference joined with its example (used by statistics and export)."""

    example_id: int
    labeler: str
    choice: str
    shown_choice: str
    swapped: bool
    confidence: int
    time_spent_s: float | None
    model_a: str | None
    model_b: str | None


OPEN_CACHE_MIN = 10_000
"""From this many open examples on, :func:`progress` reuses the database-wide count for :data:`OPEN_CACHE_SECONDS`."""
OPEN_CACHE_SECONDS = 2.0
_open_cache: weakref.WeakKeyDictionary[Engine, tuple[float, int]] = weakref.WeakKeyDictionary()


def _has_slot(condition):
    """The row's example has a slot matching ``condition`` (a per-row index probe: ``OFFSET 0`` keeps PostgreSQL
    from turning it into a join over every such slot)."""
    other = A.alias("other")
    return exists(select(other.c.id).where(other.c.example_id == A.c.example_id, condition(other)).offset(0))


def _free(t):
    return t.c.labeler_id.is_(None)


def _expired(t, now: dt.datetime):
    # a range of ix_assignments_claimable (free slots have no lease, so only expired leases are in it); adding the
    # implied "labeler_id IS NOT NULL" made PostgreSQL AND it with a bitmap of every labeled slot
    return and_(t.c.completed_at.is_(None), t.c.lease_expires_at < now)


def open_count_queries(now: dt.datetime) -> list:
    """Examples open to somebody, as two counts: F = with a free slot, X - F = with an expired lease but no free slot.

    Counting F reads every free slot (an index-only scan of ``ix_assignments_free``, ~20 ms per 100k slots on
    PostgreSQL); X - F reads the expired leases only."""
    free_ids = select(A.c.example_id).where(_free(A)).distinct().subquery()
    return [
        select(func.count()).select_from(free_ids),
        select(func.count(func.distinct(A.c.example_id))).where(_expired(A, now), ~_has_slot(_free)),
    ]


def labeler_count_queries(labeler_id: int, now: dt.datetime) -> list:
    """The labeler's own counts: votes, open examples they touched (|(F ∪ X) ∩ T| = |F ∩ T| + |(X - F) ∩ T|),
    slots leased to them.

    No term reads more than the labeler's own rows: an example with a free slot lies at or after the first free
    slot's example (the "frontier", one index lookup), so |F ∩ T| probes only the labeler's examples from there on
    (``ix_assignments_labeler_example``); |(X - F) ∩ T| starts from the expired leases."""
    frontier = select(func.min(A.c.example_id)).where(_free(A)).scalar_subquery()
    mine = A.alias("mine")
    touched = exists(
        select(mine.c.id).where(mine.c.example_id == A.c.example_id, mine.c.labeler_id == labeler_id).offset(0)
    )
    return [
        select(func.count()).select_from(P).where(P.c.labeler_id == labeler_id),
        select(func.count()).where(A.c.labeler_id == labeler_id, A.c.example_id >= frontier, _has_slot(_free)),
        select(func.count(func.distinct(A.c.example_id))).where(_expired(A, now), touched, ~_has_slot(_free)),
        select(func.count()).where(A.c.labeler_id == labeler_id, A.c.completed_at.is_(None)),
    ]


def progress_query(labeler_id: int, now: dt.datetime, *, with_open: bool = True):
    """One row: (done, |F ∩ T|, |(X - F) ∩ T|, leased to them[, |F|, |X - F|]); see :func:`progress`."""
    counts = labeler_count_queries(labeler_id, now) + (open_count_queries(now) if with_open else [])
    return select(*(c.scalar_subquery() for c in counts))


def progress(engine: Engine, labeler_id: int) -> dict:
    """How many items the labeler has done and how many are still open to them.

    remaining = |F ∪ X| - |(F ∪ X) ∩ T| + leased, with F = examples with a free slot, X = with an expired lease,
    T = touched by this labeler. Only |F ∪ X| grows with the database; from :data:`OPEN_CACHE_MIN` open examples on
    it is counted at most once per :data:`OPEN_CACHE_SECONDS` per process (``/api/next`` answers with progress, and
    at 100k examples counting it on every request was most of the server's time), so a large remaining count may
    be a second or two behind the other labelers; below that, and every labeler-specific term, it is exact.
    """
    now = utcnow()
    cached = _open_cache.get(engine)
    fresh = cached is not None and time.monotonic() < cached[0]
    with read_only(engine, one_statement=True) as conn:  # one round trip to a database server instead of five
        row = conn.execute(progress_query(labeler_id, now, with_open=not fresh)).one()
    done, n_touched_free, n_touched_expired, pending = (int(v) for v in row[:4])
    n_touched_open = n_touched_free + n_touched_expired
    if fresh:
        n_open = cached[1]
    else:
        n_open = int(row[4]) + int(row[5])
        if n_open >= OPEN_CACHE_MIN:
            _open_cache[engine] = (time.monotonic() + OPEN_CACHE_SECONDS, n_open)
        else:
            _open_cache.pop(engine, None)
    return {"done": done, "remaining": max(0, n_open - n_touched_open) + pending}


def overview(engine: Engine) -> dict:
    """Counts over the whole database."""
    now = utcnow()
    with read_only(engine) as conn:

        def count(stmt) -> int:
            return int(conn.execute(stmt).scalar_one())

        return {
            "examples": count(select(func.count()).select_from(E)),
            "slots": count(select(func.count()).select_from(A)),
            "completed": count(select(func.count()).select_from(P)),
            "leased": count(select(func.count()).where(A.c.completed_at.is_(None), A.c.lease_expires_at >= now)),
            "labelers": count(select(func.count()).select_from(L).where(L.c.is_admin.is_(False))),
        }


def load_votes(engine: Engine) -> list[Vote]:
    """Every vote with its labeler's name and the example's model names, in a stable order."""
    stmt = (
        select(
            P.c.example_id,
            L.c.name,
            P.c.choice,
            P.c.shown_choice,
            P.c.swapped,
            P.c.confidence,
            P.c.time_spent_s,
            E.c.model_a,
            E.c.model_b,
        )
        .join(L, L.c.id == P.c.labeler_id)
        .join(E, E.c.id == P.c.example_id)
        .order_by(P.c.example_id, P.c.id)
    )
    with read_only(engine) as conn:
        return [Vote(*row) for row in conn.execute(stmt)]


def load_examples(engine: Engine, example_ids: Iterable[int]) -> dict[int, dict]:
    """Examples by id, with the prompt decoded back to chat messages."""
    ids = sorted(set(example_ids))
    out: dict[int, dict] = {}
    with read_only(engine) as conn:
        for start in range(0, len(ids), 500):
            for row in conn.execute(select(E).where(E.c.id.in_(ids[start : start + 500]))):
                out[row.id] = {**row._asdict(), "prompt": json.loads(row.prompt_json)}
    return out
