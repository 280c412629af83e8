"""Read-only queries over the preference database: a labeler's progress, database counts, votes and examples for
statistics and export (the writes — import, claim, submit — are in :mod:`rlft.label.store`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import and_, func, or_, select
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


def progress(engine: Engine, labeler_id: int) -> dict:
    """How many items the labeler has done and how many are still open to them."""
    now = utcnow()
    touched = select(A.c.example_id).where(A.c.labeler_id == labeler_id)
    # |F ∪ X| - |(F ∪ X) ∩ T| with F = examples with a free slot, X = with an expired lease, T = touched by this
    # labeler: the large term F is an index-only count, everything that filters by the labeler stays small
    free = A.c.labeler_id.is_(None)
    expired = and_(A.c.completed_at.is_(None), A.c.lease_expires_at < now)
    free_ids = select(A.c.example_id).where(free)
    counts = [
        select(func.count()).select_from(P).where(P.c.labeler_id == labeler_id),  # done
        select(func.count(func.distinct(A.c.example_id))).where(free),
        select(func.count(func.distinct(A.c.example_id))).where(expired, A.c.example_id.not_in(free_ids)),
        select(func.count(func.distinct(A.c.example_id))).where(A.c.example_id.in_(touched), or_(free, expired)),
        select(func.count()).where(A.c.labeler_id == labeler_id, A.c.completed_at.is_(None)),  # leased to them
    ]
    with read_only(engine, one_statement=True) as conn:  # one round trip to a database server instead of seven
        done, n_free, n_expired_only, n_touched_open, pending = conn.execute(
            select(*(c.scalar_subquery() for c in counts))
        ).one()
    open_ = int(n_free) + int(n_expired_only) - int(n_touched_open)
    return {"done": int(done), "remaining": int(open_) + int(pending)}


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
