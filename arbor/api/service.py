"""What the API's routes share: settings, the store, the broker, and the rules for jobs, policies and runs.

Plain methods that raise ApiError (a status code and one line); routes_api.py answers it as JSON, routes_web.py as a
page. Submission is `arbor submit`'s (arbor/submission.py): the same JSONL checks, the same search configuration
checks and defaults, the same store-then-queue order: a refused request stores nothing.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any, Callable

from fastapi import Request

from agent.promotion import PromotionRefused, UnknownVersion, promote_by_operator, promote_margin, rollback
from agent.report import ReportUnreadable, read_report
from agent.run_store import PLAIN_NAME
from agent.versions import on_disk
from agent.schema import RoundsOutOfRange, check_rounds
from arbor import submission
from arbor.api.config import ApiConfig
from arbor.submission import BrokerError, SubmitError
from tasks.base import MAX_JOB_ID_CHARS
from tasks.text import id_error


class ApiError(Exception):
    """A refused request: status code, one line, and (for problem files) the bad lines."""

    def __init__(self, status: int, detail: str, errors: list[dict] | None = None, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.errors, self.headers = status, detail, errors, headers


class Streams:
    """Open progress streams, at most `most` at once: each holds a connection and polls the store."""

    def __init__(self, most: int):
        self.most, self.open = most, 0
        self._lock = threading.Lock()

    def take(self) -> Callable[[], None]:
        """A slot (its release function), or a 503 when `most` streams are open."""
        with self._lock:
            if self.open >= self.most:
                raise ApiError(503, f"{self.most} progress streams are open, this server's limit (arbor serve "
                                    "--max-streams): close one, or poll GET /api/jobs/{id}", headers={"Retry-After": "5"})
            self.open += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released, self.open = True, self.open - 1

        return release


def _iso(value) -> str | None:
    return value.isoformat() if isinstance(value, dt.datetime) else value


class Service:
    """Opened once per app (create_app); routes reach it through the `service` dependency below."""

    def __init__(self, settings, cfg: ApiConfig):
        self.settings, self.cfg = settings, cfg
        self._store = None
        self._celery = None
        self._tokenizers: dict[str, Any] = {}
        self.streams = Streams(cfg.max_streams)

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
        url = self.settings.broker_url
        if not url:
            raise ApiError(503, "no broker configured (ARBOR_BROKER_URL): the API queues jobs for workers; "
                                "nothing was submitted")
        try:
            submission.check_broker(url)
        except BrokerError as exc:
            raise ApiError(503, f"{exc}: nothing was submitted") from None

    # submission --------------------------------------------------------------------------------------------------
    def submit(self, read: Callable[[], list], refine: int, search: Any) -> dict:
        """Check everything, then store problems and jobs, then queue them: a refused request stores nothing.
        read: returns the problems (arbor/submission.py read_problem_text), or raises SubmitError."""
        from agent.jobs import submit_jobs

        try:
            check_rounds(refine)
        except RoundsOutOfRange as exc:
            raise ApiError(422, f"refine: {exc}") from None
        if not isinstance(search, dict):
            raise ApiError(422, f"search must be a JSON object of SearchConfig fields (got {type(search).__name__})")
        try:
            config = submission.job_search(search)
            problems = read()
        except SubmitError as exc:
            errors = None if exc.errors is None else [{"line": e.line, "message": e.message} for e in exc.errors]
            raise ApiError(422, str(exc), errors) from None
        self.check_broker()
        job_ids = submit_jobs(self.store, problems, rounds=refine, search=config)
        try:
            submission.queue_submitted(self.store, job_ids, refine)  # the same request again sends what is queued
        except BrokerError as exc:
            raise ApiError(503, str(exc)) from None
        return {"job_ids": job_ids, "problem_ids": [p.id for p in problems]}

    # jobs --------------------------------------------------------------------------------------------------------
    def _progress(self, job) -> dict | None:
        if job.status != "running" or not self.settings.broker_url:  # only a running job reports progress
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

    def _jobs(self, ids: list[str] | None = None, status: str | None = None, limit: int | None = None) -> list:
        """Job rows in one query: these ids, or the newest `limit` (in `status`), newest first."""
        from sqlalchemy import select

        from agent.schema import JobRow

        query = select(JobRow)
        if ids is not None:
            query = query.where(JobRow.id.in_(ids))
        else:
            query = query.order_by(JobRow.created_at.desc()).limit(min(limit or self.cfg.list_limit,
                                                                        self.cfg.list_limit))
            query = query.where(JobRow.status == status) if status else query
        with self.store.session() as s:
            return list(s.scalars(query))

    def list_jobs(self, status: str | None, limit: int | None) -> list[dict]:
        return [self.job_summary(r) for r in self._jobs(status=status, limit=limit)]

    @staticmethod
    def check_job_id(job_id: str) -> None:
        """A job id's shape, before any query (a NUL byte, say, is an error in PostgreSQL): 422 when it cannot be one."""
        problem = id_error(job_id, "job id", MAX_JOB_ID_CHARS)
        if problem:
            raise ApiError(422, f"{problem}: no job has such an id")

    def job(self, job_id: str) -> dict:
        self.check_job_id(job_id)
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
        verdicts = {t["round"]: t for t in (row.result or {}).get("tried", [])}
        out["refinement"] = [{
            "round": r, "prompt": rows[0].prompt or (problem.prompt if problem else None), "candidates": len(rows),
            "verdict": verdicts.get(r, {}).get("verdict"), "resamples": verdicts.get(r, {}).get("resamples"),
            "how": verdicts.get(r, {}).get("how"),
            "policy_version": rows[0].policy_version, "strategy": rows[0].strategy,
            "best": {"completion": rows[0].completion, "score": rows[0].score, "verified": rows[0].verified,
                     "mean_logprob": rows[0].mean_logprob, "is_best": rows[0].is_best},
        } for r, rows in sorted(by_round.items())]
        return out

    def job_states(self, ids: list[str]) -> dict[str, dict]:
        """Summaries (with progress) of these jobs, or of the newest jobs when no ids are given: one query."""
        return {r.id: self.job_summary(r, progress=True) for r in self._jobs(ids or None)}

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
                raise ApiError(404, f"policy {version} is not on this host ({path}): its tokenizer is needed for "
                                    "the tree")
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
                        "train": {k: v for k, v in train.items() if isinstance(v, (int, float, str))},
                        **on_disk(r.path)})
        return out

    def promote(self, version: str) -> dict:
        """Promote `version` by the gate's rule (agent/promotion.py), with the deployment's promote margin."""
        problem = id_error(version, "version")
        if problem:
            raise ApiError(422, f"{problem}: no policy version has such a name")
        try:
            return promote_by_operator(self.store, version, promote_margin(self.settings))
        except UnknownVersion as exc:
            raise ApiError(404, f"{exc} (GET /api/policies lists them)") from None
        except PromotionRefused as exc:
            raise ApiError(409, str(exc)) from None

    def rollback(self) -> dict:
        """Promote the previously promoted version again; the current one is marked rejected."""
        try:
            return rollback(self.store)
        except PromotionRefused as exc:
            raise ApiError(409, str(exc)) from None

    # runs --------------------------------------------------------------------------------------------------------
    def _run_dir(self, name: str) -> Path:
        folder = self.settings.runs_dir / name
        if not PLAIN_NAME.fullmatch(name) or not (folder / "report.json").is_file():
            raise ApiError(404, f"no run {name!r} under {self.settings.runs_dir}: GET /api/runs lists them")
        return folder

    def runs(self) -> list[dict]:
        root = self.settings.runs_dir
        found = [p for p in root.iterdir() if (p / "report.json").is_file()] if root.is_dir() else []
        out = []
        for folder in sorted(found, key=lambda p: (p / "report.json").stat().st_mtime, reverse=True):
            try:
                report = read_report(folder / "report.json")
            except ReportUnreadable:
                continue
            modified = dt.datetime.fromtimestamp((folder / "report.json").stat().st_mtime, dt.timezone.utc)
            cycles = report.get("cycles") or []
            out.append({"name": folder.name, "cycles": len(cycles), "final_policy": report.get("final_policy"),
                        "promoted": sum(1 for c in cycles if c.get("promoted")),
                        "elapsed_s": cycles[-1].get("elapsed_s") if cycles else None,
                        "modified": modified.isoformat(),
                        "curve": (folder / "learning_curve.png").is_file()})
        return out

    def run(self, name: str) -> dict:
        try:
            return read_report(self._run_dir(name) / "report.json")
        except ReportUnreadable as exc:
            raise ApiError(503, str(exc)) from None

    def curve(self, name: str) -> Path:
        path = self._run_dir(name) / "learning_curve.png"
        if not path.is_file():
            raise ApiError(404, f"run {name} has no learning_curve.png")
        return path

    # training ----------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        self.check_broker()
        return {"task_id": submission.send_train_cycle().id}


def service(request: Request) -> Service:
    """The routes' dependency: the app's one Service."""
    return request.app.state.service
