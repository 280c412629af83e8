"""Collecting rankings of K responses (InstructGPT-style labeling): import ranking tasks, let each labeler rank
each task once, export one ranked record per task in rlft's ``ranked`` format (best first), aggregated over
labelers by mean position (Borda count).

Kept in its own table next to the pairwise schema, created on first use, so pairwise collection is untouched.

Endpoints (added to :func:`rlft.label.api.create_app`):
    ``POST /api/import/rankings``   (admin) ``{"rows": [{"prompt", "responses": [...]}, ...]}``
    ``POST /api/rankings/next``     the next task this labeler has not ranked (responses in a shuffled order)
    ``POST /api/rankings``          ``{"task_id", "order": [indices of the shown responses, best first]}``
    ``GET  /api/export/rankings``   (admin) JSONL ``{"prompt", "responses": [best, ..., worst], "votes"}``
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from typing import Any

from sqlalchemy import DateTime, ForeignKey, String, Text, UniqueConstraint, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from rlft.label.db import Base, Id, utcnow
from rlft.label.store import Conflict, Invalid, NotFound

MAX_RESPONSES = 9


class RankingTask(Base):
    __tablename__ = "ranking_tasks"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    prompt_json: Mapped[str] = mapped_column(Text, nullable=False)
    responses_json: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)


class Ranking(Base):
    __tablename__ = "rankings"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    task_id: Mapped[int] = mapped_column(Id, ForeignKey("ranking_tasks.id"), nullable=False, index=True)
    labeler_id: Mapped[int] = mapped_column(Id, ForeignKey("labelers.id"), nullable=False)
    order_json: Mapped[str] = mapped_column(Text, nullable=False)  # indices into the stored responses, best first
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    __table_args__ = (UniqueConstraint("task_id", "labeler_id", name="uq_ranking_task_labeler"),)


def ensure_tables(engine: Engine) -> None:
    for table in (RankingTask.__table__, Ranking.__table__):
        table.create(engine, checkfirst=True)


def _validate(where: str, row: Any) -> tuple[Any, list[str]]:
    if not isinstance(row, dict):
        raise Invalid(f"{where}: expected an object with prompt and responses")
    prompt, responses = row.get("prompt"), row.get("responses")
    if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
        raise Invalid(f"{where}.prompt: expected a non-empty string or a list of messages")
    if not isinstance(responses, list) or not 2 <= len(responses) <= MAX_RESPONSES:
        raise Invalid(f"{where}.responses: expected a list of 2 to {MAX_RESPONSES} replies")
    if not all(isinstance(r, str) and r.strip() for r in responses) or len(set(responses)) != len(responses):
        raise Invalid(f"{where}.responses: every reply must be a distinct non-empty string")
    return prompt, responses


def import_tasks(engine: Engine, rows: list[Any]) -> dict:
    """Store ranking tasks; re-importing the same (prompt, responses) is a counted no-op."""
    ensure_tables(engine)
    parsed = [_validate(f"rows[{i}]", row) for i, row in enumerate(rows)]
    inserted = duplicates = 0
    with engine.begin() as conn:
        for prompt, responses in parsed:
            digest = hashlib.sha256(json.dumps([prompt, responses], sort_keys=True).encode()).hexdigest()
            if conn.execute(select(RankingTask.id).where(RankingTask.content_hash == digest)).first():
                duplicates += 1
                continue
            conn.execute(
                insert(RankingTask).values(
                    content_hash=digest, prompt_json=json.dumps(prompt), responses_json=json.dumps(responses)
                )
            )
            inserted += 1
    return {"inserted": inserted, "duplicates": duplicates}


def _shown_order(task_id: int, labeler_id: int, k: int) -> list[int]:
    """The (deterministic per labeler and task) shuffled order responses are shown in: no position bias."""
    order = list(range(k))
    random.Random(f"{task_id}:{labeler_id}").shuffle(order)
    return order


def next_task(engine: Engine, labeler_id: int) -> dict | None:
    ensure_tables(engine)
    with engine.connect() as conn:
        done = select(Ranking.task_id).where(Ranking.labeler_id == labeler_id)
        row = conn.execute(select(RankingTask).where(RankingTask.id.not_in(done)).order_by(RankingTask.id)).first()
    if row is None:
        return None
    responses = json.loads(row.responses_json)
    shown = _shown_order(row.id, labeler_id, len(responses))
    return {"task_id": row.id, "prompt": json.loads(row.prompt_json), "responses": [responses[i] for i in shown]}


def submit(engine: Engine, labeler_id: int, task_id: int, order: list[int]) -> dict:
    """Record a ranking given as indices of the responses **as shown** to this labeler, best first."""
    ensure_tables(engine)
    with engine.begin() as conn:
        row = conn.execute(select(RankingTask).where(RankingTask.id == task_id)).first()
        if row is None:
            raise NotFound(f"no ranking task {task_id}")
        k = len(json.loads(row.responses_json))
        if sorted(order) != list(range(k)):
            raise Invalid(f"order must rank every shown response once: a permutation of 0..{k - 1}, got {order}")
        shown = _shown_order(task_id, labeler_id, k)
        try:
            conn.execute(
                insert(Ranking).values(
                    task_id=task_id, labeler_id=labeler_id, order_json=json.dumps([shown[i] for i in order])
                )
            )
        except IntegrityError:
            raise Conflict(f"you already ranked task {task_id}") from None
    return {"task_id": task_id, "recorded": True}


def export(engine: Engine, *, min_votes: int = 1) -> tuple[list[dict], dict]:
    """Ranked records (best first by mean position over labelers) and a summary of what was left out."""
    ensure_tables(engine)
    with engine.connect() as conn:
        tasks = {t.id: t for t in conn.execute(select(RankingTask))}
        votes: dict[int, list[list[int]]] = {}
        for r in conn.execute(select(Ranking)):
            votes.setdefault(r.task_id, []).append(json.loads(r.order_json))
    records, skipped = [], {"unranked": 0, "too_few_votes": 0}
    for task_id, task in sorted(tasks.items()):
        orders = votes.get(task_id, [])
        if not orders or len(orders) < min_votes:
            skipped["unranked" if not orders else "too_few_votes"] += 1
            continue
        responses = json.loads(task.responses_json)
        position = {i: sum(o.index(i) for o in orders) / len(orders) for i in range(len(responses))}
        best_first = sorted(position, key=lambda i: (position[i], i))
        records.append(
            {
                "prompt": json.loads(task.prompt_json),
                "responses": [responses[i] for i in best_first],
                "votes": len(orders),
            }
        )
    return records, {"exported": len(records), **skipped}
