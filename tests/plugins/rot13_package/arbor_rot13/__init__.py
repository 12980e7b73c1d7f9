"""Rotate each letter 13 places: a task family that lives outside Arbor."""

import codecs
import random

from tasks import Problem, Task


class Rot13(Task):
    min_difficulty = 1

    def generate(self, difficulty: int, n: int, seed: int, split: str = "train") -> list[Problem]:
        rng = random.Random(f"rot13/{split}/{difficulty}/{seed}")
        words = ["".join(rng.choice("abcdefghijklm") for _ in range(difficulty)) for _ in range(n)]
        return [Problem(f"{w}>", codecs.encode(w, "rot13"), task=self.name, split=split, difficulty=difficulty,
                        id=f"rot13-{split}-{difficulty}-{seed}-{i}") for i, w in enumerate(words)]

    def max_new_tokens(self, difficulty: int) -> int:
        return difficulty + 2

    def label_checks(self):
        def inverse(problems, answers, solve):
            """rot13 undoes itself: the policy's rot13 of the answer must give the word back."""
            back = solve([Problem(f"{a}>", task=self.name) for a in answers])
            return [b.strip() == p.prompt[:-1] for p, b in zip(problems, back)]
        return {"inverse": inverse}
