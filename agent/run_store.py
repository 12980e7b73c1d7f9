"""The runs of `arbor run` in the store's database.

A killed run resumes after its last recorded cycle: the run's settings, one row per finished cycle (unique per run
and cycle) and the labels it accepted (its replay buffer). A cycle's record, trajectories, labels and its
candidate's promotion or rejection are written in one transaction (RunStore.record_cycle): a kill before it leaves
nothing of the cycle but a candidate version, which the resumed run discards (RunStore.unrecorded_versions); a kill
after it loses nothing.
"""

from __future__ import annotations

import re
import time
from typing import Callable

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from agent.schema import PolicyVersionRow, ReplayLabelRow, RunCycleRow, RunRow, TrajectoryRow, utc_now
from agent.promotion import promote_in
from agent.store import Store, retryable

# a run's name is its folder under runs/ (and fits the runs table's key): no separators, no "..", not hidden
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


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
            if promote:
                promote_in(s, version, expected=None)

    def finish(self, name: str) -> None:
        with self.store.session() as s:
            s.execute(update(RunRow).where(RunRow.name == name).values(status="finished", finished_at=utc_now()))

    def cycles(self, name: str) -> list[RunCycleRow]:
        with self.store.session() as s:
            return list(s.scalars(select(RunCycleRow).where(RunCycleRow.run == name).order_by(RunCycleRow.cycle)))

    def labels(self, name: str) -> list[ReplayLabelRow]:
        """The run's replay buffer: its accepted labels, cycle by cycle."""
        with self.store.session() as s:
            return list(s.scalars(select(ReplayLabelRow).where(ReplayLabelRow.buffer == name)
                                  .order_by(ReplayLabelRow.cycle, ReplayLabelRow.seq)))

    def record_cycle(self, name: str, cycle: int, written: Callable[[bool], tuple[dict, dict]], labels: list[dict] = (),
                     trajectories: list[dict] = (), candidate: str | None = None, promote: bool = False,
                     parent: str | None = None) -> bool:
        """Write a finished cycle in one transaction: its record, its labels, its trajectories (their `consumed`
        marks say which rows the cycle trained on) and the candidate's promotion or rejection. A promotion is a
        compare-and-set on `parent`, the version the candidate was judged against: if another version has been
        promoted since, the candidate is recorded `stale`, not promoted. `written(promoted)` gives the cycle's record
        and resume state for the outcome. Returns whether the candidate was promoted. Raises CycleRecorded, and writes nothing, when
        the cycle is recorded already."""
        for attempt in range(20):
            try:
                with self.store.session() as s:
                    if s.get(RunCycleRow, (name, cycle)) is not None:
                        raise CycleRecorded(f"cycle {cycle} of run {name!r} is already recorded")
                    promoted = False
                    if candidate is not None:
                        row = s.get(PolicyVersionRow, candidate, with_for_update=True)
                        if row is None or row.status != "candidate":
                            raise RuntimeError(f"cycle {cycle} of run {name!r}: its candidate {candidate} is "
                                               f"{'missing' if row is None else row.status}, expected an undecided candidate")
                        promoted = promote and promote_in(s, candidate, expected=parent)
                        if not promoted:
                            status = "stale" if promote else "rejected"
                            s.execute(update(PolicyVersionRow).where(PolicyVersionRow.version == candidate)
                                      .values(status=status))
                    record, state = written(promoted)
                    s.add(RunCycleRow(run=name, cycle=cycle, record=record, state=state))
                    s.flush()  # the label rows' foreign key needs it
                    if labels:
                        s.execute(insert(ReplayLabelRow), [dict(buffer=name, cycle=cycle, seq=i, problem_id=e.get("problem_id"),
                                                             prompt=e["prompt"], completion=e["completion"])
                                                        for i, e in enumerate(labels)])
                    if trajectories:
                        s.execute(insert(TrajectoryRow), list(trajectories))
                return promoted
            except (IntegrityError, OperationalError) as exc:
                if not retryable(exc) or attempt == 19:
                    raise
                time.sleep(0.01 * (attempt + 1))  # two promotions at once, or the same cycle: the check above decides
        raise AssertionError("unreachable")

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
