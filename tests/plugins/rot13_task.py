"""A task defined outside Arbor, for the plugin tests: rotate each letter 13 places."""

import codecs

from tasks import Problem, Task


class Rot13(Task):
    min_difficulty = 1

    def generate(self, difficulty: int, n: int, seed: int, split: str = "train") -> list[Problem]:
        import random

        rng = random.Random(f"rot13/{split}/{difficulty}/{seed}")
        words = ["".join(rng.choice("abcdefghijklm") for _ in range(difficulty)) for _ in range(n)]
        return [Problem(f"{w}>", codecs.encode(w, "rot13"), task=self.name, split=split, difficulty=difficulty,
                        id=f"rot13-{split}-{difficulty}-{seed}-{i}") for i, w in enumerate(words)]

    def label_checks(self):
        # rot13 is its own inverse, like reversal: the policy's rot13 of the answer must give the word back
        def inverse(problems, answers, solve):
            back = solve([Problem(f"{a}>") for a in answers])
            return [b.strip() == p.prompt[:-1] for p, b in zip(problems, back)]
        return {"inverse": inverse}


class NotATask:
    pass
