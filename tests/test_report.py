"""A run's report files are whole or absent: a write that fails part-way (a full disk, a kill) leaves the previous
complete files, and a damaged report.json is one clear error when read."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# writes a report of N cycles into DIR with every file capped at LIMIT bytes (RLIMIT_FSIZE: a disk that fills up
# mid-write, for real: the write system call fails with EFBIG after the bytes that fit)
WRITER = """
import resource, signal, sys
from pathlib import Path
from tests.test_report import records
from agent.report import write_report

run_dir, n, limit = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing the process
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
try:
    write_report(run_dir, records(n), final_policy=f"v{n}", config={"n": n})
except OSError as exc:
    sys.exit(f"write failed: {exc}")
"""


@dataclass
class Cycle:
    """The fields of agent.loop.CycleRecord that the report reads (that module imports torch: slow in a subprocess)."""

    cycle: int
    policy_version: str
    candidate: str | None
    promoted: bool
    frontier: str | None
    heldout: dict
    accepted: int
    filters: list
    train: dict
    seconds: dict
    elapsed_s: float


def records(n: int) -> list[Cycle]:
    # cycle 0 is the warm start and its evaluation; every later cycle spends 60 s, 50 of them in named phases
    spent = {"search": 10.0, "select": 5.0, "train": 25.0, "eval": 8.0, "save": 2.0}
    return [Cycle(cycle=c, policy_version=f"v{c}", candidate=f"v{c + 1}", promoted=True, frontier=str(c + 2),
                  heldout={str(d): min(1.0, 0.1 * (c + d)) for d in range(1, 7)}, accepted=10 * c,
                  filters=[{"name": "format", "kept_fraction": 0.9, "precision": None}],
                  train={"train_loss": 1.0 / (c + 1)}, seconds={"warm_start": 55.0, "eval": 5.0} if c == 0 else spent,
                  elapsed_s=60.0 * (c + 1))
            for c in range(n)]


def _write(run_dir: Path, n: int, limit: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRITER, str(run_dir), str(n), str(limit)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


@pytest.mark.parametrize("which", ["report.json", "learning_curve.png"])
def test_a_write_that_fails_part_way_leaves_the_previous_report(tmp_path, which):
    run_dir = tmp_path / "run"
    first = _write(run_dir, 2)
    assert first.returncode == 0, first.stderr
    before = _files(run_dir)
    assert set(before) == {"report.json", "report.md", "learning_curve.png", "time_per_cycle.png"}
    sizes = {name: len(data) for name, data in before.items()}
    # a cap that the failing file outgrows part-way: report.json grows with the cycles, the plot is the largest file
    n, limit = (400, sizes["learning_curve.png"]) if which == "report.json" else (3, sizes["report.json"] * 3)
    second = _write(run_dir, n, limit)
    assert second.returncode != 0 and "write failed" in second.stderr, second.stderr
    after = _files(run_dir)
    assert set(after) == set(before), "a temporary file was left behind"
    assert after[which] == before[which]  # the previous complete file, not a truncated new one
    from agent.report import read_report

    report = read_report(run_dir / "report.json")
    assert report["final_policy"] in ("v2", f"v{n}") and len(report["cycles"]) in (2, n)
    assert after["learning_curve.png"].endswith(b"IEND\xaeB`\x82")  # a PNG's last chunk: the file is whole


def test_a_report_written_whole_replaces_the_previous_one(tmp_path):
    from agent.report import read_report

    run_dir = tmp_path / "run"
    assert _write(run_dir, 2).returncode == 0 and _write(run_dir, 3).returncode == 0
    assert len(read_report(run_dir / "report.json")["cycles"]) == 3
    assert "| 2 |" in (run_dir / "report.md").read_text()
    assert sorted(p.name for p in run_dir.iterdir()) == ["learning_curve.png", "report.json", "report.md",
                                                         "time_per_cycle.png"]


def test_the_report_shows_where_each_cycles_time_went(tmp_path):
    from agent.report import read_report

    run_dir = tmp_path / "run"
    assert _write(run_dir, 3).returncode == 0
    times = read_report(run_dir / "report.json")["time_per_cycle"]
    assert times[0] == {"cycle": 0, "warm_start": 55.0, "search": 0.0, "select": 0.0, "train": 0.0, "eval": 5.0,
                        "save": 0.0, "other": 0.0, "total": 60.0}
    assert times[2] == {"cycle": 2, "warm_start": 0.0, "search": 10.0, "select": 5.0, "train": 25.0, "eval": 8.0,
                        "save": 2.0, "other": 10.0, "total": 60.0}
    md = (run_dir / "report.md").read_text()
    assert ("| cycle | warm start | search | selection and checks | training | evaluation and gate | saving | other "
            "| total |") in md
    assert "| 2 | 0.0 | 10.0 | 5.0 | 25.0 | 8.0 | 2.0 | 10.0 | 60.0 |" in md
    assert (run_dir / "time_per_cycle.png").read_bytes().startswith(b"\x89PNG")


def test_write_atomic_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from agent.files import write_atomic

    path = tmp_path / "f.txt"
    write_atomic(path, "old, complete\n")
    assert path.read_text() == "old, complete\n"

    def half_then_fail(f):
        f.write(b"new, half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old, complete\n" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    write_atomic(path, b"\x89bytes")
    assert path.read_bytes() == b"\x89bytes"


@pytest.mark.parametrize("content", [b"", b'{"cycles": [{"cycle": 1', b"\xff\xfe", b"[1, 2]", b"NaN"])
def test_a_damaged_report_is_one_clear_error(tmp_path, content):
    from agent.report import ReportUnreadable, read_report

    path = tmp_path / "report.json"
    path.write_bytes(content)
    with pytest.raises(ReportUnreadable) as err:
        read_report(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message and "arbor run --resume" in message
    with pytest.raises(ReportUnreadable, match="cannot be read"):
        read_report(tmp_path / "missing" / "report.json")


def test_a_rejected_candidates_fallen_lengths_are_shown_easiest_first_and_the_largest_drops_when_cut():
    from agent.report import fell_text

    gate = {"fell": {"12": {"before": 1.0, "after": 0.5}, "4": {"before": 0.99, "after": 0.97},
                     "8": {"before": 0.9, "after": 0.6}}}
    assert fell_text(gate) == "4 0.99->0.97, 8 0.90->0.60, 12 1.00->0.50"
    assert fell_text(gate, most=2) == "8 0.90->0.60, 12 1.00->0.50"
    assert fell_text({}) == "" and fell_text({"fell": {}}) == ""


def test_the_value_models_time_is_a_column_only_in_runs_that_train_one():
    from agent.report import _time_table, time_per_cycle

    plain = [{"cycle": 1, "elapsed_s": 30.0, "seconds": {"search": 10.0, "train": 20.0}}]
    assert "value" not in time_per_cycle(plain)[0] and "value model" not in _time_table(time_per_cycle(plain))
    judged = plain + [{"cycle": 2, "elapsed_s": 75.0, "seconds": {"search": 10.0, "train": 20.0, "value": 12.0}}]
    times = time_per_cycle(judged)
    assert [t["value"] for t in times] == [0.0, 12.0] and times[1]["other"] == 3.0
    assert "| value model |" in _time_table(times)


def test_why_the_loop_ended_a_run_is_in_both_reports(tmp_path):
    from agent.report import read_report, write_report

    reason = "stopped: the gate rejected 3 candidates in a row trained from v2 (cycle 1: 5 1.00->0.40); ..."
    write_report(tmp_path / "stopped", records(2), final_policy="v2", config={}, extra={"stopped": reason})
    assert read_report(tmp_path / "stopped" / "report.json")["stopped"] == reason
    assert f"\n{reason}\n" in (tmp_path / "stopped" / "report.md").read_text()
    write_report(tmp_path / "ran", records(2), final_policy="v2", config={})
    assert "stopped" not in read_report(tmp_path / "ran" / "report.json")
    assert "stopped:" not in (tmp_path / "ran" / "report.md").read_text()
