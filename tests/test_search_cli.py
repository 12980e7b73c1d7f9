"""`arbor search` end to end on a saved tiny model."""

import json

import pytest
import torch
from typer.testing import CliRunner

from arbor.cli import app
from agent.config import BuiltinConfig
from agent.policy import build_builtin_policy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model, tok = build_builtin_policy(BuiltinConfig(seed=5))
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.eos_token_id] *= 4.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("strategy", ["greedy", "best_of_n", "beam", "step_beam", "diverse_beam", "mcts"])
def test_search_prompt_json(model_dir, tmp_path, strategy):
    html = tmp_path / "tree.html"
    args = ["search", "--model", str(model_dir), "--strategy", strategy, "--prompt", "12+34=", "--max-new-tokens", "5",
            "--beams", "2", "--n", "4", "--simulations", "2", "--children", "2", "--tree", str(html), "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    row = json.loads(res.output.strip().splitlines()[-1])
    assert set(row) >= {"completion", "token_ids", "score", "generated_tokens", "forward_passes"}
    assert row["generated_tokens"] >= len(row["token_ids"]) and row["forward_passes"] >= 1
    assert 'class="best"' in html.read_text()


def test_search_problems_file(model_dir, tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"prompt": "1+2=", "answer": "30"}\n{"prompt": "12+34=", "answer": "640"}\nnot json\n')
    res = CliRunner().invoke(app, ["search", "--model", str(model_dir), "--strategy", "beam", "--problems", str(problems),
                                   "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output.strip().splitlines()[-1])
    assert [r["prompt"] for r in rows] == ["1+2=", "12+34="] and all(r["verified"] is False for r in rows)
    bad = CliRunner().invoke(app, ["search", "--model", str(model_dir), "--strategy", "nope", "--prompt", "1+1="])
    assert bad.exit_code != 0 and "unknown strategy" in bad.output


def test_adaptive_search_takes_its_repairs_from_the_command_line(model_dir):
    # an accept score no answer reaches (mean log-prob <= 0 < 1): every stage runs, the repairs first
    args = ["search", "--model", str(model_dir), "--strategy", "adaptive", "--scorer", "mean_logprob",
            "--accept-score", "1", "--repairs", "2", "--n", "2", "--simulations", "1", "--children", "2",
            "--prompt", "12+34=", "--max-new-tokens", "5", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    row = json.loads(res.output.strip().splitlines()[-1])
    assert [s["stage"] for s in row["stages"]] == ["greedy", "repair_1", "repair_2", "best_of_2", "mcts"]
    assert row["generated_tokens"] == sum(s["tokens"] for s in row["stages"])
