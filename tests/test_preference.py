"""Preference pairs from searched candidates, and the DPO fine-tune that trains on them."""

import time
from dataclasses import asdict, fields

import pytest
import torch

from agent.config import BuiltinConfig

from agent.policy import build_builtin_policy
from agent.preference import preference_pairs
from agent.config import SelectConfig
from agent.select import Selection, select
from agent.config import PreferenceConfig, TrainConfig
from agent.trainer import DPOFineTuner
from search import Candidate, SearchConfig, SearchResult
from tasks import get_task
from tasks.addition import make_problem

ADDITION = get_task("addition")


def cand(text, mean_logprob, verified=None):
    return Candidate(text, token_ids=[0] * len(text), mean_logprob=mean_logprob, min_logprob=mean_logprob,
                     mean_entropy=0.0, finished=True, verified=verified)


def result(problem, candidates):
    return SearchResult(problem, sorted(candidates, key=lambda c: -c.mean_logprob), "best_of_n", "v0")


def label_free(results):
    return select(results, ADDITION, SelectConfig(min_vote_share=0.5, use_task_filters=False), solve=lambda ps: [])


def test_label_free_pairs_reject_the_most_confident_disagreeing_sibling_without_ground_truth():
    p = make_problem("3", "9", id="p")  # 3 + 9 = 12, written "21"
    # the majority is wrong by the checker: label-free pairs must follow the vote, never the verdicts
    wrong_majority = result(p, [cand("31", -0.1, False), cand("31", -0.2, False), cand("31", -0.3, False),
                                cand("21", -0.6, True), cand("7", -0.4, False)])  # "7": malformed, yet more confident
    agreeing = result(make_problem("1", "1", id="q"), [cand("20", -0.1), cand("20", -0.2), cand("20", -0.3)])
    split_vote = result(make_problem("2", "2", id="r"), [cand("40", -0.1), cand("50", -0.2), cand("60", -0.3), cand("70", -0.4)])
    results = [wrong_majority, agreeing, split_vote]
    selection = label_free(results)
    assert {e["problem_id"] for e in selection.examples} == {"p", "q"}  # the split vote is not accepted
    pairs = preference_pairs(results, selection, ADDITION)
    assert pairs == [{"prompt": "3+9=", "chosen": "31", "rejected": "7", "problem_id": "p"}]  # no pair where all agree


def test_max_pairs_keeps_the_most_confident_mistakes_in_search_order():
    results = [result(make_problem(str(i), "0", id=f"p{i}"), [cand(f"{i}0", -0.1), cand(f"{i}0", -0.2), cand("99", -1.0 + i / 10)])
               for i in range(1, 5)]
    selection = label_free(results)
    assert [p["problem_id"] for p in preference_pairs(results, selection, ADDITION)] == ["p1", "p2", "p3", "p4"]
    kept = preference_pairs(results, selection, ADDITION, max_pairs=2)
    assert [p["problem_id"] for p in kept] == ["p3", "p4"] and all(p["rejected"] == "99" for p in kept)


def test_verifier_pairs_are_verified_correct_against_verified_wrong():
    p = make_problem("3", "9", id="p")
    results = [
        result(p, [cand("31", -0.1, False), cand("21", -0.5, True), cand("21", -0.3, True), cand("41", -0.9, False)]),
        result(make_problem("1", "1", id="q"), [cand("20", -0.1, True), cand("20", -0.2, True)]),  # nothing wrong: no pair
        # none verified: the problem's own answer is the label, the wrong candidates still give a pair
        result(make_problem("2", "2", id="r"), [cand("50", -0.2, False), cand("x", -0.1, False)]),
    ]
    selection = select(results, ADDITION, SelectConfig(mode="verifier"), solve=lambda ps: [])
    assert selection.mode == "verifier"
    pairs = preference_pairs(results, selection, ADDITION)
    assert [(q["problem_id"], q["chosen"], q["rejected"]) for q in pairs] == [("p", "21", "31"), ("r", "40", "x")]
    # a problem that was not accepted gives no pair, whatever its candidates
    assert preference_pairs(results, Selection([], mode="verifier"), ADDITION) == []


def _sequence_logprob(model, tok, prompt: str, completion: str) -> float:
    """Log-prob of completion + EOS after the prompt, as DPO scores it."""
    n = len(tok(prompt)["input_ids"])
    ids = torch.tensor([tok(prompt + completion + tok.eos_token)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float()
    return torch.log_softmax(logits, -1)[n - 1:].gather(-1, ids[0, n:, None]).sum().item()


def test_dpo_raises_the_margin_of_chosen_over_rejected(one_torch_thread):
    model, tok = build_builtin_policy(BuiltinConfig(hidden_size=64, intermediate_size=128, num_layers=2))
    model.eval()
    pairs = [{"prompt": "21+43=", "chosen": "640", "rejected": "740"}, {"prompt": "5+5=", "chosen": "01", "rejected": "11"},
             {"prompt": "12+31=", "chosen": "430", "rejected": "330"}, {"prompt": "7+8=", "chosen": "51", "rejected": "5"}]

    def margins():
        return [_sequence_logprob(model, tok, p["prompt"], p["chosen"]) - _sequence_logprob(model, tok, p["prompt"], p["rejected"])
                for p in pairs]

    before = margins()
    stats = DPOFineTuner(PreferenceConfig(learning_rate=1e-3, batch_size=4, max_steps=10, time_budget_s=60)).train(model, tok, pairs)
    after = margins()
    assert stats["steps"] == 10 and stats["pairs"] == 4
    assert all(a > b + 0.5 for a, b in zip(after, before)), (before, after)
    assert "forward" not in model.__dict__  # TRL's patch is gone: a clone of this model trains its own weights


def test_preference_config_and_train_method_are_validated():
    from agent.config import LoopConfig

    with pytest.raises(ValueError, match="train_method"):
        LoopConfig(train_method="ppo")
    with pytest.raises(ValueError, match="beta"):
        PreferenceConfig(beta=0.0)
    assert all(f.metadata.get("help") for f in fields(PreferenceConfig))


@pytest.mark.parametrize("method", ["sft+dpo", "sft", "dpo"])
def test_a_loop_cycle_trains_per_train_method_and_records_it(tmp_path, one_torch_thread, method):
    from agent.curriculum import BuiltinSource
    from agent.config import LoopConfig, WarmStartConfig
    from agent.loop import SelfImprovementLoop
    from agent.warm_start import ensure_policy, warm_start_examples
    from agent.registry import PolicyRegistry
    from agent.settings import Settings
    from agent.run_store import RunStore
    from agent.store import Store

    cfg = LoopConfig(
        cycles=1, problems_per_cycle=24, heldout_per_difficulty=8, report_difficulties=(2,), eval_ahead=1, max_difficulty=3,
        examples_per_cycle=64, frontier_spread=(1.0,),
        builtin=BuiltinConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2),
        search=SearchConfig(strategy="best_of_n", n=4, temperature=1.0),
        # verifier mode: a barely trained policy's wrong samples still pair with the problems' own answers
        select=SelectConfig(mode="verifier"),
        train=TrainConfig(time_budget_s=60.0, max_steps=2, batch_size=16),
        train_method=method, preference=PreferenceConfig(time_budget_s=60.0, max_steps=2, batch_size=8, max_pairs=16),
        warm_start=WarmStartConfig(difficulties=(1,), examples_per_difficulty=50, mastery=None,
                                   train=TrainConfig(time_budget_s=60.0, max_steps=2)),
    )
    settings = Settings(home=tmp_path / "home", device="cpu")
    store = Store(settings.db_url)
    registry = PolicyRegistry(settings.policies_dir, store)
    v0 = ensure_policy(settings, registry, cfg)
    runs = RunStore(store)
    runs.create("dpo", asdict(cfg), {})
    runs.set_base("dpo", v0, promote=False)
    task = get_task("addition")
    source = BuiltinSource(task, cfg.heldout_per_difficulty, cfg.max_difficulty, cfg.seed)
    records = SelfImprovementLoop(cfg, store, registry, source, warm_start_examples(task, cfg.warm_start, cfg.seed)).run(
        "dpo", time.monotonic())
    train = records[1].train
    assert ("steps" in train) == (method != "dpo")  # SFT ran ...
    if method == "sft":
        assert "dpo" not in train
        return
    assert train["dpo"]["pairs"] > 0 and train["dpo"]["steps"] == 2  # ... and DPO on this cycle's pairs
    assert records[1].seconds["train"] >= train.get("seconds", 0) + train["dpo"]["seconds"]  # DPO counts as training time
