import torch

from agent.config import BuiltinConfig

from agent.policy import build_builtin_policy
from agent.config import TrainConfig
from agent.trainer import SFTFineTuner, clone_for_training

EXAMPLES = [{"prompt": "12+34=", "completion": "460"}, {"prompt": "5+5=", "completion": "01"}] * 32


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fine_tune_changes_weights_and_a_clone_trains_independently():
    model, tok = build_builtin_policy(BuiltinConfig(hidden_size=64, intermediate_size=128, num_layers=2))
    start = _snapshot(model)
    stats = SFTFineTuner(TrainConfig(max_steps=3, time_budget_s=60)).train(model, tok, EXAMPLES)
    assert stats["steps"] == 3 and stats["examples"] == len(EXAMPLES)
    trained = _snapshot(model)
    assert any(not torch.equal(start[k], trained[k]) for k in start)

    # regression: TRL patches forward with a closure over the original model; a candidate cloned from a
    # trained model must train its own weights, not the original's
    candidate = clone_for_training(model)
    SFTFineTuner(TrainConfig(max_steps=3, time_budget_s=60)).train(candidate, tok, EXAMPLES)
    assert any(not torch.equal(trained[k], v) for k, v in candidate.state_dict().items())
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
