"""The expansion engine, step beam, MCTS, scorers and the tree view, on tiny real models."""

import pytest
import torch

from agent.config import BuiltinConfig

from agent.policy import Policy, build_builtin_policy
from tasks import get_task
from search import SearchConfig, run_search
from search.decoder import Decoder
from search.expand import Expander
from search.scorers import Confidence, Sum, Verifier
from search.tree import walk
from search.tree_html import tree_from_candidates, tree_to_html
from search.types import Candidate

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _policy(scheme="coupled", eos_boost=4.0) -> Policy:
    model, tok = build_builtin_policy(BuiltinConfig(position_scheme=scheme, seed=3))
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.eos_token_id] *= eos_boost
    return Policy(model.eval(), tok, "tiny")


PROMPTS = ["12+34=", "123+456=", "9+9=", "1234+5678=", "55+55="]


def _grow_greedy(ex, prompts, step_tokens, max_new):
    """Expand every root greedily step by step; returns the terminal leaf of each root."""
    roots = ex.roots(prompts)
    frontier, leaves = list(roots), {}
    while frontier:
        kids = ex.expand(frontier, [1] * len(frontier), 0.0, step_tokens, max_new)
        frontier = [k[0] for k in kids if not k[0].terminal]
        leaves.update({id(k[0].path()[0]): k[0] for k in kids if k[0].terminal})
    return roots, [leaves[id(r)] for r in roots]


@pytest.mark.parametrize("scheme", ["coupled", "sequential"])
def test_step_expansion_with_reused_prefix_equals_plain_greedy(scheme):
    policy = _policy(scheme, eos_boost=1.0)
    ref = Decoder(policy.model, policy.tokenizer).decode(PROMPTS, max_new_tokens=9)
    for reuse in (True, False):
        ex = Expander(Decoder(policy.model, policy.tokenizer), reuse_prefix=reuse)
        roots, leaves = _grow_greedy(ex, PROMPTS, 2, 9)
        for leaf, d in zip(leaves, ref):
            ids, lps, _ = leaf.completion()
            assert ids == d[0].token_ids
            assert max(abs(a - b) for a, b in zip(lps, d[0].logprobs)) < 1e-4
        assert ex.stats.generated_tokens == 9 * len(PROMPTS)
        assert all(ex.tokens_of[id(r)] == 9 for r in roots)
        if reuse:  # every expanded node caches exactly its own tokens: nothing on a path is computed twice
            for r in roots:
                for n in walk(r):
                    if n.children:
                        assert n.kv_len == len(n.token_ids)


def test_sampled_children_share_the_parent_cache():
    policy = _policy()
    ex = Expander(Decoder(policy.model, policy.tokenizer))
    roots = ex.roots(PROMPTS[:2])
    passes = ex.stats.forward_passes
    kids = ex.expand(roots, [6, 3], 1.0, 3, 12, torch.Generator().manual_seed(0))
    assert [len(k) for k in kids] == [6, 3]
    assert all(c.parent is r and c in r.children for r, ks in zip(roots, kids) for c in ks)
    # roots were prefilled once: the expansion spends at most one forward per decoded token position
    assert ex.stats.forward_passes - passes <= 2
    grandkids = ex.expand([k[0] for k in kids if not k[0].terminal], [2] * sum(not k[0].terminal for k in kids), 1.0, 3, 12)
    for ks in grandkids:
        for g in ks:
            assert g.full_ids()[: len(g.parent.full_ids())] == g.parent.full_ids()


@pytest.mark.parametrize("strategy", ["step_beam", "mcts"])
def test_tree_strategies_reuse_and_recompute_agree(strategy, monkeypatch):
    from functools import partial

    from search.expand import Expander

    policy = _policy()
    problems = get_task("addition").generate(3, 4, seed=1)
    kw = dict(strategy=strategy, max_new_tokens=6, beams=2, children=3, simulations=4, max_step_tokens=2, keep_tree=True)
    fast = run_search(problems, SearchConfig(**kw), policy)
    monkeypatch.setattr(f"search.{strategy}.Expander", partial(Expander, reuse_prefix=False))  # every prefix recomputed
    slow = run_search(problems, SearchConfig(**kw), policy)
    for a, b in zip(fast, slow):
        assert [c.token_ids for c in a.candidates] == [c.token_ids for c in b.candidates]
        assert a.generated_tokens == b.generated_tokens > 0
        assert a.best.finished or all(not c.finished for c in a.candidates)
        assert a.tree is not None and a.tree.on_best_path and a.tree.kv is None  # key/values released
        assert len({tuple(c.token_ids) for c in a.candidates}) == len(a.candidates)
    if strategy == "mcts":
        root = fast[0].tree
        assert root.visits == sum(c.visits for c in root.children) > 0
        assert abs(sum(c.prior for c in root.children) - 1.0) < 1e-6


def test_verifier_scorer_steers_mcts_to_checked_answers():
    model, tok = build_builtin_policy(BuiltinConfig(seed=3))
    policy = Policy(model.eval(), tok, "tiny")
    problems = get_task("addition").generate(1, 3, seed=2)
    cfg = SearchConfig(strategy="mcts", use_verifier=True, max_new_tokens=3, simulations=3, children=2)
    results = run_search(problems, cfg, policy)
    for r in results:  # an untrained model is never right: the verifier term is 0 everywhere
        assert all(c.score < 0 for c in r.candidates)
    with pytest.raises(ValueError, match="use_verifier"):
        SearchConfig(scorer="verifier+mean_logprob")


def test_scorers():
    def cand(text, mean, mn, ent, verified):
        return Candidate(text, [1], mean, mn, ent, finished=True, verified=verified)

    cs = [cand("12", -0.1, -0.5, 1.0, False), cand("13", -0.3, -0.3, 0.2, True), cand("13", -0.4, -0.4, 0.3, True)]
    assert Confidence("mean_logprob").score([None], [cs]) == [[-0.1, -0.3, -0.4]]
    assert Confidence("min_logprob").score([None], [cs]) == [[-0.5, -0.3, -0.4]]
    assert Confidence("neg_entropy").score([None], [cs]) == [[-1.0, -0.2, -0.3]]
    assert Sum([Verifier(), Confidence("mean_logprob")]).score([None], [cs]) == [[-0.1, 0.7, 0.6]]
    assert SearchConfig(use_verifier=True).build_scorer().name == "verifier+mean_logprob"
    assert SearchConfig(strategy="diverse_beam", use_verifier=True).build_scorer().name == "verifier+beam_score"
    assert SearchConfig(strategy="beam", scorer="min_logprob").build_scorer().name == "min_logprob"


def test_tree_html_marks_the_chosen_path(tmp_path):
    policy = _policy()
    problems = get_task("addition").generate(2, 2, seed=0)
    tree = run_search(problems, SearchConfig(strategy="step_beam", max_new_tokens=4, beams=2, children=2, keep_tree=True), policy)
    beams = run_search(problems, SearchConfig(strategy="beam", max_new_tokens=4, beams=3), policy)
    trie = tree_from_candidates(policy.tokenizer(problems[0].prompt).input_ids, beams[0].candidates)
    page = tree_to_html([tree[0].tree, trie], policy.tokenizer, ["step_beam", "beam"])
    assert page.count('class="best"') >= 2 and "visits=" in page and "conf=" in page


def test_tree_html_of_a_tree_deeper_than_5000_nodes():
    """One 6000-token candidate beside a short one: 6000 nested nodes (a recursive renderer hit Python's
    recursion limit near 1000), children in visit order, every node closed."""
    tok = _policy().tokenizer
    digits = tok("0123456789", add_special_tokens=False).input_ids
    long = Candidate(completion="", token_ids=[digits[i % 10] for i in range(6000)], mean_logprob=-0.1, min_logprob=-0.1,
                     mean_entropy=0.0, finished=True, score=1.0)
    short = Candidate(completion="", token_ids=[digits[1], digits[2]], mean_logprob=-0.2, min_logprob=-0.2,
                      mean_entropy=0.0, finished=True, score=0.5)
    trie = tree_from_candidates(tok("1+1=", add_special_tokens=False).input_ids, [long, short, short])
    page = tree_to_html([trie], tok, ["deep"])
    assert page.count("<details") == page.count("</details>") == 1 + 6000 + 2
    assert page.count('class="best"') == 6001
    first, second = page.index("<summary>step"), page.index("visits=2")
    assert second < page.index("visits=1 ", first)  # the step two candidates share comes first


@pytest.fixture(scope="module")
def line_policy():
    """A tiny policy taught a multi-line answer format: the prompt's digits one per line ("12=" -> "1\n2")."""
    from agent.config import TrainConfig
    from agent.trainer import SFTFineTuner

    model, tok = build_builtin_policy(BuiltinConfig(position_scheme="sequential", seed=5))
    rng = __import__("random").Random(0)
    examples = []
    for _ in range(3000):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 4)))
        examples.append({"prompt": f"{digits}=", "completion": "\n".join(digits)})
    # a step count, not a time budget: the same policy however busy the machine is
    SFTFineTuner(TrainConfig(learning_rate=3e-3, time_budget_s=600, max_steps=700, batch_size=64)).train(model, tok, examples)
    return Policy(model.eval(), tok, "lines")


def test_mcts_rollouts_run_to_the_end_of_multi_line_completions(line_policy):
    problems = [get_task("addition").generate(3, 1, seed=s)[0] for s in range(6)]
    problems = [type(p)(prompt=p.prompt.split("+")[0] + "=", id=p.id) for p in problems]  # "123=" -> "1\n2\n3"
    cfg = SearchConfig(strategy="mcts", simulations=3, children=2, max_step_tokens=4, max_new_tokens=12,
                       step_delimiter="\n", keep_tree=True)
    results = run_search(problems, cfg, line_policy)
    lines_seen = 0
    for r in results:
        for c in r.candidates:  # every answer is a finished completion or one cut at the token budget
            assert c.finished or len(c.token_ids) >= cfg.max_new_tokens, repr(c.completion)
            lines_seen = max(lines_seen, c.completion.count("\n") + 1)
        assert any(c.finished for c in r.candidates)  # a rollout reached EOS
        for node in walk(r.tree):  # the tree itself still grows one line (step) at a time
            if node.parent is not None and not node.terminal:
                assert len(node.token_ids) <= cfg.max_step_tokens
                assert node.token_ids[-1] == line_policy.tokenizer.convert_tokens_to_ids("\n") or len(node.token_ids) == cfg.max_step_tokens
    assert lines_seen >= 3  # rollouts crossed step delimiters: a three-line answer is one rollout's end


def test_every_strategy_has_traits_and_the_config_reads_them():
    from search import STRATEGIES, TRAITS

    assert list(STRATEGIES) == list(TRAITS)
    for name, traits in TRAITS.items():
        if traits.memory:
            SearchConfig(strategy=name, memory=True)
        else:
            with pytest.raises(ValueError, match="memory works with greedy, best_of_n, beam, diverse_beam and auto"):
                SearchConfig(strategy=name, memory=True)
        assert (SearchConfig(strategy=name).build_scorer().name == "beam_score") == traits.beam_score
