"""HTTP API (FastAPI) for preference collection; the Gradio UI is mounted in the same app at ``/ui``.

Authentication: every ``/api`` call sends ``Authorization: Bearer <token>``. Labeler tokens may fetch and submit
work and read statistics; admin tokens (``rlft label add-labeler NAME --admin``) are also needed for labeler
creation, import and export. Errors are JSON ``{"detail": ...}`` with 401 (no/unknown token), 403 (not an admin),
404 (unknown assignment), 409 (assignment not yours / already submitted / duplicate name) or 422 (bad input, with
``errors`` listing ``rows[i]: field: message`` for imports).

Endpoints:
    ``GET  /healthz``                   liveness and schema version (no token).
    ``GET  /api/me``                    who am I, progress.
    ``POST /api/next``                  lease the next example (``task`` is ``null`` when nothing is left).
    ``POST /api/preferences``           submit a vote for a leased example.
    ``GET  /api/stats``                 counts, agreement, position bias, time per label, win-rates.
    ``POST /api/labelers``              (admin) create a labeler, returns their token once.
    ``POST /api/import/pairs``          (admin) import pairs-format rows.
    ``POST /api/import/generations``    (admin) import two models' generations joined on the prompt.
    ``GET  /api/export/pairs``          (admin) canonical DPO pairs as JSONL; summary in ``X-Export-Summary``.
    ``GET  /api/export/winrates``       (admin) model-vs-model win-rates with CIs.
    ``/api/import/rankings``, ``/api/rankings/next``, ``/api/rankings``, ``/api/export/rankings``: K-wise
    rankings (:mod:`rlft.label.rankings`).
"""

# No `from __future__ import annotations` here: FastAPI must resolve the dependency aliases defined inside
# create_app at runtime, and string annotations of local names cannot be resolved.
import asyncio
import json
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.engine import Engine

from rlft.label import queries, store
from rlft.label.db import SCHEMA_VERSION, open_database
from rlft.label.export import build_pairs, win_rates
from rlft.label.ids import RowId
from rlft.label.importing import ImportValidationError, join_generations, parse_pair_rows
from rlft.label.quality import quality_report

_bearer = HTTPBearer(auto_error=False)


def _no_nul(value: Any, where: str = "") -> Any:
    """PostgreSQL text cannot hold NUL characters: refuse them as bad input (422) rather than failing (500)."""
    if isinstance(value, str) and "\x00" in value:
        raise ValueError(f"{where or 'text'} contains a NUL character")
    if isinstance(value, dict):
        for key, item in value.items():
            _no_nul(key, where)
            _no_nul(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _no_nul(item, f"{where}[{index}]")
    return value


class _Strict(BaseModel):
    # NaN/inf are valid JSON extensions that Python parses; as vote data they are nonsense and break the database
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _text_without_nul(cls, value: Any, info) -> Any:
        return _no_nul(value, info.field_name)


class NewLabeler(_Strict):
    name: str = Field(min_length=1, max_length=200)
    admin: bool = False


class PairsImport(_Strict):
    rows: list[Any] = Field(min_length=1, description="pairs-format rows (prompt, response_a, response_b, ...)")
    overlap: int | None = Field(None, ge=1, le=100, description="labelers per example (default: server setting)")


class GenerationsImport(_Strict):
    a: list[Any] = Field(min_length=1, description="rows of model A: {prompt, completion|response, model?}")
    b: list[Any] = Field(min_length=1, description="rows of model B")
    model_a: str = "model_a"
    model_b: str = "model_b"
    overlap: int | None = Field(None, ge=1, le=100)


class Submission(_Strict):
    assignment_id: RowId
    choice: Literal["a", "b", "tie"] = Field(description="displayed response: a = left, b = right")
    confidence: int = Field(3, ge=1, le=5)
    reasoning: str | None = Field(None, max_length=store.MAX_REASONING_CHARS)
    time_spent_s: float | None = Field(None, ge=0, le=7 * 24 * 3600)


def _task_json(task: store.Task | None) -> dict | None:
    if task is None:
        return None
    return {
        "assignment_id": task.assignment_id,
        "example_id": task.example_id,
        "prompt": task.prompt,
        "response_a": task.response_a,
        "response_b": task.response_b,
        "category": task.category,
        "lease_expires_at": task.lease_expires_at.isoformat() + "Z",
    }


def stats_payload(engine: Engine) -> dict:
    """Everything the stats endpoint, the UI's stats tab and ``rlft label stats`` show."""
    votes = queries.load_votes(engine)
    return {"overview": queries.overview(engine), "quality": quality_report(votes), "win_rates": win_rates(votes)}


class FairAdmission:
    """ASGI middleware: at most ``limit`` API requests run at once; the others wait in arrival order.

    Without it every request gets a worker thread at once, and dozens of threads contend for the GIL and the
    database's write lock (SQLite's busy handler polls with sleeps up to 100 ms), so a few requests wait seconds
    while most are fast. Admitted in FIFO order, each request's latency is its queue position times the service
    time, and fewer threads at a time also serve more requests per second.
    """

    def __init__(self, app, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"concurrency must be >= 1, got {limit}")
        self.app, self.limit = app, limit
        self._gate: asyncio.Semaphore | None = None  # made in the server's event loop

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.limit)
        async with self._gate:  # asyncio's semaphore wakes waiters first come, first served
            await self.app(scope, receive, send)


def create_app(
    db: str | Engine,
    *,
    lease_seconds: float = 600.0,
    default_overlap: int = 1,
    ui: bool = True,
    concurrency: int = 2,
) -> FastAPI:
    """Build the app for a database URL/path (or an existing engine).

    Args:
        db: SQLite path, SQLAlchemy URL (``postgresql://...``) or an :class:`Engine`.
        lease_seconds: how long a fetched example stays reserved for its labeler.
        default_overlap: labelers per example for API imports that do not say.
        ui: mount the Gradio labeling UI at ``/ui`` (off for API-only deployments and tests).
        concurrency: API requests served at once; more wait in arrival order (see :class:`FairAdmission`).
    """
    engine = db if isinstance(db, Engine) else open_database(db)
    app = FastAPI(title="rlft preference labeling", version=str(SCHEMA_VERSION))
    app.add_middleware(FairAdmission, limit=concurrency)
    app.state.engine = engine

    @app.exception_handler(store.LabelError)
    def _label_error(_: Request, exc: store.LabelError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI echoes the bad input back; a NaN there would make the error response itself fail (500)
        detail = [
            {
                "loc": list(e.get("loc", ())),
                "msg": e.get("msg", ""),
                "type": e.get("type", ""),
                "input": repr(e["input"]) if "input" in e else None,
            }
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(ImportValidationError)
    def _import_error(_: Request, exc: ImportValidationError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "errors": exc.errors}, status_code=422)

    def labeler(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> store.Identity:
        return store.authenticate(engine, creds.credentials if creds else None)

    def admin(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> store.Identity:
        return store.authenticate(engine, creds.credentials if creds else None, admin=True)

    User = Annotated[store.Identity, Depends(labeler)]
    Admin = Annotated[store.Identity, Depends(admin)]

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True, "schema_version": SCHEMA_VERSION}

    @app.get("/api/me")
    def me(user: User) -> dict:
        return {"name": user.name, "is_admin": user.is_admin, "progress": queries.progress(engine, user.id)}

    @app.post("/api/next")
    def next_task(user: User) -> dict:
        task = store.claim_next(engine, user.id, lease_seconds=lease_seconds)
        return {"task": _task_json(task), "progress": queries.progress(engine, user.id)}

    @app.post("/api/preferences", status_code=201)
    def submit(body: Submission, user: User) -> dict:
        return store.submit_preference(
            engine,
            user.id,
            body.assignment_id,
            body.choice,
            confidence=body.confidence,
            reasoning=body.reasoning,
            time_spent_s=body.time_spent_s,
        )

    @app.get("/api/stats")
    def stats(_: User) -> dict:
        return stats_payload(engine)

    @app.post("/api/labelers", status_code=201)
    def new_labeler(body: NewLabeler, _: Admin) -> dict:
        return {"name": body.name, "token": store.add_labeler(engine, body.name, admin=body.admin)}

    @app.post("/api/import/pairs", status_code=201)
    def import_pairs(body: PairsImport, _: Admin) -> dict:
        records = parse_pair_rows((f"rows[{i}]", row) for i, row in enumerate(body.rows))
        summary = store.import_records(engine, records, overlap=body.overlap or default_overlap)
        return {"inserted": summary.inserted, "duplicates": summary.duplicates, "slots": summary.slots}

    @app.post("/api/import/generations", status_code=201)
    def import_generations(body: GenerationsImport, _: Admin) -> dict:
        joined = join_generations(
            ((f"a[{i}]", r) for i, r in enumerate(body.a)),
            ((f"b[{i}]", r) for i, r in enumerate(body.b)),
            body.model_a,
            body.model_b,
        )
        summary = store.import_records(engine, joined.records, overlap=body.overlap or default_overlap)
        return {
            "inserted": summary.inserted,
            "duplicates": summary.duplicates,
            "slots": summary.slots,
            "unmatched_a": joined.unmatched_a,
            "unmatched_b": joined.unmatched_b,
            "notes": joined.notes,
        }

    @app.get("/api/export/pairs")
    def export_pairs(
        _: Admin,
        min_votes: Annotated[int, Query(ge=1)] = 1,
        min_agreement: Annotated[float, Query(ge=0.0, le=1.0)] = 0.5,
        with_metadata: bool = False,
    ) -> Response:
        votes = queries.load_votes(engine)
        examples = queries.load_examples(engine, {v.example_id for v in votes})
        pairs, summary = build_pairs(
            votes, examples, min_votes=min_votes, min_agreement=min_agreement, with_metadata=with_metadata
        )
        body = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        headers = {"X-Export-Summary": json.dumps(summary.as_dict())}
        return Response(body, media_type="application/x-ndjson", headers=headers)

    @app.get("/api/export/winrates")
    def export_winrates(_: Admin) -> list[dict]:
        return win_rates(queries.load_votes(engine))

    from rlft.label.ranking_api import add_ranking_routes

    add_ranking_routes(app, engine, User, Admin)

    if ui:
        from rlft.label.ui import mount_ui  # gradio is heavy: import only when the UI is wanted

        @app.get("/", include_in_schema=False)
        def root() -> RedirectResponse:
            return RedirectResponse("/ui/")

        app = mount_ui(app, engine, lease_seconds=lease_seconds)
    return app
