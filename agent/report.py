"""A run's results as report.json, report.md and a learning-curve PNG, each written whole or not at all."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import matplotlib

from agent.files import write_atomic

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402


class ReportUnreadable(ValueError):
    """A report.json that cannot be read: missing, unreadable, truncated or not a report."""


def read_report(path: str | Path) -> dict:
    """A run's report.json; ReportUnreadable (one line naming the file and what is wrong) when it cannot be used."""
    path = Path(path)
    again = f"write it again from the store with `arbor run --resume {path.parent.name}`"
    try:
        report = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ReportUnreadable(f"{path} cannot be read ({exc.strerror})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise ReportUnreadable(f"{path} is damaged (not JSON: {reason}): {again}") from None
    if not isinstance(report, dict):
        raise ReportUnreadable(f"{path} is damaged (not a JSON object): {again}")
    return report


def _difficulty_sort(keys):
    return sorted(keys, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))


def _shown_keys(cycles: list[dict], most: int) -> list[str]:
    """At most about `most` difficulties to show: all when they fit, else those every cycle evaluated (the report's
    own lengths; the frontier's window moves), else every other one."""
    keys = _difficulty_sort({k for c in cycles for k in c["heldout"]})
    if len(keys) <= most:
        return keys
    steady = [k for k in keys if all(k in c["heldout"] for c in cycles)]
    if 2 <= len(steady) <= most:
        return steady
    return [k for k in keys if not k.isdigit() or int(k) % 2 == 0]


# where a cycle's time goes, in the order a cycle spends it (CycleRecord.seconds keys), and what the report calls it
PHASES = {"warm_start": "warm start", "search": "search", "select": "selection and checks", "train": "training",
          "eval": "evaluation and gate", "value": "value model", "save": "saving"}
OPTIONAL_PHASES = {"value"}  # shown only by a run that spent time there (--value-model)


def time_per_cycle(cycles: list[dict]) -> list[dict]:
    """Seconds per phase of every cycle, plus `other` (the rest of the cycle's wall clock: recording, the memory
    handed back) and `total` (elapsed since the cycle before)."""
    rows, before = [], 0.0
    phases = [p for p in PHASES if p not in OPTIONAL_PHASES or any(p in c["seconds"] for c in cycles)]
    for c in cycles:
        spent = {phase: round(c["seconds"].get(phase, 0.0), 1) for phase in phases}
        total = c["elapsed_s"] - before
        rows.append({"cycle": c["cycle"], **spent, "other": round(max(0.0, total - sum(spent.values())), 1),
                     "total": round(total, 1)})
        before = c["elapsed_s"]
    return rows


NONE_FELL = "no length fell, and the gain was within the promotion margin"


def fell_text(gate: dict, most: int | None = None) -> str:
    """The lengths where a candidate scored below the current policy, as `key before->after`, easiest first (`most`:
    the largest drops only); empty when none fell."""
    fell = gate.get("fell") or {}
    keys = _difficulty_sort(fell)
    if most is not None and len(keys) > most:
        largest = sorted(keys, key=lambda k: fell[k]["after"] - fell[k]["before"])[:most]
        keys = [k for k in keys if k in largest]
    return ", ".join(f"{k} {fell[k]['before']:.2f}->{fell[k]['after']:.2f}" for k in keys)


def trained_on(cycles: list[dict]) -> dict:
    """The run's accepted labels by source, over all its cycles: found by the search, or a problem's own given answer
    where the search found none that verified."""
    return {"searched": sum(c.get("trained_searched", c["accepted"]) for c in cycles),
            "given": sum(c.get("trained_given", 0) for c in cycles)}


def write_report(run_dir: Path, records: list, final_policy: str, config: dict, extra: dict | None = None) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    cycles = [asdict(r) for r in records]
    times = time_per_cycle(cycles)
    report = {"cycles": cycles, "time_per_cycle": times, "trained_on": trained_on(cycles), "final_policy": final_policy,
              "config": config, **(extra or {})}
    write_atomic(run_dir / "report.json", json.dumps(report, indent=2, default=str))
    stopped = f"\n{report['stopped']}\n" if report.get("stopped") else ""
    write_atomic(run_dir / "report.md", _markdown(cycles, final_policy, report["trained_on"]) + stopped
                 + _time_table(times))
    _plot(cycles, run_dir / "learning_curve.png")
    _plot_time(times, run_dir / "time_per_cycle.png")
    return report


def _phases(times: list[dict]) -> list[str]:
    return [p for p in PHASES if not times or p in times[0]]


def _time_table(times: list[dict]) -> str:
    columns = [*_phases(times), "other", "total"]
    head = "| cycle | " + " | ".join(PHASES.get(c, c) for c in columns) + " |"
    lines = ["", "Where each cycle's time went, in seconds (plot: time_per_cycle.png):", "", head,
             "|" + "---|" * (len(columns) + 1)]
    lines += [f"| {t['cycle']} | " + " | ".join(f"{t[c]:.1f}" for c in columns) + " |" for t in times]
    return "\n".join(lines) + "\n"


def _plot_time(times: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0.0] * len(times)
    cycles = [t["cycle"] for t in times]
    for phase in [*_phases(times), "other"]:
        values = [t[phase] for t in times]
        ax.bar(cycles, values, bottom=bottom, label=PHASES.get(phase, phase))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("cycle")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    ax.set_title("Arbor self-improvement: where each cycle's time went")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    """A figure written whole as PNG (or not at all), then freed."""
    fig.tight_layout()
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def _markdown(cycles: list[dict], final_policy: str, sources: dict) -> str:
    shown = _shown_keys(cycles, 16)
    given = sources["given"] > 0
    head = (
        "| cycle | time (s) | policy | frontier | "
        + " | ".join(f"d={k}" for k in shown)
        + (" | searched | given" if given else " | accepted")
        + " | train loss | promoted |"
    )
    lines = ["# Arbor run", "", f"Final policy: `{final_policy}`", "",
             f"Trained on {sources['searched']} labels the search found"
             + (f" and {sources['given']} given answers (problems the search failed)" if given else "") + ".", "",
             "Held-out greedy accuracy per difficulty:", "", head, "|" + "---|" * (head.count("|") - 1)]
    for c in cycles:
        accs = " | ".join(f"{c['heldout'][k]:.2f}" if k in c["heldout"] else "" for k in shown)
        loss = c["train"].get("train_loss")
        labels = (f"{c.get('trained_searched', c['accepted'])} | {c.get('trained_given', 0)}" if given
                  else str(c["accepted"]))
        lines.append(
            f"| {c['cycle']} | {c['elapsed_s']:.0f} | {c['policy_version']} | {c['frontier']} | {accs} | {labels} | "
            f"{'' if loss is None else f'{loss:.3f}'} | {'yes' if c['promoted'] else ('-' if c['candidate'] is None else 'no')} |"
        )
    rejected = [c for c in cycles if c["candidate"] is not None and not c["promoted"] and not c.get("stale")]
    if rejected:
        lines += ["", "Rejected candidates: the lengths where each scored below the current policy (gate metric, "
                  "current -> candidate):", ""]
        lines += [f"- cycle {c['cycle']}: " + (fell_text(c.get("gate", {})) or NONE_FELL) for c in rejected]
    lines += [
        "",
        "Label filters per cycle (kept fraction / pseudo-label precision; ground truth read only for this report):",
        "",
    ]
    for c in cycles:
        if c["filters"]:
            parts = [
                f"{f['name']} {f['kept_fraction']:.2f}/{'-' if f['precision'] is None else format(f['precision'], '.3f')}"
                for f in c["filters"]
            ]
            lines.append(f"- cycle {c['cycle']} (difficulty {c['frontier']}): " + ", ".join(parts))
    return "\n".join(lines) + "\n"


def _plot(cycles: list[dict], path: Path) -> None:
    keys = _shown_keys(cycles, 14)
    if len(keys) > 14:
        keys = [k for k in keys if k.isdigit() and int(k) % 4 == 0] or keys[:8]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    minutes = [c["elapsed_s"] / 60 for c in cycles]
    for k in keys:
        points = [(m, c["heldout"][k]) for m, c in zip(minutes, cycles) if k in c["heldout"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"difficulty {k}")
    ax.set_xlabel("minutes (warm start included)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, ncol=2 if len(keys) > 7 else 1)
    ax.set_title("Arbor self-improvement: accuracy per difficulty")
    _save(fig, path)
