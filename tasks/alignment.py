"""Position coupling read off a task's examples, for a task given only as files.

When each answer character is made from the prompt character at the same place (counted from the start, or
from the end), a fresh built-in policy can number the two together, as the built-in families do
(agent/policy.py): the alignment is then the same at every length instead of a distance the model must count.
"""

from __future__ import annotations

from collections import Counter

from tasks.base import PositionCoupling

MIN_AGREEMENT = 0.95  # share of examples (and of aligned characters) the coupling must explain
MIN_EXAMPLES = 20


def infer_coupling(pairs: list[tuple[str, str]]) -> PositionCoupling | None:
    """The coupling that (prompt, answer) pairs follow, or None. It is found when every prompt ends with one
    separator character used nowhere else in the prompts, the text before it is as long as the answer in at least
    95% of pairs, the answers use only characters of that text's alphabet (they are numbered as one run after the
    separator), and one order explains them: answer[i] determined by text[i] (forward) or by text[-1 - i]
    (backward) in at least 95% of aligned characters."""
    pairs = [(p, a) for p, a in pairs if p and a]
    if len(pairs) < MIN_EXAMPLES:
        return None
    separator = pairs[0][0][-1]
    if any(p[-1] != separator or separator in p[:-1] for p, _ in pairs):
        return None
    operands = [(p[:-1], a) for p, a in pairs]
    aligned = [(o, a) for o, a in operands if len(o) == len(a)]
    if len(aligned) < MIN_AGREEMENT * len(pairs):
        return None
    alphabet = set("".join(o for o, _ in operands))
    if not set("".join(a for _, a in pairs)) <= alphabet:
        return None
    for order in ("forward", "backward"):
        if _agreement(aligned, order) >= MIN_AGREEMENT:
            return PositionCoupling(operand_chars="".join(sorted(alphabet)), separator=separator, order=order)
    return None


def _agreement(pairs: list[tuple[str, str]], order: str) -> float:
    """Share of aligned character pairs that the most common answer character of each operand character explains."""
    seen: dict[str, Counter] = {}
    for operand, answer in pairs:
        source = operand if order == "forward" else operand[::-1]
        for x, y in zip(source, answer):
            seen.setdefault(x, Counter())[y] += 1
    total = sum(sum(c.values()) for c in seen.values())
    return sum(c.most_common(1)[0][1] for c in seen.values()) / total if total else 0.0
