"""What a cycle of the loop works on, from the curriculum's frontier: the difficulties it trains on, the held-out
problems it is evaluated on, and the keys the gate judges by."""

from __future__ import annotations

from agent.config import LoopConfig
from agent.curriculum import Curriculum, ProblemSource
from agent.proposals import proposals_in_use
from tasks import Problem


DRAWS_PER_SEED = 1000  # a run's draws (cycle c's search and mix: c; its problem shares: 10c + share) stay below


def cycle_seed(seed: int, draw: int) -> int:
    """The seed of one draw of a run (a cycle's search and mix, one share of its problems): fixed by the run's seed
    and the draw alone, so that a resumed cycle draws what an uninterrupted run would have."""
    return seed * DRAWS_PER_SEED + draw


class CyclePlan:
    def __init__(self, cfg: LoopConfig, curriculum: Curriculum, source: ProblemSource):
        self.cfg = cfg
        self.curriculum = curriculum
        self.source = source
        self.task = source.task

    def stride(self, frontier_index: int | None) -> int:
        """How many difficulties apart the cycle's training lengths past the frontier lie."""
        return 1 if frontier_index is None else max(1, round((frontier_index + 1) * self.cfg.frontier_stride))

    def training_keys(self, frontier_index: int | None, metric: dict) -> list[str | None]:
        """The difficulty of each share of the cycle's problems (cfg.frontier_spread): the frontier, then difficulties
        `stride` apart past it, each brought back to the furthest one where the current policy finds labels
        (cfg.min_label_yield of `metric`, its gate metric; never before the frontier)."""
        if frontier_index is None:
            return [None] * len(self.cfg.frontier_spread)
        keys, stride, floor = self.curriculum.keys, self.stride(frontier_index), self.cfg.min_label_yield
        chosen = []
        for offset in range(len(self.cfg.frontier_spread)):
            i = min(frontier_index + offset * stride, self.curriculum.last_index(frontier_index))
            if floor is not None and self._labels_need_the_policy_right():
                while i > frontier_index and metric.get(keys[i], 0.0) < floor:
                    i -= 1
            chosen.append(keys[i])
        return chosen

    def _labels_need_the_policy_right(self) -> bool:
        """Label-free labels come from the search's own agreeing answers, unless the task proposes labels by
        decomposition (those need only the shorter lengths mastered)."""
        return self.cfg.select.mode == "label_free" and not proposals_in_use(self.task, self.cfg.select)

    def answers_teach_every_length(self) -> bool:
        """A user's file whose answers the run selects with: a problem the search fails trains on its own answer, so
        every length the file holds can be learned now, not only those next to the frontier (measured on rotate:
        the frontier's three lengths moved 6 letters from 0.00 to 0.18 in 13 cycles; all of them at once, see
        docs/benchmarks.md)."""
        cfg = self.cfg.select
        return cfg.mode == "verifier" and cfg.given_answers and not self.source.builtin

    def unmastered_keys(self, frontier_index: int | None) -> list[str]:
        """The frontier and every difficulty past it that a cycle may train on."""
        if frontier_index is None:
            return []
        return self.curriculum.keys[frontier_index: self.curriculum.last_index(frontier_index) + 1]

    def ahead(self, frontier_index: int | None) -> int:
        """How far past the frontier the held-out evaluation reaches: at least to the longest length trained on."""
        if self.answers_teach_every_length() and frontier_index is not None:
            return max(self.cfg.eval_ahead, len(self.unmastered_keys(frontier_index)) - 1)
        return max(self.cfg.eval_ahead, self.stride(frontier_index) * (len(self.cfg.frontier_spread) - 1))

    def heldout_problems(self, frontier_index: int | None) -> dict:
        ahead = self.ahead(frontier_index)
        heldout = self.source.heldout_set(
            self.curriculum.eval_keys(frontier_index, ahead, self.cfg.report_difficulties)
        )
        window = self.curriculum.keys_up_to(frontier_index, ahead)
        sample = self.cfg.heldout_past_window
        if sample is None or not window:
            return heldout
        first_sampled = self.curriculum.keys.index(window[-1]) + 1
        if self.cfg.full_heldout_ahead is not None and frontier_index is not None:
            first_sampled = min(first_sampled, frontier_index + self.cfg.full_heldout_ahead + 1)
        sampled = set(self.curriculum.keys[first_sampled:])
        return {k: problems[:sample] if k in sampled else problems for k, problems in heldout.items()}

    def gate_keys(self, frontier_index: int | None) -> list[str]:
        """The held-out keys promotion and the curriculum judge by: the window around the frontier and the report's
        difficulties below it. Without the easier ones a candidate that learned longer problems by forgetting shorter
        ones would pass, and the curriculum would keep them as mastered from an older evaluation (a run once ended
        with everything "mastered" while 24 digits had fallen from 1.00 to 0.87)."""
        window = self.curriculum.keys_up_to(frontier_index, self.ahead(frontier_index))
        report = {str(d) for d in self.cfg.report_difficulties}
        below = (
            [k for k in self.curriculum.keys[: self.curriculum.keys.index(window[0])] if k in report] if window else []
        )
        return below + window

    def problems(self, frontier_index: int | None, metric: dict, cycle: int) -> list[Problem]:
        """The cycle's training problems: cfg.frontier_spread's shares at training_keys (where answers teach every
        length: equal shares at each of them from the frontier on), each drawn from its own seed; on a built-in task
        at most cfg.answer_tokens_per_cycle problems x answer tokens, every share shrunk alike."""
        cfg = self.cfg
        if self.answers_teach_every_length() and frontier_index is not None:
            keys = self.unmastered_keys(frontier_index)
            counts = [cfg.problems_per_cycle // len(keys)] * len(keys)
        else:
            keys = self.training_keys(frontier_index, metric)
            counts = [int(cfg.problems_per_cycle * share) for share in cfg.frontier_spread]
        counts[0] += cfg.problems_per_cycle - sum(counts)  # rounding remainder goes to the frontier itself
        buckets = [self.source.train_problems(key, count, seed=cycle_seed(cfg.seed, cycle * 10 + offset))
                   for offset, (key, count) in enumerate(zip(keys, counts))]
        max_new_tokens = self.source.max_new_tokens([p for bucket in buckets for p in bucket])
        # a file task's max_new_tokens is a cap, not its answers' length: only a built-in task's is exact
        if cfg.answer_tokens_per_cycle is not None and self.source.builtin:
            scale = min(1.0, cfg.answer_tokens_per_cycle / (cfg.problems_per_cycle * max_new_tokens))
            buckets = [bucket[: max(1, round(len(bucket) * scale))] for bucket in buckets]
        return [p for bucket in buckets for p in bucket]
