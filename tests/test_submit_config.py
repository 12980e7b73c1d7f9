"""`arbor submit` takes the whole validated search configuration (a JSON file and/or flags; flags win), stores it
in the job's params, and the worker searches with all of it: a real redis-server, PostgreSQL and a real
`arbor worker` subprocess; then the in-process path (no broker) and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.support import arbor, deployment_stack, worker

UNFINISHED = 1e6  # search.scorers.rank_by puts a completion that never reached EOS this far below finished ones


def _seed(home: Path, db_url: str) -> str:
    """The untrained built-in policy, EOS made likelier so that some candidates finish, promoted."""
    from agent.config import BuiltinConfig
    from agent.policy import build_builtin_policy
    from agent.registry import PolicyRegistry
    from agent.store import Store

    store = Store(db_url)
    model, tok = build_builtin_policy(BuiltinConfig(seed=5))
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.eos_token_id] *= 4.0
    registry = PolicyRegistry(home / "policies", store)
    version = registry.save(model, tok, parent=None, trained_on={})
    registry.promote(version, {})
    store.engine.dispose()
    return version


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("submit")
    with deployment_stack(root, _seed, appendonly=False, ARBOR_TRAIN_THRESHOLD=0) as state:
        yield state


def _files(tmp_path: Path, search: dict) -> tuple[Path, Path]:
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"prompt": p, "answer": a, "id": f"s{i}-{tmp_path.name}"}) + "\n"
                                for i, (p, a) in enumerate([("12+34=", "640"), ("5+7=", "21")])))
    cfg = tmp_path / "search.json"
    cfg.write_text(json.dumps(search))
    return problems, cfg


def _check_ran_mcts_with_min_logprob(store, job_ids: list[str]) -> None:
    from sqlalchemy import select

    from agent.schema import TrajectoryRow

    for job_id in job_ids:
        job = store.get_job(job_id)
        assert job.status == "done", job.error
        search = job.params["search"]
        assert search["strategy"] == "mcts" and search["simulations"] == 3 and search["scorer"] == "min_logprob"
        assert search["children"] == 2 and search["max_new_tokens"] == 5  # from the file
        assert {f for f in search} >= {"c_puct", "step_delimiter", "max_step_tokens", "seed", "confidence"}  # all of it
    with store.session() as s:
        rows = list(s.scalars(select(TrajectoryRow).where(TrajectoryRow.job_id.in_(job_ids))))
    assert rows and {r.strategy for r in rows} == {"mcts"}
    for r in rows:  # every candidate was ranked by its least likely token (minus the penalty when unfinished)
        assert min(abs(r.score - r.min_logprob), abs(r.score - (r.min_logprob - UNFINISHED))) < 1e-3, (r.score, r.min_logprob)
    assert any(abs(r.mean_logprob - r.min_logprob) > 1e-3 for r in rows)  # so mean_logprob would have ranked differently
    for job_id in job_ids:
        (best,) = [r for r in rows if r.job_id == job_id and r.is_best]
        expected = best.min_logprob if best.score > -UNFINISHED / 2 else best.min_logprob - UNFINISHED
        assert best.score == pytest.approx(expected, abs=1e-3)


def test_the_worker_searches_with_the_submitted_configuration(deployment, tmp_path):
    w = worker("cfg", "search,default", deployment["env"], deployment["root"])
    deployment["workers"].append(w)
    # the file asks for 5 simulations; the flag overrides it with 3, and sets a non-default scorer
    problems, cfg = _files(tmp_path, {"strategy": "mcts", "simulations": 5, "children": 2, "max_new_tokens": 5})
    w.wait_ready()
    out = arbor("submit", str(problems), "--search-config", str(cfg), "--simulations", "3", "--scorer", "min_logprob",
                "--wait", "--timeout", "90", env=deployment["env"], timeout=150)
    assert out.returncode == 0, out.stderr[-3000:]
    job_ids = out.stdout.split()
    assert len(job_ids) == 2
    _check_ran_mcts_with_min_logprob(deployment["store"], job_ids)


def test_in_process_submit_uses_the_configuration_too(deployment, tmp_path):
    from arbor.cli import app

    problems, cfg = _files(tmp_path, {"strategy": "mcts", "children": 2, "max_new_tokens": 5, "scorer": "min_logprob"})
    env = {**deployment["env"], "ARBOR_BROKER_URL": ""}
    res = CliRunner().invoke(app, ["submit", str(problems), "--search-config", str(cfg), "--simulations", "3"], env=env)
    assert res.exit_code == 0, res.output
    job_ids = [line for line in res.stdout.split() if len(line) == 32]
    assert len(job_ids) == 2
    _check_ran_mcts_with_min_logprob(deployment["store"], job_ids)


@pytest.mark.parametrize("search,flags,message", [
    ({"strategy": "mcts", "simulatons": 3}, [], "unknown search field 'simulatons': valid fields are strategy, n,"),
    ({"strategy": "mcts"}, ["--simulations", "0"], "bad search configuration: beams, children, simulations, "
                                                   "max_step_tokens and max_rows must be at least 1"),
    ({"strategy": "tree"}, [], "bad search configuration: unknown strategy 'tree': choose one of greedy,"),
    ({"scorer": "max_logprob"}, [], "bad search configuration: unknown scorer 'max_logprob'"),
    ({"scorer": 3}, [], "search field 'scorer' must be str or null (got 3)"),
    ({"simulations": "3"}, [], "search field 'simulations' must be int (got \"3\")"),
    ([1, 2], [], "must hold a JSON object of SearchConfig fields"),
    (None, [], "does not exist: pass a JSON file"),
])
def test_a_bad_configuration_is_one_clear_line_and_nothing_is_submitted(deployment, tmp_path, search, flags, message):
    from arbor.cli import app

    problems, cfg = _files(tmp_path, search)
    if search is None:
        cfg = tmp_path / "missing.json"
    before = len(deployment["store"].list_jobs())
    res = CliRunner().invoke(app, ["submit", str(problems), "--search-config", str(cfg), *flags],
                             env={**deployment["env"], "ARBOR_BROKER_URL": ""})
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and message in res.output, res.output
    assert len(deployment["store"].list_jobs()) == before
