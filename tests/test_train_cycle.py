"""The workers' train cycle (agent/train_cycle.py) on a store of a user's problems: the loop's selection, replay
mix and gate (agent/gate.py), on the task and held-out problems the store holds."""

from __future__ import annotations

import pytest

from agent.config import LoopConfig
from agent.registry import PolicyRegistry
from agent.config import SelectConfig
from agent.settings import Settings
from agent.store import Store
from agent.train_cycle import run_train_cycle
from agent.config import TrainConfig
from search import SearchConfig
from tasks import Problem
from tests.support import add_trajectories, tiny_promoted_policy

WORDS = ["cat", "dog", "owl", "elk", "ant", "bee"]


def _cfg(**changes) -> LoopConfig:
    cfg = LoopConfig(examples_per_cycle=40, promote_margin=-1.0,  # the gate itself is tested with the loop
                     train=TrainConfig(learning_rate=1e-3, time_budget_s=30.0, max_steps=2),
                     eval_search=SearchConfig(strategy="greedy", max_new_tokens=4))
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    """A store of a JSONL-style task (no task name, exact answers) and a promoted policy; the addition generator
    must never run."""
    def no_addition(*args, **kwargs):
        raise AssertionError("the train cycle touched the addition generator")

    monkeypatch.setattr("tasks.addition.Addition.generate", no_addition)
    settings = Settings(home=tmp_path / "home", device="cpu")
    store = Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    registry = PolicyRegistry(tmp_path / "policies", store)
    tiny_promoted_policy(registry)
    store.add_problems([Problem(f"{w} backwards:", w[::-1], split="heldout", id=f"h-{w}") for w in WORDS[3:]])
    return settings, store, registry


def _result(store: Store, problem: Problem, completions: list[str], job: str, round: int = 0, prompt: str | None = None,
            best: bool = True) -> None:
    """What a worker records for one search (a refinement job: for one round, with the prompt it searched): the
    candidates, best first, with the checker's verdicts."""
    store.add_problems([problem])
    if round == 0:
        store.create_job("solve", problem_id=problem.id, job_id=job)
    verdict = (lambda c: c == problem.answer) if problem.answer is not None else (lambda c: None)
    add_trajectories(store, [dict(problem_id=problem.id, job_id=job, cycle=None, round=round, completion=c, token_count=len(c),
                                 mean_logprob=-1.0 - i, min_logprob=-2.0 - i, mean_entropy=0.5, score=-1.0 - i,
                                 verified=verdict(c), policy_version="v0", strategy="best_of_n", is_best=best and i == 0,
                                 prompt=prompt, search_stats={}) for i, c in enumerate(completions)])


def test_train_cycle_on_a_users_task_trains_gates_on_its_heldout_and_replays(setup, monkeypatch):
    import agent.gate
    from agent.trainer import SFTFineTuner

    settings, store, registry = setup
    evaluated, mixes = [], []
    evaluate = agent.gate.evaluate_policy
    monkeypatch.setattr("agent.gate.evaluate_policy",
                        lambda policy, by_key, *a, **k: evaluated.append(sorted(p.id for ps in by_key.values() for p in ps))
                        or evaluate(policy, by_key, *a, **k))
    train = SFTFineTuner.train
    monkeypatch.setattr(SFTFineTuner, "train", lambda self, model, tok, examples: mixes.append(examples) or train(self, model, tok, examples))

    # verifier mode (the problems carry answers): a verified candidate is the label, wherever it ranks
    for i, w in enumerate(WORDS[:2]):
        p = Problem(f"{w} backwards:", w[::-1], id=f"t-{w}")
        _result(store, p, ["zz", w[::-1], "qq"] if i == 0 else ["zz", "qq", "xx"], job=f"j-{w}")
    out = run_train_cycle(settings, store, registry, job_id="c1", worker="t", cfg=_cfg())
    assert out["candidate"] == "v1" and out["promoted"] and out["task"] is None, out
    # the second problem's candidates all failed: its own answer is the label (given_answer)
    assert out["examples"] == 2 and [f["kept"] for f in out["filters"]["verifier"]] == [1, 2]
    heldout_ids = sorted(f"h-{w}" for w in WORDS[3:])
    assert evaluated == [heldout_ids, heldout_ids]  # candidate, then current: the store's held-out problems
    assert out["metrics"]["gate_keys"] == ["all"] and set(out["metrics"]["heldout"]) == {"all"}
    assert {e["completion"] for e in mixes[0]} == {"tac", "god"} and len(mixes[0]) == 40  # no warm-start data: none stored
    assert store.count_untrained_best() == 0
    row = {r.version: r for r in store.policies()}["v1"]
    assert row.status == "promoted" and row.trained_on["source"] == "store" and row.trained_on["replayed_labels"] == 1

    # the next cycle's mix replays the earlier cycle's labels beside the new ones (the loop's shares)
    p = Problem("bee backwards:", "eeb", id="t-bee")
    _result(store, p, ["eeb", "x"], job="j-bee")
    out = run_train_cycle(settings, store, registry, job_id="c2", worker="t", cfg=_cfg())
    assert out["candidate"] == "v2" and out["parent"] == "v1"
    assert sorted({e["completion"] for e in mixes[1]}) == ["eeb", "tac"]
    assert sum(e["completion"] == "eeb" for e in mixes[1]) == int(40 * 0.35)
    assert run_train_cycle(settings, store, registry, job_id="c3", worker="t", cfg=_cfg()) == {
        "skipped": "no new best trajectories to train on"}


def test_a_refinement_round_that_succeeded_trains_on_its_prompt_with_the_attempts(setup, monkeypatch):
    from agent.trainer import SFTFineTuner

    settings, store, registry = setup
    mixes = []
    train = SFTFineTuner.train
    monkeypatch.setattr(SFTFineTuner, "train", lambda self, model, tok, examples: mixes.append(examples) or train(self, model, tok, examples))
    p = Problem("cat backwards:", "tac", id="t-cat")
    shown = "# attempt: cta\n# feedback: rejected by the exact checker\ncat backwards:"
    _result(store, p, ["cta", "act"], job="j-cat", best=False)  # round 0 failed
    _result(store, p, ["tac", "cat"], job="j-cat", round=1, prompt=shown)  # round 1, shown round 0's attempt, passed
    out = run_train_cycle(settings, store, registry, job_id="c1", worker="t", cfg=_cfg(replay_refine_fraction=0.25))
    assert out["examples"] == 1 and out["refinement_examples"] == 2
    pairs = {(e["prompt"], e["completion"]) for e in mixes[0]}
    # solved outright, solved from the feedback, and the wrong sibling "cat" shown as an attempt with its verdict
    sibling = "# attempt: cat\n# feedback: rejected by the exact checker\ncat backwards:"
    assert pairs == {("cat backwards:", "tac"), (shown, "tac"), (sibling, "tac")}
    assert sum(e["prompt"].startswith("# attempt:") for e in mixes[0]) == 10  # their share of the 40


def test_label_free_selection_applies_to_results_without_answers(setup):
    settings, store, registry = setup
    store.add_problems([Problem("say it:", split="heldout", id="h-say")])
    _result(store, Problem("say a:", id="t-a"), ["a", "b", "c", "d"], job="j-a")  # no agreement: vote share 0.25
    out = run_train_cycle(settings, store, registry, job_id="c1", worker="t", cfg=_cfg(select=SelectConfig(min_vote_share=0.75)))
    assert out["candidate"] is None and not out["promoted"] and out["reason"] == "no new result passed selection"
    assert [f["name"] for f in out["filters"]["label_free"]] == ["format", "vote_share"]
    assert out["filters"]["label_free"][-1]["kept"] == 0
    assert store.count_untrained_best() == 0  # judged once, not again every cycle
    assert [r.version for r in store.policies()] == ["v0"]


def test_no_heldout_problems_for_the_task_refuses_to_train(setup):
    settings, store, registry = setup
    _result(store, Problem("7 doubled:", "14", task=None, id="t-7"), ["14"], job="j-7")
    with store.session() as s:  # only the addition task has held-out problems now
        from sqlalchemy import update

        from agent.schema import ProblemRow

        s.execute(update(ProblemRow).where(ProblemRow.split == "heldout").values(task="addition"))
    out = run_train_cycle(settings, store, registry, job_id="c1", worker="t", cfg=_cfg())
    assert out["promoted"] is False and out["candidate"] is None
    assert "no held-out problems for task" in out["reason"] and "split 'heldout'" in out["reason"]
    assert [r.version for r in store.policies()] == ["v0"] and store.count_untrained_best() == 1  # kept for later


def test_results_on_heldout_problems_are_never_trained_on(setup, monkeypatch):
    """A user may submit held-out problems as jobs too; the gate would score memorised answers if a cycle trained
    on them."""
    from agent.trainer import SFTFineTuner

    settings, store, registry = setup
    mixes = []
    train = SFTFineTuner.train
    monkeypatch.setattr(SFTFineTuner, "train", lambda self, model, tok, examples: mixes.append(examples) or train(self, model, tok, examples))
    _result(store, Problem("elk backwards:", "kle", split="heldout", id="h-elk"), ["kle"], job="j-h-elk")
    assert store.count_untrained_best() == 0 and store.count_trainable() == 0
    _result(store, Problem("cat backwards:", "tac", id="t-cat"), ["tac"], job="j-cat")
    out = run_train_cycle(settings, store, registry, job_id="c1", worker="t", cfg=_cfg())
    assert out["examples"] == 1 and {e["completion"] for e in mixes[0]} == {"tac"}, out


def test_heldout_problems_that_nothing_can_check_refuse_to_train(setup):
    """Without answers and without label checks every policy scores 0 on them: a gate of 0 vs 0 is no gate."""
    settings, store, registry = setup
    with store.session() as s:
        from sqlalchemy import update

        from agent.schema import ProblemRow

        s.execute(update(ProblemRow).where(ProblemRow.split == "heldout").values(answer=None))
    _result(store, Problem("cat backwards:", id="t-cat"), ["tac"], job="j-cat")
    out = run_train_cycle(settings, store, registry, job_id="c1", worker="t", cfg=_cfg())
    assert out["promoted"] is False and out["candidate"] is None and "carry no answers" in out["reason"], out
    assert [r.version for r in store.policies()] == ["v0"]


def test_a_cycle_reads_one_bounded_page_of_results_oldest_first(tmp_path):
    """However many results wait, a cycle loads the oldest `limit` of them and only their rows: the consumed and
    the newer ones stay in the database (the rows loaded are counted)."""
    from sqlalchemy import event

    from agent.schema import TrajectoryRow
    from agent.train_cycle import _new_results

    store = Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    for i in range(30):
        _result(store, Problem(f"p{i}:", None, id=f"p{i}"), [f"a{i}", f"b{i}", f"c{i}"], job=f"j{i:02d}")
    store.mark_consumed([t.id for t in store.trajectories(job_id="j00") if t.is_best])  # judged by an earlier cycle
    loaded = []

    def count(row, _context):
        loaded.append(row.id)

    event.listen(TrajectoryRow, "load", count)
    try:
        results, ids, _ = _new_results(store, limit=10)
    finally:
        event.remove(TrajectoryRow, "load", count)
    assert [r.problem.id for r in results] == [f"p{i}" for i in range(1, 11)]
    assert [c.completion for c in results[0].candidates] == ["a1", "b1", "c1"] and all(len(g) == 3 for g in ids)
    assert len(loaded) == 10 * 3  # the page's best rows and the other rows of their jobs, nothing else
    statements = []

    def seen(conn, cursor, statement, *_):
        statements.append(statement)

    event.listen(store.engine, "before_cursor_execute", seen)
    assert store.count_untrained_best() == 29 and store.count_trainable() == 0  # no held-out problems: none trainable
    event.remove(store.engine, "before_cursor_execute", seen)
    assert len(statements) == 2 and all("count(" in s.lower() for s in statements)  # one COUNT each, no ids fetched


def test_a_cycle_finishing_after_a_rollback_does_not_promote_a_child_of_the_rolled_back_version(setup, monkeypatch):
    """The gate judged the candidate against the version it trained from; an operator rolled that version back while
    the cycle trained. Promotion is a compare-and-set on the parent, so the rollback stands and the candidate is
    recorded stale (before, the candidate was promoted over the operator's choice)."""
    from agent.promotion import rollback
    from agent.trainer import SFTFineTuner

    settings, store, registry = setup
    v0 = registry.promoted()[0]
    parent = registry.load(v0)
    v1 = registry.save(parent.model, parent.tokenizer, parent=v0, trained_on={}, metrics={"gate_score": 1.0})
    registry.promote(v1, {})
    _result(store, Problem("cat backwards:", "tac", id="t-cat"), ["tac", "cat"], job="j-cat")
    train = SFTFineTuner.train

    def operator_rolls_back_meanwhile(self, model, tok, examples):
        assert rollback(store) == {"promoted": v0, "previous": v1}
        return train(self, model, tok, examples)

    monkeypatch.setattr(SFTFineTuner, "train", operator_rolls_back_meanwhile)
    out = run_train_cycle(settings, store, registry, job_id="c1", worker="t", cfg=_cfg())  # margin -1: the gate passes
    statuses = {r.version: r.status for r in store.policies()}
    assert out["parent"] == v1 and out["promoted"] is False and "no longer the promoted version" in out["stale"]
    assert statuses == {v0: "promoted", v1: "rejected", out["candidate"]: "stale"}
    assert registry.promoted()[0] == v0


def test_a_promoting_train_cycle_keeps_a_value_model_beside_its_version(setup, monkeypatch):
    from agent.config import ValueConfig
    from agent.registry import value_folder

    settings, store, registry = setup
    monkeypatch.setenv("ARBOR_VALUE_MODEL", "on")
    from agent.train_cycle import loop_config_from_env

    assert loop_config_from_env(Settings(home=settings.home, device="cpu")).value_model is True
    for w in WORDS[:3]:  # verifier mode: the checker's verdicts on every candidate are the value model's labels
        _result(store, Problem(f"{w} backwards:", w[::-1], id=f"t-{w}"), [w[::-1], "zz", "qq"], job=f"j-{w}")
    cfg = _cfg(value_model=True, value=ValueConfig(time_budget_s=5.0, epochs=1))
    out = run_train_cycle(settings, store, registry, job_id="c1", worker="t", cfg=cfg)
    assert out["promoted"] and out["value"]["completions"] == 9 and out["value"]["right"] == 3, out
    assert out["value"]["calibrated_on"] == len(WORDS[3:])  # the store's held-out problems with answers
    assert value_folder(registry, out["candidate"]).is_dir()
    assert registry.load(out["candidate"]).value_model is not None
