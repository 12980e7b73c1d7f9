import json
import time


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


def test_a_lone_surrogate_is_refused_per_line_and_field(tmp_path):
    from agent.store import Store

    path = tmp_path / "p.jsonl"
    bad = "a\ud800b"  # a lone surrogate: valid JSON (\ud800), not valid Unicode text: UTF-8 cannot encode it
    records = [
        {"prompt": "1+1=", "answer": "2", "id": "good1"},
        {"prompt": bad},
        {"prompt": "x", "answer": bad},
        {"prompt": "x", "id": bad},
        {"prompt": "x", "task": bad},
        {"prompt": "x", "meta": {"source": bad}},
        {"prompt": "x", "meta": {"tags": ["ok", {"deep": "\udfff"}]}},
        {"prompt": "x", "meta": {bad: 1}},
        {"prompt": "smile \U0001F600", "answer": "2", "id": "good2"},  # a surrogate pair in JSON is one character
        {"prompt": "x", "meta": {"note": "a\u0000b"}},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")  # json.dumps writes \ud800 as an escape
    problems, errors = read_problems(path)
    assert [p.id for p in problems] == ["good1", "good2"] and problems[1].prompt == "smile \U0001F600"
    messages = {e.line: e.message for e in errors}
    assert set(messages) == set(range(2, 9)) | {10}, messages
    for line, field in {2: "'prompt'", 3: "'answer'", 4: "'id'", 5: "'task'", 6: "'meta.source'",
                        7: "'meta.tags[1].deep'", 8: "'meta'"}.items():
        assert field in messages[line] and "surrogate" in messages[line], messages[line]
    assert "'meta.note'" in messages[10] and "NUL" in messages[10]
    for e in errors:
        str(e).encode("utf-8")  # an error line prints: the bad text is never echoed raw
    store = Store(f"sqlite:///{tmp_path / 'a.db'}")
    assert store.add_problems(problems) == ["good1", "good2"]  # what the reader keeps, the store takes


def test_demos_with_a_lone_surrogate_are_refused(tmp_path):
    from tasks.jsonl import read_demos

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n"
                    + json.dumps({"prompt": "1+1=", "completion": "2\udc80"}) + "\n")
    demos, errors = read_demos(path)
    assert demos == [{"prompt": "1+1=", "completion": "2"}]
    assert [e.line for e in errors] == [2] and "'completion'" in errors[0].message and "surrogate" in errors[0].message


def test_text_and_id_rules():
    from tasks.base import MAX_ID_CHARS, MAX_JOB_ID_CHARS
    from tasks.text import check_text, id_error

    assert check_text("plain text, caf\u00e9, \U0001F600, tab\tand newline\n", "prompt") is None
    assert check_text(42, "answer") is None and check_text(None, "meta") is None
    assert "NUL" in check_text("a\x00", "prompt") and "'prompt'" in check_text("a\x00", "prompt")
    assert "surrogate" in check_text("\ud83d", "prompt")  # half of a pair is a lone surrogate
    assert "'body.problems[0].prompt'" in check_text({"problems": [{"prompt": "\ud800"}]}, "body")
    deep = "x"
    for _ in range(5000):  # deeper than Python's recursion limit: the walk is not recursive
        deep = [deep]
    assert check_text(deep, "meta") is None
    # one id rule for problem ids and job ids: non-blank, bounded, no control characters, valid Unicode
    for good in ("ok1", "p-0123abcd", "add-train-d3-s0-1", "9f86d081884c7d659a2feaa0c55ad015",
                 "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "caf\u00e9 7", "i" * MAX_ID_CHARS):
        assert id_error(good) is None, good
    for bad in ("", "   ", "a\x00b", "a\ud800b", "line\nbreak", "tab\there", "del\x7f", "i" * (MAX_ID_CHARS + 1),
                5, None):
        assert id_error(bad) is not None, bad
    assert id_error("j" * MAX_JOB_ID_CHARS, max_chars=MAX_JOB_ID_CHARS) is None
    assert id_error("j" * 65, max_chars=MAX_JOB_ID_CHARS) is not None
    assert id_error("ok", "job id") is None
    assert "'job id'" in id_error("a\x00", "job id") and "NUL" in id_error("a\x00", "job id")
    assert str(MAX_ID_CHARS) in id_error("i" * 201, "id") and "control" in id_error("a\nb", "id")
