"""The store: problems, jobs, trajectories and policy versions (SQLAlchemy; SQLite or PostgreSQL).

Writes that a retried job may repeat are idempotent by key: problems by id, a job's finish by job id.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, exists, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import aliased, sessionmaker

from agent.promotion import ANY_PROMOTED, promote_in
from agent.schema import (JOB_FINISHED, JobRow, PolicyVersionRow, ProblemRow, ReplayLabelRow, TrajectoryRow, check_rounds,
                          migrate, utc_now)
from tasks import Problem
from tasks.base import MAX_ID_CHARS


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
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        migrate(self.engine, self._sessions)

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
                         difficulty=p.difficulty, meta=p.meta or {}, created_at=utc_now()) for p in chunk]
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
        check_rounds(rounds)
        with self.session() as s:
            pids = self._add_problems(s, problems)
            ids = [job_id(pid, kind, rounds, params, key) for pid in pids]
            rows = list({i: dict(id=i, kind=kind, problem_id=pid, rounds=rounds, params=params, status="queued", attempts=0,
                                 created_at=utc_now()) for i, pid in zip(ids, pids)}.values())
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
            if row.status in JOB_FINISHED:
                return False
            row.status, row.worker = "running", worker
            return True

    def finish_job(self, job_id: str, result: dict | None = None, error: str | None = None,
                   rounds_rows: list[list[dict]] = (), parents: list[int | None] | None = None) -> bool:
        """Finish a job and insert its trajectories in one transaction, only if it is not finished yet: a redelivered
        job writes nothing. `rounds_rows[r]` are round r's rows, best first; `parents[r]` is the earlier round whose
        best row round r refined (its `parent_id`). Returns whether this call wrote anything."""
        with self.session() as s:
            changed = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status.not_in(JOB_FINISHED))
                .values(status="failed" if error else "done", result=result, error=error, finished_at=utc_now())
            ).rowcount
            if changed != 1:
                return False
            best_ids = []
            for r, rows in enumerate(rounds_rows):
                parent = parents[r] if parents else None
                objs = [TrajectoryRow(**row, parent_id=None if parent is None else best_ids[parent]) for row in rows]
                s.add_all(objs)
                s.flush()  # assigns ids so that later rounds can point at this one
                best_ids.append(objs[0].id if objs else None)
        return True

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

    def mark_consumed(self, trajectory_ids: list[int]) -> None:
        with self.session() as s:
            s.execute(update(TrajectoryRow).where(TrajectoryRow.id.in_(trajectory_ids)).values(consumed=True))

    def heldout_problems(self) -> list[Problem]:
        with self.session() as s:
            return [r.to_problem() for r in s.scalars(select(ProblemRow).where(ProblemRow.split == "heldout"))]

    def untrained_results(self, limit: int) -> list[list[TrajectoryRow]]:
        """The oldest `limit` worker results (a job's round) whose best row no train cycle has consumed yet, each as its
        rows ranked best first. Bounded: one page of best rows, then the rows of those jobs only."""
        with self.session() as s:
            best = list(s.scalars(select(TrajectoryRow).where(*self._untrained_best()).order_by(TrajectoryRow.id).limit(limit)))
            jobs = sorted({b.job_id for b in best})
            rows: list[TrajectoryRow] = []
            for at in range(0, len(jobs), 500):  # bounded IN lists (SQLite's variable limit)
                rows += s.scalars(select(TrajectoryRow).where(TrajectoryRow.job_id.in_(jobs[at : at + 500]))
                                  .order_by(TrajectoryRow.id))
        wanted = {(b.job_id, b.round) for b in best}
        by_result: dict[tuple, list[TrajectoryRow]] = {}
        for row in rows:
            if (row.job_id, row.round) in wanted:
                by_result.setdefault((row.job_id, row.round), []).append(row)
        return [sorted(by_result[(b.job_id, b.round)], key=lambda r: (not r.is_best, r.id)) for b in best]

    def add_replay_labels(self, buffer: str, labels: list[dict]) -> int:
        """Append one cycle's labels ({"prompt", "completion", "problem_id"}) to a replay buffer; returns the cycle's
        number in that buffer."""
        for _ in range(20):
            try:
                with self.session() as s:
                    cycle = 1 + (s.scalar(select(func.max(ReplayLabelRow.cycle)).where(ReplayLabelRow.buffer == buffer)) or 0)
                    s.add_all([ReplayLabelRow(buffer=buffer, cycle=cycle, seq=i, problem_id=e.get("problem_id"),
                                              prompt=e["prompt"], completion=e["completion"]) for i, e in enumerate(labels)])
                return cycle
            except IntegrityError:
                continue  # another cycle took that number a moment ago
        raise RuntimeError(f"could not append to replay buffer {buffer!r} after 20 tries")

    def replay_labels(self, buffer: str, limit: int) -> list[dict]:
        """The newest `limit` labels of a replay buffer, oldest first: a mix draws at most that many, however many
        cycles ran before."""
        with self.session() as s:
            rows = s.execute(select(ReplayLabelRow.prompt, ReplayLabelRow.completion).where(ReplayLabelRow.buffer == buffer)
                             .order_by(ReplayLabelRow.cycle.desc(), ReplayLabelRow.seq.desc()).limit(limit)).all()
        return [{"prompt": prompt, "completion": completion} for prompt, completion in reversed(rows)]

    @staticmethod
    def _untrained_best():
        """What a train cycle consumes (agent/train_cycle.py): the best row of each worker result (a job's) that no
        cycle has judged yet. The loop judges and marks its own results (cycle rows) itself. Results on held-out
        problems (a user may solve them too) are never trained on: the gate would then score memorised answers."""
        heldout = select(ProblemRow.id).where(ProblemRow.split == "heldout")
        return (TrajectoryRow.is_best.is_(True), TrajectoryRow.consumed.is_(False), TrajectoryRow.job_id.is_not(None),
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
        """Set a version's status other than promoted (promote_policy writes promotions), merging `metrics`."""
        if status == "promoted":
            raise ValueError("promotion is written by Store.promote_policy (a compare-and-set on the promoted version)")
        with self.session() as s:
            if s.execute(update(PolicyVersionRow).where(PolicyVersionRow.version == version).values(status=status)).rowcount != 1:
                raise KeyError(f"no policy version {version!r}")
            if metrics is not None:
                row = s.get(PolicyVersionRow, version, populate_existing=True)
                row.metrics = {**(row.metrics or {}), **metrics}

    def promote_policy(self, version: str, expected: str | None | object = ANY_PROMOTED, metrics: dict | None = None,
                       stale_status: str | None = None) -> bool:
        """Promote `version` if `expected` (a version, or None for none) is still the promoted one, retiring it; with
        the default ANY_PROMOTED, whatever is promoted is retired. Returns whether it promoted. A refused promotion
        sets the version's status to `stale_status` when given. `metrics` are merged in either way."""
        for attempt in range(20):
            try:
                with self.session() as s:
                    promoted = promote_in(s, version, expected)
                    values = {"status": stale_status} if not promoted and stale_status else {}
                    if values:
                        s.execute(update(PolicyVersionRow).where(PolicyVersionRow.version == version).values(**values))
                    if metrics is not None:
                        row = s.get(PolicyVersionRow, version, populate_existing=True)
                        row.metrics = {**(row.metrics or {}), **metrics}
                return promoted
            except (IntegrityError, OperationalError) as exc:
                if not retryable(exc) or attempt == 19:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def policies(self) -> list[PolicyVersionRow]:
        with self.session() as s:
            return list(s.scalars(select(PolicyVersionRow).order_by(PolicyVersionRow.created_at, PolicyVersionRow.version)))

    def promoted_policy(self) -> PolicyVersionRow | None:
        with self.session() as s:
            return s.scalars(select(PolicyVersionRow).where(PolicyVersionRow.status == "promoted")
                             .order_by(PolicyVersionRow.promoted_at.desc().nulls_last(), PolicyVersionRow.version.desc())).first()


def retryable(exc: Exception) -> bool:
    """A racing promotion refused by the unique index, or a deadlock PostgreSQL broke: the transaction may run again."""
    return isinstance(exc, IntegrityError) or getattr(getattr(exc, "orig", None), "sqlstate", None) in ("40P01", "40001")


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
