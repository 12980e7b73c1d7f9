"""LoRA adapter versions: saved as the adapter alone over a hashed base, promoted, rolled back and hot-swapped by a
worker's PolicyCache over one base load; search on an adapted model is exact against `generate` on the merged model;
a LoRA fine-tune moves only adapter weights. Real peft and TRL throughout, on a tiny built-in policy."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from agent import adapters
from agent.config import BuiltinConfig, LoopConfig, PreferenceConfig, TrainConfig, WarmStartConfig
from agent.policy import PolicyLoadError, build_builtin_policy
from agent.registry import PolicyRegistry
from agent.settings import Settings
from agent.store import Store
from agent.trainer import SFTFineTuner, clone_for_training
from agent.versions import folder_bytes, kind, read_base
from search import SearchConfig, run_search
from tasks import get_task
from workers.cache import PolicyCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = BuiltinConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, seed=1)
PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
EXAMPLES = [{"prompt": f"{a}+{b}=", "completion": str(a + b)[::-1]} for a in range(10) for b in range(0, 10, 3)]
# a high rate (A at 2.5 times this, B at 20 times: lora_learning_rate_scale and lora_plus_ratio) so that a few steps
# move the adapter far enough to change what the model decodes
LORA = TrainConfig(adapter="lora", lora_rank=2, lora_alpha=8, lora_dropout=0.0, learning_rate=0.005, max_steps=6,
                   batch_size=8, time_budget_s=60)
MAX_NEW = 6


def _fine_tuned(model, tokenizer, cfg: TrainConfig = LORA):
    tuner = SFTFineTuner(cfg)
    tuner.train(clone_for_training(model, cfg.adapter), tokenizer, EXAMPLES)
    return tuner.trained


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """v0 a full built-in policy (promoted), v1 a LoRA fine-tune of it, v2 a LoRA fine-tune of v1 (both promoted in
    turn, v1 last); returns (home, registry, {version: the model that was saved})."""
    home = tmp_path_factory.mktemp("home")
    settings = Settings(home=home, device="cpu")
    registry = PolicyRegistry(settings.policies_dir, Store(settings.db_url))
    model, tok = build_builtin_policy(TINY)
    with torch.no_grad():  # EOS likely, so that beams finish at different lengths
        model.get_input_embeddings().weight[tok.eos_token_id] *= 4.0
    saved = {"v0": model}
    registry.promote(registry.save(model, tok, parent=None, trained_on={}), {})
    current = registry.load("v0")
    saved["v1"] = _fine_tuned(current.model, tok)
    registry.promote(registry.save(saved["v1"], tok, parent="v0", trained_on={}, draft_source=current.draft_source), {})
    saved["v2"] = _fine_tuned(saved["v1"], tok)  # a later cycle: the adapter version keeps training its adapter
    registry.promote(registry.save(saved["v2"], tok, parent="v1", trained_on={}), {})
    registry.promote("v1", {})
    return home, registry, saved


def _logits(model, tok):
    enc = tok(["12+34=", "7+8="], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model(**enc).logits


@pytest.mark.parametrize("in_place", [True, False], ids=["weights-copied", "adapter-loaded"])
def test_an_adapter_version_round_trips_and_a_worker_swaps_adapters_over_one_base(versions, monkeypatch, in_place):
    home, registry, saved = versions
    monkeypatch.setattr(adapters, "BASES", adapters._Bases())  # a fresh process: no base read yet
    if not in_place:  # as for an adapter of another rank: peft loads it as a new adapter
        monkeypatch.setattr(adapters, "_copy_adapter_in_place", lambda model, folder: False)
    tok = registry.load("v0").tokenizer
    cache = PolicyCache(registry)
    held = cache.get()
    assert held.version == "v1" and adapters.is_adapter(held.model)
    assert cache.base_loads == 1 and adapters.BASES.loads == 1
    assert torch.equal(_logits(held.model, tok), _logits(saved["v1"], tok))  # the saved adapter, exactly

    registry.promote("v2", {})
    swapped = cache.get()
    assert swapped.version == "v2" and swapped.model is held.model  # only the adapter was loaded
    assert len(swapped.model.peft_config) == 1  # one adapter held: the previous one was overwritten or removed
    assert torch.equal(_logits(swapped.model, tok), _logits(saved["v2"], tok))

    registry.promote("v1", {})  # an operator's rollback
    back = cache.get()
    assert back.version == "v1" and torch.equal(_logits(back.model, tok), _logits(saved["v1"], tok))
    assert cache.loads == 3 and cache.base_loads == 1 and adapters.BASES.loads == 1
    # the base under all of them is v0's weights, untouched by training and swaps
    base = registry.load("v0").model
    assert all(torch.equal(p, base.state_dict()[k]) for k, p in adapters.BASES.held[1].state_dict().items())


def test_an_adapter_of_other_shapes_is_not_copied_in_place(versions):
    _, registry, saved = versions
    held = registry.load("v1")
    other = TrainConfig(**{**LORA.__dict__, "lora_rank": 3})
    folder = registry.root / "rank3"
    adapters.save_adapter(_fine_tuned(saved["v0"], held.tokenizer, other), folder, registry.folder("v0"), "x")
    assert adapters._same_shape_weights(held.model, folder) is None
    assert adapters._same_shape_weights(held.model, registry.folder("v2")) is not None


def test_dora_versions_keep_their_magnitudes_and_swap_in_place(tmp_path):
    registry = PolicyRegistry(tmp_path / "policies", Store(f"sqlite:///{tmp_path / 'arbor.db'}"))
    model, tok = build_builtin_policy(TINY)
    registry.promote(registry.save(model, tok, parent=None, trained_on={}), {})
    dora = replace(LORA, lora_dora=True)
    first = _fine_tuned(registry.load("v0").model, tok, dora)
    registry.save(first, tok, parent="v0", trained_on={})
    second = _fine_tuned(first, tok, dora)
    registry.save(second, tok, parent="v1", trained_on={})
    held = registry.load("v1")
    assert held.model.peft_config[held.model.active_adapter].use_dora
    assert torch.equal(_logits(held.model, tok), _logits(first, tok))
    # a magnitude per adapted layer is part of what a swap writes
    magnitudes = [k for k in adapters._adapter_tensors(held.model) if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == TINY.num_layers * len(PROJECTIONS)
    assert adapters._same_shape_weights(held.model, registry.folder("v2")) is not None
    swapped = adapters.swap_adapter(held, registry.folder("v2"), "v2")
    assert swapped.model is held.model and swapped.version == "v2"
    assert torch.equal(_logits(swapped.model, tok), _logits(second, tok))
    assert not torch.equal(_logits(first, tok), _logits(second, tok))


def test_a_worker_holding_the_base_version_goes_over_it_without_a_second_load(versions, monkeypatch):
    _, registry, _ = versions
    monkeypatch.setattr(adapters, "BASES", adapters._Bases())
    registry.promote("v0", {})
    try:
        cache = PolicyCache(registry)
        assert cache.get().version == "v0"
        registry.promote("v2", {})
        assert cache.get().version == "v2" and cache.base_loads == 0 and adapters.BASES.loads == 0
    finally:
        registry.promote("v1", {})


def test_the_version_folder_holds_only_the_adapter(versions):
    home, registry, _ = versions
    v0, v1, v2 = (registry.root / v for v in ("v0", "v1", "v2"))
    assert sorted(p.name for p in v1.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "arbor_meta.json", "base.json", "recycling.safetensors"]
    assert read_base(v2) == read_base(v1)  # an adapter of an adapter is over the same full base
    assert read_base(v1)["path"] == str(v0.resolve())
    from safetensors.torch import load_file

    weights = load_file(v1 / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    assert (kind(v0), kind(v1)) == ("full", "lora adapter")
    assert folder_bytes(v1) - (v1 / "recycling.safetensors").stat().st_size < folder_bytes(v0) / 5
    from arbor.cli import app

    listed = CliRunner().invoke(app, ["policies"], env={"ARBOR_HOME": str(home)})
    assert listed.exit_code == 0 and "lora adapter" in listed.output and " full " in listed.output


def test_a_changed_base_is_refused_with_one_line(tmp_path):
    registry = PolicyRegistry(tmp_path / "policies", Store(f"sqlite:///{tmp_path / 'arbor.db'}"))
    model, tok = build_builtin_policy(TINY)
    registry.promote(registry.save(model, tok, parent=None, trained_on={}), {})
    registry.save(_fine_tuned(model, tok), tok, parent="v0", trained_on={})
    assert registry.load("v1").version == "v1"
    (registry.root / "v0" / "tokenizer_config.json").write_text("{}")  # someone edited the base in place
    with pytest.raises(PolicyLoadError) as info:
        registry.load("v1")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"policy v1 is a LoRA adapter over {registry.root / 'v0'}")
    assert "whose contents changed since (sha256 " in message and message.endswith(
        "restore that base or promote a full version")


def _generate(model, tok, problems, **kw):
    """generate per prompt length (no padding): top sequence without EOS, and its score."""
    out = {}
    for d in sorted({p.difficulty for p in problems}):
        group = [p for p in problems if p.difficulty == d]
        enc = tok([p.prompt for p in group], return_tensors="pt", add_special_tokens=False)
        res = model.generate(**enc, max_new_tokens=MAX_NEW, return_dict_in_generate=True, output_scores=True, **kw)
        for j, p in enumerate(group):
            ids = res.sequences[j, enc.input_ids.shape[1]:].tolist()
            ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
            out[p.id] = (ids, res.sequences_scores[j].item() if "num_beams" in kw else None)
    return out


def test_greedy_and_beam_on_the_adapter_equal_generate_on_the_merged_model(versions):
    _, registry, _ = versions
    policy = registry.load("v2")
    merged = adapters.merged_copy(policy.model)  # a copy: merging in place would write into the shared base
    tok = policy.tokenizer
    problems = [p for d in (1, 2, 3) for p in get_task("addition").generate(d, 12, seed=5)]
    greedy = run_search(problems, SearchConfig(strategy="greedy", max_new_tokens=MAX_NEW), policy)
    ref = _generate(merged, tok, problems, do_sample=False)
    assert [r.best.token_ids for r in greedy] == [ref[p.id][0] for p in problems]
    base = run_search(problems, SearchConfig(strategy="greedy", max_new_tokens=MAX_NEW), registry.load("v0"))
    assert any(a.best.token_ids != b.best.token_ids for a, b in zip(greedy, base))  # the adapter changes answers

    beams = run_search(problems, SearchConfig(strategy="beam", beams=4, max_new_tokens=MAX_NEW), policy)
    ref = _generate(merged, tok, problems, num_beams=4, do_sample=False)
    for r in beams:
        ids, score = ref[r.problem.id]
        assert r.best.token_ids == ids and abs(r.best.score - score) < 1e-4


def test_a_lora_fine_tune_changes_only_adapter_weights():
    model, tok = build_builtin_policy(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(adapter="lora", max_steps=3, batch_size=8, gradient_accumulation_steps=2,
                      gradient_checkpointing=True, time_budget_s=60)
    tuner = SFTFineTuner(cfg)
    stats = tuner.train(clone_for_training(model, "lora"), tok, EXAMPLES)
    trained = tuner.trained
    assert stats["steps"] == 3 and adapters.is_adapter(trained)
    assert sorted(trained.peft_config["default"].target_modules) == PROJECTIONS  # read off the decoder layers
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base it shares, untouched
    moved = {n for n, p in trained.named_parameters() if "lora_B" in n and p.abs().sum() > 0}  # lora_B starts at 0
    assert len(moved) == len(PROJECTIONS) * TINY.num_layers
    frozen = {k: v for k, v in trained.get_base_model().state_dict().items() if "lora_" not in k}
    assert all(torch.equal(before[k.replace("base_layer.", "")], v) for k, v in frozen.items())
    assert all(not p.requires_grad for n, p in trained.named_parameters() if "lora_" not in n)


def test_lora_settings_are_checked_in_one_line():
    for bad in (dict(adapter="qlora"), dict(lora_rank=0), dict(lora_dropout=1.0), dict(lora_target_modules=()),
                dict(gradient_accumulation_steps=0)):
        with pytest.raises(ValueError, match=r"^TrainConfig: [^\n]+$"):
            TrainConfig(**bad)
    assert TrainConfig(lora_target_modules=["q_proj"]).lora_target_modules == ("q_proj",)  # as restored from JSON
    with pytest.raises(ValueError, match="must match"):
        LoopConfig(train_method="sft+dpo", train=TrainConfig(adapter="lora"), preference=PreferenceConfig())
    with pytest.raises(ValueError, match="warm_start.train.adapter must be 'full'"):
        WarmStartConfig(train=TrainConfig(adapter="lora"))


def test_auto_trains_the_builtin_policy_in_full_and_a_large_model_with_lora():
    from transformers import LlamaConfig, LlamaForCausalLM

    small, _ = build_builtin_policy(TINY)
    assert adapters.resolved_adapter("auto", small) == "full"
    with torch.device("meta"):  # shapes only: nothing is allocated
        large = LlamaForCausalLM(LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                                             num_attention_heads=16, vocab_size=32000))
    assert sum(p.numel() for p in large.parameters()) >= adapters.LORA_FROM_PARAMETERS
    assert adapters.resolved_adapter("auto", large) == "lora"
    assert adapters.resolved_adapter("full", large) == "full"
    assert LoopConfig().train.adapter == "auto" and LoopConfig().warm_start.train.adapter == "full"


def test_every_strategy_recycling_and_the_context_memory_run_on_the_adapted_model():
    from agent.policy import Policy
    from search import STRATEGIES

    model, tok = build_builtin_policy(BuiltinConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                                    position_scheme="sequential", seed=2))
    adapted = _fine_tuned(model, tok).eval()
    policy = Policy(adapted, tok, "lora")
    merged = Policy(adapters.merged_copy(adapted), tok, "merged")
    problems = [p for d in (1, 2) for p in get_task("addition").generate(d, 6, seed=7)]
    for strategy in STRATEGIES:
        # adaptive escalates by confidence here (no value model): below -1 mean log-prob
        cfg = SearchConfig(strategy=strategy, n=4, beams=4, groups=2, children=2, simulations=3, max_new_tokens=MAX_NEW,
                           accept_score=-1.0, scorer="mean_logprob" if strategy == "adaptive" else None)
        got = run_search(problems, cfg, policy)
        assert all(r.candidates and r.generated_tokens > 0 for r in got), strategy
        if strategy in ("greedy", "beam", "diverse_beam", "auto"):  # deterministic: the merged model's answers
            assert [r.best.token_ids for r in got] == [r.best.token_ids for r in run_search(problems, cfg, merged)]
    plain = run_search(problems, SearchConfig(strategy="greedy", max_new_tokens=MAX_NEW), policy)
    from memory.recycling import RecyclingMemory

    policy.draft_source = RecyclingMemory(adapted.config.vocab_size)
    for _ in range(2):  # the second pass drafts from what the first recycled
        drafted = run_search(problems, SearchConfig(strategy="greedy", max_new_tokens=MAX_NEW, recycling=True), policy)
        assert [r.best.token_ids for r in drafted] == [r.best.token_ids for r in plain]
    memory = SearchConfig(strategy="greedy", max_new_tokens=MAX_NEW, memory=True)
    assert ([r.best.token_ids for r in run_search(problems, memory, policy)]
            == [r.best.token_ids for r in run_search(problems, memory, merged)])


def test_lora_trains_at_its_own_rate():
    from agent.trainer import _at_adapter_rate

    model, _ = build_builtin_policy(TINY)
    cfg = TrainConfig(learning_rate=5e-4)
    assert _at_adapter_rate(cfg, model).learning_rate == 5e-4  # auto on a 1M model: full, at the full rate
    assert _at_adapter_rate(replace(cfg, adapter="lora"), model).learning_rate == pytest.approx(1.25e-3)  # 2.5x
    assert _at_adapter_rate(replace(cfg, adapter="lora", lora_learning_rate_scale=2.0), model).learning_rate == 1e-3
    with pytest.raises(ValueError, match="lora_learning_rate_scale must be positive"):
        TrainConfig(lora_learning_rate_scale=0)


def test_lora_plus_trains_b_faster_than_a_and_the_time_schedule_keeps_the_ratio():
    from types import SimpleNamespace

    from agent.trainer import _lora_plus, _TimeBudget

    model, tok = build_builtin_policy(TINY)
    cfg = TrainConfig(adapter="lora", lora_plus_ratio=16.0, learning_rate=1e-3, schedule="time_cosine", max_steps=4,
                      batch_size=8, time_budget_s=60)
    wrapped = adapters._wrapped(clone_for_training(model, "lora"), adapters.lora_config(cfg, model))
    trainer = SimpleNamespace(model=wrapped, optimizer=None)
    _lora_plus(trainer, cfg)
    names = {id(p): n for n, p in wrapped.named_parameters()}

    def rates():
        return {names[id(p)]: g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}

    assert {lr for n, lr in rates().items() if "lora_A" in n} == {1e-3}
    assert [pytest.approx(1.6e-2)] == list({lr for n, lr in rates().items() if "lora_B" in n})
    schedule = _TimeBudget(60.0, 4, cosine=True)
    schedule.on_train_begin(None, None, None)
    for step in (0, 2):  # warm-up, then cosine: every group scaled alike
        schedule.on_step_begin(None, SimpleNamespace(global_step=step), None, optimizer=trainer.optimizer)
        a = {lr for n, lr in rates().items() if "lora_A" in n}
        b = {lr for n, lr in rates().items() if "lora_B" in n}
        assert len(a) == len(b) == 1 and b.pop() == pytest.approx(16 * a.pop())
    plain = SimpleNamespace(model=wrapped, optimizer=None)
    _lora_plus(plain, replace(cfg, lora_plus_ratio=1.0))
    assert plain.optimizer is None  # the trainer builds its own, one rate
    tuner = SFTFineTuner(cfg)
    assert tuner.train(clone_for_training(model, "lora"), tok, EXAMPLES)["steps"] == 4
    with pytest.raises(ValueError, match="lora_plus_ratio must be 1 or more"):
        TrainConfig(lora_plus_ratio=0.5)
