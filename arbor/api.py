"""The HTTP API and the web view, one FastAPI app (served by `arbor serve`, arbor/commands/serve.py).

    POST /api/jobs                 {"problems": [{...}, ...], "refine": 1, "search": {SearchConfig fields}}
    POST /api/jobs/upload          multipart: file=problems.jsonl, refine, search (a JSON object)
    GET  /api/jobs[?status=S]      GET /api/jobs/{id}: status, rounds, the best answer, progress
    GET  /api/events[?job=ID...]   server-sent events: one `job` event per job state change
    GET  /api/policies             POST /api/policies/{version}/promote, POST /api/policies/rollback
    GET  /api/runs                 GET /api/runs/{name} (report.json), /api/runs/{name}/learning_curve.png
    POST /api/train                one train cycle, queued for a worker on the train queue
    /runs, /jobs, /jobs/{id}, /jobs/{id}/tree, /policies: the web view (jinja2 pages, no build step)

Submission is `arbor submit`'s: the same JSONL checks (tasks/jsonl.py, every bad line named), the same search
configuration checks and defaults (arbor/commands/submit.py), the same store-then-queue order (agent/jobs.py
submit_jobs): a refused request stores nothing. Every request but /api/health and the login page needs the API
token (Settings.api_token): `Authorization: Bearer TOKEN`, or the cookie the login page sets. Request bodies are
limited to Settings.api_max_request_bytes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import secrets
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from agent.settings import mask

WEB = Path(__file__).parent / "web"
COOKIE = "arbor_token"
FINISHED = ("done", "failed")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class ApiConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 inside a container)"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    poll_s: float = field(default=0.5, metadata={"help": "how often the progress stream reads job states, seconds"})
    list_limit: int = field(default=500, metadata={"help": "the most jobs one listing returns (newest first)"})


class ApiError(Exception):
    """A refused request: status code, one line, and (for problem files) the bad lines."""

    def __init__(self, status: int, detail: str, errors: list[dict] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.errors = status, detail, errors


class _LoginRequired(Exception):
    pass


def read_lines(text: str, filename: str, known_tasks: set[str]):
    """`arbor submit`'s reading of a problem file (tasks/jsonl.py read_problems), for text that arrived over HTTP:
    written to a private temporary folder under its own file name, so that checks, messages and ids are the CLI's."""
    from tasks.jsonl import read_problems

    with tempfile.TemporaryDirectory(prefix="arbor-upload-") as tmp:
        path = Path(tmp) / filename
        path.write_text(text, encoding="utf-8")
        return read_problems(path, known_tasks=known_tasks)


# request bodies ------------------------------------------------------------------------------------------------
class SubmitBody(BaseModel):
    problems: list[Any] = Field(description="problems, each an object as one line of a problem file "
                                            '({"prompt": str, "answer": str?, "checker": ..., "split": ..., "id": str?})')
    refine: int = Field(1, description="refinement rounds (1: search once)")
    search: dict[str, Any] = Field(default_factory=dict, description="SearchConfig fields; the rest take arbor submit's defaults")


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


# the body size limit: outermost, so that nothing behind it reads a body over the limit -----------------------
class BodyLimit:
    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _refuse(self, send, size: str) -> None:
        body = json.dumps({"detail": f"request body is {size} bytes, over the limit of {self.limit} "
                                     "(ARBOR_API_MAX_REQUEST_BYTES): split the file into smaller ones"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await self._refuse(send, length.decode(errors="replace"))
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        # chunked: read it all (up to the limit) before the app sees any of it
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            total += len(message.get("body", b""))
            if total > self.limit:
                return await self._refuse(send, f"over {total}")
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# the service: store, queue, token -----------------------------------------------------------------------------
def resolve_token(settings) -> str | None:
    """ARBOR_API_TOKEN, else the contents of ARBOR_API_TOKEN_FILE (stripped); None when neither is set."""
    if settings.api_token:
        return settings.api_token
    if settings.api_token_file is not None:
        try:
            token = Path(settings.api_token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"ARBOR_API_TOKEN_FILE={settings.api_token_file}: cannot read it ({exc.strerror})") from None
        if not token:
            raise ValueError(f"ARBOR_API_TOKEN_FILE={settings.api_token_file} is empty")
        return token
    return None


def _iso(value) -> str | None:
    return value.isoformat() if isinstance(value, dt.datetime) else value


class Service:
    """What the routes share: settings, the store, the broker. Plain methods; routes turn ApiError into responses."""

    def __init__(self, settings, cfg: ApiConfig):
        self.settings, self.cfg = settings, cfg
        self._store = None
        self._celery = None
        self._tokenizers: dict[str, Any] = {}

    @property
    def store(self):
        """The store, opened on first use (`arbor serve` opens it before it listens, so a bad URL fails at once)."""
        if self._store is None:
            from agent.store import Store

            self._store = Store(self.settings.db_url)
        return self._store

    # the queue -------------------------------------------------------------------------------------------------
    def celery(self):
        if self._celery is None:
            from workers.app import app as celery_app

            self._celery = celery_app
        return self._celery

    def check_broker(self) -> None:
        import redis

        url = self.settings.broker_url
        if not url:
            raise ApiError(503, "no broker configured (ARBOR_BROKER_URL): the API queues jobs for workers; nothing was submitted")
        try:
            redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
        except Exception as exc:
            raise ApiError(503, f"cannot reach the broker at {mask(url)} ({type(exc).__name__}): nothing was submitted") from None

    # submission --------------------------------------------------------------------------------------------------
    def search_config(self, given: Any) -> dict:
        """arbor submit's checks on a JSON object of SearchConfig fields; the whole validated configuration."""
        from arbor.commands.submit import JOB_SEARCH, _accepts, _name
        from typing import get_type_hints

        from search import SearchConfig

        if not isinstance(given, dict):
            raise ApiError(422, f"search must be a JSON object of SearchConfig fields (got {type(given).__name__})")
        valid = [f.name for f in fields(SearchConfig)]
        hints = get_type_hints(SearchConfig)
        for name, value in given.items():
            if name not in valid:
                raise ApiError(422, f"unknown search field {name!r}: valid fields are {', '.join(valid)}")
            if not _accepts(hints[name], value):
                raise ApiError(422, f"search field {name!r} must be {_name(hints[name])} (got {json.dumps(value)})")
        try:
            return asdict(SearchConfig(**{**asdict(JOB_SEARCH), **given}))
        except ValueError as exc:
            raise ApiError(422, f"bad search configuration: {exc}") from None

    def submit(self, parse, source: str, refine: int, search: Any) -> dict:
        """Check everything, then store problems and jobs, then queue them: a refused request stores nothing."""
        from agent.jobs import submit_jobs, unsent
        from tasks import names

        if refine < 1:
            raise ApiError(422, f"refine must be at least 1 (got {refine})")
        config = self.search_config(search)
        problems, errors = parse(names())
        if errors:
            raise ApiError(422, f"{len(errors)} bad line(s) in {source}; nothing was submitted: fix them and submit again",
                           [{"line": e.line, "message": e.message} for e in errors])
        if not problems:
            raise ApiError(422, f"{source} holds no problems")
        self.check_broker()
        job_ids = submit_jobs(self.store, problems, rounds=refine, search=config)
        kind = "refine" if refine > 1 else "solve"
        sent, pending = 0, unsent(self.store, job_ids)  # the same request again sends what is still queued
        try:
            for job_id in pending:  # the job id is the task id, as `arbor submit` sends it
                self.celery().send_task(f"arbor.{kind}", args=[job_id], task_id=job_id)
                sent += 1
        except Exception as exc:
            raise ApiError(503, f"{len(pending) - sent} of {len(job_ids)} jobs are in the store but not queued "
                                f"({type(exc).__name__}: {exc}): run `arbor requeue` once the broker is back") from None
        return {"job_ids": job_ids, "problem_ids": [p.id for p in problems]}

    # jobs --------------------------------------------------------------------------------------------------------
    def _progress(self, job) -> dict | None:
        if job.status in FINISHED or not self.settings.broker_url:
            return None
        try:
            res = self.celery().AsyncResult(job.id)
            return {"task_state": res.state, **(res.info if isinstance(res.info, dict) else {})}
        except Exception:
            return None

    def job_summary(self, job, progress: bool = False) -> dict:
        best = (job.result or {}).get("best")
        out = {"job_id": job.id, "kind": job.kind, "problem_id": job.problem_id, "status": job.status,
               "attempts": job.attempts, "rounds": job.rounds, "worker": job.worker, "created_at": _iso(job.created_at),
               "finished_at": _iso(job.finished_at), "error": job.error,
               "best": {k: best.get(k) for k in ("completion", "score", "verified", "round")} if best else None}
        if progress:
            out["progress"] = self._progress(job)
        return out

    def list_jobs(self, status: str | None, limit: int | None) -> list[dict]:
        rows = self.store.list_jobs()
        if status:
            rows = [r for r in rows if r.status == status]
        rows = rows[::-1][: min(limit or self.cfg.list_limit, self.cfg.list_limit)]
        return [self.job_summary(r) for r in rows]

    def job(self, job_id: str) -> dict:
        row = self.store.get_job(job_id)
        if row is None:
            raise ApiError(404, f"no job {job_id!r}: GET /api/jobs lists what there is")
        out = self.job_summary(row, progress=True)
        out["result"] = row.result
        out["search"] = (row.params or {}).get("search")
        problem = self.store.get_problem(row.problem_id) if row.problem_id else None
        out["problem"] = None if problem is None else {
            "id": problem.id, "prompt": problem.prompt, "answer": problem.answer, "checker": problem.checker,
            "task": problem.task, "split": problem.split, "difficulty": problem.difficulty}
        by_round: dict[int, list] = {}
        for t in self.store.trajectories(job_id=job_id):
            by_round.setdefault(t.round, []).append(t)
        out["refinement"] = [{
            "round": r, "prompt": rows[0].prompt or (problem.prompt if problem else None), "candidates": len(rows),
            "policy_version": rows[0].policy_version, "strategy": rows[0].strategy,
            "best": {"completion": rows[0].completion, "score": rows[0].score, "verified": rows[0].verified,
                     "mean_logprob": rows[0].mean_logprob, "is_best": rows[0].is_best},
        } for r, rows in sorted(by_round.items())]
        return out

    def job_states(self, ids: list[str]) -> dict[str, dict]:
        rows = [self.store.get_job(j) for j in ids] if ids else self.store.list_jobs()[-self.cfg.list_limit:]
        return {r.id: self.job_summary(r, progress=True) for r in rows if r is not None}

    def tree_html(self, job_id: str) -> str:
        """The job's candidates per round as search/tree_html.py's tree (a token trie of what the workers stored,
        ranked as they ranked it; the chosen path highlighted)."""
        from search import Candidate
        from search.tree_html import tree_from_candidates, tree_to_html

        detail = self.job(job_id)
        rows = self.store.trajectories(job_id=job_id)
        if not rows:
            raise ApiError(404, f"job {job_id} has no stored candidates yet (status {detail['status']})")
        paths = {r.version: r.path for r in self.store.policies()}
        roots, titles = [], []
        for info in detail["refinement"]:
            version = info["policy_version"]
            tokenizer = self._tokenizer(version, paths.get(version))
            cands = []
            for t in (t for t in rows if t.round == info["round"]):
                ids = tokenizer.encode(t.completion, add_special_tokens=False)
                cands.append(Candidate(completion=t.completion, token_ids=ids, mean_logprob=t.mean_logprob,
                                       min_logprob=t.min_logprob, mean_entropy=t.mean_entropy, finished=True,
                                       verified=t.verified, score=t.score, logprobs=[t.mean_logprob] * len(ids)))
            prompt_ids = tokenizer.encode(info["prompt"] or "", add_special_tokens=False)
            roots.append(tree_from_candidates(prompt_ids, cands))
            titles.append(f"job {job_id}, round {info['round']} ({info['strategy']}, policy {version}): "
                          f"{info['candidates']} candidates")
        return tree_to_html(roots, tokenizer, titles)

    def _tokenizer(self, version: str, path: str | None):
        if version not in self._tokenizers:
            if not path or not Path(path).is_dir():
                raise ApiError(404, f"policy {version} is not on this host ({path}): its tokenizer is needed for the tree")
            from transformers import AutoTokenizer

            self._tokenizers[version] = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return self._tokenizers[version]

    # policies ----------------------------------------------------------------------------------------------------
    def policies(self) -> list[dict]:
        out = []
        for r in self.store.policies():
            train = (r.trained_on or {}).get("train") or {}
            out.append({"version": r.version, "status": r.status, "parent": r.parent, "path": r.path,
                        "metrics": r.metrics, "created_at": _iso(r.created_at), "promoted_at": _iso(r.promoted_at),
                        "train": {k: v for k, v in train.items() if isinstance(v, (int, float, str))}})
        return out

    def _margin(self) -> float:
        from agent.train_cycle import loop_config_from_env

        return loop_config_from_env(self.settings).promote_margin

    def promote(self, version: str) -> dict:
        """Promote `version` by the train cycle's gate rule: its recorded gate score must beat the promoted version's
        by more than the promote margin (ARBOR_PROMOTE_MARGIN). A version that was promoted before (retired) passed
        the gate once and may come back; one never gated (no gate score) is refused."""
        rows = {r.version: r for r in self.store.policies()}
        row = rows.get(version)
        if row is None:
            raise ApiError(404, f"no policy version {version!r}: GET /api/policies lists them")
        if row.status == "promoted":
            raise ApiError(409, f"{version} is already the promoted version")
        if not Path(row.path).is_dir():
            raise ApiError(409, f"{version}'s checkpoint {row.path} is missing: it cannot be served")
        current = next((r for r in rows.values() if r.status == "promoted"), None)
        if row.status != "retired" and current is not None:
            score = (row.metrics or {}).get("gate_score")
            if score is None:
                raise ApiError(409, f"{version} was never gated (no gate score): register your own model with "
                                    "`arbor policies add PATH`")
            reference = (current.metrics or {}).get("gate_score")
            if reference is None:  # the promoted version was never gated (v0, an added model): what the gate measured
                reference = (row.metrics or {}).get("current_gate_score", 0.0)
            margin = self._margin()
            if not score > reference + margin:
                raise ApiError(409, f"{version}'s gate score {score:.3f} does not beat {current.version}'s {reference:.3f} "
                                    f"by more than the promote margin {margin:g}: not promoted")
        self.store.set_policy_status(version, "promoted")
        return {"promoted": version, "previous": current.version if current else None}

    def rollback(self) -> dict:
        """Promote the version that was promoted before the current one; the current one is marked rejected (so a
        second rollback goes one further back)."""
        rows = self.store.policies()
        current = next((r for r in rows if r.status == "promoted"), None)
        if current is None:
            raise ApiError(409, "no version is promoted: nothing to roll back")
        earlier = sorted((r for r in rows if r.status == "retired" and r.promoted_at is not None and Path(r.path).is_dir()),
                         key=lambda r: r.promoted_at)
        if not earlier:
            raise ApiError(409, f"{current.version} is the only version ever promoted: nothing to roll back to")
        previous = earlier[-1]
        self.store.set_policy_status(previous.version, "promoted")
        self.store.set_policy_status(current.version, "rejected",
                                     {"rolled_back_at": dt.datetime.now(dt.timezone.utc).isoformat()})
        return {"promoted": previous.version, "previous": current.version}

    # runs --------------------------------------------------------------------------------------------------------
    def _run_dir(self, name: str) -> Path:
        folder = self.settings.runs_dir / name
        if not RUN_NAME.fullmatch(name) or not (folder / "report.json").is_file():
            raise ApiError(404, f"no run {name!r} under {self.settings.runs_dir}: GET /api/runs lists them")
        return folder

    def runs(self) -> list[dict]:
        root = self.settings.runs_dir
        found = [p for p in root.iterdir() if (p / "report.json").is_file()] if root.is_dir() else []
        out = []
        for folder in sorted(found, key=lambda p: (p / "report.json").stat().st_mtime, reverse=True):
            try:
                report = json.loads((folder / "report.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
            cycles = report.get("cycles") or []
            out.append({"name": folder.name, "cycles": len(cycles), "final_policy": report.get("final_policy"),
                        "promoted": sum(1 for c in cycles if c.get("promoted")),
                        "elapsed_s": cycles[-1].get("elapsed_s") if cycles else None,
                        "modified": dt.datetime.fromtimestamp((folder / "report.json").stat().st_mtime, dt.timezone.utc).isoformat(),
                        "curve": (folder / "learning_curve.png").is_file()})
        return out

    def run(self, name: str) -> dict:
        return json.loads((self._run_dir(name) / "report.json").read_text())

    def curve(self, name: str) -> Path:
        path = self._run_dir(name) / "learning_curve.png"
        if not path.is_file():
            raise ApiError(404, f"run {name} has no learning_curve.png")
        return path

    # training ----------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        self.check_broker()
        res = self.celery().send_task("arbor.train_cycle", queue="train")
        return {"task_id": res.id}


def _difficulties(cycles: list[dict]) -> list[str]:
    keys = {k for c in cycles for k in (c.get("heldout") or {})}
    return sorted(keys, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))


def create_app(settings=None, cfg: ApiConfig | None = None, token: str | None = None, require_token: bool = True):
    """The ASGI app (the body limit around FastAPI). settings: agent.settings.Settings (default: the environment);
    token: the API token (default: resolve_token(settings)); require_token=False serves without one (local use)."""
    if settings is None:
        from agent.settings import Settings

        settings = Settings(device="cpu")
    cfg = cfg or ApiConfig()
    token = token if token is not None else resolve_token(settings)
    if token is None and require_token:
        raise ValueError("no API token: set ARBOR_API_TOKEN or ARBOR_API_TOKEN_FILE (or serve with --no-auth on a "
                         "trusted host)")
    svc = Service(settings, cfg)
    templates = Jinja2Templates(directory=str(WEB / "templates"))
    templates.env.filters["fmt"] = lambda v, spec=".3f": "" if v is None else (format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v))
    api = FastAPI(title="Arbor", version="0.1.0",
                  description="Submit problems, follow jobs, read results, manage policy versions and runs. Every "
                              "route but /api/health needs the API token: `Authorization: Bearer TOKEN`.")
    api.state.service = svc

    def given_token(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return request.cookies.get(COOKIE)

    def valid(request: Request) -> bool:
        if token is None:
            return True
        got = given_token(request)
        return got is not None and secrets.compare_digest(got.encode(), token.encode())

    def auth(request: Request) -> None:
        if not valid(request):
            raise HTTPException(401, "missing or wrong API token: send `Authorization: Bearer TOKEN`",
                                headers={"WWW-Authenticate": "Bearer"})

    def web_auth(request: Request) -> None:
        if not valid(request):
            raise _LoginRequired()

    @api.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        body = {"detail": exc.detail}
        if exc.errors is not None:
            body["errors"] = exc.errors
        return JSONResponse(body, status_code=exc.status)

    @api.exception_handler(_LoginRequired)
    async def _login(request: Request, _exc):
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    refusals = {401: {"model": Refused, "description": "no or wrong API token"},
                413: {"model": Refused, "description": "request body over ARBOR_API_MAX_REQUEST_BYTES"}}
    submit_refusals = {**refusals, 422: {"model": Refused, "description": "bad lines (each named) or configuration; nothing stored"},
                       503: {"model": Refused, "description": "broker not configured or unreachable; nothing stored"}}

    # ---- JSON API ----
    @api.get("/api/health", tags=["service"])
    def health() -> dict:
        return {"status": "ok"}

    @api.post("/api/jobs", tags=["jobs"], status_code=201, response_model=Submitted, responses=submit_refusals,
              dependencies=[Depends(auth)])
    def submit_json(body: SubmitBody) -> dict:
        """Submit problems as a JSON list (each checked as one line of a problem file, numbered from 1)."""
        text = "\n".join(json.dumps(item) for item in body.problems)
        return svc.submit(lambda known: read_lines(text, f"request-{uuid.uuid4().hex[:8]}.jsonl", known),
                          "the request", body.refine, body.search)

    @api.post("/api/jobs/upload", tags=["jobs"], status_code=201, response_model=Submitted, responses=submit_refusals,
              dependencies=[Depends(auth)])
    def submit_upload(file: UploadFile = File(..., description="problems, one JSON object a line"),
                      refine: int = Form(1, description="refinement rounds (1: search once)"),
                      search: str = Form("{}", description="a JSON object of SearchConfig fields")) -> dict:
        """Submit a JSONL problem file, as `arbor submit FILE.jsonl` does (the same checks, the same ids)."""
        name = Path(file.filename or "").name
        name = name if RUN_NAME.fullmatch(name) else "upload.jsonl"
        try:
            text = file.file.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(422, f"{name} is not UTF-8 text (byte {exc.start}): nothing was submitted") from None
        try:
            given = json.loads(search)
        except json.JSONDecodeError as exc:
            raise ApiError(422, f"search is not valid JSON: {exc}") from None
        return svc.submit(lambda known: read_lines(text, name, known), name, refine, given)

    @api.get("/api/jobs", tags=["jobs"], dependencies=[Depends(auth)], responses=refusals)
    def jobs(status: Optional[str] = Query(None, description="queued, running, done or failed"),
             limit: Optional[int] = Query(None, ge=1, description="the most jobs to return, newest first")) -> list[dict]:
        return svc.list_jobs(status, limit)

    @api.get("/api/jobs/{job_id}", tags=["jobs"], dependencies=[Depends(auth)], responses=refusals)
    def job(job_id: str) -> dict:
        """A job: status, progress while it runs, each refinement round's best attempt, the best answer."""
        return svc.job(job_id)

    @api.get("/api/events", tags=["jobs"], dependencies=[Depends(auth)], responses=refusals,
             response_class=StreamingResponse)
    async def events(request: Request, job: list[str] = Query([], description="job ids to follow (none: every job)")):
        """Server-sent events: `event: job` with the job's summary whenever its state or progress changes; with job
        ids given, `event: end` once all of them are finished."""
        ids = list(dict.fromkeys(job))
        missing = [j for j in ids if svc.store.get_job(j) is None]
        if missing:
            raise ApiError(404, f"no job {missing[0]!r}")

        async def stream():
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
                if ids and all(states[j]["status"] in FINISHED for j in ids if j in states):
                    yield f"event: end\ndata: {json.dumps({'jobs': len(ids)})}\n\n"
                    return
                if time.monotonic() - last_write > 15:
                    last_write = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(cfg.poll_s)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.get("/api/policies", tags=["policies"], dependencies=[Depends(auth)], responses=refusals)
    def policies() -> list[dict]:
        return svc.policies()

    @api.post("/api/policies/{version}/promote", tags=["policies"], dependencies=[Depends(auth)],
              responses={**refusals, 409: {"model": Refused, "description": "the gate refuses it"}})
    def promote(version: str) -> dict:
        """Promote a version if it passes the train cycle's gate (or was promoted before); workers move to it
        between jobs."""
        return svc.promote(version)

    @api.post("/api/policies/rollback", tags=["policies"], dependencies=[Depends(auth)],
              responses={**refusals, 409: {"model": Refused, "description": "nothing to roll back to"}})
    def rollback() -> dict:
        """Promote the previously promoted version again; the current one is marked rejected."""
        return svc.rollback()

    @api.get("/api/runs", tags=["runs"], dependencies=[Depends(auth)], responses=refusals)
    def runs() -> list[dict]:
        """Runs of `arbor run` (report.json under ARBOR_HOME/runs/), newest first."""
        return svc.runs()

    @api.get("/api/runs/{name}", tags=["runs"], dependencies=[Depends(auth)], responses=refusals)
    def run(name: str) -> dict:
        """A run's report.json: its cycles (held-out accuracy, filters with their precision, gate, promotion)."""
        return svc.run(name)

    @api.get("/api/runs/{name}/learning_curve.png", tags=["runs"], dependencies=[Depends(auth)], responses=refusals,
             response_class=FileResponse)
    def curve(name: str):
        return FileResponse(svc.curve(name), media_type="image/png")

    @api.post("/api/train", tags=["training"], status_code=202, response_model=TrainQueued, dependencies=[Depends(auth)],
              responses={**refusals, 503: {"model": Refused, "description": "broker not configured or unreachable"}})
    def train() -> dict:
        """Queue one train cycle; its id is a job id once a trainer picks it up (GET /api/jobs/{id})."""
        return svc.train()

    # ---- web view ----
    api.mount("/static", StaticFiles(directory=str(WEB / "static")), name="static")

    def page(request: Request, template: str, code: int = 200, **context):
        return templates.TemplateResponse(request, template, {"auth": token is not None, **context}, status_code=code)

    @api.get("/", include_in_schema=False)
    def home():
        return RedirectResponse("/jobs", status_code=303)

    @api.get("/login", include_in_schema=False, response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/jobs"):
        return page(request, "login.html", next=next if next.startswith("/") else "/jobs", error=None)

    @api.post("/login", include_in_schema=False)
    def login(request: Request, token_given: str = Form("", alias="token"), next: str = Form("/jobs")):
        target = next if next.startswith("/") and not next.startswith("//") else "/jobs"
        if token is not None and not secrets.compare_digest(token_given.encode(), token.encode()):
            return page(request, "login.html", code=401, next=target, error="wrong token")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, token_given, httponly=True, samesite="strict")
        return response

    @api.post("/logout", include_in_schema=False)
    def logout():
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @api.get("/jobs", include_in_schema=False, response_class=HTMLResponse, dependencies=[Depends(web_auth)])
    def jobs_page(request: Request, status: Optional[str] = None, message: Optional[str] = None):
        return page(request, "jobs.html", jobs=svc.list_jobs(status, None), status=status, message=message, refused=None,
                    strategies=_strategies())

    @api.post("/jobs/upload", include_in_schema=False, dependencies=[Depends(web_auth)])
    def upload_form(request: Request, file: UploadFile = File(...), refine: int = Form(1),
                    strategy: str = Form("")):
        """The jobs page's form: POST /api/jobs/upload's submission, answered with a page."""
        name = Path(file.filename or "").name
        name = name if RUN_NAME.fullmatch(name) else "upload.jsonl"
        try:
            try:
                text = file.file.read().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ApiError(422, f"{name} is not UTF-8 text (byte {exc.start}): nothing was submitted") from None
            done = svc.submit(lambda known: read_lines(text, name, known), name, refine,
                              {"strategy": strategy} if strategy else {})
        except ApiError as exc:
            return page(request, "jobs.html", code=exc.status, jobs=svc.list_jobs(None, None), status=None, message=None,
                        refused=exc, strategies=_strategies())
        message = f"submitted {len(done['job_ids'])} job(s) from {name}"
        return RedirectResponse(f"/jobs?{_query(message)}", status_code=303)

    @api.get("/jobs/{job_id}", include_in_schema=False, response_class=HTMLResponse, dependencies=[Depends(web_auth)])
    def job_page(request: Request, job_id: str):
        try:
            job = svc.job(job_id)
        except ApiError as exc:
            return page(request, "error.html", code=exc.status, message=exc.detail)
        return page(request, "job.html", job=job)

    @api.get("/jobs/{job_id}/tree", include_in_schema=False, response_class=HTMLResponse, dependencies=[Depends(web_auth)])
    def tree_page(request: Request, job_id: str):
        try:
            return HTMLResponse(svc.tree_html(job_id))
        except ApiError as exc:
            return page(request, "error.html", code=exc.status, message=exc.detail)

    @api.get("/policies", include_in_schema=False, response_class=HTMLResponse, dependencies=[Depends(web_auth)])
    def policies_page(request: Request, message: Optional[str] = None):
        return page(request, "policies.html", policies=svc.policies()[::-1], message=message)

    @api.post("/policies/{version}/promote", include_in_schema=False, dependencies=[Depends(web_auth)])
    def promote_form(version: str):
        try:
            done = svc.promote(version)
            message = f"{done['promoted']} promoted"
        except ApiError as exc:
            message = exc.detail
        return RedirectResponse(f"/policies?{_query(message)}", status_code=303)

    @api.post("/policies/rollback", include_in_schema=False, dependencies=[Depends(web_auth)])
    def rollback_form():
        try:
            done = svc.rollback()
            message = f"rolled back: {done['promoted']} promoted, {done['previous']} rejected"
        except ApiError as exc:
            message = exc.detail
        return RedirectResponse(f"/policies?{_query(message)}", status_code=303)

    @api.get("/runs", include_in_schema=False, response_class=HTMLResponse, dependencies=[Depends(web_auth)])
    def runs_page(request: Request):
        return page(request, "runs.html", runs=svc.runs())

    @api.get("/runs/{name}", include_in_schema=False, response_class=HTMLResponse, dependencies=[Depends(web_auth)])
    def run_page(request: Request, name: str):
        try:
            report = svc.run(name)
        except ApiError as exc:
            return page(request, "error.html", code=exc.status, message=exc.detail)
        cycles = report.get("cycles") or []
        return page(request, "run.html", name=name, report=report, cycles=cycles, keys=_difficulties(cycles),
                    curve=(svc.settings.runs_dir / name / "learning_curve.png").is_file())

    return BodyLimit(api, settings.api_max_request_bytes)


def _strategies() -> list[str]:
    from search import STRATEGIES

    return list(STRATEGIES)


def _query(message: str) -> str:
    from urllib.parse import urlencode

    return urlencode({"message": message})


def openapi_schema(app) -> dict:
    """The schema the app serves at /openapi.json (app: what create_app returned)."""
    return app.app.openapi()
