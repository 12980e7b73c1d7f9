import pytest
import torch

from agent.policy import PolicyLoadError, build_builtin_policy, coupled_positions, load_policy


def test_builtin_size_and_roundtrip(tmp_path):
    model, tok = build_builtin_policy()
    assert 1_000_000 <= sum(p.numel() for p in model.parameters()) <= 5_000_000
    text = "0123+4567=\nhello, World!"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_policy(tmp_path)
    ids = tok(["12+34="], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-6)
    assert loaded_tok.decode(ids[0]) == "12+34="


def test_coupled_positions_follow_digit_columns():
    model, tok = build_builtin_policy()
    enc = tok(["321+654=9750"], return_tensors="pt")
    pos, operand = coupled_positions(model.config, enc.input_ids, enc.attention_mask)
    # a0 a1 a2 + b0 b1 b2 = s0 s1 s2 s3: digit i of both operands and the token predicting s_i share an id
    assert pos[0].tolist() == [1, 2, 3, 4, 1, 2, 3, 1, 2, 3, 4, 5]
    assert operand[0].tolist() == [True] * 7 + [False] * 5


def test_only_the_problems_own_line_holds_operands():
    """A refinement prompt shows earlier attempts on the lines above the problem: their digits are plain text
    (position 0, never masked), and the problem's operands and answer are numbered as without them."""
    model, tok = build_builtin_policy()
    plain = tok(["321+654=9750"], return_tensors="pt")
    shown = tok(["# attempt: 0751\n# feedback: rejected\n321+654=9750"], return_tensors="pt")
    pos, operand = coupled_positions(model.config, shown.input_ids, shown.attention_mask)
    plain_pos, plain_operand = coupled_positions(model.config, plain.input_ids, plain.attention_mask)
    n = plain.input_ids.shape[1]
    assert pos[0, -n:].tolist() == plain_pos[0].tolist() and operand[0, -n:].tolist() == plain_operand[0].tolist()
    assert pos[0, :-n].eq(0).all() and not operand[0, :-n].any()
    # the attempt's last digit would be a masked operand above the first query's position: as text, it is seen
    with torch.no_grad():
        a = model(**tok(["# attempt: 0751\n321+654="], return_tensors="pt")).logits[0, -1]
        b = model(**tok(["# attempt: 9999\n321+654="], return_tensors="pt")).logits[0, -1]
    assert not torch.equal(a, b)


def test_backward_coupling_pairs_a_word_with_its_reversal():
    from tasks import get_task

    model, tok = build_builtin_policy(coupling=get_task("reversal").coupling)
    enc = tok(["abcd<dcba", "xy<yx"], return_tensors="pt", padding=True)
    pos, operand = coupled_positions(model.config, enc.input_ids, enc.attention_mask)
    # the word counts back from its end; '<' predicts the last letter (both 1), answer letter j sits at j + 2,
    # beside the word letter it predicts next
    assert pos[0].tolist() == [4, 3, 2, 1, 1, 2, 3, 4, 5]
    assert pos[1, -5:].tolist() == [2, 1, 1, 2, 3]  # padding changes nothing
    assert operand[0].tolist() == [True] * 4 + [False] * 5
    # a query may not see word letters numbered above its own: '<' sees only the last letter
    with torch.no_grad():
        a = model(**tok(["abcd<"], return_tensors="pt")).logits[0, -1]
        b = model(**tok(["zbcd<"], return_tensors="pt")).logits[0, -1]
    assert torch.equal(a, b)


@pytest.mark.parametrize("task,prompts", [("addition", ["123+456=", "9+9="]), ("reversal", ["abcdef<", "xy<"])])
def test_incremental_decoding_matches_full_forward(task, prompts):
    """generate (KV cache, positions from prepare_inputs_for_generation) agrees with one full forward."""
    from tasks import get_task

    model, tok = build_builtin_policy(coupling=get_task(task).coupling)
    model.eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    new = out[:, enc.input_ids.shape[1]:]
    mask = torch.cat([enc.attention_mask, torch.ones_like(new)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=out, attention_mask=mask).logits
    assert torch.equal(logits[:, enc.input_ids.shape[1] - 1 : -1].argmax(-1), new)


def test_not_a_model_folder_gives_one_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    try:
        load_policy(tmp_path)
    except PolicyLoadError as exc:
        assert "not a model folder" in str(exc) and str(tmp_path) in str(exc)
    else:
        raise AssertionError("loading a folder without a model must fail")
    (tmp_path / "config.json").write_text("{not json")
    try:
        load_policy(tmp_path)
    except PolicyLoadError as exc:
        assert "could not be loaded" in str(exc)
    else:
        raise AssertionError("a corrupt config must fail")


def _protocol_members(protocol) -> set[str]:
    return {name for name in vars(protocol) if not name.startswith("_")}


def test_a_loaded_policy_is_what_search_needs(tmp_path):
    from agent.policy import Policy
    from search import SearchPolicy

    model, tok = build_builtin_policy()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    policy = Policy.load(tmp_path)
    assert isinstance(policy, SearchPolicy) and isinstance(Policy(model, tok), SearchPolicy)
    assert _protocol_members(SearchPolicy) == {"model", "tokenizer", "version", "prompt_format", "draft_source",
                                                "memory_cache_factory"}
    bare = type("Bare", (), {"model": model, "tokenizer": tok, "version": "v"})()  # no drafts, no context memory
    assert not isinstance(bare, SearchPolicy)


def test_search_uses_nothing_of_a_policy_beyond_its_protocol():
    import ast
    from pathlib import Path

    from search import SearchPolicy

    used = set()
    for path in (Path(__file__).resolve().parents[1] / "search").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "policy":
                used.add(node.attr)
    assert used == _protocol_members(SearchPolicy)
