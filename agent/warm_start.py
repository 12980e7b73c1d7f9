"""Every way the first policy of a run is made: the built-in policy warm-started on a task's easy problems (checked
for mastery and extended), a fresh built-in policy sized to a user's files, or the user's own model folder (each
optionally fine-tuned on demonstrations first)."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Callable

from agent.config import BuiltinConfig, LoopConfig, WarmStartConfig
from agent.evaluation import evaluate_policy, greedy_config
from agent.policy import DEFAULT_CHARSET, Policy, build_builtin_policy, load_policy
from agent.registry import PolicyRegistry
from agent.trainer import SFTFineTuner
from search.prompt_format import PromptFormat, formatted_examples
from tasks import Problem, Task, get_task
from tasks.alignment import infer_coupling

Events = Callable[[str, object], None]


def warm_start_examples(task: Task, cfg: WarmStartConfig, seed: int = 0) -> list[dict]:
    """True-labelled easy problems: the only ground truth the label-free loop ever trains on."""
    examples = [
        {"prompt": p.prompt, "completion": p.answer}
        for d in cfg.difficulties
        for p in task.generate(d, cfg.examples_per_difficulty * d, seed=seed, split="train")
    ]
    random.Random(seed).shuffle(examples)
    return examples


def master_warm_start(
    model, tokenizer, task: Task, cfg: WarmStartConfig, examples: list[dict], seed: int
) -> list[dict]:
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
        accuracy = evaluate_policy(Policy(model, tokenizer, "warm-start"), problems, greedy_config()).accuracy
        checks.append(accuracy)
        if min(accuracy.values(), default=1.0) >= cfg.mastery:
            break
    return checks


def warm_start_builtin(device: str, registry: PolicyRegistry, cfg: LoopConfig, task: Task, examples: list[dict],
                       demos: bool = False, run: str | None = None) -> str:
    """A new built-in policy fine-tuned on `examples` (the task's warm-start examples, or the user's demonstrations
    when `demos`), saved as a version. The task's examples are checked for mastery and extended. With `run` the
    version stays a candidate: the run records it as its base and promotes it in one transaction (RunStore.set_base),
    so a kill in between leaves nothing promoted that the run does not know; without, it is promoted."""
    model, tokenizer = build_builtin_policy(replace(cfg.builtin, seed=cfg.seed), DEFAULT_CHARSET, task.coupling)
    model.to(device)
    stats = SFTFineTuner(cfg.warm_start.train).train(model, tokenizer, examples) if examples else {}
    if not demos:
        stats["mastery_checks"] = master_warm_start(model, tokenizer, task, cfg.warm_start, examples, cfg.seed)
    trained_on = {"warm_start": True, "examples": len(examples), "train": stats,
                  "difficulties": "demos" if demos else list(cfg.warm_start.difficulties)}
    if run is not None:
        trained_on["run"] = run
    version = registry.save(model, tokenizer, parent=None, trained_on=trained_on, metrics={"warm_start": stats})
    if run is None:
        registry.promote(version, {"warm_start": stats})
    return version


def ensure_policy(settings, registry: PolicyRegistry, cfg: LoopConfig | None = None, task: Task | None = None) -> str:
    """The promoted version; when there is none, the built-in policy warm-started on `task` (default addition) as v0."""
    promoted = registry.promoted()
    if promoted is not None:
        return promoted[0]
    cfg = cfg or LoopConfig()
    task = task or get_task("addition")
    return warm_start_builtin(settings.device, registry, cfg, task, warm_start_examples(task, cfg.warm_start, cfg.seed))


def adopt_user_folder(registry: PolicyRegistry, path: Path, demos: list[dict] | None, cfg: LoopConfig, on_event: Events,
                      run: str) -> str:
    """Register a user's model folder for `run` (a candidate); with demos, warm-start it on them first."""
    model, tokenizer = load_policy(path)  # PolicyLoadError names the folder and the problem
    prompt_format = cfg.chosen_prompt_format(PromptFormat.load(path))
    prompt_format.check(tokenizer)
    stats = {}
    if demos:
        on_event("phase", f"warm-starting {path} on {len(demos)} demonstrations")
        stats = SFTFineTuner(cfg.warm_start.train).train(model, tokenizer,
                                                         formatted_examples(demos, prompt_format, tokenizer))
    return registry.save(
        model,
        tokenizer,
        parent=None,
        trained_on={"source": str(Path(path).resolve()), "demos": len(demos or []), "train": stats, "run": run},
        prompt_format=prompt_format,
    )


def fresh_builtin_for_files(
    registry: PolicyRegistry,
    problems: list[Problem],
    demos: list[dict] | None,
    cfg: LoopConfig,
    on_event: Events,
    run: str,
) -> str:
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


def base_policy(device: str, registry: PolicyRegistry, cfg: LoopConfig, task: Task, seed_examples: list[dict],
                model: Path | None, demos: list[dict] | None, problems: list[Problem] | None, run: str,
                on_event: Events) -> tuple[str, bool]:
    """The run's first policy, and whether RunStore.set_base may promote it (only when nothing is promoted): the user's
    folder, a fresh built-in policy for the user's files, the promoted version, or the built-in policy warm-started on
    `seed_examples` (the run's own warm-start data, made once)."""
    if model is not None:
        return adopt_user_folder(registry, model, demos, cfg, on_event, run), True
    promoted = registry.promoted()
    if cfg.prompt_format == "chat" and (problems is not None or promoted is None):  # before the warm start, not after
        raise ValueError("prompt_format chat needs a model whose tokenizer has a chat template (--model DIR): a new "
                         "built-in policy's has none")
    if problems is not None:
        return fresh_builtin_for_files(registry, problems, demos, cfg, on_event, run), True
    if promoted is not None:
        return promoted[0], False
    on_event(
        "phase",
        f"warm-starting the built-in policy on {task.name} at difficulties {list(cfg.warm_start.difficulties)} "
        f"({cfg.warm_start.train.time_budget_s:.0f} s"
        + (
            f", extended until each reaches {cfg.warm_start.mastery:.2f})"
            if cfg.warm_start.mastery is not None
            else ")"
        ),
    )
    examples = demos if demos is not None else seed_examples
    return warm_start_builtin(device, registry, cfg, task, examples, demos=demos is not None, run=run), True
