"""The self-improvement loop, one cycle at a time:

    frontier -> search -> select (verifier or label-free filters) -> fine-tune a candidate (TRL)
             -> evaluate candidate vs current on held-out problems -> promote only if better

Everything runs in one process; workers/ calls the same functions from Celery tasks.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

from agent import distributed
from agent.config import LoopConfig, WarmStartConfig
from agent.curriculum import Curriculum, ProblemSource
from agent.policy import Policy
from agent.preference import preference_pairs
from agent.registry import PolicyRegistry
from agent.select import Pseudo, proposals_in_use, select, task_filters
from agent.solve import trajectory_rows
from agent.store import RunStore, Store
from tasks import Problem, Task
from agent.trainer import DPOFineTuner, SFTFineTuner, clone_for_training
from search import SearchConfig, run_search


def greedy_solver(policy, cfg: SearchConfig) -> Callable[[list[Problem]], list[str]]:
    """The label filters' access to the policy: greedy answers to sub-problems, batched."""

    def solve(problems: list[Problem]) -> list[str]:
        greedy = SearchConfig(strategy="greedy", max_new_tokens=cfg.max_new_tokens, max_rows=cfg.max_rows)
        return [r.best.completion for r in run_search(problems, greedy, policy)]

    return solve


def evaluate_policy(policy, by_difficulty: dict, cfg: SearchConfig, task: Task | None = None,
                    verify_keys: list[str] | None = None) -> dict:
    """Held-out accuracy per difficulty (ground truth) and, when the task declares label filters, the
    self-verified rate: the share of greedy answers that pass them (no ground truth), for `verify_keys`
    (default: every difficulty). Difficulties shown only in reports need no self-verification."""
    problems = [p for ps in by_difficulty.values() for p in ps]
    key_of = {p.id: key for key, ps in by_difficulty.items() for p in ps}  # the caller's grouping, whatever it is
    results = run_search(problems, cfg, policy) if problems else []
    accuracy, self_verified = {}, {}
    by_key = {}
    for r in results:
        by_key.setdefault(key_of[r.problem.id], []).append(r)
    for key, rs in by_key.items():
        judged = [r for r in rs if r.best.verified is not None]
        if judged:
            accuracy[key] = sum(bool(r.best.verified) for r in judged) / len(judged)
    if task is not None and task.label_checks():
        items = []
        for r in results:
            answer = task.extract(r.problem, r.best.completion)
            if answer is not None and (verify_keys is None or key_of[r.problem.id] in verify_keys):
                items.append(Pseudo(r, answer=answer, completion=r.best.completion))
        solve = greedy_solver(policy, cfg)
        for f in task_filters(task):
            items = f(items, task, solve)
        passed = {}
        for p in items:
            key = key_of[p.result.problem.id]
            passed[key] = passed.get(key, 0) + 1
        self_verified = {key: passed.get(key, 0) / len(rs) for key, rs in by_key.items()
                         if verify_keys is None or key in verify_keys}
    # confidence of each greedy answer per key: what calibrates label-free selection for tasks without label checks
    confidence = {key: [r.best.mean_logprob for r in rs] for key, rs in by_key.items()}
    return {"accuracy": accuracy, "self_verified": self_verified, "confidence": confidence,
            "generated_tokens": sum(r.generated_tokens for r in results)}


def gate_metric(evaluation: dict, mode: str) -> dict:
    """What promotion and the curriculum look at: ground-truth accuracy in verifier mode; in label-free mode
    the self-verified rate when the task has label filters (no ground truth used), else accuracy."""
    if mode == "label_free" and evaluation["self_verified"]:
        return evaluation["self_verified"]
    return evaluation["accuracy"]


def gate_score(metric: dict, keys: list[str]) -> float:
    common = [k for k in keys if k in metric]
    return sum(metric[k] for k in common) / len(common) if common else 0.0


def replay_mix(seed_examples: list[dict], newest: list[dict], older: list[dict], cfg: LoopConfig,
               rng: random.Random) -> list[dict]:
    """The training mix (cfg.examples_per_cycle examples): warm-start (true-labelled) data, the newest labels and
    earlier labels, in the shares cfg.replay_seed_fraction and cfg.replay_newest_fraction (the rest: earlier)."""
    n = cfg.examples_per_cycle
    n_seed = int(n * cfg.replay_seed_fraction) if seed_examples else 0
    n_newest = int(n * cfg.replay_newest_fraction) if older else n - n_seed
    n_older = n - n_seed - n_newest if older else 0
    mix = [rng.choice(seed_examples) for _ in range(n_seed)]
    mix += [rng.choice(newest) for _ in range(n_newest)] if newest else []
    mix += [rng.choice(older) for _ in range(n_older)]
    rng.shuffle(mix)
    return mix


@dataclass
class GateOutcome:
    """A trained candidate, judged against the current policy and saved as `version` (promoted or rejected)."""

    version: str
    promoted: bool
    current: Policy  # the policy to go on with: the candidate when promoted, else the one it was trained from
    current_eval: dict  # evaluate_policy's result for `current` (and its gate metric below)
    current_metric: dict
    parent_eval: dict  # evaluate_policy's result for the policy the candidate was trained from
    candidate_eval: dict
    candidate_score: float
    current_score: float
    keys: list[str]  # the held-out keys the scores average over
    metrics: dict  # what the version records
    train: dict  # the fine-tune's stats
    seconds: dict  # "train" and "eval" wall clock


def train_and_gate(current: Policy, examples: list[dict], task: Task | None, heldout: dict[str, list[Problem]],
                   cfg: LoopConfig, registry: PolicyRegistry, trained_on: dict, mode: str | None = None,
                   verify_keys: list[str] | None = None, current_eval: dict | None = None, decide: bool = True,
                   pairs: list[dict] | None = None) -> GateOutcome:
    """Fine-tune a copy of `current` on `examples`, evaluate candidate and current on the same held-out problems
    with the same search (cfg.eval_search), save the candidate as a version and promote it only if its gate score
    beats the current one's by more than cfg.promote_margin; otherwise it is recorded as rejected.

    `mode` picks the gate metric (default cfg.select.mode, see gate_metric); `verify_keys` are the held-out keys the
    gate averages over (default: all of `heldout`). `current_eval` is what the current policy already scored on
    some of these keys (the loop keeps it between cycles); the current policy is evaluated on the others only.
    `decide=False` leaves the saved version a candidate: the caller promotes or rejects it (the loop does so in the
    transaction that records the cycle, RunStore.record_cycle). `pairs` (agent/preference.py) are what a DPO
    fine-tune trains on, after SFT when cfg.train_method is sft+dpo; its stats are the train stats' "dpo"."""
    mode = mode or cfg.select.mode
    seconds = {}
    t = time.monotonic()
    model = clone_for_training(current.model)
    pairs, train_stats, sft_cfg = pairs or [], {}, cfg.train
    if cfg.train_method == "sft+dpo" and not pairs:  # nothing to prefer: SFT gets the DPO time, a cycle costs the same
        sft_cfg = replace(cfg.train, time_budget_s=cfg.train.time_budget_s + cfg.preference.time_budget_s)
    if cfg.train_method in ("sft", "sft+dpo"):
        distributed.share_fine_tune(current.version, examples, sft_cfg)  # other ranks of a multi-process launch join it
        train_stats = SFTFineTuner(sft_cfg).train(model, current.tokenizer, examples)
    if cfg.train_method in ("dpo", "sft+dpo"):
        dpo = DPOFineTuner(cfg.preference).train(model, current.tokenizer, pairs) if pairs else {"steps": 0, "seconds": 0.0}
        train_stats["dpo"] = {**dpo, "pairs": len(pairs)}
    seconds["train"] = time.monotonic() - t
    t = time.monotonic()
    candidate = Policy(model, current.tokenizer, "candidate", draft_source=current.draft_source)
    cand_eval = evaluate_policy(candidate, heldout, cfg.eval_search, task, verify_keys)
    cand_metric = gate_metric(cand_eval, mode)
    keys = [k for k in (verify_keys if verify_keys is not None else sorted(heldout)) if k in cand_metric]
    current_eval = current_eval if current_eval is not None else {"accuracy": {}, "self_verified": {}, "generated_tokens": 0}
    current_metric = gate_metric(current_eval, mode)
    # only the keys the scores compare: past them the current policy's report accuracy is already in current_eval
    cur_missing = {k: heldout[k] for k in keys if k not in current_metric}
    if cur_missing:  # the current policy was not evaluated at some of these keys yet (the loop's frontier moved)
        extra = evaluate_policy(current, cur_missing, cfg.eval_search, task, keys)
        for part in ("accuracy", "self_verified", "confidence"):
            current_eval.setdefault(part, {}).update(extra[part])
        current_metric = gate_metric(current_eval, mode)
    parent_eval = current_eval
    cand_score, cur_score = gate_score(cand_metric, keys), gate_score(current_metric, keys)
    promoted = cand_score > cur_score + cfg.promote_margin
    seconds["eval"] = time.monotonic() - t
    metrics = {"heldout": cand_eval["accuracy"], "self_verified": cand_eval["self_verified"],
               "gate_score": cand_score, "current_gate_score": cur_score, "gate_keys": keys}
    version = registry.save(model, current.tokenizer, parent=current.version, trained_on={**trained_on, "train": train_stats},
                            metrics=metrics, draft_source=current.draft_source)
    if promoted:
        if decide:
            registry.promote(version, metrics)
        current = Policy(model, current.tokenizer, version, str(registry.root / version), current.draft_source)
        current_eval, current_metric = cand_eval, cand_metric
    elif decide:
        registry.reject(version, metrics)
    return GateOutcome(version=version, promoted=promoted, current=current, current_eval=current_eval,
                       current_metric=current_metric, parent_eval=parent_eval, candidate_eval=cand_eval, candidate_score=cand_score,
                       current_score=cur_score, keys=keys, metrics=metrics, train=train_stats, seconds=seconds)


@dataclass
class CycleRecord:
    cycle: int
    policy_version: str
    candidate: str | None
    promoted: bool
    frontier: str | None
    heldout: dict
    self_verified: dict
    gate: dict
    accepted: int
    filters: list
    train: dict
    seconds: dict
    elapsed_s: float
    search_tokens: int = 0  # tokens the cycle's search generated (what data sources are compared at)


class SelfImprovementLoop:
    def __init__(self, cfg: LoopConfig, store: Store, registry: PolicyRegistry, source: ProblemSource,
                 seed_examples: list[dict], device: str = "cpu", on_cycle: Callable[[CycleRecord], None] | None = None):
        self.cfg = cfg
        self.store = store
        self.runs = RunStore(store)
        self.registry = registry
        self.source = source
        self.task = source.task
        self.seed_examples = seed_examples
        self.device = device
        self.on_cycle = on_cycle  # called with every record of the run, the recorded ones first
        self.accepted: list[list[dict]] = []  # labels accepted per cycle, for replay
        self.curriculum = Curriculum(source.difficulties(), cfg.threshold)
        self.name: str | None = None

    def _stride(self, frontier_index: int | None) -> int:
        """How many difficulties apart the cycle's training lengths past the frontier lie."""
        return 1 if frontier_index is None else max(1, round((frontier_index + 1) * self.cfg.frontier_stride))

    def _training_keys(self, frontier_index: int | None, metric: dict) -> list[str | None]:
        """The difficulty of each share of the cycle's problems (cfg.frontier_spread): the frontier, then difficulties
        `stride` apart past it, each brought back to the furthest one where the current policy finds labels
        (cfg.min_label_yield of `metric`, its gate metric; never before the frontier)."""
        if frontier_index is None:
            return [None] * len(self.cfg.frontier_spread)
        keys, stride, floor = self.curriculum.keys, self._stride(frontier_index), self.cfg.min_label_yield
        chosen = []
        for offset in range(len(self.cfg.frontier_spread)):
            i = min(frontier_index + offset * stride, len(keys) - 1)
            if floor is not None and self._labels_need_the_policy_right():
                while i > frontier_index and metric.get(keys[i], 0.0) < floor:
                    i -= 1
            chosen.append(keys[i])
        return chosen

    def _labels_need_the_policy_right(self) -> bool:
        """Label-free labels come from the search's own agreeing answers, unless the task proposes labels by
        decomposition (those need only the shorter lengths mastered)."""
        return self.cfg.select.mode == "label_free" and not proposals_in_use(self.task, self.cfg.select)

    def _ahead(self, frontier_index: int | None) -> int:
        """How far past the frontier the held-out evaluation reaches: at least to the longest length trained on."""
        return max(self.cfg.eval_ahead, self._stride(frontier_index) * (len(self.cfg.frontier_spread) - 1))

    def _heldout(self, frontier_index: int | None) -> dict:
        ahead = self._ahead(frontier_index)
        heldout = self.source.heldout_set(self.curriculum.eval_keys(frontier_index, ahead, self.cfg.report_difficulties))
        window = self.curriculum.keys_up_to(frontier_index, ahead)
        sample = self.cfg.heldout_past_window
        if sample is None or not window:
            return heldout
        past = set(self.curriculum.keys[self.curriculum.keys.index(window[-1]) + 1:])
        return {k: problems[:sample] if k in past else problems for k, problems in heldout.items()}

    def _gate_keys(self, frontier_index: int | None) -> list[str]:
        """The held-out keys promotion and the curriculum judge by: the window around the frontier and the report's
        difficulties below it. Without the easier ones a candidate that learned longer problems by forgetting shorter
        ones would pass, and the curriculum would keep them as mastered from an older evaluation (a run once ended
        with everything "mastered" while 24 digits had fallen from 1.00 to 0.87)."""
        window = self.curriculum.keys_up_to(frontier_index, self._ahead(frontier_index))
        report = {str(d) for d in self.cfg.report_difficulties}
        below = [k for k in self.curriculum.keys[: self.curriculum.keys.index(window[0])] if k in report] if window else []
        return below + window

    def evaluate(self, policy, frontier_index: int | None) -> dict:
        verify_keys = self._gate_keys(frontier_index)
        return evaluate_policy(policy, self._heldout(frontier_index), self.cfg.eval_search, self.task, verify_keys)

    def training_mix(self, cycle: int) -> list[dict]:
        newest = self.accepted[-1] if self.accepted else []
        older = [e for batch in self.accepted[:-1] for e in batch]
        # one generator per cycle: a resumed cycle draws the mix an uninterrupted run would have drawn
        return replay_mix(self.seed_examples, newest, older, self.cfg, random.Random(self.cfg.seed * 1000 + cycle))

    def run(self, name: str, start_time: float, warm_start_seconds: float = 0.0) -> list[CycleRecord]:
        """Run the cycles of run `name` (in the store, with its base version) that follow its last recorded one: a
        killed run goes on with the policy, curriculum, replay buffer and clock its records hold. Every cycle is
        written in one transaction (RunStore.record_cycle). Returns all of the run's records."""
        cfg = self.cfg
        self.name = name
        stored = self.runs.cycles(name)
        records = [CycleRecord(**c.record) for c in stored]
        for record in records:
            if self.on_cycle:
                self.on_cycle(record)
        if not records:
            # cycle 0: the warm-started policy, before any self-training
            current = self.registry.load(self.runs.get(name).base_version, self.device)
            t = time.monotonic()
            evaluation = self.evaluate(current, self.curriculum.frontier_index)
            metric = gate_metric(evaluation, cfg.select.mode)
            self.curriculum.update(metric)
            records.append(self._commit(self._record(0, current.version, None, False, evaluation, [], 0, {},
                                                     {"warm_start": warm_start_seconds, "eval": time.monotonic() - t},
                                                     start_time)))
        else:
            last = records[-1]
            current = self.registry.load(last.policy_version, self.device)
            self.curriculum.update(stored[-1].state["known"])
            # a record holds the current policy's evaluation after its cycle, which is what the next cycle starts from
            evaluation = {"accuracy": dict(last.heldout), "self_verified": dict(last.self_verified), "generated_tokens": 0}
            metric = gate_metric(evaluation, cfg.select.mode)
            start_time = time.monotonic() - last.elapsed_s  # the clock counts recorded work, not the time the run lay dead
            by_cycle: dict[int, list[dict]] = {}
            for label in self.runs.labels(name):
                by_cycle.setdefault(label.cycle, []).append({"prompt": label.prompt, "completion": label.completion})
            self.accepted = [by_cycle[c] for c in sorted(by_cycle)]
        for cycle in range(records[-1].cycle + 1, cfg.cycles + 1):
            if self._should_stop(records[-1], start_time):
                break
            record, current, evaluation, metric = self.cycle(cycle, current, evaluation, metric, start_time)
            records.append(record)
        return records

    def _should_stop(self, last: CycleRecord, start_time: float) -> bool:
        cfg = self.cfg
        if cfg.time_budget_s is not None and time.monotonic() - start_time >= cfg.time_budget_s:
            return True
        if cfg.stop_when:
            acc = last.heldout.get(str(cfg.stop_when["difficulty"]))
            if acc is not None and acc >= cfg.stop_when["accuracy"]:
                return True
        return self.curriculum.frontier_index is None and self.source.builtin  # everything mastered

    def cycle(self, cycle: int, current: Policy, current_eval: dict, current_metric: dict, start_time: float):
        cfg, timings = self.cfg, {}
        frontier_index = self.curriculum.frontier_index
        frontier = self.curriculum.key(frontier_index)
        t = time.monotonic()
        counts = [int(cfg.problems_per_cycle * share) for share in cfg.frontier_spread]
        counts[0] += cfg.problems_per_cycle - sum(counts)  # rounding remainder goes to the frontier itself
        buckets = [self.source.train_problems(key, count, seed=cfg.seed * 1000 + cycle * 10 + offset)
                   for offset, (key, count) in enumerate(zip(self._training_keys(frontier_index, current_metric), counts))]
        max_new_tokens = self.source.max_new_tokens([p for bucket in buckets for p in bucket])
        # a file task's max_new_tokens is a cap, not its answers' length: only a built-in task's is exact
        if cfg.answer_tokens_per_cycle is not None and self.source.builtin:  # every share shrinks alike
            scale = min(1.0, cfg.answer_tokens_per_cycle / (cfg.problems_per_cycle * max_new_tokens))
            buckets = [bucket[: max(1, round(len(bucket) * scale))] for bucket in buckets]
        problems = [p for bucket in buckets for p in bucket]
        self.store.add_problems(problems)  # content ids: a resumed cycle adds the same problems, not new ones
        search_cfg = replace(cfg.search, max_new_tokens=max_new_tokens, seed=cfg.seed * 1000 + cycle)
        results = run_search(problems, search_cfg, current)
        timings["search"] = time.monotonic() - t
        search_tokens = sum(r.generated_tokens for r in results)

        t = time.monotonic()
        mastered = [key for key, value in current_metric.items() if value >= cfg.threshold]
        confidences = [c for key in mastered for c in current_eval.get("confidence", {}).get(key, [])]
        # the latest metric of every difficulty, those below the evaluated window included (what proposals trust)
        known = {**self.curriculum.known, **current_metric}
        selection = select(results, self.task, cfg.select, greedy_solver(current, search_cfg), confidences, known)
        accepted_ids = {e["problem_id"] for e in selection.examples}
        rows = [row for r in results for row in trajectory_rows(r, cycle=cycle)]
        for row in rows:  # written with the cycle's record, so marked only once the training that used them is recorded
            row["trained_on"] = row["is_best"] and row["problem_id"] in accepted_ids
        timings["select"] = time.monotonic() - t
        if selection.examples:
            self.accepted.append([{"prompt": e["prompt"], "completion": e["completion"]} for e in selection.examples])

        if not self.accepted:
            record = self._record(cycle, current.version, None, False, current_eval, selection.filters, 0, {}, timings, start_time,
                                  search_tokens=search_tokens)
            return self._commit(record, rows=rows), current, current_eval, current_metric

        trained_on = {"cycle": cycle, "frontier": frontier, "examples": len(selection.examples), "filters": selection.filters,
                      "mode": cfg.select.mode, "run": self.name}
        pairs = preference_pairs(results, selection, self.task, cfg.preference.max_pairs) if cfg.train_method != "sft" else None
        gate = train_and_gate(current, self.training_mix(cycle), self.task, self._heldout(frontier_index), cfg, self.registry,
                              trained_on=trained_on, verify_keys=self._gate_keys(frontier_index),
                              current_eval=current_eval, decide=False, pairs=pairs)
        timings.update(gate.seconds)
        current, current_eval, current_metric = gate.current, gate.current_eval, gate.current_metric
        if gate.promoted:
            self.curriculum.update(current_metric)
        record = self._record(cycle, current.version, gate.version, gate.promoted, current_eval, selection.filters,
                              len(selection.examples), gate.train, timings, start_time,
                              gate={"candidate": gate.candidate_score, "current": gate.current_score}, search_tokens=search_tokens)
        self._commit(record, labels=selection.examples, rows=rows, candidate=gate.version, promoted=gate.promoted)
        if not gate.promoted:
            self.registry.prune_rejected()
        return record, current, current_eval, current_metric

    def _record(self, cycle, version, candidate, promoted, evaluation, filters, accepted, train, timings, start_time, gate=None,
                search_tokens=0):
        return CycleRecord(
            cycle=cycle, policy_version=version, candidate=candidate, promoted=promoted,
            frontier=self.curriculum.key(self.curriculum.frontier_index), heldout=dict(evaluation["accuracy"]),
            self_verified=dict(evaluation["self_verified"]), gate=gate or {}, accepted=accepted, filters=filters,
            train=train, seconds={k: round(v, 2) for k, v in timings.items()}, elapsed_s=round(time.monotonic() - start_time, 1),
            search_tokens=search_tokens,
        )

    def _commit(self, record: CycleRecord, labels: list[dict] = (), rows: list[dict] = (), candidate: str | None = None,
                promoted: bool = False) -> CycleRecord:
        self.runs.record_cycle(self.name, record.cycle, asdict(record), {"known": dict(self.curriculum.known)}, labels=labels,
                               trajectories=rows, candidate=candidate, promoted=promoted)
        if self.on_cycle:
            self.on_cycle(record)
        return record


def warm_start_examples(task: Task, cfg: WarmStartConfig, seed: int = 0) -> list[dict]:
    """True-labelled easy problems: the only ground truth the label-free loop ever trains on."""
    examples = [{"prompt": p.prompt, "completion": p.answer}
                for d in cfg.difficulties for p in task.generate(d, cfg.examples_per_difficulty * d, seed=seed, split="train")]
    random.Random(seed).shuffle(examples)
    return examples


def master_warm_start(model, tokenizer, task: Task, cfg: WarmStartConfig, examples: list[dict], seed: int) -> list[dict]:
    """Check the warm-started `model` on fresh problems of each warm-start difficulty (greedy accuracy) and extend its
    fine-tune until every one reaches cfg.mastery or cfg.extensions run out. Returns each check's accuracies. The
    problems come from a stream of their own (split "validation"), never the held-out problems the loop reports."""
    if cfg.mastery is None:
        return []
    problems = {str(d): task.generate(d, cfg.check_problems, seed=seed, split="validation") for d in cfg.difficulties}
    checks = []
    for extension in range(cfg.extensions + 1):
        if extension:
            SFTFineTuner(cfg.extension()).train(model, tokenizer, examples)
        accuracy = evaluate_policy(Policy(model, tokenizer, "warm-start"), problems, SearchConfig(strategy="greedy"))["accuracy"]
        checks.append(accuracy)
        if min(accuracy.values(), default=1.0) >= cfg.mastery:
            break
    return checks


def ensure_policy(settings, store: Store, registry: PolicyRegistry, cfg: LoopConfig | None = None,
                  demos: list[dict] | None = None, charset: str | None = None, task: Task | None = None,
                  run: str | None = None) -> str:
    """The promoted version; when there is none, create the built-in policy and warm-start it as v0.

    With `run`, a new version is saved for that run and left a candidate: the run records it as its base and
    promotes it in one transaction (RunStore.set_base), so a kill in between leaves nothing promoted that the
    run does not know."""
    from agent.policy import DEFAULT_CHARSET, build_builtin_policy
    from tasks import get_task

    promoted = registry.promoted()
    if promoted is not None:
        return promoted[0]
    cfg = cfg or LoopConfig()
    task = task or get_task("addition")
    model, tokenizer = build_builtin_policy(replace(cfg.builtin, seed=cfg.seed), charset or DEFAULT_CHARSET, task.coupling)
    model.to(settings.device)
    examples = demos if demos is not None else warm_start_examples(task, cfg.warm_start, cfg.seed)
    stats = SFTFineTuner(cfg.warm_start.train).train(model, tokenizer, examples) if examples else {}
    if demos is None:
        stats["mastery_checks"] = master_warm_start(model, tokenizer, task, cfg.warm_start, examples, cfg.seed)
    trained_on = {"warm_start": True, "examples": len(examples), "train": stats,
                  "difficulties": list(cfg.warm_start.difficulties) if demos is None else "demos"}
    if run is not None:
        trained_on["run"] = run
    version = registry.save(model, tokenizer, parent=None, trained_on=trained_on, metrics={"warm_start": stats})
    if run is None:
        registry.promote(version, {"warm_start": stats})
    return version

