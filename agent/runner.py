"""The main job: set up store, registry and policy, run the self-improvement loop, write the report.

A run lives in the store (agent/store.py RunStore): its settings and inputs, its base version, one record per
finished cycle and its replay buffer. `run_main` with `RunInputs(resume=NAME)` continues a killed run after its
last recorded cycle; the report is always rebuilt from the stored records.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Callable

from agent.curriculum import BuiltinSource, FileSource
from agent.allocator import keep_freed_memory
from agent.config import LoopConfig
from agent.loop import CycleRecord, SelfImprovementLoop
from agent.registry import PolicyRegistry
from agent.report import write_report
from agent.settings import Settings
from agent.run_store import PLAIN_NAME, RunExists, RunStore
from agent.store import Store
from agent.locks import FileLease
from agent.warm_start import base_policy, warm_start_examples
from tasks import Task, allow, get_task
from tasks.jsonl import LineError, read_demos, read_problems

RESUME_CHANGES = ("cycles", "time_budget_s")  # what a resumed run may change: when to stop, not how to learn


class RunError(ValueError):
    """A problem with the user's input that stops the run before anything is written."""


@dataclass
class RunInputs:
    model: Path | None = None
    demos: Path | None = None
    problems: Path | None = None
    run_name: str | None = None
    resume: str | None = None  # a run to continue, with the inputs and settings it was started with
    changes: dict = field(default_factory=dict)  # with resume: new values of RESUME_CHANGES fields
    task: str | None = None  # a task family by name (tasks/registry.py); default: addition, or the files' own
    select_given: bool = False  # --select was given; otherwise answers on the train problems pick verifier mode


def run_main(settings: Settings, cfg: LoopConfig, inputs: RunInputs = RunInputs(),
             on_event: Callable[[str, object], None] = lambda kind, payload: None,
             should_stop: Callable[[CycleRecord], bool] | None = None) -> dict:
    """Run the loop, or resume a run (`inputs.resume`); `on_event(kind, payload)` reports progress ("warning",
    "phase", "cycle": every record of the run, the recorded ones first); `should_stop(record)`, checked after every
    cycle, ends the run early (a benchmark's target reached)."""
    keep_freed_memory()
    start = time.monotonic()
    store = Store(settings.db_url)
    registry = PolicyRegistry(settings.policies_dir, store)
    runs = RunStore(store)
    if inputs.task is not None:
        _usable_task(inputs.task, generated=inputs.problems is None)
    if inputs.resume is not None:
        name, cfg, inputs = _resumed(runs, inputs, settings)
        demos, problems = _read_inputs(inputs, on_event)
    else:
        name = (
            _plain_name(inputs.run_name, "--run-name")
            if inputs.run_name
            else dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
        )
        taken = f"run {name!r} already exists: continue it with --resume {name}, or choose another --run-name"
        if (settings.runs_dir / name).exists():
            raise RunError(taken)
        demos, problems = _read_inputs(inputs, on_event)  # a bad file stops the run before it is created
        if problems is not None and not inputs.select_given:
            cfg = _select_from_answers(cfg, problems, on_event)
        try:
            runs.create(name, asdict(cfg), _describe_inputs(inputs))
        except RunExists:
            raise RunError(taken) from None
    run_dir = settings.runs_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLease(run_dir / ".lock", holder=name)
    if not lock.acquire():
        raise RunError(f"run {name!r} is running in another process: wait for it to end, or stop it first")
    try:
        # a candidate saved by a killed process whose cycle was never recorded: the resumed cycle trains again
        for row in runs.unrecorded_versions(name):
            registry.discard(row.version)
            on_event(
                "warning", f"discarded policy {row.version}: saved by run {name} before it was stopped, never recorded"
            )
        if problems is None:
            task = get_task(inputs.task or "addition")
            source = BuiltinSource(task, cfg.heldout_per_difficulty, cfg.max_difficulty, cfg.seed)
            seed_examples = warm_start_examples(task, cfg.warm_start, cfg.seed)
        else:
            store.add_problems(problems)
            task = get_task(inputs.task) if inputs.task else Task()
            source = FileSource(problems, task)
            seed_examples = demos or []
        warm_seconds = 0.0
        if runs.get(name).base_version is None:
            t = time.monotonic()
            version, promote = base_policy(
                settings.device, registry, cfg, task, seed_examples, inputs.model, demos, problems, name, on_event
            )
            runs.set_base(name, version, promote)
            warm_seconds = time.monotonic() - t
        recorded = runs.cycles(name)
        on_event("phase", f"run {name}: " + (f"resuming after cycle {recorded[-1].cycle}" if recorded else "starting")
                 + f" (after a stop, continue it with --resume {name})")
        loop = SelfImprovementLoop(cfg, store, registry, source, seed_examples, settings.device,
                                   on_cycle=lambda record: on_event("cycle", record), should_stop=should_stop,
                                   dtype=settings.dtype)
        loop.run(name, start, warm_seconds)
        if loop.stop_reason:
            on_event("phase", loop.stop_reason)
        runs.finish(name)
        records = [CycleRecord(**c.record) for c in runs.cycles(name)]  # whichever process ran each cycle
        paths = {r.version: r.path for r in store.policies()}
        return write_report(
            run_dir,
            records,
            paths[records[-1].policy_version],
            runs.get(name).config,
            {"run": name, "run_dir": str(run_dir.resolve()), "database": settings.db_url.split("@")[-1],
             **({"stopped": loop.stop_reason} if loop.stop_reason else {})},
        )
    finally:
        lock.release()


def _select_from_answers(cfg: LoopConfig, problems, on_event) -> LoopConfig:
    """Use what the user gives: train problems that all carry answers are selected by them (verifier mode);
    label-free selection is the default only where answers are missing."""
    train = [p for p in problems if p.split == "train"]
    with_answers = sum(p.answer is not None for p in train)
    if train and with_answers == len(train):
        on_event("phase", f"all {len(train)} train problems carry answers: selecting with them (verifier mode; "
                          "--select label_free ignores them)")
        return replace(cfg, select=replace(cfg.select, mode="verifier"))
    if with_answers:
        on_event("phase", f"{with_answers} of {len(train)} train problems carry answers: label-free selection "
                          "(--select verifier keeps only the answered ones)")
    return cfg


def _usable_task(name: str, generated: bool) -> None:
    """The task can be named (see tasks/registry.py) and, without --problems, generates its own problems."""
    try:
        allow(name)
    except ValueError as exc:
        raise RunError(f"--task: {exc}") from None
    if generated and type(get_task(name)).generate is Task.generate:
        raise RunError(f"--task {name}: this task has no problem generator: give its problems with --problems FILE")


def _plain_name(name: str, flag: str) -> str:
    if not PLAIN_NAME.fullmatch(name):
        raise RunError(f"{flag} {name!r} is not a plain name: use letters, digits, '.', '_' and '-' (at most 100, "
                       "not starting with '.' or '-'); the run's folder is made under runs/")
    return name


def _resumed(runs: RunStore, inputs: RunInputs, settings: Settings) -> tuple[str, LoopConfig, RunInputs]:
    """The stored run's name, settings (with inputs.changes) and inputs; its files must be as they were."""
    name = _plain_name(inputs.resume, "--resume")
    given = [
        flag
        for flag, value in (
            ("--model", inputs.model),
            ("--demos", inputs.demos),
            ("--problems", inputs.problems),
            ("--run-name", inputs.run_name),
        )
        if value is not None
    ]
    if given:
        raise RunError(f"--resume continues run {name!r} with the inputs it was started with: drop {', '.join(given)}")
    row = runs.get(name)
    if row is None:
        raise RunError(f"no run {name!r} in the store at {settings.db_url.split('@')[-1]}: start one without --resume")
    unknown = sorted(set(inputs.changes) - set(RESUME_CHANGES))
    if unknown:
        raise RunError(
            f"a resumed run keeps its settings: only {', '.join(RESUME_CHANGES)} may change (got {', '.join(unknown)})"
        )
    cfg = replace(_restored(LoopConfig(), row.config), **inputs.changes)
    if inputs.changes:
        runs.set_config(name, asdict(cfg))
    files = {}
    for key in ("demos", "problems"):
        stored = row.inputs.get(key)
        if stored is None:
            continue
        path = Path(stored["path"])
        if not path.is_file():
            raise RunError(f"run {name!r} was started with --{key} {path}: that file is gone; put it back to resume")
        if _sha256(path) != stored["sha256"]:
            raise RunError(f"--{key} {path} changed since run {name!r} started: a resumed run needs the same file")
        files[key] = path
    model, task = row.inputs.get("model"), row.inputs.get("task")
    if task is not None:
        _usable_task(task, generated=row.inputs.get("problems") is None)
    return name, cfg, RunInputs(model=Path(model) if model else None, run_name=name, task=task, **files)


def _restored(default, data: dict):
    """A config dataclass from its asdict() form as JSON keeps it (lists where tuples were, nested dicts)."""
    changes = {}
    for f in fields(default):
        if f.name not in data:
            continue  # a field added since the run started keeps its default
        value, now = data[f.name], getattr(default, f.name)
        if is_dataclass(now):
            value = _restored(now, value)
        elif isinstance(now, tuple):
            value = tuple(value)
        changes[f.name] = value
    return replace(default, **changes)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe_inputs(inputs: RunInputs) -> dict:
    out = {"model": str(Path(inputs.model).resolve()) if inputs.model is not None else None, "task": inputs.task}
    for key in ("demos", "problems"):
        path = getattr(inputs, key)
        out[key] = {"path": str(Path(path).resolve()), "sha256": _sha256(Path(path))} if path is not None else None
    return out


def _read_inputs(inputs: RunInputs, on_event):
    demos = problems = None
    if inputs.demos is not None:
        demos, errors = read_demos(_existing(inputs.demos, "--demos"))
        _report_line_errors(errors, on_event)
    if inputs.problems is not None:
        problems, errors = read_problems(_existing(inputs.problems, "--problems"), default_task=inputs.task)
        _report_line_errors(errors, on_event)
        if not any(p.split == "train" for p in problems):
            raise RunError(
                f"{inputs.problems}: no usable problem with split 'train': add some, or fix the lines reported above"
            )
    return demos, problems


def _existing(path: Path, flag: str) -> Path:
    if not Path(path).is_file():
        raise RunError(f"{flag} {path}: no such file")
    return Path(path)


def _report_line_errors(errors: list[LineError], on_event) -> None:
    for e in errors:
        on_event("warning", f"skipped {e} (the other lines are kept)")
