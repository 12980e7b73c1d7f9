"""The JSON bodies of /api/* (pydantic: they make the OpenAPI schema, docs/openapi.json) and the refusals each
route documents."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class SubmitBody(BaseModel):
    problems: list[Any] = Field(description="problems, each an object as one line of a problem file "
                                            '({"prompt": str, "answer": str?, "checker": ..., "split": ..., '
                                            '"id": str?})')
    refine: int = Field(1, description="refinement rounds (1: search once)")
    search: dict[str, Any] = Field(default_factory=dict,
                                   description="SearchConfig fields; the rest take arbor submit's defaults")


class Submitted(BaseModel):
    job_ids: list[str]
    problem_ids: list[str]


class LineErrorOut(BaseModel):
    line: int
    message: str


class Refused(BaseModel):
    detail: str
    errors: list[LineErrorOut] | None = None


class TrainQueued(BaseModel):
    task_id: str


REFUSALS = {401: {"model": Refused, "description": "no or wrong API token"},
            413: {"model": Refused, "description": "request body over ARBOR_API_MAX_REQUEST_BYTES"}}
SUBMIT_REFUSALS = {
    **REFUSALS,
    422: {"model": Refused, "description": "bad lines (each named) or configuration; nothing stored"},
    503: {"model": Refused, "description": "broker not configured or unreachable; nothing stored"},
}
BROKER_REFUSALS = {**REFUSALS, 503: {"model": Refused, "description": "broker not configured or unreachable"}}
