"""The main job: set up store, registry and policy, run the self-improvement loop, write the report.

A run lives in the store (agent/store.py RunStore): its settings and inputs, its base version, one record per
finished cycle and its replay buffer. `run_main` with `RunInputs(resume=NAME)` continues a killed run after its
last recorded cycle; the report is always rebuilt from the stored records.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Callable

from agent.curriculum import BuiltinSource, FileSource
from agent.allocator import keep_freed_memory
from agent.config import LoopConfig
from agent.loop import CycleRecord, SelfImprovementLoop, ensure_policy, warm_start_examples
from agent.config import BuiltinConfig
from agent.policy import DEFAULT_CHARSET, build_builtin_policy, load_policy
from agent.registry import PolicyRegistry
from agent.report import write_report
from agent.settings import Settings
from agent.store import RunExists, RunStore, Store
from agent.train_cycle import FileLease
from tasks import Task, allow, get_task
from tasks.alignment import infer_coupling
from tasks.jsonl import LineError, read_demos, read_problems
from agent.trainer import SFTFineTuner

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a folder name under runs/: no separators, no "..", no hidden
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
             on_event: Callable[[str, object], None] = lambda kind, payload: None) -> dict:
    """Run the loop, or resume a run (`inputs.resume`); `on_event(kind, payload)` reports progress ("warning",
    "phase", "cycle": every record of the run, the recorded ones first)."""
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
        name = _plain_name(inputs.run_name, "--run-name") if inputs.run_name else dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
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
            on_event("warning", f"discarded policy {row.version}: saved by run {name} before it was stopped, never recorded")
        if problems is None:
            task: Task = get_task(inputs.task or "addition")
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
            version, promote = _base_policy(settings, store, registry, cfg, inputs, demos, problems, name, on_event)
            runs.set_base(name, version, promote)
            warm_seconds = time.monotonic() - t
        recorded = runs.cycles(name)
        on_event("phase", f"run {name}: " + (f"resuming after cycle {recorded[-1].cycle}" if recorded else "starting")
                 + f" (after a stop, continue it with --resume {name})")
        loop = SelfImprovementLoop(cfg, store, registry, source, seed_examples, settings.device,
                                   on_cycle=lambda record: on_event("cycle", record))
        loop.run(name, start, warm_seconds)
        runs.finish(name)
        records = [CycleRecord(**c.record) for c in runs.cycles(name)]  # whichever process ran each cycle
        paths = {r.version: r.path for r in store.policies()}
        return write_report(run_dir, records, paths[records[-1].policy_version], runs.get(name).config,
                            {"run": name, "run_dir": str(run_dir.resolve()), "database": settings.db_url.split("@")[-1]})
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
    if not RUN_NAME.fullmatch(name):
        raise RunError(f"{flag} {name!r} is not a plain name: use letters, digits, '.', '_' and '-' (at most 100, "
                       "not starting with '.' or '-'); the run's folder is made under runs/")
    return name


def _resumed(runs: RunStore, inputs: RunInputs, settings: Settings) -> tuple[str, LoopConfig, RunInputs]:
    """The stored run's name, settings (with inputs.changes) and inputs; its files must be as they were."""
    name = _plain_name(inputs.resume, "--resume")
    given = [flag for flag, value in (("--model", inputs.model), ("--demos", inputs.demos), ("--problems", inputs.problems),
                                      ("--run-name", inputs.run_name)) if value is not None]
    if given:
        raise RunError(f"--resume continues run {name!r} with the inputs it was started with: drop {', '.join(given)}")
    row = runs.get(name)
    if row is None:
        raise RunError(f"no run {name!r} in the store at {settings.db_url.split('@')[-1]}: start one without --resume")
    unknown = sorted(set(inputs.changes) - set(RESUME_CHANGES))
    if unknown:
        raise RunError(f"a resumed run keeps its settings: only {', '.join(RESUME_CHANGES)} may change (got {', '.join(unknown)})")
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


def _base_policy(settings, store, registry, cfg, inputs, demos, problems, name, on_event) -> tuple[str, bool]:
    """The run's first policy, and whether RunStore.set_base may promote it (only when nothing is promoted)."""
    if inputs.model is not None:
        return _adopt_user_folder(registry, inputs.model, demos, cfg, on_event, name), True
    if problems is not None:
        return _fresh_builtin_for_files(registry, problems, demos, cfg, on_event, name), True
    promoted = registry.promoted()
    if promoted is not None:
        return promoted[0], False
    task = get_task(inputs.task or "addition")
    on_event("phase", f"warm-starting the built-in policy on {task.name} at difficulties {list(cfg.warm_start.difficulties)} "
                      f"({cfg.warm_start.train.time_budget_s:.0f} s"
                      + (f", extended until each reaches {cfg.warm_start.mastery:.2f})" if cfg.warm_start.mastery is not None else ")"))
    return ensure_policy(settings, store, registry, cfg, demos=demos, task=task, run=name), True


def _read_inputs(inputs: RunInputs, on_event):
    demos = problems = None
    if inputs.demos is not None:
        demos, errors = read_demos(_existing(inputs.demos, "--demos"))
        _report_line_errors(errors, on_event)
    if inputs.problems is not None:
        problems, errors = read_problems(_existing(inputs.problems, "--problems"), default_task=inputs.task)
        _report_line_errors(errors, on_event)
        if not any(p.split == "train" for p in problems):
            raise RunError(f"{inputs.problems}: no usable problem with split 'train': add some, or fix the lines reported above")
    return demos, problems


def _existing(path: Path, flag: str) -> Path:
    if not Path(path).is_file():
        raise RunError(f"{flag} {path}: no such file")
    return Path(path)


def _report_line_errors(errors: list[LineError], on_event) -> None:
    for e in errors:
        on_event("warning", f"skipped {e} (the other lines are kept)")


def _adopt_user_folder(registry: PolicyRegistry, path: Path, demos, cfg: LoopConfig, on_event, run: str) -> str:
    """Register a user's model folder for `run` (a candidate); with demos, warm-start it on them first."""
    model, tokenizer = load_policy(path)  # PolicyLoadError names the folder and the problem
    stats = {}
    if demos:
        on_event("phase", f"warm-starting {path} on {len(demos)} demonstrations")
        stats = SFTFineTuner(cfg.warm_start.train).train(model, tokenizer, demos)
    return registry.save(model, tokenizer, parent=None,
                         trained_on={"source": str(Path(path).resolve()), "demos": len(demos or []), "train": stats, "run": run})


def _fresh_builtin_for_files(registry: PolicyRegistry, problems, demos, cfg: LoopConfig, on_event, run: str) -> str:
    """A new built-in policy for `run` (a candidate) whose tokenizer covers every character of the user's files. Where
    the examples show each answer character made from the prompt character at the same place, the policy couples
    their positions (tasks/alignment.py); otherwise it numbers tokens in sequence."""
    texts = [p.prompt + (p.answer or "") for p in problems] + [d["prompt"] + d["completion"] for d in demos or []]
    charset = "".join(sorted(set("".join(texts)) | set(DEFAULT_CHARSET)))
    examples = [(d["prompt"], d["completion"]) for d in demos or []]
    if cfg.select.mode == "verifier":  # a label-free run ignores the problems' answers, here too
        examples += [(p.prompt, p.answer) for p in problems if p.answer]
    coupling = infer_coupling(examples)
    if coupling is not None:
        on_event("phase", f"the examples align answer and prompt characters ({coupling.order}, separator "
                          f"{coupling.separator!r}): the new policy couples their positions")
    shape = BuiltinConfig(position_scheme="coupled" if coupling else "sequential", seed=cfg.seed)
    model, tokenizer = build_builtin_policy(shape, charset, coupling)
    stats = {}
    if demos:
        on_event("phase", f"warm-starting a fresh built-in policy on {len(demos)} demonstrations")
        stats = SFTFineTuner(cfg.warm_start.train).train(model, tokenizer, demos)
    return registry.save(model, tokenizer, parent=None,
                         trained_on={"warm_start": "demos", "examples": len(demos or []), "train": stats, "run": run})

