"""The store: problems, jobs, trajectories and policy versions (SQLAlchemy; SQLite or PostgreSQL).

Writes that a retried job may repeat are idempotent by key: problems by id, a job's finish by job id.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, create_engine, event, exists, func,
                        ForeignKeyConstraint, Index, insert, select, text, update)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, aliased, mapped_column, sessionmaker

from tasks import Problem
from tasks.base import MAX_ID_CHARS, MAX_TASK_CHARS


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class ProblemRow(Base):
    __tablename__ = "problems"
    id: Mapped[str] = mapped_column(String(MAX_ID_CHARS), primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)
    answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    checker: Mapped[str] = mapped_column(String(40), default="exact")
    task: Mapped[str | None] = mapped_column(String(MAX_TASK_CHARS), nullable=True)
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
    # at most one promoted version, whatever runs at once: a second promotion must demote the first to commit
    __table_args__ = (Index("one_promoted_policy", "status", unique=True, sqlite_where=text("status = 'promoted'"),
                            postgresql_where=text("status = 'promoted'")),)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    parent: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # saving (allocated, being written) | candidate | promoted | rejected | retired
    status: Mapped[str] = mapped_column(String(20), default="candidate")
    trained_on: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    promoted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ProblemConflict(ValueError):
    """A problem id that is already taken by a problem with different content."""


def _insert(dialect: str):
    """INSERT ... ON CONFLICT DO NOTHING for the store's two databases."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert


def _differences(old: dict, new: dict) -> str:
    return ", ".join(f"{k} {str(old[k])[:40]!r} vs {str(new[k])[:40]!r}" for k in new if old.get(k) != new[k])


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
        self._one_promoted()

    def _one_promoted(self) -> None:
        """The one-promoted constraint on a database created before it existed: the newest promotion stays."""
        index = next(i for i in PolicyVersionRow.__table__.indexes if i.name == "one_promoted_policy")
        with self.session() as s:
            promoted = list(s.scalars(select(PolicyVersionRow).where(PolicyVersionRow.status == "promoted")
                                      .order_by(PolicyVersionRow.promoted_at.desc().nulls_last(), PolicyVersionRow.version.desc())))
            for row in promoted[1:]:
                row.status = "retired"
        try:
            index.create(self.engine, checkfirst=True)
        except IntegrityError:
            pass  # another process created it (or demoted) at the same moment
        except Exception as exc:  # "already exists" raced between the check and the create
            if "already exists" not in str(exc):
                raise

    @contextmanager
    def session(self):
        with self._sessions() as s, s.begin():
            yield s

    # problems --------------------------------------------------------------------------------------
    def add_problems(self, problems: list[Problem]) -> list[str]:
        """Insert problems; returns their ids (a problem without one gets `Problem.content_id()`).

        An id already stored with the same content changes nothing (a resubmission); an id stored, or given twice
        here, with different content raises ProblemConflict and adds nothing. Concurrent calls are safe: rows go in
        with INSERT ... ON CONFLICT DO NOTHING and are compared with what the table holds afterwards."""
        with self.session() as s:
            return self._add_problems(s, problems)

    def _add_problems(self, s, problems: list[Problem]) -> list[str]:
        ids, batch = [], {}
        for p in problems:
            p.id = p.id or p.content_id()
            if len(p.id) > MAX_ID_CHARS:
                raise ProblemConflict(f"problem id {p.id[:40]!r}... has {len(p.id)} characters, over {MAX_ID_CHARS}")
            ids.append(p.id)
            if p.id in batch and batch[p.id].content() != p.content():
                raise ProblemConflict(f"problem id {p.id!r} is given to two different problems "
                                      f"({_differences(batch[p.id].content(), p.content())})")
            batch[p.id] = p
        conflicts = []
        unique = list(batch.values())
        dialect_insert = _insert(self.engine.dialect.name)
        for at in range(0, len(unique), 500):  # bounded statements and IN lists
            chunk = unique[at : at + 500]
            rows = [dict(id=p.id, prompt=p.prompt, answer=p.answer, checker=p.checker, task=p.task, split=p.split,
                         difficulty=p.difficulty, meta=p.meta or {}, created_at=_now()) for p in chunk]
            s.execute(dialect_insert(ProblemRow).on_conflict_do_nothing(index_elements=["id"]), rows)
            stored = {r.id: r.to_problem().content() for r in s.scalars(select(ProblemRow).where(ProblemRow.id.in_([p.id for p in chunk])))}
            conflicts += [f"{p.id!r} ({_differences(stored[p.id], p.content())})" for p in chunk if stored[p.id] != p.content()]
        if conflicts:  # raising rolls the whole transaction back: nothing of it is added
            raise ProblemConflict(f"{len(conflicts)} problem id(s) already stored with different content: "
                                  f"{'; '.join(conflicts[:5])}{' ...' if len(conflicts) > 5 else ''}: give each "
                                  "new problem its own id, or leave 'id' out (then it is derived from the content)")
        return ids

    def submit(self, problems: list[Problem], kind: str, rounds: int, params: dict, key: str = "") -> list[str]:
        """Problems and one job per problem, in one transaction: all of them or (a crash, a conflict) none.

        A job's id is a hash of its problem, kind, rounds, params and the submission `key`, so that submitting the
        same problems the same way again adds nothing and returns the same ids (INSERT ... ON CONFLICT DO NOTHING);
        another `key` makes new jobs of the same problems. Rounds outside 1..MAX_REFINE_ROUNDS: RoundsOutOfRange,
        nothing written."""
        from agent.jobs import check_rounds  # agent.jobs imports this module; the bound lives there

        check_rounds(rounds)
        with self.session() as s:
            pids = self._add_problems(s, problems)
            ids = [job_id(pid, kind, rounds, params, key) for pid in pids]
            rows = list({i: dict(id=i, kind=kind, problem_id=pid, rounds=rounds, params=params, status="queued", attempts=0,
                                 created_at=_now()) for i, pid in zip(ids, pids)}.values())
            dialect_insert = _insert(self.engine.dialect.name)
            for at in range(0, len(rows), 500):
                s.execute(dialect_insert(JobRow).on_conflict_do_nothing(index_elements=["id"]), rows[at : at + 500])
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

    def running_jobs(self, kinds: tuple[str, ...] = ("solve", "refine")) -> list[JobRow]:
        with self.session() as s:
            return list(s.scalars(select(JobRow).where(JobRow.status == "running", JobRow.kind.in_(kinds))))

    def requeue_running(self, job_id: str, attempts: int) -> bool:
        """Mark a running job queued again (its delivery died), only if no delivery started it since we looked:
        a compare-and-swap on (status, attempts). Returns whether this call changed it."""
        with self.session() as s:
            changed = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "running",
                                                     JobRow.attempts == attempts).values(status="queued")).rowcount
        return changed == 1

    def job_status(self, job_ids: list[str]) -> dict[str, str]:
        """Job id -> status, for the ids that exist (bounded IN lists)."""
        ids, out = list(dict.fromkeys(job_ids)), {}
        with self.session() as s:
            for at in range(0, len(ids), 500):
                out.update(s.execute(select(JobRow.id, JobRow.status).where(JobRow.id.in_(ids[at : at + 500]))).all())
        return out

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

    @staticmethod
    def _untrained_best():
        """What a train cycle consumes (agent/train_cycle.py): the best row of each worker result (a job's) that no
        cycle has judged yet. The loop judges and marks its own results (cycle rows) itself. Results on held-out
        problems (a user may solve them too) are never trained on: the gate would then score memorised answers."""
        heldout = select(ProblemRow.id).where(ProblemRow.split == "heldout")
        return (TrajectoryRow.is_best.is_(True), TrajectoryRow.trained_on.is_(False), TrajectoryRow.job_id.is_not(None),
                TrajectoryRow.problem_id.not_in(heldout))

    def count_untrained_best(self) -> int:
        """Worker results no train cycle has judged yet (one COUNT)."""
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(TrajectoryRow).where(*self._untrained_best()))

    def count_trainable(self) -> int:
        """Untrained worker results of tasks that have held-out problems: what the next train cycle can consume (a
        result of a task without held-out problems waits, and must not start cycle after cycle). One COUNT."""
        heldout = aliased(ProblemRow)
        has_heldout = exists().where(heldout.split == "heldout", heldout.task.is_not_distinct_from(ProblemRow.task))
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(TrajectoryRow)
                            .join(ProblemRow, ProblemRow.id == TrajectoryRow.problem_id)
                            .where(*self._untrained_best(), has_heldout))

    # policy versions -------------------------------------------------------------------------------
    def record_policy(self, version: str, path: str, parent: str | None, status: str, trained_on: dict, metrics: dict) -> None:
        with self.session() as s:
            try:
                with s.begin_nested():
                    s.add(PolicyVersionRow(version=version, path=path, parent=parent, status=status,
                                           trained_on=trained_on, metrics=metrics))
            except IntegrityError:
                raise ValueError(f"policy version {version} is already recorded") from None

    def allocate_policy(self, path_of, parent: str | None, trained_on: dict, metrics: dict, floor: int = 0) -> str:
        """Take the next free version number, v{max+1} (at least v{floor}), by inserting its row with status
        `saving`: the primary key makes two writers take two numbers; on a conflict the next one is tried."""
        for _ in range(100):
            with self.session() as s:
                numbers = [int(v[1:]) for v in s.scalars(select(PolicyVersionRow.version)) if v[:1] == "v" and v[1:].isdigit()]
            version = f"v{max(max(numbers, default=-1) + 1, floor)}"
            try:
                with self.session() as s:
                    s.add(PolicyVersionRow(version=version, path=path_of(version), parent=parent, status="saving",
                                           trained_on=trained_on, metrics=metrics))
                return version
            except IntegrityError:
                continue  # another writer took it a moment ago
        raise RuntimeError("could not allocate a policy version number after 100 tries")

    def finish_policy(self, version: str, status: str) -> None:
        """A saved version's folder is complete: it leaves `saving` for its first status."""
        with self.session() as s:
            s.execute(update(PolicyVersionRow).where(PolicyVersionRow.version == version, PolicyVersionRow.status == "saving")
                      .values(status=status))

    def drop_unsaved_policy(self, version: str) -> None:
        """Forget a version number whose save never completed (its folder never appeared)."""
        with self.session() as s:
            s.execute(PolicyVersionRow.__table__.delete().where(PolicyVersionRow.version == version,
                                                                PolicyVersionRow.status == "saving"))

    def set_policy_status(self, version: str, status: str, metrics: dict | None = None) -> None:
        """Set a version's status; promoting one retires the previously promoted version in the same transaction.
        Two promotions at once: the unique index makes the later one fail, and it runs again (demoting the first).

        The transaction writes before it reads: on SQLite a row read first comes from a snapshot that a racing
        promotion may have changed by the time this one writes, and an ORM write of a status the stale row already
        shows is skipped (a promoted version retired under it stayed retired: nothing promoted)."""
        for attempt in range(20):
            try:
                with self.session() as s:
                    if status == "promoted":
                        s.execute(update(PolicyVersionRow).where(PolicyVersionRow.status == "promoted",
                                                                 PolicyVersionRow.version != version).values(status="retired"))
                    values = {"status": status, **({"promoted_at": _now()} if status == "promoted" else {})}
                    if s.execute(update(PolicyVersionRow).where(PolicyVersionRow.version == version).values(**values)).rowcount != 1:
                        raise KeyError(f"no policy version {version!r}")
                    if metrics is not None:
                        row = s.get(PolicyVersionRow, version, populate_existing=True)
                        row.metrics = {**(row.metrics or {}), **metrics}
                return
            except (IntegrityError, OperationalError) as exc:
                # the unique index refused a racing promotion, or PostgreSQL broke a deadlock between two of them
                retry = isinstance(exc, IntegrityError) or getattr(exc.orig, "sqlstate", None) in ("40P01", "40001")
                if not retry or attempt == 19:
                    raise
                time.sleep(0.01 * (attempt + 1))

    def policies(self) -> list[PolicyVersionRow]:
        with self.session() as s:
            return list(s.scalars(select(PolicyVersionRow).order_by(PolicyVersionRow.created_at, PolicyVersionRow.version)))

    def promoted_policy(self) -> PolicyVersionRow | None:
        with self.session() as s:
            return s.scalars(select(PolicyVersionRow).where(PolicyVersionRow.status == "promoted")
                             .order_by(PolicyVersionRow.promoted_at.desc().nulls_last(), PolicyVersionRow.version.desc())).first()


def job_id(problem_id: str, kind: str, rounds: int, params: dict, key: str = "") -> str:
    """A job's id from what it runs: the same problem submitted the same way (and under the same key) is one job."""
    blob = json.dumps({"problem": problem_id, "kind": kind, "rounds": rounds, "params": params, "key": key},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _sqlite_pragmas(dbapi_connection, _record):
    # WAL lets workers read while another process writes; foreign keys are off by default in SQLite
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


# runs ------------------------------------------------------------------------------------------------
# `arbor run` keeps its run here, so that a killed run resumes after its last recorded cycle: the run's settings,
# one row per finished cycle (unique per run and cycle) and the labels it accepted (its replay buffer). A cycle's
# record, trajectories, labels and its candidate's promotion or rejection are written in one transaction
# (RunStore.record_cycle): a kill before it leaves nothing of the cycle but a candidate version, which the resumed
# run discards (RunStore.unrecorded_versions); a kill after it loses nothing.

class RunRow(Base):
    __tablename__ = "runs"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    config: Mapped[dict] = mapped_column(JSON)  # asdict(LoopConfig)
    inputs: Mapped[dict] = mapped_column(JSON)  # the user's files (path, sha256) and model folder
    base_version: Mapped[str | None] = mapped_column(String(64), nullable=True)  # None until the warm start is saved
    status: Mapped[str] = mapped_column(String(20), default="running")  # running | finished
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RunCycleRow(Base):
    __tablename__ = "run_cycles"
    run: Mapped[str] = mapped_column(ForeignKey("runs.name"), primary_key=True)
    cycle: Mapped[int] = mapped_column(Integer, primary_key=True)  # the key (run, cycle): a cycle is recorded once
    record: Mapped[dict] = mapped_column(JSON)  # asdict(CycleRecord)
    state: Mapped[dict] = mapped_column(JSON)  # what a resume needs besides the record (the curriculum's metrics)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class RunLabelRow(Base):
    __tablename__ = "run_labels"
    __table_args__ = (ForeignKeyConstraint(["run", "cycle"], ["run_cycles.run", "run_cycles.cycle"]),)
    run: Mapped[str] = mapped_column(String(100), primary_key=True)
    cycle: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)  # order of selection within the cycle
    problem_id: Mapped[str | None] = mapped_column(ForeignKey("problems.id"), nullable=True)
    prompt: Mapped[str] = mapped_column(Text)
    completion: Mapped[str] = mapped_column(Text)


class RunExists(ValueError):
    """A run name that is already taken."""


class CycleRecorded(ValueError):
    """A cycle of a run that is already recorded (another process resumed the same run)."""


class RunStore:
    """The runs of `arbor run` in a Store's database (the tables above)."""

    def __init__(self, store: Store):
        self.store = store

    def create(self, name: str, config: dict, inputs: dict) -> None:
        try:
            with self.store.session() as s:
                s.add(RunRow(name=name, config=config, inputs=inputs))
        except IntegrityError:
            raise RunExists(f"run {name!r} already exists") from None

    def get(self, name: str) -> RunRow | None:
        with self.store.session() as s:
            return s.get(RunRow, name)

    def set_config(self, name: str, config: dict) -> None:
        with self.store.session() as s:
            s.execute(update(RunRow).where(RunRow.name == name).values(config=config))

    def set_base(self, name: str, version: str, promote: bool) -> None:
        """Record the run's first policy and, with `promote`, promote it if no version is promoted yet, in one
        transaction: a run never demotes a version it did not train (an earlier run's improved policy)."""
        with self.store.session() as s:
            s.execute(update(RunRow).where(RunRow.name == name).values(base_version=version))
            if promote and s.scalar(select(func.count()).select_from(PolicyVersionRow).where(PolicyVersionRow.status == "promoted")) == 0:
                row = s.get(PolicyVersionRow, version, with_for_update=True)
                row.status, row.promoted_at = "promoted", _now()

    def finish(self, name: str) -> None:
        with self.store.session() as s:
            s.execute(update(RunRow).where(RunRow.name == name).values(status="finished", finished_at=_now()))

    def cycles(self, name: str) -> list[RunCycleRow]:
        with self.store.session() as s:
            return list(s.scalars(select(RunCycleRow).where(RunCycleRow.run == name).order_by(RunCycleRow.cycle)))

    def labels(self, name: str) -> list[RunLabelRow]:
        with self.store.session() as s:
            return list(s.scalars(select(RunLabelRow).where(RunLabelRow.run == name)
                                  .order_by(RunLabelRow.cycle, RunLabelRow.seq)))

    def record_cycle(self, name: str, cycle: int, record: dict, state: dict, labels: list[dict] = (),
                     trajectories: list[dict] = (), candidate: str | None = None, promoted: bool = False) -> None:
        """Write a finished cycle in one transaction: its record, its labels, its trajectories (their `trained_on`
        marks say which rows the cycle trained on) and the candidate's promotion or rejection (promoting retires
        the promoted version). Raises CycleRecorded, and writes nothing, when the cycle is recorded already."""
        for attempt in range(20):
            try:
                with self.store.session() as s:
                    if s.get(RunCycleRow, (name, cycle)) is not None:
                        raise CycleRecorded(f"cycle {cycle} of run {name!r} is already recorded")
                    s.add(RunCycleRow(run=name, cycle=cycle, record=record, state=state))
                    s.flush()  # the label rows' foreign key needs it
                    if labels:
                        s.execute(insert(RunLabelRow), [dict(run=name, cycle=cycle, seq=i, problem_id=e.get("problem_id"),
                                                             prompt=e["prompt"], completion=e["completion"])
                                                        for i, e in enumerate(labels)])
                    if trajectories:
                        s.execute(insert(TrajectoryRow), list(trajectories))
                    if candidate is not None:
                        row = s.get(PolicyVersionRow, candidate, with_for_update=True)
                        if row is None or row.status != "candidate":
                            raise RuntimeError(f"cycle {cycle} of run {name!r}: its candidate {candidate} is "
                                               f"{'missing' if row is None else row.status}, expected an undecided candidate")
                        if promoted:
                            s.execute(update(PolicyVersionRow).where(PolicyVersionRow.status == "promoted",
                                                                     PolicyVersionRow.version != candidate).values(status="retired"))
                            s.flush()
                            row.promoted_at = _now()
                        row.status = "promoted" if promoted else "rejected"
                return
            except IntegrityError:
                if attempt == 19:
                    raise
                time.sleep(0.01 * (attempt + 1))  # two promotions at once, or the same cycle: the check above decides

    def unrecorded_versions(self, name: str) -> list[PolicyVersionRow]:
        """Versions the run saved (`trained_on["run"]`) that neither its base nor a recorded cycle names: a process
        killed after saving a candidate and before recording its cycle left them."""
        with self.store.session() as s:
            run = s.get(RunRow, name)
            named = {run.base_version} | {c.record.get("candidate") for c in s.scalars(select(RunCycleRow).where(RunCycleRow.run == name))}
            rows = s.scalars(select(PolicyVersionRow).order_by(PolicyVersionRow.version))
            return [r for r in rows if (r.trained_on or {}).get("run") == name and r.version not in named]

    def delete_undecided_policy(self, version: str) -> None:
        """Forget a version that was never promoted or rejected (status saving or candidate)."""
        with self.store.session() as s:
            row = s.get(PolicyVersionRow, version, with_for_update=True)
            if row is None:
                return
            if row.status not in ("saving", "candidate"):
                raise RuntimeError(f"policy version {version} is {row.status}: only an undecided version may be deleted")
            s.delete(row)
