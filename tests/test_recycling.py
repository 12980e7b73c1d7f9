"""Token Recycling: the template, the matrix, lossless verification against transformers greedy, the tree sizer."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agent.config import BuiltinConfig

from agent.policy import build_builtin_policy
from memory.recycling import PAPER_TREE, DraftTree, RecyclingMemory, TreeSizer
from search.decoder import DecodeStats, Decoder
from tasks import get_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_paper_template_has_its_published_shape():
    tree = DraftTree(PAPER_TREE)
    assert len(tree) == 81  # 80 drafts and the root
    assert [tree.depths.count(d) for d in range(1, 7)] == [8, 21, 25, 15, 8, 3]
    assert tree.max_column() == 7
    assert sum(1 for i in range(len(tree)) if i not in tree.parents) == 40  # leaves = paths
    with pytest.raises(ValueError, match="prefix-closed"):
        DraftTree([(0,), (1, 0, 0)])


def test_drafts_follow_the_matrix_one_gather_per_depth():
    memory = RecyclingMemory(vocab_size=50, k=8, tree=[(0,), (1,), (0, 0), (0, 1), (0, 0, 0)])
    memory.adj[7] = torch.arange(10, 18, dtype=torch.int32)
    memory.adj[10] = torch.arange(20, 28, dtype=torch.int32)
    memory.adj[20] = torch.arange(30, 38, dtype=torch.int32)
    tokens, parents = memory.propose(torch.tensor([7]))
    assert parents == [-1, 0, 0, 1, 1, 3]
    assert tokens.tolist() == [[7, 10, 11, 20, 21, 30]]
    logits = torch.zeros(1, 2, 50)
    logits[0, 0, 40:48] = torch.arange(8, 0, -1).float()  # after token 3: 40 best, then 41, ...
    memory.observe(torch.tensor([[3, 4]]), logits)
    assert memory.adj[3].tolist() == list(range(40, 48))
    assert memory.nbytes == 50 * 8 * 4  # int32


def _hf_greedy(model, prompts_ids: list[list[int]], new: int, eos: int) -> list[list[int]]:
    out = []
    for ids in prompts_ids:
        with torch.no_grad():
            res = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=new)
        row = res[0, len(ids):].tolist()
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


def _check_lossless(model, tok, prompt_ids, new):
    ref = _hf_greedy(model, prompt_ids, new, tok.eos_token_id)
    memory = RecyclingMemory(model.config.vocab_size)  # one hot matrix across every prompt and batch size
    accepted = 0
    for batch in (1, 8):
        stats = DecodeStats()
        out = Decoder(model, tok, draft_source=memory).decode_ids(prompt_ids, max_new_tokens=new, max_rows=batch, stats=stats)
        assert [d[0].token_ids for d in out] == ref, batch
        accepted += stats.generated_tokens
    return memory


def test_lossless_on_the_builtin_task_and_policy():
    model, tok = build_builtin_policy(BuiltinConfig(seed=4))
    prompts = [p.prompt for d in (2, 4, 6, 8) for p in get_task("addition").generate(d, 50, seed=5)]  # 200 prompts
    memory = _check_lossless(model.eval(), tok, [tok(p, add_special_tokens=False).input_ids for p in prompts], 12)
    assert memory.accept_counts[1:].sum() > 0  # drafts were accepted, so verification did real work


def test_lossless_on_free_text_with_a_random_32k_llama():
    from agent.policy import build_char_tokenizer

    tok = build_char_tokenizer()  # only its pad/eos ids are used: prompts are token ids over the full 32k vocabulary
    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 32000) for _ in range(rng.randint(4, 24))] for _ in range(200)]
    _check_lossless(model, tok, prompts, 10)


def test_the_matrix_is_saved_beside_a_policy_and_loads_warm(tmp_path):
    memory = RecyclingMemory(vocab_size=30)
    memory.adj[5] = torch.arange(8, dtype=torch.int32)
    memory.accepted(torch.tensor([3, 0]))
    memory.save(tmp_path)
    again = RecyclingMemory.load(tmp_path, vocab_size=30)
    assert torch.equal(again.adj, memory.adj) and torch.equal(again.accept_counts, memory.accept_counts)
    assert RecyclingMemory.load(tmp_path, vocab_size=31).adj.abs().sum() == 0  # another vocabulary starts cold
    assert RecyclingMemory.load(tmp_path / "none", vocab_size=30).adj.abs().sum() == 0
    assert again.k == memory.k and again.tree.paths == memory.tree.paths


def test_a_matrix_saved_by_an_earlier_version_as_recycling_pt_still_loads(tmp_path):
    memory = RecyclingMemory(vocab_size=30)
    memory.adj[7] = torch.arange(8, dtype=torch.int32)
    torch.save({"adj": memory.adj, "k": memory.k, "accept_counts": memory.accept_counts,
                "tree": [list(p) for p in memory.tree.paths[1:]]}, tmp_path / "recycling.pt")
    again = RecyclingMemory.load(tmp_path, vocab_size=30)
    assert torch.equal(again.adj, memory.adj) and again.tree.paths == memory.tree.paths


def test_the_sizer_trades_accepted_tokens_against_measured_cost():
    rates = {p: 0.9 ** len(p) if p[-1] == 0 else 0.01 for p in PAPER_TREE}  # only the all-zero chain is accepted
    flat = {n: 1.0 for n in TreeSizer.SIZES}  # a device where drafting is free: take every useful node
    tree, gain = TreeSizer.choose(rates, flat)
    assert (0, 0, 0, 0, 0, 0) in tree and gain > 4
    steep = {n: float(n) for n in TreeSizer.SIZES}  # cost grows with every input: a tiny tree, or none pays
    tree, gain = TreeSizer.choose(rates, steep)
    assert len(tree) <= 2 and gain < 1.5


def test_greedy_search_with_recycling_matches_plain_greedy_and_saves_beside_the_version(tmp_path):
    from agent.registry import PolicyRegistry
    from agent.store import Store
    from search import SearchConfig, run_search

    store = Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    registry = PolicyRegistry(tmp_path / "policies", store)
    model, tok = build_builtin_policy(BuiltinConfig(seed=6))
    v0 = registry.save(model, tok, parent=None, trained_on={})
    policy = registry.load(v0)
    assert isinstance(policy.draft_source, RecyclingMemory)
    problems = get_task("addition").generate(5, 30, seed=1)
    plain = run_search(problems, SearchConfig(strategy="greedy", max_new_tokens=10, max_rows=1), policy)
    drafted = run_search(problems, SearchConfig(strategy="greedy", max_new_tokens=10, max_rows=1, recycling=True), policy)
    assert [r.best.token_ids for r in drafted] == [r.best.token_ids for r in plain]
    assert sum(r.forward_passes for r in drafted) < sum(r.forward_passes for r in plain)  # fewer forwards, same tokens
    assert sum(r.generated_tokens for r in drafted) == sum(r.generated_tokens for r in plain)
    # the hot matrix travels with the next version and comes back warm
    v1 = registry.save(model, tok, parent=v0, trained_on={}, draft_source=policy.draft_source)
    assert torch.equal(registry.load(v1).draft_source.adj, policy.draft_source.adj)


def test_mcts_rollouts_with_recycling_reach_the_same_answers_with_fewer_forwards():
    from agent.policy import Policy
    from search import SearchConfig, run_search

    model, tok = build_builtin_policy(BuiltinConfig(seed=7))
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.eos_token_id] *= 3.0
    policy = Policy(model.eval(), tok, "tiny", draft_source=RecyclingMemory(model.config.vocab_size))
    problems = get_task("addition").generate(6, 8, seed=2)
    cfg = SearchConfig(strategy="mcts", simulations=3, children=2, max_step_tokens=2, max_new_tokens=10)
    plain = run_search(problems, cfg, policy)
    run_search(problems, SearchConfig(strategy="greedy", max_new_tokens=10, max_rows=1, recycling=True), policy)  # warm
    drafted = run_search(problems, SearchConfig(**{**cfg.__dict__, "recycling": True}), policy)
    for a, b in zip(plain, drafted):
        assert [c.token_ids for c in a.candidates] == [c.token_ids for c in b.candidates]
        assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], abs=1e-4)
    assert sum(r.forward_passes for r in drafted) < sum(r.forward_passes for r in plain)
    assert sum(r.generated_tokens for r in drafted) == sum(r.generated_tokens for r in plain)


def test_drafting_at_a_batch_size_is_decided_by_turns_of_both_arms():
    """Drafted and one-token decodes take turns until each has DraftTrial.TOKENS tokens; the faster stays."""
    from memory.recycling import DraftTrial, RecyclingMemory

    for drafted_seconds, decision in ((2.0, False), (0.5, True)):
        memory = RecyclingMemory(100)
        memory.steps = memory.WARMUP_STEPS  # warmed up: the sizer has kept a tree for batch 1, context 128
        memory._sized[(1, 128)] = [(0,), (0, 0)]
        arms = []
        while memory._trials.get(1) is None or memory._trials[1].decision is None:
            drafts = memory.ready(None, batch=1, context=100)
            arms.append(drafts)
            memory.finished(None, 1, 100, seconds=drafted_seconds if drafts else 1.0, tokens=64, drafted=drafts)
        assert arms == [True, False] * (DraftTrial.TOKENS // 64), arms
        assert memory._trials[1].decision is decision and memory.ready(None, batch=1, context=100) is decision
        assert memory.trials()["batch 1"]["drafting"] is decision
        # decided: later decodes change nothing, and another batch size has its own trial
        memory.finished(None, 1, 100, seconds=100.0, tokens=64, drafted=decision)
        assert memory._trials[1].decision is decision and 2 not in memory._trials
