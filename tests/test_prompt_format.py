"""Prompt formats: `chat` wraps a prompt in the tokenizer's chat template the same way in search, training and
evaluation; a version keeps its format through the registry (full and LoRA alike) and `arbor run --model` stores the
run's choice with every version it saves; a job may name its own; what cannot work is refused in one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from agent.config import BuiltinConfig, LoopConfig, PreferenceConfig, TrainConfig
from agent.evaluation import evaluate_policy, greedy_config
from agent.gate import train_candidate
from agent.policy import Policy, build_builtin_policy
from agent.registry import PolicyRegistry
from agent.settings import Settings
from agent.store import Store
from agent.trainer import SFTFineTuner
from agent.versions import on_disk
from search import SearchConfig, run_search
from search.decoder import Decoder
from search.prompt_format import PromptFormat
from tasks import Problem

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = BuiltinConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, position_scheme="sequential",
                     seed=3)
# a template of the built-in tokenizer's own characters: [system]<user>| with "|" the generation prompt
TEMPLATE = ("{% for m in messages %}{% if m.role == 'system' %}[{{ m.content }}]{% else %}<{{ m.content }}>{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}|{% endif %}")
CHAT = PromptFormat("chat", "sum")
PROBLEMS = [Problem(prompt=f"{a}+{b}=", answer=str(a + b), id=f"p{a}{b}") for a, b in [(1, 2), (3, 4), (12, 7)]]


def _chat_policy(fmt: PromptFormat = CHAT) -> Policy:
    model, tok = build_builtin_policy(TINY)
    tok.chat_template = TEMPLATE
    return Policy(model, tok, "v", prompt_format=fmt)


@pytest.fixture()
def encoded(monkeypatch):
    """Every prompt text a Decoder tokenizes, in order."""
    seen: list[str] = []
    real = Decoder.encode

    def spy(self, prompts):
        seen.extend(prompts)
        return real(self, prompts)

    monkeypatch.setattr(Decoder, "encode", spy)
    return seen


def test_chat_puts_the_prompt_in_the_template_with_the_system_message():
    policy = _chat_policy()
    assert CHAT.apply(policy.tokenizer, "1+2=") == "[sum]<1+2=>|"
    assert PromptFormat("chat").apply(policy.tokenizer, "1+2=") == "<1+2=>|"
    assert PromptFormat().apply(policy.tokenizer, "1+2=") == "1+2="


def test_search_evaluation_and_training_read_the_same_formatted_prompt(encoded, monkeypatch):
    policy = _chat_policy()
    shown = [CHAT.apply(policy.tokenizer, p.prompt) for p in PROBLEMS]

    results = run_search(PROBLEMS, SearchConfig(strategy="greedy", max_new_tokens=4), policy)
    assert encoded == shown
    assert [r.problem for r in results] == PROBLEMS  # the result names the problem as it was given
    direct = Decoder(policy.model, policy.tokenizer).decode(shown, max_new_tokens=4)
    assert [r.best.token_ids for r in results] == [d[0].token_ids for d in direct]
    raw = Decoder(policy.model, policy.tokenizer).decode([p.prompt for p in PROBLEMS], max_new_tokens=4)
    assert [r.best.token_ids for r in results] != [d[0].token_ids for d in raw]  # the format changed what it read

    encoded.clear()
    evaluate_policy(policy, {"1": PROBLEMS}, greedy_config())
    assert sorted(encoded) == sorted(shown)

    trained: list[str] = []
    real = SFTFineTuner.train

    def spy(self, model, tokenizer, examples):
        trained.extend(e["prompt"] for e in examples)
        return real(self, model, tokenizer, examples)

    monkeypatch.setattr(SFTFineTuner, "train", spy)
    examples = [{"prompt": p.prompt, "completion": p.answer} for p in PROBLEMS]
    train_candidate(policy, examples, [], TrainConfig(max_steps=1, batch_size=3), "sft", PreferenceConfig())
    assert trained == shown


def test_a_job_may_name_its_own_format(encoded):
    policy = _chat_policy()
    run_search(PROBLEMS[:1], SearchConfig(strategy="greedy", max_new_tokens=2, prompt_format="raw"), policy)
    run_search(PROBLEMS[:1], SearchConfig(strategy="greedy", max_new_tokens=2, system_prompt="add"), policy)
    assert encoded == ["1+2=", "[add]<1+2=>|"]


def test_the_format_is_kept_with_full_and_adapter_versions(tmp_path):
    settings = Settings(home=tmp_path, device="cpu")
    registry = PolicyRegistry(settings.policies_dir, Store(settings.db_url))
    policy = _chat_policy()
    v0 = registry.save(policy.model, policy.tokenizer, parent=None, trained_on={}, prompt_format=CHAT)
    registry.promote(v0, {})
    current = registry.load(v0)
    assert current.prompt_format == CHAT
    examples = [{"prompt": p.prompt, "completion": p.answer} for p in PROBLEMS]
    lora = TrainConfig(adapter="lora", lora_rank=2, max_steps=1, batch_size=3)
    model, stats = train_candidate(current, examples, [], lora, "sft", PreferenceConfig())
    assert stats["adapter"] == "lora"
    v1 = registry.save(model, current.tokenizer, parent=v0, trained_on={}, prompt_format=current.prompt_format)
    assert on_disk(registry.folder(v1)) == {"kind": "lora adapter", "bytes": on_disk(registry.folder(v1))["bytes"],
                                            "prompt_format": "chat"}
    assert registry.load(v1).prompt_format == CHAT
    plain = registry.save(policy.model, policy.tokenizer, parent=None, trained_on={})
    assert registry.load(plain).prompt_format == PromptFormat()


def test_arbor_run_stores_the_runs_format_with_every_version(tmp_path, monkeypatch):
    from arbor.cli import app

    policy = _chat_policy(PromptFormat())
    folder = tmp_path / "model"
    policy.model.save_pretrained(folder)
    policy.tokenizer.save_pretrained(folder)
    problems = tmp_path / "problems.jsonl"
    rows = [{"prompt": p.prompt, "answer": p.answer, "split": split, "id": f"{split}-{p.id}"}
            for p in PROBLEMS for split in ("train", "heldout")]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("ARBOR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ARBOR_DATABASE_URL", raising=False)
    res = CliRunner().invoke(app, ["run", "--model", str(folder), "--problems", str(problems), "--select", "label_free",
                                   "--strategy", "greedy", "--samples", "1", "--problems-per-cycle", "3",
                                   "--train-seconds", "1", "--cycles", "1", "--prompt-format", "chat",
                                   "--system-prompt", "sum", "--json"])
    assert res.exit_code == 0, res.output
    listed = CliRunner().invoke(app, ["policies", "--json"])
    versions = json.loads(listed.output)
    assert len(versions) >= 2 and {v["prompt_format"] for v in versions} == {"chat"}
    assert {PromptFormat.load(v["path"]) for v in versions} == {CHAT}


def test_what_cannot_work_is_refused_in_one_line():
    model, tok = build_builtin_policy(TINY)  # no chat template
    with pytest.raises(ValueError, match="has none") as exc:
        run_search(PROBLEMS[:1], SearchConfig(strategy="greedy", prompt_format="chat"), Policy(model, tok))
    assert "\n" not in str(exc.value)
    for bad, match in [(dict(prompt_format="markdown"), "one of raw, chat"),
                       (dict(prompt_format="raw", system_prompt="x"), "needs prompt_format chat")]:
        with pytest.raises(ValueError, match=match):
            SearchConfig(**bad)
        with pytest.raises(ValueError, match=match):
            LoopConfig(**bad)
