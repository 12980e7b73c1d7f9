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
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from agent.schema import JOB_FINISHED
from arbor.api.auth import require_token
from arbor.api.models import MAX_LIST, MAX_STREAM_IDS, ROUNDS, JobStatus, SubmitBody, Submitted, TrainQueued, refusals
from arbor.api.service import ApiError, Service, service
from arbor.submission import SubmitError, decode_upload, read_problem_text

public = APIRouter()
router = APIRouter(dependencies=[Depends(require_token)])
SUBMIT = refusals(400, 401, 413, 422, 503)


@public.get("/api/health", tags=["service"])
def health() -> dict:
    return {"status": "ok"}


@router.post("/api/jobs", tags=["jobs"], status_code=201, response_model=Submitted, responses=SUBMIT)
def submit_json(body: SubmitBody, svc: Service = Depends(service)) -> dict:
    """Submit problems as a JSON list (each checked as one line of a problem file, numbered from 1)."""
    text = "\n".join(json.dumps(item) for item in body.problems)
    name = f"request-{uuid.uuid4().hex[:8]}.jsonl"
    return svc.submit(lambda: read_problem_text(text, name, "the request"), body.refine, body.search)


@router.post("/api/jobs/upload", tags=["jobs"], status_code=201, response_model=Submitted, responses=SUBMIT)
def submit_upload(file: UploadFile = File(..., description="problems, one JSON object a line (an empty file is "
                                                           "refused: 422)"),
                  refine: int = Form(1, description="refinement rounds (1: search once)", json_schema_extra=ROUNDS),
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


@router.get("/api/jobs", tags=["jobs"], responses=refusals(401, 422, 503))
def jobs(status: Optional[JobStatus] = Query(None, description="only jobs in this state"),
         limit: Optional[int] = Query(None, ge=1, le=MAX_LIST, description="the most jobs to return, newest first "
                                                                           "(at most the server's list limit)"),
         svc: Service = Depends(service)) -> list[dict]:
    return svc.list_jobs(status, limit)


@router.get("/api/jobs/{job_id}", tags=["jobs"], responses=refusals(401, 404, 422, 503))
def job(job_id: str, svc: Service = Depends(service)) -> dict:
    """A job: status, progress while it runs, each refinement round's best attempt, the best answer."""
    return svc.job(job_id)


@router.get("/api/events", tags=["jobs"], responses=refusals(401, 404, 422, 503), response_class=StreamingResponse)
async def events(request: Request,
                 job: list[str] = Query([], description=f"job ids to follow, at most {MAX_STREAM_IDS} (none: the "
                                                        "newest jobs)", json_schema_extra={"maxItems": MAX_STREAM_IDS}),
                 svc: Service = Depends(service)):
    """Server-sent events: `event: job` with the job's summary whenever its state or progress changes; with job
    ids given, `event: end` once all of them are finished. A server keeps a limited number of streams open
    (`arbor serve --max-streams`): one more is a 503."""
    ids = list(dict.fromkeys(job))
    if len(ids) > MAX_STREAM_IDS:
        raise ApiError(422, f"{len(ids)} job ids: one stream follows at most {MAX_STREAM_IDS}: open another stream")
    for job_id in ids:
        svc.check_job_id(job_id)
    states = await run_in_threadpool(svc.job_states, ids)
    missing = [j for j in ids if j not in states]
    if missing:
        raise ApiError(404, f"no job {missing[0]!r}")
    release = svc.streams.take()
    return StreamingResponse(_job_events(request, svc, ids, states, release), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _job_events(request: Request, svc: Service, ids: list[str], states: dict, release):
    """The stream: store reads in a thread (never on the event loop), one query a poll, polled less often while
    nothing changes (poll_s doubling up to max_poll_s)."""
    seen: dict[str, str] = {}
    wait = svc.cfg.poll_s
    try:
        yield "retry: 2000\n\n"
        last_write = time.monotonic()
        while True:
            changed = False
            for job_id, state in states.items():
                key = json.dumps([state["status"], state["attempts"], state.get("progress")], sort_keys=True,
                                 default=str)
                if seen.get(job_id) != key:
                    seen[job_id] = key
                    changed = True
                    yield f"event: job\ndata: {json.dumps(state, default=str)}\n\n"
            if ids and all(states[j]["status"] in JOB_FINISHED for j in ids if j in states):
                yield f"event: end\ndata: {json.dumps({'jobs': len(ids)})}\n\n"
                return
            if changed:
                last_write = time.monotonic()
            elif time.monotonic() - last_write > 15:  # a comment line keeps proxies from closing a quiet stream
                last_write = time.monotonic()
                yield ": keep-alive\n\n"
            wait = svc.cfg.poll_s if changed else min(wait * 2, svc.cfg.max_poll_s)
            await asyncio.sleep(wait)
            if await request.is_disconnected():
                return
            states = await run_in_threadpool(svc.job_states, ids)
    finally:
        release()


@router.get("/api/policies", tags=["policies"], responses=refusals(401, 503))
def policies(svc: Service = Depends(service)) -> list[dict]:
    return svc.policies()


@router.post("/api/policies/{version}/promote", tags=["policies"], responses=refusals(401, 404, 409, 422, 503))
def promote(version: str, svc: Service = Depends(service)) -> dict:
    """Promote a version if it passes the train cycle's gate (or was promoted before); workers move to it
    between jobs."""
    return svc.promote(version)


@router.post("/api/policies/rollback", tags=["policies"], responses=refusals(401, 409, 503))
def rollback(svc: Service = Depends(service)) -> dict:
    """Promote the previously promoted version again; the current one is marked rejected."""
    return svc.rollback()


@router.get("/api/runs", tags=["runs"], responses=refusals(401))
def runs(svc: Service = Depends(service)) -> list[dict]:
    """Runs of `arbor run` (report.json under ARBOR_HOME/runs/), newest first; a damaged report is left out."""
    return svc.runs()


@router.get("/api/runs/{name}", tags=["runs"], responses=refusals(401, 404, 503))
def run(name: str, svc: Service = Depends(service)) -> dict:
    """A run's report.json: its cycles (held-out accuracy, filters with their precision, gate, promotion); a
    damaged report.json is a 503 naming what is wrong."""
    return svc.run(name)


@router.get("/api/runs/{name}/learning_curve.png", tags=["runs"], responses=refusals(401, 404),
            response_class=FileResponse)
def curve(name: str, svc: Service = Depends(service)):
    return FileResponse(svc.curve(name), media_type="image/png")


@router.post("/api/train", tags=["training"], status_code=202, response_model=TrainQueued,
             responses=refusals(401, 503))
def train(svc: Service = Depends(service)) -> dict:
    """Queue one train cycle; its id is a job id once a trainer picks it up (GET /api/jobs/{id})."""
    return svc.train()
