"""Fuzz: 10,000 generated problem lines and 2,000 generated search settings. Every bad line is one clear
per-line error, every good line is kept as written, nothing crashes or hangs."""

import json
import math
import random
import time

from search import SearchConfig
from tasks.jsonl import read_problems


def _good(rng: random.Random, i: int) -> dict:
    record = {"prompt": f"{rng.randrange(10**6)}+{i}=", "id": f"g{i}"}
    if rng.random() < 0.7:
        record["answer"] = str(rng.randrange(10**7))
    if rng.random() < 0.3:
        record["checker"] = rng.choice(["exact", "numeric"])
    if rng.random() < 0.2:
        record["checker"], record["answer"] = "regex", rng.choice([r"\d+", r"[0-9]{1,9}", r"(\d+)+x"])
    if rng.random() < 0.3:
        record["split"] = rng.choice(["train", "heldout"])
    if rng.random() < 0.3:
        record["difficulty"] = rng.randrange(1, 40)
    if rng.random() < 0.2:
        record["meta"] = {"source": rng.choice(["a", "b"]), "n": rng.randrange(5)}
    return record


# each maker returns the raw bytes of one bad line
BAD = [
    lambda rng, i: b'{"prompt": "1+1=", "id": "b' + str(i).encode() + b'"',  # truncated JSON
    lambda rng, i: json.dumps(rng.choice([[1, 2], 3, "text", None, True])).encode(),  # not an object
    lambda rng, i: json.dumps({"answer": "2", "id": f"b{i}"}).encode(),  # no prompt
    lambda rng, i: json.dumps({"prompt": rng.choice(["", 5, None, ["x"], {"a": 1}]), "id": f"b{i}"}).encode(),
    lambda rng, i: json.dumps({"prompt": "1+1=", "checker": rng.choice(["python", "eval", "", 3]), "id": f"b{i}"}).encode(),
    lambda rng, i: json.dumps({"prompt": "1+1=", "split": rng.choice(["test", "", 1]), "id": f"b{i}"}).encode(),
    lambda rng, i: json.dumps({"prompt": "1+1=", "difficulty": rng.choice(["hard", 1.5, -3, 10**30]), "id": f"b{i}"}).encode(),
    lambda rng, i: json.dumps({"prompt": "1+1=", "id": "x" * 5000}).encode(),  # id too long
    lambda rng, i: json.dumps({"prompt": "1+1=", "checker": "regex", "answer": rng.choice(["(", "[a-", "*x"]), "id": f"b{i}"}).encode(),
    lambda rng, i: b'{"prompt": "1+1=", "answer": NaN, "id": "b' + str(i).encode() + b'"}',
    lambda rng, i: b'{"prompt": "\xff\xfe1+1=", "id": "b' + str(i).encode() + b'"}',  # not UTF-8
    lambda rng, i: ("[" * 5000 + "]" * 5000).encode(),  # deep nesting
    lambda rng, i: json.dumps({"prompt": "1+1=", "meta": rng.choice([[1], "m", 3]), "id": f"b{i}"}).encode(),
    lambda rng, i: json.dumps({"prompt": "x" * 20000, "id": f"b{i}"}).encode(),  # oversized prompt
]


def test_ten_thousand_generated_problem_lines(tmp_path):
    rng = random.Random(0)
    lines, good, bad_lines = [], [], set()
    for i in range(10_000):
        if rng.random() < 0.4:
            lines.append(rng.choice(BAD)(rng, i))
            bad_lines.add(len(lines))
        else:
            record = _good(rng, i)
            good.append(record)
            lines.append(json.dumps(record).encode())
        if rng.random() < 0.02:
            lines.append(b"   ")  # blank lines are skipped silently
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    start = time.monotonic()
    problems, errors = read_problems(path)
    assert time.monotonic() - start < 60  # no pathological input makes reading hang
    assert {e.line for e in errors} == bad_lines and len(errors) == len(bad_lines)
    for e in errors:
        assert "\n" not in str(e) and str(e).startswith(f"{path}:{e.line}: ")
    assert [p.id for p in problems] == [r["id"] for r in good]
    for p, r in zip(problems, good):
        assert p.prompt == r["prompt"] and p.answer == r.get("answer") and p.checker == r.get("checker", "exact")
        assert p.split == r.get("split", "train") and p.difficulty == r.get("difficulty")


def _value(rng: random.Random):
    return rng.choice([
        rng.randrange(-5, 10), rng.randrange(10**3, 10**12), rng.random() * rng.choice([1, 100, -1]),
        math.nan, math.inf, "", "beam", "mcts", "min_logprob", "verifier+min_logprob", "nonsense+x", None, True,
        [1], {"a": 1},
    ])


def test_two_thousand_generated_search_settings():
    rng = random.Random(1)
    names = list(SearchConfig.__dataclass_fields__) + ["not_a_field"]
    accepted = 0
    for _ in range(2000):
        settings = {name: _value(rng) for name in rng.sample(names, rng.randint(1, 6))}
        try:
            cfg = SearchConfig(**settings)
        except (ValueError, TypeError) as exc:
            assert str(exc) and "\n" not in str(exc), settings
            continue
        accepted += 1
        # whatever is accepted is bounded: no setting may make a worker allocate without limit
        assert 1 <= cfg.max_new_tokens <= 32768 and 1 <= cfg.n and 1 <= cfg.beams and 1 <= cfg.simulations
        assert cfg.max_rows >= 1 and cfg.temperature >= 0
    assert accepted > 0
