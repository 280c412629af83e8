"""The one bound on row ids that every request body shares (64-bit, as the columns are: :data:`rlft.label.db.MAX_ID`),
so an id out of range is a 422 naming the field, never a database overflow (a 500)."""

from typing import Annotated

from pydantic import Field

from rlft.label.db import MAX_ID

RowId = Annotated[
    int, Field(ge=1, le=MAX_ID, description=f"a row id: a whole number from 1 to {MAX_ID} (2**63 - 1, 64-bit)")
]
