"""Token beam search and greedy are exact against transformers `generate` on the same tiny model."""

import pytest
import torch

from agent.config import BuiltinConfig

from agent.policy import Policy, build_builtin_policy
from tasks import get_task
from search import SearchConfig, run_search

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_NEW = 8



def _policy(scheme: str) -> Policy:
    model, tok = build_builtin_policy(BuiltinConfig(position_scheme=scheme, seed=1))
    with torch.no_grad():  # make EOS likely, so that hypotheses finish at many different lengths
        model.get_input_embeddings().weight[tok.eos_token_id] *= 6.0
    return Policy(model.eval(), tok, "tiny")


def _problems():
    task = get_task("addition")
    return [p for d in (1, 2, 3, 4) for p in task.generate(d, 25, seed=7)]  # 100 prompts


def _generate(policy, problems, **kw):
    """generate per prompt length (no padding), top sequence without EOS, and its score."""
    tok, out = policy.tokenizer, {}
    for d in sorted({p.difficulty for p in problems}):
        group = [p for p in problems if p.difficulty == d]
        enc = tok([p.prompt for p in group], return_tensors="pt", add_special_tokens=False)
        res = policy.model.generate(**enc, max_new_tokens=MAX_NEW, return_dict_in_generate=True, output_scores=True, **kw)
        for j, p in enumerate(group):
            ids = res.sequences[j, enc.input_ids.shape[1] :].tolist()
            ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
            score = res.sequences_scores[j].item() if "num_beams" in kw else None
            out[p.id] = (ids, score)
    return out


@pytest.mark.parametrize("scheme", ["coupled", "sequential"])
def test_beam_matches_generate(scheme):
    policy, problems = _policy(scheme), _problems()
    ended_early = 0
    for beams, length_penalty in [(2, 1.0), (4, 1.0), (8, 1.0), (4, 0.5)]:
        cfg = SearchConfig(strategy="beam", beams=beams, max_new_tokens=MAX_NEW, length_penalty=length_penalty)
        results = run_search(problems, cfg, policy)
        ref = _generate(policy, problems, num_beams=beams, do_sample=False, length_penalty=length_penalty)
        for r in results:
            ids, score = ref[r.problem.id]
            assert r.best.token_ids == ids, (beams, r.problem.prompt)
            assert abs(r.best.score - score) < 1e-4
            ended_early += r.best.finished
            assert r.generated_tokens % beams == 0 and r.forward_passes >= 1
    assert ended_early > 100  # the EOS path of the algorithm was exercised, not only the length cap


def test_greedy_matches_generate():
    policy, problems = _policy("coupled"), _problems()
    results = run_search(problems, SearchConfig(strategy="greedy", max_new_tokens=MAX_NEW), policy)
    ref = _generate(policy, problems, do_sample=False)
    assert all(r.best.token_ids == ref[r.problem.id][0] for r in results)


def _hamming(results) -> int:
    """Pairwise Hamming distance within each returned set, summed over problems."""
    return sum(
        sum(a != b for a, b in zip(x.token_ids, y.token_ids)) + abs(len(x.token_ids) - len(y.token_ids))
        for r in results for i, x in enumerate(r.candidates) for y in r.candidates[i + 1 :]
    )


def test_diverse_beam_one_group_is_beam_and_groups_diversify():
    policy, problems = _policy("coupled"), _problems()[:40]
    plain = run_search(problems, SearchConfig(strategy="beam", beams=4, max_new_tokens=MAX_NEW), policy)
    one = run_search(problems, SearchConfig(strategy="diverse_beam", beams=4, groups=1, max_new_tokens=MAX_NEW), policy)
    assert [r.best.token_ids for r in one] == [r.best.token_ids for r in plain]
    assert [r.best.score for r in one] == pytest.approx([r.best.score for r in plain], abs=1e-4)
    # an untouched random model rarely ends early: the returned sets differ in their tokens, not their lengths
    model, tok = build_builtin_policy(BuiltinConfig(seed=1))
    policy = Policy(model.eval(), tok, "tiny")
    plain = run_search(problems, SearchConfig(strategy="beam", beams=4, max_new_tokens=MAX_NEW), policy)
    diverse = run_search(problems, SearchConfig(strategy="diverse_beam", beams=4, groups=4, diversity_penalty=2.0, max_new_tokens=MAX_NEW), policy)
    first = lambda rs: sum(len({tuple(c.token_ids[:1]) for c in r.candidates}) for r in rs)  # noqa: E731
    assert first(diverse) > 2 * first(plain)
    assert _hamming(diverse) > 1.5 * _hamming(plain)
    assert all(len(r.candidates) == 4 for r in diverse)
