"""The store: problems, jobs, trajectories and policy versions (SQLAlchemy; SQLite or PostgreSQL).

Writes that a retried job may repeat are idempotent by key: problems by id, a job's finish by job id.
"""

from __future__ import annotations

import datetime as dt
import uuid
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, create_engine, event, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from tasks import Problem


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class ProblemRow(Base):
    __tablename__ = "problems"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)
    answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    checker: Mapped[str] = mapped_column(String(40), default="exact")
    task: Mapped[str | None] = mapped_column(String(80), nullable=True)
    split: Mapped[str] = mapped_column(String(20), default="train")
    difficulty: Mapped[int | None] = mapped_column(Integer, nullable=True)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)

    def to_problem(self) -> Problem:
        return Problem(self.prompt, self.answer, self.checker, self.task, self.split, self.id, self.difficulty, dict(self.meta or {}))


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), default="solve")  # solve | refine | train | evaluate
    problem_id: Mapped[str | None] = mapped_column(ForeignKey("problems.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="queued")  # queued | running | done | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # deliveries seen
    rounds: Mapped[int] = mapped_column(Integer, default=1)  # refinement rounds asked for
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class TrajectoryRow(Base):
    __tablename__ = "trajectories"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    problem_id: Mapped[str] = mapped_column(ForeignKey("problems.id"))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    cycle: Mapped[int | None] = mapped_column(Integer, nullable=True)
    round: Mapped[int] = mapped_column(Integer, default=0)  # refinement round
    # refinement links: the prompt a round searched (None: the problem's own prompt) and the best attempt of the
    # previous round that this round's prompt was built from
    prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("trajectories.id"), nullable=True)
    completion: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int] = mapped_column(Integer)
    mean_logprob: Mapped[float] = mapped_column(Float)
    min_logprob: Mapped[float] = mapped_column(Float)
    mean_entropy: Mapped[float] = mapped_column(Float)
    score: Mapped[float] = mapped_column(Float)
    verified: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    policy_version: Mapped[str] = mapped_column(String(64))
    strategy: Mapped[str] = mapped_column(String(40))
    search_stats: Mapped[dict] = mapped_column(JSON, default=dict)
    is_best: Mapped[bool] = mapped_column(Boolean, default=False)
    trained_on: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class PolicyVersionRow(Base):
    __tablename__ = "policy_versions"
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    parent: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="candidate")  # candidate | promoted | rejected | retired
    trained_on: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    promoted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Store:
    def __init__(self, url: str):
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.url = url
        connect_args = {"timeout": 30} if url.startswith("sqlite") else {}
        self.engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self):
        with self._sessions() as s, s.begin():
            yield s

    # problems --------------------------------------------------------------------------------------
    def add_problems(self, problems: list[Problem]) -> list[str]:
        """Insert problems, keeping existing rows with the same id (a resubmission changes nothing)."""
        ids = []
        with self.session() as s:
            existing = set(s.scalars(select(ProblemRow.id).where(ProblemRow.id.in_([p.id for p in problems if p.id]))))
            for p in problems:
                pid = p.id or f"p-{uuid.uuid4().hex[:12]}"
                p.id = pid
                ids.append(pid)
                if pid in existing:
                    continue
                existing.add(pid)
                s.add(ProblemRow(id=pid, prompt=p.prompt, answer=p.answer, checker=p.checker, task=p.task,
                                 split=p.split, difficulty=p.difficulty, meta=p.meta))
        return ids

    def get_problem(self, problem_id: str) -> Problem | None:
        with self.session() as s:
            row = s.get(ProblemRow, problem_id)
            return row.to_problem() if row else None

    def get_problems(self, problem_ids: list[str]) -> dict[str, Problem]:
        with self.session() as s:
            rows = s.scalars(select(ProblemRow).where(ProblemRow.id.in_(set(problem_ids))))
            return {r.id: r.to_problem() for r in rows}

    # jobs ------------------------------------------------------------------------------------------
    def create_job(self, kind: str, problem_id: str | None = None, rounds: int = 1, params: dict | None = None,
                   job_id: str | None = None) -> str:
        job_id = job_id or uuid.uuid4().hex
        with self.session() as s:
            s.add(JobRow(id=job_id, kind=kind, problem_id=problem_id, rounds=rounds, params=params or {}))
        return job_id

    def get_job(self, job_id: str) -> JobRow | None:
        with self.session() as s:
            return s.get(JobRow, job_id)

    def start_job(self, job_id: str, worker: str) -> bool:
        """Count a delivery and mark the job running; False when it is already finished (nothing to do)."""
        with self.session() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise KeyError(f"no job {job_id!r} in the store")
            row.attempts += 1
            if row.status in ("done", "failed"):
                return False
            row.status, row.worker = "running", worker
            return True

    def finish_job(self, job_id: str, result: dict | None = None, error: str | None = None) -> bool:
        """Finish a job exactly once: only the first call changes the row. Returns whether this call did."""
        with self.session() as s:
            changed = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status.not_in(("done", "failed")))
                .values(status="failed" if error else "done", result=result, error=error, finished_at=_now())
            ).rowcount
        return changed == 1

    def list_jobs(self, kind: str | None = None) -> list[JobRow]:
        with self.session() as s:
            q = select(JobRow).order_by(JobRow.created_at)
            if kind:
                q = q.where(JobRow.kind == kind)
            return list(s.scalars(q))

    # trajectories ----------------------------------------------------------------------------------
    def add_trajectories(self, rows: list[dict]) -> None:
        if rows:
            with self.session() as s:
                s.execute(insert(TrajectoryRow), rows)  # one executemany: ORM objects cost ~10x more per row

    def trajectories(self, job_id: str | None = None, cycle: int | None = None, best_only: bool = False) -> list[TrajectoryRow]:
        with self.session() as s:
            q = select(TrajectoryRow).order_by(TrajectoryRow.id)
            if job_id is not None:
                q = q.where(TrajectoryRow.job_id == job_id)
            if cycle is not None:
                q = q.where(TrajectoryRow.cycle == cycle)
            if best_only:
                q = q.where(TrajectoryRow.is_best.is_(True))
            return list(s.scalars(q))

    def mark_trained(self, trajectory_ids: list[int]) -> None:
        with self.session() as s:
            s.execute(update(TrajectoryRow).where(TrajectoryRow.id.in_(trajectory_ids)).values(trained_on=True))

    def heldout_problems(self) -> list[Problem]:
        with self.session() as s:
            return [r.to_problem() for r in s.scalars(select(ProblemRow).where(ProblemRow.split == "heldout"))]

    def count_untrained_best(self) -> int:
        with self.session() as s:
            q = select(TrajectoryRow.id).where(TrajectoryRow.is_best.is_(True), TrajectoryRow.trained_on.is_(False))
            return len(list(s.scalars(q)))

    # policy versions -------------------------------------------------------------------------------
    def record_policy(self, version: str, path: str, parent: str | None, status: str, trained_on: dict, metrics: dict) -> None:
        with self.session() as s:
            try:
                with s.begin_nested():
                    s.add(PolicyVersionRow(version=version, path=path, parent=parent, status=status,
                                           trained_on=trained_on, metrics=metrics))
            except IntegrityError:
                raise ValueError(f"policy version {version} is already recorded") from None

    def set_policy_status(self, version: str, status: str, metrics: dict | None = None) -> None:
        """Set a version's status; promoting one retires the previously promoted version in the same transaction."""
        with self.session() as s:
            row = s.get(PolicyVersionRow, version)
            if row is None:
                raise KeyError(f"no policy version {version!r}")
            if status == "promoted":
                s.execute(update(PolicyVersionRow).where(PolicyVersionRow.status == "promoted").values(status="retired"))
                row.promoted_at = _now()
            row.status = status
            if metrics is not None:
                row.metrics = {**(row.metrics or {}), **metrics}

    def policies(self) -> list[PolicyVersionRow]:
        with self.session() as s:
            return list(s.scalars(select(PolicyVersionRow).order_by(PolicyVersionRow.created_at)))

    def promoted_policy(self) -> PolicyVersionRow | None:
        with self.session() as s:
            return s.scalars(select(PolicyVersionRow).where(PolicyVersionRow.status == "promoted")).first()


def _sqlite_pragmas(dbapi_connection, _record):
    # WAL lets workers read while another process writes; foreign keys are off by default in SQLite
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
