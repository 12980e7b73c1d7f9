"""`arbor run`: the self-improvement loop in one process, with a live per-cycle table.

    arbor run --cycles 20 --run-name addition     # the run is kept in the store, cycle by cycle
    arbor run --resume addition                   # after any stop: continue after its last recorded cycle
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from agent.config import LoopConfig
from agent.settings import Settings
from arbor.options import load_settings, option

LOOP = LoopConfig()  # every option's default is LoopConfig's own (and its search, select and train configs')

console = Console(stderr=True, soft_wrap=True)  # a warning or an error stays on one line


def _cycle_row(record) -> list[str]:
    shown = sorted(record.heldout, key=lambda k: int(k) if k.isdigit() else -1)
    if len(shown) > 8:
        shown = [k for k in shown if not k.isdigit() or int(k) % 4 == 0 or k == record.frontier]
    accs = " ".join(f"{k}:{record.heldout[k]:.2f}" for k in shown)
    loss = record.train.get("train_loss")
    status = "yes" if record.promoted else ("-" if record.candidate is None else "no")
    if record.candidate is not None and not record.promoted and not record.stale:
        from agent.report import NONE_FELL, fell_text  # the report's plotting imports only once a run has started

        fell = fell_text(record.gate, most=4)
        status = f"no, fell: {fell}" if fell else f"no, {NONE_FELL}"
    accepted = (f"{record.trained_searched}+{record.trained_given} given" if record.trained_given
                else str(record.accepted))
    return [str(record.cycle), f"{record.elapsed_s:.0f}", record.policy_version, str(record.frontier), accs,
            accepted, "" if loss is None else f"{loss:.3f}", status]


# the options a resumed run may be given: when to stop (agent/runner.py RESUME_CHANGES) and where it runs
RESUME_OPTIONS = {"resume", "cycles", "time_budget", "home", "device", "json_out"}


def run(
    ctx: typer.Context,
    model: Optional[Path] = typer.Option(None, help="A local transformers causal-LM folder to start from (default: "
                                         "the built-in policy)."),
    demos: Optional[Path] = typer.Option(None, help="JSONL of {prompt, completion} pairs for the warm start."),
    problems: Optional[Path] = typer.Option(None, help="JSONL of problems (default: the built-in addition task)."),
    task: Optional[str] = typer.Option(None, help="A task family: built-in (addition, reversal), installed "
                                       "(arbor.tasks entry point) or module:Class; with --problems, the task of lines "
                                       "that name none."),
    cycles: int = option(LOOP, "cycles"),
    time_budget: Optional[float] = option(LOOP, "time_budget_s", "--time-budget"),
    strategy: str = option(LOOP.search, "strategy"),
    samples: int = option(LOOP.search, "n", "--samples"),
    select: Optional[str] = option(LOOP.select, "mode", "--select", unset=True,
                                   help="label_free or verifier (default: verifier when every train problem of "
                                        "--problems carries an answer, else label_free)"),
    problems_per_cycle: int = option(LOOP, "problems_per_cycle"),
    stop_after_rejections: int = option(LOOP, "stop_after_rejections"),
    train_method: str = option(LOOP, "train_method"),
    train_seconds: float = option(LOOP.train, "time_budget_s", "--train-seconds"),
    learning_rate: float = option(LOOP.train, "learning_rate"),
    # a cycle's SFT and DPO fine-tunes alike (one candidate); the warm start trains a full model
    adapter: str = option(LOOP.train, "adapter"),
    lora_rank: int = option(LOOP.train, "lora_rank"),
    lora_dora: bool = option(LOOP.train, "lora_dora"),
    lora_plus_ratio: float = option(LOOP.train, "lora_plus_ratio"),
    lora_learning_rate_scale: float = option(LOOP.train, "lora_learning_rate_scale"),
    gradient_checkpointing: bool = option(LOOP.train, "gradient_checkpointing"),
    gradient_accumulation_steps: int = option(LOOP.train, "gradient_accumulation_steps"),
    warm_start_seconds: float = option(LOOP.warm_start.train, "time_budget_s", "--warm-start-seconds"),
    value_model: bool = option(LOOP, "value_model"),
    value_seconds: float = option(LOOP.value, "time_budget_s", "--value-seconds"),
    value_refresh_auroc: float = option(LOOP, "value_refresh_auroc"),
    value_learning_auroc: float = option(LOOP, "value_learning_auroc"),
    min_value: Optional[float] = option(LOOP.select, "min_value"),
    prompt_format: Optional[str] = option(LOOP, "prompt_format"),
    system_prompt: Optional[str] = option(LOOP, "system_prompt"),
    heldout: int = option(LOOP, "heldout_per_difficulty", "--heldout"),
    seed: int = option(LOOP, "seed"),
    run_name: Optional[str] = typer.Option(None, help="The run's name: its folder under $ARBOR_HOME/runs (letters, "
                                           "digits, '.', '_', '-')."),
    resume: Optional[str] = typer.Option(None, metavar="RUN", help="Continue run RUN after its last recorded cycle, "
                                         "with the inputs and settings it was started with (--cycles and "
                                         "--time-budget may change)."),
    home: Optional[Path] = option(Settings, "home"),
    device: Optional[str] = option(Settings, "device"),
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON object on the last line."),
):
    """Run the self-improvement loop: search, select, fine-tune, evaluate, promote."""
    from agent.policy import PolicyLoadError
    from agent.runner import RunError, RunInputs, run_main

    settings = load_settings(home=home, device=device)
    # typer carries its own copy of click: its ParameterSource is matched by name
    given = [name for name in ctx.params if ctx.get_parameter_source(name).name == "COMMANDLINE"]
    changes = {}
    if resume is not None:
        refused = [f"--{name.replace('_', '-')}" for name in given if name not in RESUME_OPTIONS]
        if refused:
            console.print(f"[red]error:[/] --resume continues run {resume!r} with the inputs and settings it was "
                          f"started with: drop {', '.join(refused)}")
            raise typer.Exit(2)
        when = (("cycles", "cycles", cycles), ("time_budget", "time_budget_s", time_budget))
        changes = {field: value for name, field, value in when if name in given}
    fine_tune = dict(adapter=adapter, lora_rank=lora_rank, lora_dora=lora_dora, lora_plus_ratio=lora_plus_ratio,
                     lora_learning_rate_scale=lora_learning_rate_scale,
                     gradient_checkpointing=gradient_checkpointing,
                     gradient_accumulation_steps=gradient_accumulation_steps)
    try:
        cfg = replace(
            LOOP,
            cycles=cycles,
            time_budget_s=time_budget,
            problems_per_cycle=problems_per_cycle,
            stop_after_rejections=stop_after_rejections,
            train_method=train_method,
            heldout_per_difficulty=heldout,
            seed=seed,
            prompt_format=prompt_format,
            system_prompt=system_prompt,
            value_model=value_model,
            value_refresh_auroc=value_refresh_auroc,
            value_learning_auroc=value_learning_auroc,
            value=replace(LOOP.value, time_budget_s=value_seconds),
            search=replace(LOOP.search, strategy=strategy, n=samples),
            select=replace(LOOP.select, mode=select or LOOP.select.mode, min_value=min_value),
            train=replace(LOOP.train, time_budget_s=train_seconds, learning_rate=learning_rate, **fine_tune),
            preference=replace(LOOP.preference, **fine_tune),
            warm_start=replace(LOOP.warm_start, train=replace(LOOP.warm_start.train, time_budget_s=warm_start_seconds)),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    table = Table(title="Arbor self-improvement", show_lines=False)
    for col in ["cycle", "s", "policy", "frontier", "held-out accuracy (difficulty:acc)", "accepted", "loss",
                "promoted"]:
        table.add_column(col)

    def on_event(kind: str, payload) -> None:
        if kind == "warning":
            console.print(f"[yellow]warning:[/] {payload}")
        elif kind == "phase":
            console.print(f"[cyan]{payload}[/]")
        elif kind == "cycle":
            row = _cycle_row(payload)
            table.add_row(*row)
            names = ["cycle", "t", "policy", "frontier", "acc", "accepted", "loss", "promoted"]
            console.print("  ".join(f"{c}={v}" for c, v in zip(names, row)))

    try:
        with console.status("running the self-improvement loop (each cycle: search, select, train, evaluate)"):
            report = run_main(settings, cfg, RunInputs(model, demos, problems, run_name, resume, changes, task,
                                                        select_given=select is not None), on_event)
    except (RunError, PolicyLoadError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    console.print(table)
    console.print(f"report: {report['run_dir']}/report.md, learning curve: {report['run_dir']}/learning_curve.png, "
                  f"time per cycle: {report['run_dir']}/time_per_cycle.png")
    if json_out:
        print(json.dumps({k: report[k] for k in ("cycles", "final_policy", "run_dir")}, default=str))
