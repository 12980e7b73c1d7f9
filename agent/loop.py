"""The self-improvement loop, one cycle at a time:

    frontier -> search -> select (verifier or label-free filters) -> fine-tune a candidate (TRL)
             -> evaluate candidate vs current on held-out problems -> promote only if better

Everything runs in one process; the workers' train cycle (agent/train_cycle.py) shares the gate (agent/gate.py).
A run's state between cycles is the current policy and its Evaluation; both are rebuilt from the store on resume
exactly as an uninterrupted run holds them.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from agent.config import LoopConfig
from agent.curriculum import Curriculum, ProblemSource
from agent.evaluation import Evaluation, evaluate_policy, greedy_solver
from agent.gate import gate_keeps_rejecting, judge, train_candidate
from agent.plan import CyclePlan, cycle_seed
from agent.policy import Policy
from agent.preference import preference_pairs
from agent.registry import PolicyRegistry, save_value
from agent.run_store import RunStore
from agent.refine import shows_history, sibling_examples
from agent.proposals import memoized
from agent.select import select
from agent.job_search import trajectory_rows
from agent.store import Store
from agent.value_cycle import (ValueCycle, demonstration_candidates, labelled_candidates, learns_from_demonstrations,
                                train_cycle_value)
from search import SearchConfig, run_search


def replay_mix(seed_examples: list[dict], newest: list[dict], older: list[dict], cfg: LoopConfig,
               rng: random.Random, refinements: list[dict] = ()) -> list[dict]:
    """The training mix (cfg.examples_per_cycle examples): warm-start (true-labelled) data, the newest labels and
    earlier labels, in the shares cfg.replay_seed_fraction and cfg.replay_newest_fraction (the rest: earlier);
    refinement examples, when there are any, take cfg.replay_refine_fraction out of the newest labels' share."""
    n = cfg.examples_per_cycle
    n_seed = int(n * cfg.replay_seed_fraction) if seed_examples else 0
    n_newest = int(n * cfg.replay_newest_fraction) if older else n - n_seed
    n_older = n - n_seed - n_newest if older else 0
    n_refine = min(n_newest, int(n * cfg.replay_refine_fraction)) if refinements else 0
    n_newest -= n_refine
    mix = [rng.choice(seed_examples) for _ in range(n_seed)]
    mix += [rng.choice(refinements) for _ in range(n_refine)]
    mix += [rng.choice(newest) for _ in range(n_newest)] if newest else []
    mix += [rng.choice(older) for _ in range(n_older)]
    rng.shuffle(mix)
    return mix


@dataclass
class CycleRecord:
    """What a run keeps of one cycle (and its report shows)."""

    cycle: int
    policy_version: str  # the current policy after the cycle
    candidate: str | None
    promoted: bool
    frontier: str | None
    heldout: dict  # the current policy's held-out accuracy per key
    self_verified: dict
    gate: dict  # candidate and current gate scores; fell: {key: {before, after}} where the candidate scored lower
    accepted: int
    filters: list
    train: dict
    seconds: dict
    elapsed_s: float
    search_tokens: int = 0  # tokens the cycle's search generated (what data sources are compared at)
    # the accepted labels by source: found by the search, or a problem's own given answer where the search failed
    trained_searched: int = 0
    trained_given: int = 0
    refinement_examples: int = 0  # sibling refinement examples the cycle's mix drew from (agent/refine.py)
    value: dict = field(default_factory=dict)  # the value model trained with a promoted candidate (agent/value_cycle.py)
    stale: bool = False  # the gate promoted the candidate, but its parent was no longer the promoted version


@dataclass(frozen=True)
class CycleOutcome:
    """What a cycle hands to the next: its record, the current policy and that policy's evaluation."""

    record: CycleRecord
    current: Policy
    evaluation: Evaluation


@dataclass
class _CycleWork:
    """What a cycle found before its gate: the labels, the rows to write and where its time went so far."""

    examples: list[dict]
    filters: list
    rows: list[dict]
    pairs: list[dict]  # preference pairs, when the train method uses them
    refinements: list[dict]  # refinement examples from the search's siblings
    search_tokens: int
    given: int  # examples that are a problem's own given answer
    seconds: dict = field(default_factory=dict)
    value_rows: list[dict] = field(default_factory=list)  # labelled candidates, when the run trains a value model


class SelfImprovementLoop:
    def __init__(self, cfg: LoopConfig, store: Store, registry: PolicyRegistry, source: ProblemSource,
                 seed_examples: list[dict], device: str = "cpu", on_cycle: Callable[[CycleRecord], None] | None = None,
                 should_stop: Callable[[CycleRecord], bool] | None = None, dtype: str = "float32"):
        self.cfg = cfg
        self.store = store
        self.runs = RunStore(store)
        self.registry = registry
        self.source = source
        self.task = source.task
        self.seed_examples = seed_examples
        self.device = device
        self.dtype = cfg.base_dtype(dtype)  # Settings.dtype, for a LoRA run's frozen base
        self.on_cycle = on_cycle  # called with every record of the run, the recorded ones first
        self.should_stop = should_stop  # a caller's own stop (a benchmark's target), checked after every cycle
        self.accepted: list[list[dict]] = []  # labels accepted per cycle, for replay
        self.value_rows: list[dict] = []  # earlier cycles' labelled candidates, the value model's replay
        reported = [str(d) for d in cfg.report_difficulties]
        self.curriculum = Curriculum(source.difficulties(), cfg.threshold,
                                     horizon=max(reported, key=int) if reported else None)
        self.plan = CyclePlan(cfg, self.curriculum, source)
        self.name: str | None = None
        self.stop_reason: str | None = None  # why the run ended before its budget, when the loop itself ended it
        # (version, model) of the last candidate the gate rejected, whose fine-tune the next cycle continues
        self.continue_from: tuple[str, object] | None = None

    def evaluate(self, policy, frontier_index: int | None) -> Evaluation:
        heldout = self.plan.heldout_problems(frontier_index)
        return evaluate_policy(policy, heldout, self.eval_search(heldout), self.task, self.plan.gate_keys(frontier_index),
                               self.cfg.select.mode)

    def eval_search(self, heldout: dict) -> SearchConfig:
        """The held-out search, with room for the longest answer evaluated (a built-in task's is exact: a 100-digit
        sum needs 102 tokens, past the search's default)."""
        problems = [p for ps in heldout.values() for p in ps]
        return replace(self.cfg.eval_search, max_new_tokens=self.source.max_new_tokens(problems)) if problems \
            else self.cfg.eval_search

    def training_mix(self, cycle: int, refinements: list[dict] = ()) -> list[dict]:
        newest = self.accepted[-1] if self.accepted else []
        older = [e for batch in self.accepted[:-1] for e in batch]
        return replay_mix(self.seed_examples, newest, older, self.cfg, random.Random(cycle_seed(self.cfg.seed, cycle)),
                          [{"prompt": e["prompt"], "completion": e["completion"]} for e in refinements])

    def run(self, name: str, start_time: float, warm_start_seconds: float = 0.0) -> list[CycleRecord]:
        """Run the cycles of run `name` (in the store, with its base version) that follow its last recorded one: a
        killed run goes on with the policy, evaluation, curriculum, replay buffer and clock its records hold. Every
        cycle is written in one transaction (RunStore.record_cycle). Returns all of the run's records."""
        self.name = name
        stored = self.runs.cycles(name)
        records = [CycleRecord(**c.record) for c in stored]
        for record in records:
            if self.on_cycle:
                self.on_cycle(record)
        if records:
            current = self._formatted(self.registry.load(records[-1].policy_version, self.device, self.dtype))
            state = stored[-1].state
            self.curriculum.update(state["known"])
            if "evaluation" in state:
                evaluation = Evaluation(**state["evaluation"])
            else:  # a run recorded before evaluations were kept: evaluated again, confidences included
                evaluation = self.evaluate(current, self.curriculum.frontier_index)
            start_time = time.monotonic() - records[-1].elapsed_s  # the clock counts recorded work, not dead time
            by_cycle: dict[int, list[dict]] = {}
            for label in self.runs.labels(name):
                by_cycle.setdefault(label.cycle, []).append({"prompt": label.prompt, "completion": label.completion})
            self.accepted = [by_cycle[c] for c in sorted(by_cycle)]
            last = records[-1]
            if self._continues_rejected() and last.candidate is not None and not last.promoted and not last.stale:
                self.continue_from = self._rejected(last.candidate)
        else:  # cycle 0: the warm-started policy, before any self-training
            current = self._formatted(self.registry.load(self.runs.get(name).base_version, self.device, self.dtype))
            t = time.monotonic()
            evaluation = self.evaluate(current, self.curriculum.frontier_index)
            self.curriculum.update(evaluation.metric)
            seconds = {"warm_start": warm_start_seconds, "eval": time.monotonic() - t}
            records.append(self._commit(self._record(0, current.version, None, False, evaluation, [], 0, {}, seconds,
                                                     start_time), evaluation))
        for cycle in range(records[-1].cycle + 1, self.cfg.cycles + 1):
            if self._should_stop(records[-1], start_time):
                break
            self.stop_reason = gate_keeps_rejecting(records, self.cfg.stop_after_rejections, self.cfg.select.mode,
                                                    self._continues_rejected())
            if self.stop_reason:
                break
            outcome = self.cycle(cycle, current, evaluation, start_time)
            records.append(outcome.record)
            current, evaluation = outcome.current, outcome.evaluation
        return records

    def _formatted(self, policy: Policy) -> Policy:
        """`policy` putting prompts in the run's format (LoopConfig.prompt_format; unset: its own), which every
        version the run saves keeps."""
        policy.prompt_format = self.cfg.chosen_prompt_format(policy.prompt_format)
        policy.prompt_format.check(policy.tokenizer)
        return policy

    def _should_stop(self, last: CycleRecord, start_time: float) -> bool:
        if self.cfg.time_budget_s is not None and time.monotonic() - start_time >= self.cfg.time_budget_s:
            return True
        if self.should_stop is not None and self.should_stop(last):
            return True
        return self.curriculum.frontier_index is None and self.source.builtin  # everything mastered

    def _search_and_select(self, cycle: int, current: Policy, evaluation: Evaluation) -> _CycleWork:
        """Search the cycle's problems with the current policy and select its labels."""
        cfg, seconds = self.cfg, {}
        t = time.monotonic()
        problems = self.plan.problems(self.curriculum.frontier_index, evaluation.metric, cycle)
        self.store.add_problems(problems)  # content ids: a resumed cycle adds the same problems, not new ones
        max_new_tokens = self.source.max_new_tokens(problems)
        search_cfg = replace(cfg.search, max_new_tokens=max_new_tokens, seed=cycle_seed(cfg.seed, cycle))
        results = run_search(problems, search_cfg, current)
        seconds["search"] = time.monotonic() - t

        t = time.monotonic()
        mastered = [key for key, value in evaluation.metric.items() if value >= cfg.threshold]
        confidences = [c for key in mastered for c in evaluation.confidence.get(key, [])]
        # one memo for the filters and the siblings' verdicts: both ask the same sub-problems (the split check's halves)
        solve = memoized(greedy_solver(current, search_cfg))
        # what proposals trust is judged by the current policy's own evaluation, never by the curriculum's older scores
        # of lengths no longer evaluated (agent/select.py mastered_up_to)
        value_model = getattr(current, "value_model", None)
        if cfg.select.min_value is not None and value_model is None and self._from_demonstrations():
            # a first judge for the filter, from the demonstrations, kept beside the version it judges (resumes load it)
            t_value = time.monotonic()
            first_rows = self._demonstration_rows(current, cycle)
            first = self._train_value(current, current, first_rows, cycle, evaluation)
            if first.model is not None:
                save_value(self.registry, current.version, first.model)
            current.value_model = value_model = first.model
            self.value_rows += first_rows
            seconds["value"] = time.monotonic() - t_value
        selection = select(results, self.task, cfg.select, solve, confidences, evaluation.metric, value_model)
        refinements = (sibling_examples(results, selection.examples, self.task, solve)
                       if cfg.replay_refine_fraction and shows_history(current) else [])
        accepted_ids = {e["problem_id"] for e in selection.examples}
        rows = [row for r in results for row in trajectory_rows(r, cycle=cycle)]
        for row in rows:  # written with the cycle's record, so marked only once the training that used them is recorded
            row["consumed"] = row["is_best"] and row["problem_id"] in accepted_ids
        seconds["select"] = time.monotonic() - t
        pairs = (
            preference_pairs(results, selection, self.task, cfg.preference.max_pairs)
            if cfg.train_method != "sft"
            else []
        )
        value_rows = (labelled_candidates(results, selection.examples, self.task, cfg.select.mode)
                      if cfg.value_model and not self._from_demonstrations() else [])
        return _CycleWork(selection.examples, selection.filters, rows, pairs, refinements,
                          sum(r.generated_tokens for r in results), selection.given, seconds, value_rows)

    def cycle(self, cycle: int, current: Policy, evaluation: Evaluation, start_time: float) -> CycleOutcome:
        cfg = self.cfg
        frontier_index = self.curriculum.frontier_index
        work = self._search_and_select(cycle, current, evaluation)
        seconds = work.seconds
        if work.examples:
            self.accepted.append([{"prompt": e["prompt"], "completion": e["completion"]} for e in work.examples])
        if not self.accepted:
            record = self._record(cycle, current.version, None, False, evaluation, work.filters, 0, {}, seconds,
                                  start_time, search_tokens=work.search_tokens)
            return CycleOutcome(self._commit(record, evaluation, rows=work.rows), current, evaluation)

        t = time.monotonic()
        mix = self.training_mix(cycle, work.refinements)
        start = self.continue_from if self._continues_rejected() else None
        model, train_stats = train_candidate(current, mix, work.pairs, cfg.train, cfg.train_method, cfg.preference,
                                             start=start[1] if start else None)
        if start:
            train_stats["continued_from"] = start[0]
        seconds["train"] = time.monotonic() - t
        candidate = Policy(model, current.tokenizer, "candidate", draft_source=current.draft_source,
                           prompt_format=current.prompt_format)
        heldout = self.plan.heldout_problems(frontier_index)
        verdict = judge(
            candidate,
            current,
            heldout,
            self.eval_search(heldout),
            self.task,
            cfg.select.mode,
            cfg.promote_margin,
            self.plan.gate_keys(frontier_index),
            evaluation,
            cfg.gate_current_sample,
        )
        seconds["eval"] = verdict.seconds
        value = None
        if cfg.value_model and verdict.promote:  # a rejected candidate's judge would be pruned with it: not trained
            t = time.monotonic()
            if self._from_demonstrations():  # the candidate's own answers are the negatives of the judge it gets
                work.value_rows = self._demonstration_rows(candidate, cycle)
            value = self._train_value(current, candidate, work.value_rows, cycle, evaluation, verdict.candidate.answers)
            seconds["value"] = seconds.get("value", 0.0) + time.monotonic() - t
        self.value_rows += work.value_rows
        trained_on = {"cycle": cycle, "frontier": self.curriculum.key(frontier_index), "examples": len(work.examples),
                      "given_answers": work.given, "filters": work.filters, "mode": cfg.select.mode, "run": self.name,
                      "train": train_stats}
        t = time.monotonic()
        version = self.registry.save(model, current.tokenizer, parent=current.version, trained_on=trained_on,
                                     metrics=verdict.metrics(), draft_source=current.draft_source,
                                     prompt_format=current.prompt_format)
        if value is not None and value.model is not None:
            save_value(self.registry, version, value.model)
        seconds["save"] = time.monotonic() - t
        promoted_policy = Policy(model, current.tokenizer, version, str(self.registry.root / version),
                                 current.draft_source, current.prompt_format)
        promoted_policy.value_model = value.model if value is not None else None
        outcomes: dict[bool, CycleOutcome] = {}

        def written(promoted: bool) -> tuple[dict, dict]:
            """The cycle for either result of the promotion's compare-and-set (RunStore.record_cycle)."""
            after, after_eval = (promoted_policy, verdict.candidate) if promoted else (current, verdict.current)
            # a rejected cycle still measured the current policy at the gate's lengths it had not seen: a length it
            # already masters must move the frontier, or every next candidate ties there and is rejected (a reversal
            # run stopped so at 21 letters with the current at 1.00 on 21 and 28)
            self.curriculum.update(after_eval.metric)
            record = self._record(cycle, after.version, version, promoted, after_eval, work.filters, len(work.examples),
                                  train_stats, seconds, start_time, search_tokens=work.search_tokens,
                                  refinement_examples=len(work.refinements), given=work.given,
                                  gate={"candidate": verdict.candidate_score, "current": verdict.current_score,
                                        "fell": verdict.fell()},
                                  stale=verdict.promote and not promoted,
                                  value=value.record if value is not None else {})
            outcomes[promoted] = CycleOutcome(record, after, after_eval)
            return asdict(record), self._state(after_eval)

        promoted = self.runs.record_cycle(self.name, cycle, written, labels=work.examples, trajectories=work.rows,
                                          candidate=version, promote=verdict.promote, parent=current.version)
        if self.on_cycle:
            self.on_cycle(outcomes[promoted].record)
        if not promoted:
            self.registry.prune_rejected()
        self.continue_from = (version, model) if self._continues_rejected() and not verdict.promote else None
        return outcomes[promoted]

    def _continues_rejected(self) -> bool:
        return self.cfg.continue_rejected and self.cfg.select.mode == "verifier"

    def _rejected(self, version: str) -> tuple[str, object] | None:
        """A rejected candidate to continue after a resume, when its folder is still kept (None: start afresh)."""
        try:
            return version, self.registry.load(version, self.device, self.dtype).model
        except (OSError, ValueError):  # PolicyLoadError is a ValueError
            return None

    def _from_demonstrations(self) -> bool:
        return learns_from_demonstrations(self.task, self.cfg) and bool(self.seed_examples)

    def _demonstration_rows(self, policy: Policy, cycle: int) -> list[dict]:
        return demonstration_candidates(policy, self.seed_examples, self.task, self.cfg,
                                        cycle_seed(self.cfg.seed, cycle))

    def _train_value(self, current: Policy, candidate: Policy, newest: list[dict], cycle: int,
                     evaluation: Evaluation, greedy: dict | None = None) -> ValueCycle:
        """The candidate's value model from `newest` and a replay share of earlier cycles' rows, continuing the current
        version's and calibrated for adaptive search on the held-out problems the policy does not master yet (with
        the candidate's greedy answers the gate decoded, `greedy`, where it has them)."""
        frontier_index = self.curriculum.frontier_index
        heldout = self.plan.heldout_problems(frontier_index)
        keys = self.plan.gate_keys(frontier_index)
        # calibrated where answers are in doubt: on lengths the policy masters nearly every greedy answer is right,
        # and a threshold for 95% precision there trusted almost anything (2e-10 in a measured run)
        unmastered = [k for k in keys if evaluation.metric.get(k, 0.0) < self.cfg.threshold] or keys
        return train_cycle_value(current, candidate, newest, self.value_rows, self.cfg,
                                 random.Random(cycle_seed(self.cfg.seed, cycle)),
                                 [p for key in unmastered for p in heldout.get(key, [])],
                                 self.eval_search(heldout).max_new_tokens, greedy)

    def _state(self, evaluation: Evaluation) -> dict:
        """What a resume needs besides the record: the curriculum's metrics and the current policy's evaluation."""
        return {"known": dict(self.curriculum.known), "evaluation": evaluation.stored()}

    def _record(self, cycle, version, candidate, promoted, evaluation: Evaluation, filters, accepted, train, seconds,
                start_time, gate=None, search_tokens=0, stale=False, refinement_examples=0, given=0,
                value=None) -> CycleRecord:
        return CycleRecord(
            cycle=cycle, policy_version=version, candidate=candidate, promoted=promoted,
            frontier=self.curriculum.key(self.curriculum.frontier_index), heldout=dict(evaluation.accuracy),
            self_verified=dict(evaluation.self_verified), gate=gate or {}, accepted=accepted, filters=filters,
            train=train, seconds={k: round(v, 2) for k, v in seconds.items()},
            elapsed_s=round(time.monotonic() - start_time, 1), search_tokens=search_tokens,
            refinement_examples=refinement_examples, stale=stale, trained_searched=accepted - given,
            trained_given=given, value=value or {},
        )

    def _commit(self, record: CycleRecord, evaluation: Evaluation, rows: list[dict] = ()) -> CycleRecord:
        """Write a cycle that trained no candidate."""
        self.runs.record_cycle(self.name, record.cycle, lambda _: (asdict(record), self._state(evaluation)),
                               trajectories=rows)
        if self.on_cycle:
            self.on_cycle(record)
        return record
