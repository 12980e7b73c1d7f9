"""The JSON API under /api (its schema: docs/openapi.json). Every route but /api/health needs the API token.

    POST /api/jobs                 {"problems": [{...}, ...], "refine": 1, "search": {SearchConfig fields}}
    POST /api/jobs/upload          multipart: file=problems.jsonl, refine, search (a JSON object)
    GET  /api/jobs[?status=S]      GET /api/jobs/{id}: status, rounds, the best answer, progress
    GET  /api/events[?job=ID...]   server-sent events: one `job` event per job state change
    GET  /api/policies             POST /api/policies/{version}/promote, POST /api/policies/rollback
    GET  /api/runs                 GET /api/runs/{name} (report.json), /api/runs/{name}/learning_curve.png
    POST /api/train                one train cycle, queued for a worker on the train queue
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Optional

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, StreamingResponse

from agent.schema import JOB_FINISHED
from arbor.api.auth import require_token
from arbor.api.models import BROKER_REFUSALS, REFUSALS, SUBMIT_REFUSALS, Refused, SubmitBody, Submitted, TrainQueued
from arbor.api.service import ApiError, Service, service
from arbor.submission import SubmitError, decode_upload, read_problem_text

public = APIRouter()
router = APIRouter(dependencies=[Depends(require_token)])


@public.get("/api/health", tags=["service"])
def health() -> dict:
    return {"status": "ok"}


@router.post("/api/jobs", tags=["jobs"], status_code=201, response_model=Submitted, responses=SUBMIT_REFUSALS)
def submit_json(body: SubmitBody, svc: Service = Depends(service)) -> dict:
    """Submit problems as a JSON list (each checked as one line of a problem file, numbered from 1)."""
    text = "\n".join(json.dumps(item) for item in body.problems)
    name = f"request-{uuid.uuid4().hex[:8]}.jsonl"
    return svc.submit(lambda: read_problem_text(text, name, "the request"), body.refine, body.search)


@router.post("/api/jobs/upload", tags=["jobs"], status_code=201, response_model=Submitted, responses=SUBMIT_REFUSALS)
def submit_upload(file: UploadFile = File(..., description="problems, one JSON object a line"),
                  refine: int = Form(1, description="refinement rounds (1: search once)"),
                  search: str = Form("{}", description="a JSON object of SearchConfig fields"),
                  svc: Service = Depends(service)) -> dict:
    """Submit a JSONL problem file, as `arbor submit FILE.jsonl` does (the same checks, the same ids)."""
    try:
        name, text = decode_upload(file.file.read(), file.filename)
    except SubmitError as exc:
        raise ApiError(422, str(exc)) from None
    try:
        given = json.loads(search)
    except json.JSONDecodeError as exc:
        raise ApiError(422, f"search is not valid JSON: {exc}") from None
    return svc.submit(lambda: read_problem_text(text, name, name), refine, given)


@router.get("/api/jobs", tags=["jobs"], responses=REFUSALS)
def jobs(status: Optional[str] = Query(None, description="queued, running, done or failed"),
         limit: Optional[int] = Query(None, ge=1, description="the most jobs to return, newest first"),
         svc: Service = Depends(service)) -> list[dict]:
    return svc.list_jobs(status, limit)


@router.get("/api/jobs/{job_id}", tags=["jobs"], responses=REFUSALS)
def job(job_id: str, svc: Service = Depends(service)) -> dict:
    """A job: status, progress while it runs, each refinement round's best attempt, the best answer."""
    return svc.job(job_id)


@router.get("/api/events", tags=["jobs"], responses=REFUSALS, response_class=StreamingResponse)
async def events(request: Request, job: list[str] = Query([], description="job ids to follow (none: every job)"),
                 svc: Service = Depends(service)):
    """Server-sent events: `event: job` with the job's summary whenever its state or progress changes; with job
    ids given, `event: end` once all of them are finished."""
    ids = list(dict.fromkeys(job))
    missing = [j for j in ids if svc.store.get_job(j) is None]
    if missing:
        raise ApiError(404, f"no job {missing[0]!r}")
    return StreamingResponse(_job_events(request, svc, ids), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _job_events(request: Request, svc: Service, ids: list[str]):
    seen: dict[str, str] = {}
    yield "retry: 2000\n\n"
    last_write = time.monotonic()
    while not await request.is_disconnected():
        states = await asyncio.to_thread(svc.job_states, ids)
        for job_id, state in states.items():
            key = json.dumps([state["status"], state["attempts"], state.get("progress")], sort_keys=True, default=str)
            if seen.get(job_id) != key:
                seen[job_id] = key
                last_write = time.monotonic()
                yield f"event: job\ndata: {json.dumps(state, default=str)}\n\n"
        if ids and all(states[j]["status"] in JOB_FINISHED for j in ids if j in states):
            yield f"event: end\ndata: {json.dumps({'jobs': len(ids)})}\n\n"
            return
        if time.monotonic() - last_write > 15:  # a comment line keeps proxies from closing a quiet stream
            last_write = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(svc.cfg.poll_s)


@router.get("/api/policies", tags=["policies"], responses=REFUSALS)
def policies(svc: Service = Depends(service)) -> list[dict]:
    return svc.policies()


@router.post("/api/policies/{version}/promote", tags=["policies"],
             responses={**REFUSALS, 409: {"model": Refused, "description": "the gate refuses it"}})
def promote(version: str, svc: Service = Depends(service)) -> dict:
    """Promote a version if it passes the train cycle's gate (or was promoted before); workers move to it
    between jobs."""
    return svc.promote(version)


@router.post("/api/policies/rollback", tags=["policies"],
             responses={**REFUSALS, 409: {"model": Refused, "description": "nothing to roll back to"}})
def rollback(svc: Service = Depends(service)) -> dict:
    """Promote the previously promoted version again; the current one is marked rejected."""
    return svc.rollback()


@router.get("/api/runs", tags=["runs"], responses=REFUSALS)
def runs(svc: Service = Depends(service)) -> list[dict]:
    """Runs of `arbor run` (report.json under ARBOR_HOME/runs/), newest first."""
    return svc.runs()


@router.get("/api/runs/{name}", tags=["runs"], responses=REFUSALS)
def run(name: str, svc: Service = Depends(service)) -> dict:
    """A run's report.json: its cycles (held-out accuracy, filters with their precision, gate, promotion)."""
    return svc.run(name)


@router.get("/api/runs/{name}/learning_curve.png", tags=["runs"], responses=REFUSALS, response_class=FileResponse)
def curve(name: str, svc: Service = Depends(service)):
    return FileResponse(svc.curve(name), media_type="image/png")


@router.post("/api/train", tags=["training"], status_code=202, response_model=TrainQueued, responses=BROKER_REFUSALS)
def train(svc: Service = Depends(service)) -> dict:
    """Queue one train cycle; its id is a job id once a trainer picks it up (GET /api/jobs/{id})."""
    return svc.train()
