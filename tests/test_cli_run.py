"""`arbor run` end to end as a real process: a user's task from --demos/--problems, and the built-in task."""

import json
import os
import subprocess
import sys
from pathlib import Path

ARBOR = [sys.executable, "-m", "arbor"]


def _arbor(args, home: Path, timeout=420):
    env = {**os.environ, "ARBOR_HOME": str(home), "ARBOR_DEVICE": "cpu"}
    env.pop("ARBOR_DATABASE_URL", None)
    env.pop("ARBOR_BROKER_URL", None)
    return subprocess.run(ARBOR + args, env=env, capture_output=True, text=True, timeout=timeout)


def _write_jsonl(path: Path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_user_task_from_demos_and_problems(tmp_path):
    words = ["abc", "kite", "moon", "tree", "lamp", "frog", "star", "rain", "wolf", "sand", "bird", "leaf"]
    demos, problems = tmp_path / "demos.jsonl", tmp_path / "problems.jsonl"
    _write_jsonl(demos, [{"prompt": f"reverse {w}:", "completion": w[::-1]} for w in words])
    rows = [{"prompt": f"reverse {w}:", "answer": w[::-1], "split": "train", "id": f"t{i}"} for i, w in enumerate(words)]
    rows += [{"prompt": f"reverse {w}:", "answer": w[::-1], "split": "heldout", "id": f"h{i}"} for i, w in enumerate(words[:4])]
    rows.append("{broken json")
    _write_jsonl(problems, rows)
    proc = _arbor(["run", "--demos", str(demos), "--problems", str(problems), "--cycles", "1", "--select", "verifier",
                   # a 2 s warm start leaves a few wrong samples among 8 (6-7 refinement examples in 3 runs; with 4 s
                   # and 4 samples the policy made 1 mistake a run, and now and then none)
                   "--samples", "8", "--train-seconds", "3", "--warm-start-seconds", "2", "--json"], tmp_path / "home")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "problems.jsonl:17: not valid JSON" in proc.stderr and "not valid JSON" in proc.stderr  # named, and the run went on
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [c["cycle"] for c in report["cycles"]] == [0, 1]
    # a file task's policy reads a refinement history: the cycle's wrong siblings of verified answers trained too
    assert report["cycles"][1]["refinement_examples"] > 0
    # no difficulty given: grouped by prompt length (5 groups of about equal size; 14 of 16 prompts have 13 characters)
    assert set(report["cycles"][0]["heldout"]) == {"13"}
    assert Path(report["final_policy"]).is_dir()
    run_dir = Path(report["run_dir"])
    assert (run_dir / "report.md").is_file() and (run_dir / "learning_curve.png").stat().st_size > 1000
    # where each cycle's time went: a row per cycle whose phases add up to no more than the cycle's wall clock
    times = json.loads((run_dir / "report.json").read_text())["time_per_cycle"]
    assert [t["cycle"] for t in times] == [0, 1] and times[0]["warm_start"] > 0 and times[1]["train"] > 0
    assert all(sum(v for k, v in t.items() if k not in ("cycle", "total")) <= t["total"] + 0.6 for t in times)
    assert "Where each cycle's time went" in (run_dir / "report.md").read_text()
    assert (run_dir / "time_per_cycle.png").stat().st_size > 1000


def test_builtin_run_json_and_policies(tmp_path):
    home = tmp_path / "home"
    proc = _arbor(["run", "--cycles", "1", "--warm-start-seconds", "10", "--train-seconds", "3", "--problems-per-cycle", "48",
                   "--heldout", "8", "--samples", "4", "--select", "verifier", "--json"], home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    first = report["cycles"][0]
    assert first["policy_version"] == "v0" and not first["promoted"] and "20" in first["heldout"]
    assert report["cycles"][1]["accepted"] > 0 and report["cycles"][1]["candidate"] == "v1"
    listed = _arbor(["policies", "--json"], home)
    assert listed.returncode == 0, listed.stderr
    versions = json.loads(listed.stdout)
    assert [v["version"] for v in versions][:2] == ["v0", "v1"]
    assert {"version", "path", "status", "metrics"} <= set(versions[0])


def test_model_path_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _arbor(["run", "--model", str(tmp_path / "empty"), "--cycles", "1"], tmp_path / "home")
    assert proc.returncode == 2
    assert "not a model folder" in proc.stderr and "Traceback" not in proc.stderr


def test_run_name_must_be_plain_and_resume_keeps_the_run_settings(tmp_path):
    home = tmp_path / "home"
    proc = _arbor(["run", "--run-name", "../x", "--cycles", "0", "--heldout", "1", "--warm-start-seconds", "1"], home)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: --run-name '../x' is not a plain name: use letters, digits" in proc.stderr  # one line
    assert not (home / "x").exists() and not (tmp_path / "x").exists()
    proc = _arbor(["run", "--resume", "nope"], home)
    assert proc.returncode == 2 and "error: no run 'nope' in the store" in proc.stderr
    proc = _arbor(["run", "--resume", "nope", "--samples", "8", "--problems", "p.jsonl", "--cycles", "3"], home)
    assert proc.returncode == 2
    assert "error: --resume continues run 'nope' with the inputs and settings it was started with: drop --samples, --problems" in proc.stderr


def test_answers_on_the_train_problems_select_with_them_unless_told_otherwise(tmp_path):
    from agent.run_store import RunStore
    from agent.store import Store

    words = ["cat", "dog", "owl", "elk", "ant", "bee"]
    problems = tmp_path / "p.jsonl"
    _write_jsonl(problems, [{"prompt": f"{w}<", "answer": w[::-1], "split": "heldout" if i > 3 else "train"}
                            for i, w in enumerate(words)])
    for flags, mode in (([], "verifier"), (["--select", "label_free"], "label_free")):
        home = tmp_path / mode
        proc = _arbor(["run", "--problems", str(problems), "--cycles", "0", "--warm-start-seconds", "1", "--heldout", "2",
                       "--run-name", "r", *flags], home)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert RunStore(Store(f"sqlite:///{home / 'arbor.db'}")).get("r").config["select"]["mode"] == mode
        assert ("all 4 train problems carry answers: selecting with them" in proc.stderr) == (not flags), proc.stderr
