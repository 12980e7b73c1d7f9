"""The database's tables (SQLAlchemy ORM) and its one-time migrations. agent/store.py and agent/run_store.py are
the only code that reads or writes them."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, inspect, select,
                        text)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tasks import Problem
from tasks.base import MAX_ID_CHARS, MAX_TASK_CHARS

JOB_DONE = "done"
JOB_FAILED = "failed"
JOB_FINISHED = (JOB_DONE, JOB_FAILED)  # a job in one of these states is never run again
JOB_STATES = ("queued", "running", *JOB_FINISHED)
MAX_REFINE_ROUNDS = 20  # refinement rounds a job may ask for (each round's prompt holds every earlier attempt)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class RoundsOutOfRange(ValueError):
    """A job asks for a number of refinement rounds outside 1..MAX_REFINE_ROUNDS."""


def check_rounds(rounds) -> int:
    """`rounds` when it is a whole number from 1 to MAX_REFINE_ROUNDS; RoundsOutOfRange (one line) otherwise."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= MAX_REFINE_ROUNDS:
        shown = str(rounds)[:40] if isinstance(rounds, int) else repr(rounds)[:40]
        raise RoundsOutOfRange(f"refinement rounds must be a whole number from 1 to {MAX_REFINE_ROUNDS} (got {shown})")
    return rounds


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
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utc_now)

    def to_problem(self) -> Problem:
        return Problem(
            self.prompt,
            self.answer,
            self.checker,
            self.task,
            self.split,
            self.id,
            self.difficulty,
            dict(self.meta or {}),
        )


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), default="solve")  # solve | refine | train | evaluate
    problem_id: Mapped[str | None] = mapped_column(ForeignKey("problems.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="queued")  # queued | running | one of JOB_FINISHED
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # deliveries seen
    rounds: Mapped[int] = mapped_column(Integer, default=1)  # refinement rounds asked for
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
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
    # a cycle has used this row: the loop marks the best rows it trained on, the store-driven train cycle every best
    # row it judged (so that none is judged twice)
    consumed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class PolicyVersionRow(Base):
    __tablename__ = "policy_versions"
    # at most one promoted version, whatever runs at once: a second promotion must demote the first to commit
    __table_args__ = (Index("one_promoted_policy", "status", unique=True, sqlite_where=text("status = 'promoted'"),
                            postgresql_where=text("status = 'promoted'")),)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    parent: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # saving (allocated, being written) | candidate | promoted | rejected | retired | stale (judged better than a parent
    # that was no longer the promoted version when its promotion was written: never served)
    status: Mapped[str] = mapped_column(String(20), default="candidate")
    trained_on: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    promoted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


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
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RunCycleRow(Base):
    __tablename__ = "run_cycles"
    run: Mapped[str] = mapped_column(ForeignKey("runs.name"), primary_key=True)
    cycle: Mapped[int] = mapped_column(Integer, primary_key=True)  # the key (run, cycle): a cycle is recorded once
    record: Mapped[dict] = mapped_column(JSON)  # asdict(CycleRecord)
    state: Mapped[dict] = mapped_column(JSON)  # what a resume needs besides the record (the curriculum's metrics)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class ReplayLabelRow(Base):
    """The replay buffer of both drivers: a run's accepted labels (`buffer` is the run's name) and the store-driven
    train cycles' (`buffer` is "store:" and the task), per cycle in the order they were selected."""

    __tablename__ = "replay_labels"
    buffer: Mapped[str] = mapped_column(String(200), primary_key=True)
    cycle: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)  # order of selection within the cycle
    problem_id: Mapped[str | None] = mapped_column(ForeignKey("problems.id"), nullable=True)
    prompt: Mapped[str] = mapped_column(Text)
    completion: Mapped[str] = mapped_column(Text)


def store_buffer(task: str | None) -> str:
    """The replay buffer of the store-driven train cycles of one task."""
    return f"store:{task or ''}"


class SchemaVersionRow(Base):
    """Which one-time migrations (MIGRATIONS, by index) this database has had."""

    __tablename__ = "schema_version"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # a single row
    version: Mapped[int] = mapped_column(Integer)


def _keep_newest_promotion(s, engine) -> None:
    """A database made before the one-promoted index existed may hold several promoted versions: the newest
    promotion stays, then the index is created."""
    promoted = list(
        s.scalars(
            select(PolicyVersionRow)
            .where(PolicyVersionRow.status == "promoted")
            .order_by(PolicyVersionRow.promoted_at.desc().nulls_last(), PolicyVersionRow.version.desc())
        )
    )
    for row in promoted[1:]:
        row.status = "retired"
    s.flush()
    index = next(i for i in PolicyVersionRow.__table__.indexes if i.name == "one_promoted_policy")
    index.create(s.connection(), checkfirst=True)


def _one_replay_table(s, engine) -> None:
    """The replay buffer was kept two ways: a run's labels in `run_labels`, and the train cycles' as trajectory ids
    listed in each version's `trained_on["labels"]`. Both move to `replay_labels`."""
    if "run_labels" in inspect(s.connection()).get_table_names():
        s.execute(text("INSERT INTO replay_labels (buffer, cycle, seq, problem_id, prompt, completion) "
                       "SELECT run, cycle, seq, problem_id, prompt, completion FROM run_labels"))
        s.execute(text("DROP TABLE run_labels"))
    cycles: dict[str, int] = {}
    versions = s.scalars(select(PolicyVersionRow).order_by(PolicyVersionRow.created_at, PolicyVersionRow.version))
    for row in versions:
        trained_on = dict(row.trained_on or {})
        if trained_on.get("source") != "store" or "labels" not in trained_on:
            continue
        buffer = store_buffer(trained_on.get("task"))
        cycles[buffer] = cycles.get(buffer, 0) + 1
        ids = trained_on.pop("labels")
        rows = s.execute(select(TrajectoryRow.id, TrajectoryRow.problem_id, ProblemRow.prompt, TrajectoryRow.completion)
                         .join(ProblemRow, ProblemRow.id == TrajectoryRow.problem_id)
                         .where(TrajectoryRow.id.in_(ids)).order_by(TrajectoryRow.id)).all() if ids else []
        for seq, (_, problem_id, prompt, completion) in enumerate(rows):
            s.add(ReplayLabelRow(buffer=buffer, cycle=cycles[buffer], seq=seq, problem_id=problem_id, prompt=prompt,
                                 completion=completion))
        row.trained_on = {**trained_on, "replayed_labels": len(rows)}


def _consumed_trajectories(s, engine) -> None:
    """A trajectory's `trained_on` flag read like a version's `trained_on` record: the flag is now `consumed`."""
    if "trained_on" in {c["name"] for c in inspect(s.connection()).get_columns("trajectories")}:
        s.execute(text("ALTER TABLE trajectories RENAME COLUMN trained_on TO consumed"))


MIGRATIONS = [
    _keep_newest_promotion,
    _one_replay_table,
    _consumed_trajectories,
]  # append only: a database records how many it has had


def migrate(engine, sessions) -> None:
    """Create missing tables, then run the migrations this database has not had, each once (two processes starting
    at once: the schema_version row's primary key lets one of them write it; the other finds it done)."""
    Base.metadata.create_all(engine)
    try:
        with sessions() as s, s.begin():
            row = s.get(SchemaVersionRow, 1, with_for_update=True)
            done = row.version if row is not None else 0
            if done >= len(MIGRATIONS):
                return
            for step in MIGRATIONS[done:]:
                step(s, engine)
            if row is None:
                s.add(SchemaVersionRow(id=1, version=len(MIGRATIONS)))
            else:
                row.version = len(MIGRATIONS)
    except IntegrityError:
        pass  # another process ran them at the same moment and wrote the row first
