"""Operations on the preference database, shared by the HTTP API, the Gradio UI and the CLI.

Every function takes an :class:`~sqlalchemy.engine.Engine` and runs its own short transaction, so callers (request
handlers on many threads) never share a connection. User mistakes raise :class:`LabelError` subclasses that carry
the HTTP status the API answers with.

Assignment protocol (why overlap is never exceeded): each example owns ``overlap`` slot rows in ``assignments``.
:func:`claim_next` first hands back the labeler's own unfinished slot (renewing its lease, so a page reload does not
leak slots); otherwise it picks a free or lease-expired slot of an example the labeler has not touched and claims it
with a compare-and-swap ``UPDATE ... WHERE <still claimable>``. On PostgreSQL the candidate rows are selected
``FOR UPDATE SKIP LOCKED`` so parallel requests spread over different slots instead of queueing on one; on SQLite
every transaction is ``BEGIN IMMEDIATE`` (see :mod:`rlft.label.db`), which serialises writers. A labeler racing
with themself (several tabs) is serialised by a row lock on their ``labelers`` row, so all tabs get the same
lease; ``UNIQUE(example_id, labeler_id)`` (checked inside a savepoint) backs this up.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import secrets
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import and_, exists, insert, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from rlft.label.db import A, E, L, P, read_only, utcnow
from rlft.label.importing import PairRecord

CHOICES = ("a", "b", "tie")
# displayed side -> stored response, for (swapped=False, swapped=True)
_SHOWN_TO_STORED = {"a": ("a", "b"), "b": ("b", "a"), "tie": ("tie", "tie")}
_SHOWN_SIDE = {"a": "left", "b": "right", "tie": "tie"}
MAX_REASONING_CHARS = 10_000


MIN_TOKEN_LENGTH = 8


class LabelError(Exception):
    """A request that cannot be served; ``status`` is the HTTP status code the API returns."""

    status = 400


class Unauthorized(LabelError):
    status = 401


class Forbidden(LabelError):
    status = 403


class NotFound(LabelError):
    status = 404


class Conflict(LabelError):
    status = 409


class Invalid(LabelError):
    status = 422


@dataclass(frozen=True)
class Identity:
    id: int
    name: str
    is_admin: bool


@dataclass(frozen=True)
class Task:
    """An example as one labeler sees it: ``response_a`` is shown on the left, ``response_b`` on the right."""

    assignment_id: int
    example_id: int
    prompt: list[dict[str, str]]
    response_a: str
    response_b: str
    category: str | None
    lease_expires_at: dt.datetime


@dataclass(frozen=True)
class ImportSummary:
    inserted: int
    duplicates: int
    slots: int


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_labeler(engine: Engine, name: str, *, admin: bool = False, token: str | None = None) -> str:
    """Create a labeler (or admin) and return their access token; only its hash is stored."""
    name = name.strip()
    if not name or len(name) > 200:
        raise Invalid("labeler name must be 1-200 characters")
    if token is not None and len(token) < MIN_TOKEN_LENGTH:  # the only secret between the API and a stranger
        raise Invalid(f"a token must have at least {MIN_TOKEN_LENGTH} characters; leave it out for a random one")
    token = token or secrets.token_urlsafe(24)
    try:
        with engine.begin() as conn:
            conn.execute(insert(L).values(name=name, token_hash=hash_token(token), is_admin=admin, created_at=utcnow()))
    except IntegrityError as exc:
        raise Conflict(f"a labeler named {name!r} already exists (or the token is already in use)") from exc
    return token


_identities: weakref.WeakKeyDictionary[Engine, dict[str, Identity]] = weakref.WeakKeyDictionary()


def authenticate(engine: Engine, token: str | None, *, admin: bool = False) -> Identity:
    """The labeler owning ``token``; :class:`Unauthorized` if unknown, :class:`Forbidden` if ``admin`` is needed."""
    if not token:
        raise Unauthorized(
            "missing token: send 'Authorization: Bearer <token>' (create one with rlft label add-labeler)"
        )
    digest = hash_token(token)
    known = _identities.setdefault(engine, {})
    identity = known.get(digest)
    if identity is None:
        with read_only(engine, one_statement=True) as conn:
            row = conn.execute(select(L.c.id, L.c.name, L.c.is_admin).where(L.c.token_hash == digest)).first()
        if row is None:
            raise Unauthorized("unknown token")
        # labelers are never changed or removed, so a known token stays valid: every API call after the first
        # saves a database round trip (unknown tokens are not cached, so a new labeler works at once)
        identity = known[digest] = Identity(row.id, row.name, bool(row.is_admin))
    if admin and not identity.is_admin:
        raise Forbidden(f"{identity.name!r} is not an admin; this endpoint needs an admin token (add-labeler --admin)")
    return identity


def content_hash(record: PairRecord) -> str:
    payload = json.dumps([record.prompt, record.response_a, record.response_b], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def import_records(engine: Engine, records: Iterable[PairRecord], *, overlap: int = 1) -> ImportSummary:
    """Insert examples with ``overlap`` labeling slots each; examples already present are counted, not duplicated."""
    if overlap < 1:
        raise Invalid(f"overlap must be >= 1, got {overlap}")
    records = list(records)
    hashes = [content_hash(r) for r in records]
    try:
        summary = _insert_examples(engine, records, hashes, overlap)
    except IntegrityError as exc:  # two imports of the same rows at the same moment
        raise Conflict("another import inserted some of these examples concurrently; run the import again") from exc
    refresh_statistics(engine)
    return summary


def refresh_statistics(engine: Engine) -> None:
    """``ANALYZE``: without statistics SQLite scans every slot to find the next free one (ms per request at scale)."""
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")


def _insert_examples(engine: Engine, records: list[PairRecord], hashes: list[str], overlap: int) -> ImportSummary:
    inserted = slots = 0
    with engine.begin() as conn:
        existing = set()
        for start in range(0, len(hashes), 500):
            chunk = hashes[start : start + 500]
            existing |= set(conn.execute(select(E.c.content_hash).where(E.c.content_hash.in_(chunk))).scalars())
        now = utcnow()
        for record, digest in zip(records, hashes):
            if digest in existing:
                continue
            existing.add(digest)  # duplicates inside the same file count once
            example_id = conn.execute(
                insert(E).values(
                    content_hash=digest,
                    prompt_json=json.dumps(record.prompt, ensure_ascii=False),
                    response_a=record.response_a,
                    response_b=record.response_b,
                    model_a=record.model_a,
                    model_b=record.model_b,
                    category=record.category,
                    source=(record.source or "")[:500] or None,
                    overlap=overlap,
                    created_at=now,
                )
            ).inserted_primary_key[0]
            conn.execute(insert(A), [{"example_id": example_id, "slot": s, "swapped": False} for s in range(overlap)])
            inserted += 1
            slots += overlap
    return ImportSummary(inserted=inserted, duplicates=len(records) - inserted, slots=slots)


_SHOWN = (E.c.prompt_json, E.c.response_a, E.c.response_b, E.c.category)  # what a task shows of its example


def _task(conn, assignment_id: int, example_id: int, swapped: bool, expires: dt.datetime) -> Task:
    return _task_of(
        conn.execute(select(*_SHOWN).where(E.c.id == example_id)).one(), assignment_id, example_id, swapped, expires
    )


def _task_of(ex, assignment_id: int, example_id: int, swapped: bool, expires: dt.datetime) -> Task:
    left, right = (ex.response_b, ex.response_a) if swapped else (ex.response_a, ex.response_b)
    return Task(assignment_id, example_id, json.loads(ex.prompt_json), left, right, ex.category, expires)


def _renew_own_lease(conn, labeler_id: int, expires: dt.datetime) -> Task | None:
    # the labeler's unfinished slots (normally none or one), lowest id first; sorted here, not by ORDER BY id LIMIT 1,
    # for which PostgreSQL walked the primary key over every slot (40 ms at 100k examples) instead of
    # ix_assignments_labeler_done
    unfinished = conn.execute(
        select(A.c.id, A.c.example_id, A.c.swapped).where(A.c.labeler_id == labeler_id, A.c.completed_at.is_(None))
    ).all()
    if not unfinished:
        return None
    own = min(unfinished, key=lambda row: row.id)
    # compare-and-swap: an expired lease may have been taken over by someone else meanwhile
    renewed = conn.execute(
        update(A)
        .where(A.c.id == own.id, A.c.labeler_id == labeler_id, A.c.completed_at.is_(None))
        .values(lease_expires_at=expires)
    )
    return _task(conn, own.id, own.example_id, own.swapped, expires) if renewed.rowcount == 1 else None


def _untouched_by(labeler_id: int):
    """The slot's example has no slot of this labeler: one index lookup per candidate (``labeler_id, example_id``).

    ``OFFSET 0`` keeps PostgreSQL from turning the ``NOT EXISTS`` into an anti-join, which it merged with every
    example the labeler ever touched (2,000 index entries per request for a labeler with 2,000 votes) instead of
    looking up the one or two candidates in front of the free-slot index.
    """
    mine = A.alias("mine")
    return ~exists(
        select(mine.c.id).where(mine.c.example_id == A.c.example_id, mine.c.labeler_id == labeler_id).offset(0)
    )


def expired_lease(now: dt.datetime):
    """A leased, unfinished slot whose lease ran out (``labeler_id IS NOT NULL`` selects ``ix_assignments_leased``:
    only the leased slots are read, not every unfinished one)."""
    return and_(A.c.labeler_id.is_not(None), A.c.completed_at.is_(None), A.c.lease_expires_at < now)


def candidate_query(labeler_id: int, condition, tried: set[int]):
    """The first slot matching ``condition`` (in example, slot order) of an example the labeler has not touched nor
    tried in this request, locked ``FOR UPDATE SKIP LOCKED``, with the example's texts (one round trip fewer than
    fetching them after the claim).

    The slot is picked in a ``LIMIT 1`` subquery and only then joined to its example: joined before the limit,
    PostgreSQL merge-joined the free slots with ``examples`` in id order and so read every example before the first
    free slot (all the labeled ones: 60 ms at 100k examples, half of them labeled).
    """
    slot = (
        select(A.c.id, A.c.example_id)
        .where(condition, _untouched_by(labeler_id), A.c.example_id.not_in(tried or [-1]))
        .order_by(A.c.example_id, A.c.slot)
        .limit(1)
        .with_for_update(skip_locked=True)
        .subquery("candidate")
    )
    return select(slot.c.id, slot.c.example_id, *_SHOWN).join_from(slot, E, E.c.id == slot.c.example_id)


def claim_next(
    engine: Engine,
    labeler_id: int,
    *,
    lease_seconds: float = 600,
    rng: random.Random | None = None,
    max_rounds: int = 20,
) -> Task | None:
    """Lease the next example for a labeler, or ``None`` when nothing is left for them (see module docstring)."""
    rng = rng or random.Random()
    for round_ in range(max_rounds):
        now = utcnow()
        expires = now + dt.timedelta(seconds=lease_seconds)
        claimable = or_(A.c.labeler_id.is_(None), expired_lease(now))
        tried: set[int] = set()
        with engine.begin() as conn:
            # Serialise one labeler's parallel requests (several tabs): the second one then sees the first one's
            # lease and returns it. Other labelers do not wait on this row lock.
            conn.execute(select(L.c.id).where(L.c.id == labeler_id).with_for_update()).first()
            task = _renew_own_lease(conn, labeler_id, expires)
            if task is not None:
                return task
            while True:
                # One row at a time: SKIP LOCKED must not hide more slots from parallel requests than we try.
                # Free slots first (a range scan of their partial index), then slots whose lease expired.
                cand = None
                for condition in (A.c.labeler_id.is_(None), expired_lease(now)):
                    cand = conn.execute(candidate_query(labeler_id, condition, tried)).first()
                    if cand is not None:
                        break
                if cand is None:
                    break
                tried.add(cand.example_id)
                swapped = rng.random() < 0.5
                try:
                    with conn.begin_nested():
                        result = conn.execute(
                            update(A)
                            .where(A.c.id == cand.id, claimable)
                            .values(labeler_id=labeler_id, swapped=swapped, leased_at=now, lease_expires_at=expires)
                        )
                except IntegrityError:  # this labeler claimed another slot of the example in a parallel request
                    continue
                if result.rowcount == 1:
                    return _task_of(cand, cand.id, cand.example_id, swapped, expires)
            # Slots locked by in-flight requests were skipped; if any exist, wait for those requests and look again
            # rather than telling the labeler that nothing is left.
            locked_elsewhere = any(
                conn.execute(
                    select(A.c.id)
                    .where(condition, _untouched_by(labeler_id), A.c.example_id.not_in(tried or [-1]))
                    .limit(1)
                ).first()
                for condition in (A.c.labeler_id.is_(None), expired_lease(now))
            )
        if not locked_elsewhere:
            return None
        time.sleep(0.01 * (round_ + 1))
    return None


def _refuse_submission(conn, labeler_id: int, assignment_id: int) -> None:
    slot = conn.execute(select(A.c.labeler_id, A.c.completed_at).where(A.c.id == assignment_id)).first()
    if slot is None:
        raise NotFound(f"assignment {assignment_id} does not exist")
    if slot.labeler_id != labeler_id:
        raise Conflict(f"assignment {assignment_id} is not leased to you (the lease may have expired and moved on)")
    if slot.completed_at is not None:
        raise Conflict(f"assignment {assignment_id} was already submitted")
    raise Conflict(f"assignment {assignment_id} changed while submitting; fetch the next example again")


def submit_preference(
    engine: Engine,
    labeler_id: int,
    assignment_id: int,
    choice: str,
    *,
    confidence: int = 3,
    reasoning: str | None = None,
    time_spent_s: float | None = None,
) -> dict:
    """Record a vote. ``choice`` names the *displayed* response (``a`` = left, ``b`` = right, or ``tie``)."""
    if choice not in CHOICES:
        raise Invalid(f"choice must be one of {list(CHOICES)} (a = left response, b = right), got {choice!r}")
    if not isinstance(confidence, int) or not 1 <= confidence <= 5:
        raise Invalid(f"confidence must be an integer from 1 to 5, got {confidence!r}")
    if reasoning is not None and len(reasoning) > MAX_REASONING_CHARS:
        raise Invalid(f"reasoning is limited to {MAX_REASONING_CHARS} characters, got {len(reasoning)}")
    if time_spent_s is not None and not 0 <= time_spent_s < 7 * 24 * 3600:
        raise Invalid(f"time_spent_s must be between 0 and one week, got {time_spent_s}")
    now = utcnow()
    with engine.begin() as conn:
        # the common case in one statement; only a refused submission reads the slot again to say why
        slot = conn.execute(
            update(A)
            .where(A.c.id == assignment_id, A.c.labeler_id == labeler_id, A.c.completed_at.is_(None))
            .values(completed_at=now)
            .returning(A.c.example_id, A.c.swapped, A.c.leased_at)
        ).first()
        if slot is None:
            _refuse_submission(conn, labeler_id, assignment_id)
        stored = _SHOWN_TO_STORED[choice][int(slot.swapped)]
        if time_spent_s is None and slot.leased_at is not None:
            time_spent_s = (now - slot.leased_at).total_seconds()
        conn.execute(
            insert(P).values(
                assignment_id=assignment_id,
                example_id=slot.example_id,
                labeler_id=labeler_id,
                choice=stored,
                shown_choice=_SHOWN_SIDE[choice],
                swapped=slot.swapped,
                confidence=confidence,
                reasoning=reasoning or None,
                time_spent_s=time_spent_s,
                shown_at=slot.leased_at,
                created_at=now,
            )
        )
    return {"assignment_id": assignment_id, "example_id": slot.example_id, "choice": stored}
