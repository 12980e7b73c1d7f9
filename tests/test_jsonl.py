import json
import time

import pytest

from tasks import Problem, verify
from tasks.jsonl import MAX_PROMPT_CHARS, read_problems


def test_bad_lines_are_named_and_good_lines_kept(tmp_path):
    path = tmp_path / "problems.jsonl"
    lines = [
        json.dumps({"prompt": "12+34=", "answer": "46", "id": "ok1"}),
        "{not json",
        json.dumps({"answer": "1"}),
        json.dumps({"prompt": "x", "checker": "python_eval"}),
        json.dumps({"prompt": "x", "split": "test"}),
        json.dumps({"prompt": "y" * (MAX_PROMPT_CHARS + 1)}),
        json.dumps({"prompt": "what is 2+2?", "answer": 4, "checker": "numeric", "split": "heldout"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    problems, errors = read_problems(path)
    assert [p.id for p in problems] == ["ok1", problems[1].content_id()]
    assert problems[1].answer == "4" and problems[1].split == "heldout"
    messages = {e.line: e.message for e in errors}
    assert set(messages) == {2, 3, 4, 5, 6}
    assert "not valid JSON" in messages[2]
    assert "'prompt'" in messages[3]
    assert "'checker'" in messages[4] and "python_eval" in messages[4]
    assert "'split'" in messages[5]
    assert "limit" in messages[6]
    assert str(errors[0]).startswith(f"{path}:2:")


def test_default_ids_come_from_content_not_from_the_file_name(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "problems.jsonl", tmp_path / "b" / "problems.jsonl"
    a.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    b.write_text(json.dumps({"prompt": "9+9=", "answer": "18"}) + "\n" + json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    (pa,), errors_a = read_problems(a)
    (pb, pb_same), errors_b = read_problems(b)
    assert not errors_a and not errors_b
    assert pa.id != pb.id  # same file name, same line: different problems, different ids
    assert pa.id == pb_same.id  # the same problem has the same id wherever it comes from
    assert pa.id == Problem("1+1=", "2").content_id() and len(pa.id) <= 200


def test_ids_used_twice_in_one_file_are_reported_per_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "1+1=", "answer": "2", "id": "x"}),
        json.dumps({"prompt": "2+2=", "answer": "4", "id": "x"}),  # same id, another problem
        json.dumps({"prompt": "1+1=", "answer": "2", "id": "x"}),  # the same problem again
        json.dumps({"prompt": "3+3=", "answer": "6"}),
        json.dumps({"prompt": "3+3=", "answer": "6"}),  # the same problem again, default id
    ]) + "\n")
    problems, errors = read_problems(path)
    assert [p.prompt for p in problems] == ["1+1=", "3+3="]
    messages = {e.line: e.message for e in errors}
    assert set(messages) == {2, 3, 5}
    assert "different problem" in messages[2] and "'x'" in messages[2] and "line 1" in messages[2]
    assert "repeats" in messages[3] and "line 1" in messages[3]
    assert "repeats" in messages[5] and "line 4" in messages[5]


def test_bad_values_are_reported_per_line_before_they_reach_the_store(tmp_path):
    path = tmp_path / "p.jsonl"
    good = json.dumps({"prompt": "ok", "answer": "1"}).encode()
    lines = [
        good,
        b'{"prompt": "caf\xe9"}',  # Latin-1, not UTF-8
        json.dumps({"prompt": "x", "difficulty": "hard"}).encode(),
        json.dumps({"prompt": "x", "difficulty": 2**40}).encode(),
        json.dumps({"prompt": "x", "difficulty": True}).encode(),
        json.dumps({"prompt": "x", "id": "i" * 201}).encode(),
        json.dumps({"prompt": "x", "answer": "(a+)+$\\1", "checker": "regex"}).encode(),
        json.dumps({"prompt": "x", "answer": "(?<=a)b", "checker": "regex"}).encode(),
        b'{"prompt": "x", "answer": NaN}',
        b'{"prompt": "x", "answer": ' + b"1" * 5000 + b"}",
        b"[" * 100000 + b"]" * 100000,
        json.dumps({"prompt": "a\u0000b"}).encode(),
        json.dumps({"prompt": "x", "task": "t" * 81}).encode(),
        json.dumps({"prompt": "x", "id": ""}).encode(),
        json.dumps({"prompt": "x", "checker": ["exact"]}).encode(),
        json.dumps({"prompt": "caf\u00e9 \u2028 line", "answer": "a.b", "checker": "regex", "difficulty": 3}).encode(),
    ]
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # with a byte order mark
    problems, errors = read_problems(path)
    assert [p.prompt for p in problems] == ["ok", "caf\u00e9 \u2028 line"] and problems[1].difficulty == 3
    messages = {e.line: e.message for e in errors}
    assert set(messages) == set(range(2, 16)), messages
    assert "UTF-8" in messages[2]
    assert all("'difficulty'" in messages[n] for n in (3, 4, 5))
    assert "'id'" in messages[6] and "200" in messages[6]
    assert "RE2" in messages[7] and "RE2" in messages[8]
    assert all("JSON" in messages[n] for n in (9, 10, 11))
    assert "NUL" in messages[12] and "'task'" in messages[13] and "'id'" in messages[14] and "'checker'" in messages[15]


def test_regex_checker_matches_in_linear_time():
    evil = Problem("x", "(a+)+$", checker="regex")  # catastrophic for a backtracking engine
    t = time.monotonic()
    assert verify(evil, "a" * 100_000 + "!") is False
    assert time.monotonic() - t < 1.0
    assert verify(Problem("x", "a.b", checker="regex"), "a\nb") is True  # '.' spans lines, as before
    assert verify(Problem("x", "(a)\\1", checker="regex"), "aa") is False  # refused at load; never matches
