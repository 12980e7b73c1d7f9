import random
import string

from tasks.alignment import infer_coupling

MIRROR = str.maketrans(string.ascii_lowercase, string.ascii_lowercase[::-1])


def _words(n, rng):
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 8))) for _ in range(n)]


def test_a_per_character_map_is_coupled_forward_and_a_reversal_backward():
    words = _words(200, random.Random(0))
    mirror = infer_coupling([(f"{w}|", w.translate(MIRROR)) for w in words])
    assert mirror is not None and (mirror.separator, mirror.order) == ("|", "forward")
    assert set(mirror.operand_chars) == set("".join(words))
    backward = infer_coupling([(f"{w}<", w[::-1]) for w in words])
    assert backward is not None and backward.order == "backward"


def test_tasks_without_that_alignment_keep_sequential_positions():
    words = _words(200, random.Random(1))
    assert infer_coupling([(f"{w}|", "".join(sorted(w))) for w in words]) is None  # sorting: no place-to-place map
    assert infer_coupling([(f"{w}|", str(len(w))) for w in words]) is None  # lengths differ, other alphabet
    assert infer_coupling([(f"{w}{'|' if i % 2 else '='}", w) for i, w in enumerate(words)]) is None  # two separators
    assert infer_coupling([("ab|", "zy")] * 5) is None  # too few examples to tell


def test_a_files_fresh_policy_couples_positions_when_its_examples_align(tmp_path):
    import json
    from dataclasses import replace

    from agent.config import LoopConfig
    from agent.registry import PolicyRegistry
    from agent.warm_start import fresh_builtin_for_files
    from agent.store import Store
    from tasks.jsonl import read_problems

    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{w}|", "answer": w.translate(MIRROR)}) + "\n"
                            for w in sorted(set(_words(60, random.Random(2))))))
    problems, _ = read_problems(path)
    store = Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    registry = PolicyRegistry(tmp_path / "policies", store)
    events = []
    with_answers = replace(LoopConfig(), select=replace(LoopConfig().select, mode="verifier"))  # as answered files make it
    version = fresh_builtin_for_files(registry, problems, None, with_answers, lambda kind, msg: events.append(msg), "r")
    config = registry.load(version).model.config
    assert config.position_scheme == "coupled" and config.equals_token_id is not None
    assert any("couples their positions" in e for e in events)
    # label-free, the problems' answers are not read, and without demonstrations nothing shows an alignment
    label_free = replace(LoopConfig(), select=replace(LoopConfig().select, mode="label_free"))
    version = fresh_builtin_for_files(registry, problems, None, label_free, lambda kind, msg: None, "r2")
    assert registry.load(version).model.config.position_scheme == "sequential"
