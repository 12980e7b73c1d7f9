"""The JSON bodies of /api/* (pydantic: they make the OpenAPI schema, docs/openapi.json) and every refusal each
route can answer with (refusals()), so that the schema lists each status the server sends."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, Field

from agent.schema import JOB_STATES, MAX_REFINE_ROUNDS

MAX_STREAM_IDS = 200  # job ids one progress stream may follow
MAX_LIST = 500  # the most jobs one listing may ask for
JobStatus = Literal[JOB_STATES]
ROUNDS = {"minimum": 1, "maximum": MAX_REFINE_ROUNDS}  # checked by agent/schema.py check_rounds: a one-line 422


class SubmitBody(BaseModel):
    problems: list[Any] = Field(min_length=1,
                                description="problems, each an object as one line of a problem file "
                                            '({"prompt": str, "answer": str?, "checker": ..., "split": ..., '
                                            '"id": str?}), checked line by line (numbered from 1)')
    refine: int = Field(1, description=f"refinement rounds (1: search once; at most {MAX_REFINE_ROUNDS})",
                        json_schema_extra=ROUNDS)
    search: dict[str, Any] = Field(default_factory=dict,
                                   description="SearchConfig fields; the rest take arbor submit's defaults")


class Submitted(BaseModel):
    job_ids: list[str]
    problem_ids: list[str]


class LineErrorOut(BaseModel):
    line: int
    message: str


class Refused(BaseModel):
    detail: Union[str, list[dict[str, Any]]] = Field(
        description="one line saying what is wrong and what to do; a request FastAPI itself cannot parse gets its "
                    "list of validation errors instead")
    errors: list[LineErrorOut] | None = Field(None, description="a problem file's bad lines, each named")


class TrainQueued(BaseModel):
    task_id: str


_WHY = {
    400: "both Content-Length and Transfer-Encoding, or a Content-Length that is not one number",
    401: "no or wrong API token (the header only: the login cookie is the web pages')",
    404: "no such job, policy version or run",
    409: "the gate refuses the promotion, or there is nothing to roll back to",
    413: "request body over ARBOR_API_MAX_REQUEST_BYTES (counted as it arrives)",
    422: "a bad request: one line (a problem file's bad lines in `errors`), or FastAPI's list of validation errors",
    503: "the database, the broker or the disk cannot do it now (named in `detail`); nothing was stored",
}


def refusals(*codes: int) -> dict:
    """The `responses` of a route: each status it may refuse with, and why."""
    return {code: {"model": Refused, "description": _WHY[code]} for code in codes}
