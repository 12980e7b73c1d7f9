"""The main job: set up store, registry and policy, run the self-improvement loop, write the report."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from agent.curriculum import BuiltinSource, FileSource
from agent.loop import LoopConfig, SelfImprovementLoop, ensure_policy, warm_start_examples
from agent.policy import DEFAULT_CHARSET, BuiltinConfig, build_builtin_policy, load_policy
from agent.registry import PolicyRegistry
from agent.report import write_report
from agent.settings import Settings
from agent.store import Store
from tasks import Task, get_task
from tasks.jsonl import LineError, read_demos, read_problems
from agent.trainer import SFTFineTuner


class RunError(ValueError):
    """A problem with the user's input that stops the run before anything is written."""


@dataclass
class RunInputs:
    model: Path | None = None
    demos: Path | None = None
    problems: Path | None = None
    run_name: str | None = None


def run_main(settings: Settings, cfg: LoopConfig, inputs: RunInputs = RunInputs(),
             on_event: Callable[[str, object], None] = lambda kind, payload: None) -> dict:
    """Run the loop; `on_event(kind, payload)` reports progress ("warning", "phase", "cycle")."""
    start = time.monotonic()
    store = Store(settings.db_url)
    registry = PolicyRegistry(settings.policies_dir, store)
    demos, problems = _read_inputs(inputs, on_event)

    warm_seconds = 0.0
    if problems is None:
        task: Task = get_task("addition")
        source = BuiltinSource(task, cfg.heldout_per_difficulty, cfg.max_difficulty, cfg.seed)
        seed_examples = warm_start_examples(task, cfg.warm_start, cfg.seed)
        if inputs.model is not None:
            version = _adopt_user_folder(registry, inputs.model, demos, cfg, on_event)
        else:
            if registry.promoted() is None:
                on_event("phase", f"warm-starting the built-in policy on {list(cfg.warm_start.difficulties)}-digit addition "
                                  f"({cfg.warm_start.train.time_budget_s:.0f} s)")
            t = time.monotonic()
            version = ensure_policy(settings, store, registry, cfg, demos=demos)
            warm_seconds = time.monotonic() - t
    else:
        store.add_problems(problems)
        task = Task()
        source = FileSource(problems, task)
        seed_examples = demos or []
        t = time.monotonic()
        if inputs.model is not None:
            version = _adopt_user_folder(registry, inputs.model, demos, cfg, on_event)
        else:
            version = _fresh_builtin_for_files(registry, problems, demos, cfg, on_event)
        warm_seconds = time.monotonic() - t

    loop = SelfImprovementLoop(cfg, store, registry, source, seed_examples, settings.device,
                               on_cycle=lambda record: on_event("cycle", record))
    records = loop.run(version, start, warm_seconds)
    final = registry.promoted()
    run_dir = settings.runs_dir / (inputs.run_name or dt.datetime.now().strftime("run-%Y%m%d-%H%M%S"))
    report = write_report(run_dir, records, final[1] if final else "", asdict(cfg),
                          {"run_dir": str(run_dir.resolve()), "database": settings.db_url.split("@")[-1]})
    return report


def _read_inputs(inputs: RunInputs, on_event):
    demos = problems = None
    if inputs.demos is not None:
        demos, errors = read_demos(_existing(inputs.demos, "--demos"))
        _report_line_errors(errors, on_event)
    if inputs.problems is not None:
        problems, errors = read_problems(_existing(inputs.problems, "--problems"))
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


def _adopt_user_folder(registry: PolicyRegistry, path: Path, demos, cfg: LoopConfig, on_event) -> str:
    """Register a user's model folder; with demos, warm-start it on them first."""
    model, tokenizer = load_policy(path)  # PolicyLoadError names the folder and the problem
    stats = {}
    if demos:
        on_event("phase", f"warm-starting {path} on {len(demos)} demonstrations")
        stats = SFTFineTuner(cfg.warm_start.train).train(model, tokenizer, demos)
    version = registry.save(model, tokenizer, parent=None, trained_on={"source": str(Path(path).resolve()), "demos": len(demos or []), "train": stats})
    registry.promote(version, {})
    return version


def _fresh_builtin_for_files(registry: PolicyRegistry, problems, demos, cfg: LoopConfig, on_event) -> str:
    """A new built-in policy whose tokenizer covers every character of the user's files."""
    texts = [p.prompt + (p.answer or "") for p in problems] + [d["prompt"] + d["completion"] for d in demos or []]
    charset = "".join(sorted(set("".join(texts)) | set(DEFAULT_CHARSET)))
    model, tokenizer = build_builtin_policy(BuiltinConfig(position_scheme="sequential", seed=cfg.seed), charset)
    stats = {}
    if demos:
        on_event("phase", f"warm-starting a fresh built-in policy on {len(demos)} demonstrations")
        stats = SFTFineTuner(cfg.warm_start.train).train(model, tokenizer, demos)
    version = registry.save(model, tokenizer, parent=None, trained_on={"warm_start": "demos", "examples": len(demos or []), "train": stats})
    registry.promote(version, {})
    return version

