"""The CUDA path: every strategy, the Decoder's tree step, one fine-tune step and one worker job on `cuda`.

Skipped where no GPU is present; scripts/gpu-check.sh runs this module on a GPU machine."""

import random

import pytest
import torch

from agent.config import BuiltinConfig

from agent.policy import Policy, build_builtin_policy
from search import STRATEGIES, SearchConfig, run_search
from search.decoder import Decoder
from tasks import Problem, get_task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _policy(device: str, dtype=torch.float32) -> Policy:
    model, tok = build_builtin_policy(BuiltinConfig(seed=1))
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.eos_token_id] *= 4.0
    return Policy(model.to(device=device, dtype=dtype).eval(), tok, "cuda-test")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_runs_on_cuda_and_greedy_ones_match_the_cpu(strategy):
    problems = get_task("addition").generate(3, 12, seed=0)
    # adaptive escalates past greedy by confidence here (no value model): accept_score -1 mean log-prob
    cfg = SearchConfig(strategy=strategy, n=4, beams=4, groups=2, children=2, simulations=3, max_new_tokens=6,
                       accept_score=-1.0, scorer="mean_logprob" if strategy == "adaptive" else None)
    gpu = run_search(problems, cfg, _policy("cuda"))
    assert len(gpu) == len(problems) and all(r.candidates for r in gpu)
    assert all(r.generated_tokens > 0 and r.forward_passes > 0 for r in gpu)
    if strategy in ("greedy", "beam"):  # deterministic: the same tokens as on the CPU
        cpu = run_search(problems, cfg, _policy("cpu"))
        assert [r.best.token_ids for r in gpu] == [r.best.token_ids for r in cpu]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strategies_run_in_half_precision_settings(dtype):
    problems = get_task("addition").generate(2, 8, seed=1)
    for strategy in ("best_of_n", "mcts"):
        results = run_search(problems, SearchConfig(strategy=strategy, n=3, simulations=2, max_new_tokens=5), _policy("cuda", dtype))
        assert all(r.candidates for r in results)


def test_tree_step_on_cuda_equals_each_path_alone():
    policy = _policy("cuda")
    model, tok = policy.model, policy.tokenizer
    decoder = Decoder(model, tok)
    rng = random.Random(0)
    vocab = [tok.convert_tokens_to_ids(c) for c in "0123456789"]
    parents = [-1] + [rng.randrange(i) for i in range(1, 16)]
    prompts = decoder.encode(["12+34=", "1234+5678="])
    trees = [[rng.choice(vocab) for _ in parents] for _ in prompts]
    with torch.no_grad():
        ids, mask = decoder.left_pad(prompts)
        cache, _ = decoder.prefill(ids, mask)
        logits = decoder.tree_step(ids, mask, cache, torch.tensor(trees, device="cuda"), parents)
        for b, prompt in enumerate(prompts):
            for i in range(len(parents)):
                path, j = [], i
                while j != -1:
                    path.append(j)
                    j = parents[j]
                seq = torch.tensor([prompt + [trees[b][k] for k in path[::-1]]], device="cuda")
                ref = model(input_ids=seq).logits[0, -1].float()
                assert torch.allclose(logits[b, i], ref, atol=1e-3)


def test_one_fine_tune_step_on_cuda_changes_the_weights():
    from agent.config import TrainConfig
    from agent.trainer import SFTFineTuner

    policy = _policy("cuda")
    before = policy.model.model.embed_tokens.weight.detach().clone()
    examples = [{"prompt": p.prompt, "completion": p.answer} for p in get_task("addition").generate(2, 64, seed=2)]
    stats = SFTFineTuner(TrainConfig(max_steps=1, time_budget_s=60, batch_size=16)).train(policy.model, policy.tokenizer, examples)
    assert stats["steps"] == 1
    assert policy.model.device.type == "cuda"
    assert not torch.equal(before, policy.model.model.embed_tokens.weight.detach())


def test_a_lora_fine_tune_on_a_bf16_base_with_checkpointing_and_accumulation():
    """The one-GPU settings for a user's model (docs/models.md): frozen bf16 base, float32 adapters, bf16 autocast,
    gradient checkpointing, micro-batches; only the adapter moves, and search runs on the adapted model."""
    from agent.config import TrainConfig
    from agent.trainer import SFTFineTuner, clone_for_training

    policy = _policy("cuda", torch.bfloat16)
    base = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    cfg = TrainConfig(adapter="lora", lora_rank=4, max_steps=2, time_budget_s=60, batch_size=16, bf16=True,
                      gradient_checkpointing=True, gradient_accumulation_steps=4, learning_rate=1e-3)
    examples = [{"prompt": p.prompt, "completion": p.answer} for p in get_task("addition").generate(2, 64, seed=2)]
    tuner = SFTFineTuner(cfg)
    stats = tuner.train(clone_for_training(policy.model, "lora"), policy.tokenizer, examples)
    assert stats["steps"] == 2
    adapted = tuner.trained
    lora = {n: p for n, p in adapted.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.device.type == "cuda" for p in lora.values())
    assert all(torch.equal(base[n], p) for n, p in policy.model.named_parameters())  # the shared base never moved
    problems = get_task("addition").generate(2, 4, seed=3)
    results = run_search(problems, SearchConfig(strategy="beam", beams=2, max_new_tokens=4),
                         Policy(adapted.eval(), policy.tokenizer, "lora"))
    assert all(r.candidates for r in results)


def test_one_worker_job_on_cuda(tmp_path):
    from agent.jobs import run_job, submit_jobs
    from agent.registry import PolicyRegistry
    from agent.store import Store
    from workers.cache import PolicyCache

    store = Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    registry = PolicyRegistry(tmp_path / "policies", store)
    model, tok = build_builtin_policy()
    registry.promote(registry.save(model, tok, parent=None, trained_on={}), {})
    cache = PolicyCache(registry, device="cuda")
    (job,) = submit_jobs(store, [Problem("12+34=", "640", id="c1")], rounds=2,
                         search={"strategy": "mcts", "simulations": 2, "max_new_tokens": 4})
    out = run_job(store, job, cache.get, "gpu-worker")
    assert out["status"] == "done", out
    assert cache.policy.model.device.type == "cuda"
    assert len(store.trajectories(job_id=job)) >= 1
