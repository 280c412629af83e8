"""HTTP routes for ranking collection (see :mod:`rlft.label.rankings`), added to the labeling app."""

# No `from __future__ import annotations`: FastAPI resolves the dependency aliases passed in at runtime.
import json
from typing import Annotated, Any

from fastapi import FastAPI, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from rlft.label import rankings
from rlft.label.ids import RowId


class RankingsImport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: list[Any] = Field(min_length=1, description="{prompt, responses: [2..9 replies]} rows")


class RankingSubmission(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task_id: RowId
    order: list[Annotated[int, Field(ge=0, lt=rankings.MAX_RESPONSES)]] = Field(
        min_length=2, max_length=rankings.MAX_RESPONSES, description="indices of the responses as shown, best first"
    )


def add_ranking_routes(app: FastAPI, engine, user_dependency, admin_dependency) -> None:
    """Mount the ranking endpoints; ``user_dependency`` / ``admin_dependency`` are the app's auth aliases."""
    User, Admin = user_dependency, admin_dependency

    @app.post("/api/import/rankings", status_code=201)
    def import_rankings(body: RankingsImport, _: Admin) -> dict:
        return rankings.import_tasks(engine, body.rows)

    @app.post("/api/rankings/next")
    def next_ranking(user: User) -> dict:
        return {"task": rankings.next_task(engine, user.id)}

    @app.post("/api/rankings", status_code=201)
    def submit_ranking(body: RankingSubmission, user: User) -> dict:
        return rankings.submit(engine, user.id, body.task_id, body.order)

    @app.get("/api/export/rankings")
    def export_rankings(_: Admin, min_votes: Annotated[int, Query(ge=1)] = 1) -> Response:
        records, summary = rankings.export(engine, min_votes=min_votes)
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return Response(body, media_type="application/x-ndjson", headers={"X-Export-Summary": json.dumps(summary)})
