import json

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
    assert [p.id for p in problems] == ["ok1", "problems-7"]
    assert problems[1].answer == "4" and problems[1].split == "heldout"
    messages = {e.line: e.message for e in errors}
    assert set(messages) == {2, 3, 4, 5, 6}
    assert "not valid JSON" in messages[2]
    assert "'prompt'" in messages[3]
    assert "'checker'" in messages[4] and "python_eval" in messages[4]
    assert "'split'" in messages[5]
    assert "limit" in messages[6]
    assert str(errors[0]).startswith(f"{path}:2:")
