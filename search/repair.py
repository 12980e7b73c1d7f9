"""Repair: a rejected answer changed at its least confident token, the rest decoded greedily.

A policy's confident mistake is usually one wrong step (a carry in addition) that the rest of the answer follows
from: the model's margin there, log p(chosen) - log p(best other token), is small. `branch_points` scores every
token of an answer by that margin in one teacher-forced forward pass; `repair` takes a branch (the answer's tokens
before it, the other token at it) and decodes the rest greedily, so one repair costs the tokens after the branch.
Refinement (agent/refine.py) tries a rejected answer's branches in order of margin, and so does adaptive search
(search/adaptive.py) with an untrusted greedy answer before it samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from search.decoder import Decoder
from search.prompt_format import PromptFormat, formatted_problems
from search.types import Candidate, SearchPolicy, SearchResult, confidence
from tasks import Problem, verify


@dataclass(frozen=True, order=True)
class Branch:
    margin: float  # log p(chosen) - log p(other) at the branch: the smaller, the likelier the mistake is there
    position: int  # index into the answer's tokens
    token: int  # the other token
    prefix: tuple[int, ...]  # the answer's tokens before the branch
    logprobs: tuple[float, ...]  # the model's log-probs of the prefix and of `token`


def _right_padded(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    # right padding keeps every real token at its own position, for position-coupled and plain models alike
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _encoded_prompts(decoder: Decoder, policy: SearchPolicy, problems: list[Problem],
                     fmt: PromptFormat | None) -> list[list[int]]:
    """The problems' prompts as token ids, in `fmt` (default: the version's own format)."""
    return decoder.encode([p.prompt for p in formatted_problems(problems, fmt or policy.prompt_format,
                                                                policy.tokenizer)])


@torch.inference_mode()
def branch_points(policy: SearchPolicy, problems: list[Problem], answers: list[Candidate],
                  starts: list[int] | None = None, fmt: PromptFormat | None = None) -> list[list[Branch]]:
    """Each answer's branches at its tokens from `starts` on (default: all), smallest margin first: one batched
    forward over prompt + answer (+ EOS where it finished: a branch there goes on instead of stopping). Special
    tokens (EOS, padding) are never the other token. `fmt`: how the prompts are put to the policy (default: the
    version's own format; a search whose problems are already formatted passes raw)."""
    decoder = Decoder(policy.model, policy.tokenizer)
    prompts = _encoded_prompts(decoder, policy, problems, fmt)
    # a finished answer's last step chose EOS: stopping there can be the mistake too (a word cut short)
    chosen_lists = [a.token_ids + ([decoder.eos] if a.finished else []) for a in answers]
    ids, mask = _right_padded([p + c for p, c in zip(prompts, chosen_lists)], decoder.pad, decoder.device)
    logprobs = torch.log_softmax(policy.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    special = [t for t in {decoder.eos, decoder.pad, policy.tokenizer.unk_token_id} if t is not None]
    out = []
    for row, (prompt, answer, chosen_list) in enumerate(zip(prompts, answers, chosen_lists)):
        n = len(chosen_list)
        if n == 0:
            out.append([])
            continue
        steps = logprobs[row, len(prompt) - 1: len(prompt) - 1 + n]  # the distributions that chose each token
        chosen_ids = torch.tensor(chosen_list, device=steps.device)
        chosen = steps.gather(1, chosen_ids[:, None])[:, 0]
        others = steps.clone()
        others[torch.arange(n), chosen_ids] = float("-inf")
        others[:, special] = float("-inf")
        best, token = others.max(dim=1)
        chosen, best, token = chosen.tolist(), best.tolist(), token.tolist()
        start = starts[row] if starts is not None else 0
        out.append(sorted(Branch(chosen[t] - best[t], t, token[t], tuple(answer.token_ids[:t]),
                                 tuple(chosen[:t]) + (best[t],))
                          for t in range(start, n)))
    return out


def repair(policy: SearchPolicy, problems: list[Problem], branches: list[Branch], max_new_tokens: int,
           strategy: str = "repair", fmt: PromptFormat | None = None) -> list[SearchResult]:
    """Each problem's answer from its branch: the prefix, the other token, then greedy decoding to the end. The
    candidate's log-probs are the model's own over the whole answer; its tokens count only what was decoded."""
    decoder = Decoder(policy.model, policy.tokenizer)
    prompts = _encoded_prompts(decoder, policy, problems, fmt)
    heads = [list(b.prefix) + [b.token] for b in branches]
    budgets = [max(1, max_new_tokens - len(h)) for h in heads]
    # one batch decoded to the longest budget; a row past its own budget is cut there, as if it had stopped
    decoded = [d[0] for d in decoder.decode_ids([p + h for p, h in zip(prompts, heads)], n=1, temperature=0.0,
                                                max_new_tokens=max(budgets))] if problems else []
    results = []
    for problem, branch, head, d, budget in zip(problems, branches, heads, decoded, budgets):
        cut = len(d.token_ids) > budget
        tail, tail_logprobs, tail_entropies = d.token_ids[:budget], d.logprobs[:budget], d.entropies[:budget]
        finished = d.finished and not cut
        token_ids = head + tail
        text = policy.tokenizer.decode(token_ids, skip_special_tokens=True)
        logprobs = list(branch.logprobs) + tail_logprobs
        entropies = [0.0] * len(branch.logprobs) + tail_entropies  # not known before the branch: no spread claimed
        stats = confidence(logprobs, entropies)
        candidate = Candidate(completion=text, token_ids=token_ids, finished=finished,
                              verified=verify(problem, text), score=stats["mean_logprob"], logprobs=logprobs, **stats)
        results.append(SearchResult(problem, [candidate], strategy, policy.version,
                                    generated_tokens=len(tail) + int(finished), forward_passes=d.forward_passes))
    return results
