"""A train cycle as a job: recorded in the store under its id, run under the train lock so that never two
run at once. Plain functions; `arbor train` calls them in process when no broker is configured.

The cycle is the loop's train step over what the workers found: the store's new search results go through the
same selection as in the loop (agent/select.py, with the task's own label checks; verifier mode where answers
exist), the labels join the loop's replay mix, and agent/gate.py trains a candidate and judges it on the store's
held-out problems of the same task; the promotion is a compare-and-set on the version it was trained from, so a
cycle that finishes after an operator's rollback never promotes a child of the version rolled back. A cycle trains
one task (the one with the most new results that has held-out problems); the others wait for the next cycle.
"""

from __future__ import annotations

import logging
import random
import subprocess
from dataclasses import replace

from sqlalchemy.exc import IntegrityError

from agent.config import LoopConfig
from agent.evaluation import greedy_solver
from agent.gate import judge, train_candidate
from agent.jobs import LeaseBusy
from agent.locks import FileLease
from agent.loop import replay_mix
from agent.policy import Policy
from agent.refine import refinement_examples, shows_history, sibling_examples
from agent.schema import JOB_FINISHED, store_buffer
from agent.proposals import memoized
from agent.select import select
from agent.registry import save_value
from agent.store import Store
from agent.value_cycle import labelled_candidates, train_cycle_value
from agent.warm_start import warm_start_examples
from search import Candidate, SearchResult
from tasks import TASKS, Problem, task_of

log = logging.getLogger("arbor.train_cycle")


def _ensure_job(store: Store, job_id: str) -> None:
    if store.get_job(job_id) is None:
        try:
            store.create_job("train", job_id=job_id)
        except IntegrityError:
            pass  # another delivery created it a moment ago


def _answer_room(task, problems, default: int) -> int:
    """Tokens the longest answer among `problems` needs, by the task's difficulty (`default` where none has one)."""
    return max((task.max_new_tokens(p.difficulty) for p in problems if p.difficulty is not None), default=default)


def loop_config_from_env(settings):
    """The train cycle's LoopConfig, with the knobs a deployment sets (agent/settings.py: ARBOR_TRAIN_BUDGET_S, the
    fine-tune wall clock; ARBOR_PROMOTE_MARGIN, how much the candidate must beat the promoted version by on held-out
    problems; ARBOR_HELDOUT_PER_DIFFICULTY, the built-in held-out set size; ARBOR_ADAPTER, full or LoRA fine-tunes;
    ARBOR_VALUE_MODEL, a value model trained with each promoted candidate).
    Unset: LoopConfig's own defaults."""
    cfg = LoopConfig()
    if settings.train_budget_s is not None:
        cfg.train = replace(cfg.train, time_budget_s=settings.train_budget_s)
    if settings.adapter is not None:
        cfg.train = replace(cfg.train, adapter=settings.adapter)
        cfg.preference = replace(cfg.preference, adapter=settings.adapter)
    if settings.promote_margin is not None:
        cfg.promote_margin = settings.promote_margin
    if settings.heldout_per_difficulty is not None:
        cfg.heldout_per_difficulty = settings.heldout_per_difficulty
    if settings.value_model is not None:
        cfg.value_model = settings.value_model
    return cfg


def _new_results(store: Store, limit: int) -> tuple[list[SearchResult], list[list[int]], list[str | None]]:
    """The oldest `limit` unconsumed worker results rebuilt from their rows (Store.untrained_results), with each
    candidate's trajectory id and the prompt the best row's round searched (None: the problem's own; a refinement
    round's holds the earlier attempts)."""
    groups = store.untrained_results(limit)
    problems = store.get_problems(sorted({g[0].problem_id for g in groups}))
    results, ids = [], []
    for g in groups:
        candidates = [Candidate(completion=r.completion, token_ids=[], mean_logprob=r.mean_logprob,
                                min_logprob=r.min_logprob, mean_entropy=r.mean_entropy, finished=True,
                                verified=r.verified, score=r.score) for r in g]
        results.append(SearchResult(problems[g[0].problem_id], candidates, g[0].strategy, g[0].policy_version))
        ids.append([r.id for r in g])
    return results, ids, [g[0].prompt for g in groups]


def train_from_store(settings, store: Store, registry, cfg=None) -> dict:
    """One train cycle over what the workers found: select labels from the new search results as the loop does,
    fine-tune the promoted policy on the loop's replay mix, gate candidate vs current on the store's held-out
    problems of the same task, promote only if better (agent/gate.py) and only over the version it trained from."""
    cfg = cfg or LoopConfig()
    results, ids, round_prompts = _new_results(store, cfg.problems_per_cycle)  # the oldest first; the rest wait
    if not results:
        return {"candidate": None, "promoted": False, "reason": "no new search results", "metrics": {}}
    by_task: dict[str | None, list[int]] = {}
    for i, r in enumerate(results):
        by_task.setdefault(r.problem.task, []).append(i)
    heldout_by_task: dict[str | None, list[Problem]] = {}
    for p in store.heldout_problems():
        heldout_by_task.setdefault(p.task, []).append(p)
    # the task with held-out problems and the most new results goes first; the others stay for the next cycle
    name = min(by_task, key=lambda t: (t not in heldout_by_task, -len(by_task[t]), str(t)))
    task = task_of(results[by_task[name][0]].problem)
    pending = sorted(str(t) for t in by_task if t != name)
    if name not in heldout_by_task:
        return {"candidate": None, "promoted": False, "task": name, "metrics": {},
                "reason": f"no held-out problems for task {name or 'none (generic)'!r} in the store: "
                          f"submit some with split 'heldout'{' and the same task' if name else ' and no task'}"}
    if not any(p.answer is not None for p in heldout_by_task[name]) and not task.label_checks():
        return {
            "candidate": None,
            "promoted": False,
            "task": name,
            "metrics": {},
            "reason": f"the held-out problems of task {name or 'none (generic)'!r} carry no answers and the task has "
            f"no label checks, so nothing can tell a better policy from a worse one: give them answers",
        }
    results = [results[i] for i in by_task[name]]
    ids = [ids[i] for i in by_task[name]]
    round_prompts = [round_prompts[i] for i in by_task[name]]
    heldout: dict[str, list[Problem]] = {}
    for p in heldout_by_task[name]:
        heldout.setdefault(str(p.difficulty) if p.difficulty is not None else "all", []).append(p)

    current = registry.load(device=settings.device, dtype=cfg.base_dtype(settings.dtype))
    max_new = _answer_room(task, [r.problem for r in results], cfg.search.max_new_tokens)
    # one memo for the filters and the siblings' verdicts: both ask the same sub-problems
    solve = memoized(greedy_solver(current, replace(cfg.search, max_new_tokens=max_new)))
    # verifier mode where answers exist (the checker's verdicts were recorded with the trajectories), the loop's
    # label-free filters with the task's own checks elsewhere
    filters, examples = {}, []
    for mode in ("verifier", "label_free"):
        part = [r for r in results if (r.problem.answer is not None) == (mode == "verifier")]
        if part:
            selection = select(part, task, replace(cfg.select, mode=mode), solve,
                               value_model=getattr(current, "value_model", None))
            filters[mode], examples = selection.filters, examples + selection.examples
    consumed = [group[0] for group in ids]  # each result's best row: judged by one cycle, never again
    if not examples:
        store.mark_consumed(consumed)
        return {"candidate": None, "promoted": False, "task": name, "reason": "no new result passed selection",
                "filters": filters, "metrics": {}, "pending_tasks": pending}
    row_of = {}
    for r, group in zip(results, ids):
        for c, i in zip(r.candidates, group):
            row_of.setdefault((r.problem.id, c.completion), i)
    # what later cycles replay: the labels that are trajectories (a problem's own given answer is none), in row order
    replayed = sorted((e for e in examples if (e["problem_id"], e["completion"]) in row_of),
                      key=lambda e: row_of[(e["problem_id"], e["completion"])])
    newest = [{"prompt": e["prompt"], "completion": e["completion"]} for e in examples]
    # a refinement round that succeeded after failed ones (its prompt: the attempts and verdicts), and the wrong
    # siblings of a labelled problem shown as attempts, each with the label: the policy learns to use a verdict
    siblings = (sibling_examples(results, examples, task, solve if task.label_checks() else None)
                if shows_history(current) else [])
    refined = refinement_examples(results, round_prompts) + [
        {"prompt": e["prompt"], "completion": e["completion"]} for e in siblings]
    seed_examples = warm_start_examples(task, cfg.warm_start, cfg.seed) if task.name in TASKS else []
    rng = random.Random(f"{cfg.seed}/{len(store.policies())}")
    buffer = store_buffer(name)
    mix = replay_mix(seed_examples, newest, store.replay_labels(buffer, cfg.examples_per_cycle), cfg, rng, refined)
    mode = "verifier" if any(p.answer is not None for ps in heldout.values() for p in ps) else "label_free"
    trained_on = {"source": "store", "task": name, "results": len(results), "examples": len(examples),
                  "refinement_examples": len(refined), "filters": filters,
                  "mode": mode, "replayed_labels": len(replayed)}
    model, train_stats = train_candidate(current, mix, [], cfg.train, cfg.train_method, cfg.preference)
    candidate = Policy(model, current.tokenizer, "candidate", draft_source=current.draft_source,
                       prompt_format=current.prompt_format)
    # room for the longest held-out answer (a 100-digit sum needs 102 tokens, past the search's default)
    eval_search = replace(cfg.eval_search, max_new_tokens=_answer_room(
        task, [p for ps in heldout.values() for p in ps], cfg.eval_search.max_new_tokens))
    verdict = judge(candidate, current, heldout, eval_search, task, mode, cfg.promote_margin)
    metrics = verdict.metrics()
    value = None
    if cfg.value_model and verdict.promote:
        # the judge continues the promoted version's (which carries what earlier cycles taught it): no replay here
        labelled = [row for part_mode in ("verifier", "label_free") for row in labelled_candidates(
            [r for r in results if (r.problem.answer is not None) == (part_mode == "verifier")], examples, task,
            part_mode)]
        value = train_cycle_value(current, candidate, labelled, [], cfg, rng,
                                  [p for ps in heldout.values() for p in ps], eval_search.max_new_tokens)
    version = registry.save(
        model,
        current.tokenizer,
        parent=current.version,
        trained_on={**trained_on, "train": train_stats},
        metrics=metrics,
        draft_source=current.draft_source,
        prompt_format=current.prompt_format,
    )
    if value is not None and value.model is not None:
        save_value(registry, version, value.model)
    # the compare-and-set: an operator's rollback (or another promotion) since this cycle began wins
    promoted = verdict.promote and store.promote_policy(version, expected=current.version, metrics=metrics,
                                                        stale_status="stale")
    if not verdict.promote:
        registry.reject(version, metrics)
    store.add_replay_labels(buffer, replayed)
    store.mark_consumed(consumed)
    out = {"candidate": version, "promoted": promoted, "parent": current.version, "task": name,
           "examples": len(examples), "refinement_examples": len(refined), "filters": filters,
           "metrics": {**metrics, "current_heldout": verdict.current.accuracy}, "train": train_stats,
           "pending_tasks": pending}
    if value is not None:
        out["value"] = value.record
    if verdict.promote and not promoted:
        out["stale"] = f"{current.version} was no longer the promoted version when {version} passed the gate"
    return out


def run_train_cycle(settings, store: Store, registry, job_id: str, worker: str, lock=None, cfg=None,
                    processes: int = 1) -> dict:
    """Fine-tune the promoted policy on the store's new best trajectories, evaluate, promote or reject.

    `lock` is a RedisLease (with a broker) or a FileLease; a cycle that finds another cycle running is
    finished as skipped. A delivery of a finished cycle returns its stored result and trains nothing.
    With `processes` > 1 the cycle runs as that many data-parallel processes (agent/distributed.py) while this
    one holds the lock."""
    _ensure_job(store, job_id)
    job = store.get_job(job_id)
    if job.status in JOB_FINISHED:
        return job.result or {"error": job.error}
    lock = lock if lock is not None else FileLease(settings.home / "train.lock", holder=job_id)
    settings.home.mkdir(parents=True, exist_ok=True)
    if not lock.acquire():
        if lock.current_holder() == job_id:
            raise LeaseBusy(f"train cycle {job_id} is running elsewhere")
        result = {"skipped": "another train cycle is running"}
        store.finish_job(job_id, result)
        return result
    try:
        if processes > 1:
            return _launched_cycle(store, job_id, processes)
        if not store.start_job(job_id, worker):
            return store.get_job(job_id).result or {}
        try:
            if store.count_untrained_best() == 0:
                result = {"skipped": "no new best trajectories to train on"}
            else:
                result = train_from_store(settings, store, registry, cfg or loop_config_from_env(settings))
        except Exception as exc:
            log.exception("train cycle %s failed", job_id)
            store.finish_job(job_id, error=f"{type(exc).__name__}: {exc}")
            raise
        store.finish_job(job_id, result)
        return result
    finally:
        lock.release()


def _launched_cycle(store: Store, job_id: str, processes: int) -> dict:
    """The same cycle as `processes` processes under `accelerate launch`; the first records it under `job_id`."""
    from agent import distributed

    cmd = distributed.launch_command(processes, ["train", "--in-process", "--lock-held", "--job-id", job_id])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    job = store.get_job(job_id)
    if job is None or job.status not in JOB_FINISHED:
        lines = proc.stderr.strip().splitlines()
        # Arbor's own one-line error when there is one; torchrun's failure summary follows it
        tail = next(
            (line for line in reversed(lines) if line.startswith("error: ")), lines[-1] if lines else "no output"
        )
        raise RuntimeError(f"the {processes}-process train cycle exited with status {proc.returncode} before recording "
                           f"a result: {tail}")
    return job.result or {"error": job.error}
