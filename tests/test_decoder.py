"""The Decoder: tree steps, compaction and chunked prefill against plain forwards of each sequence alone."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agent.config import BuiltinConfig

from agent.policy import build_builtin_policy, build_char_tokenizer
from search.decoder import Decoder, ancestor_matrix

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["12+34=", "5+7=", "1234+5678="]


def _random_llama(attn: str):
    tok = build_char_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tok


def _builtin(scheme: str):
    model, tok = build_builtin_policy(BuiltinConfig(position_scheme=scheme, seed=2))
    return model.eval(), tok


MODELS = {
    "llama-sdpa": lambda: _random_llama("sdpa"),
    "llama-eager": lambda: _random_llama("eager"),
    "builtin-coupled": lambda: _builtin("coupled"),
    "builtin-sequential": lambda: _builtin("sequential"),
}


def _random_tree(n: int, vocab: list[int], rng: random.Random):
    parents = [-1] + [rng.randrange(i) for i in range(1, n)]
    return parents, [rng.choice(vocab) for _ in range(n)]


def _path(parents: list[int], i: int) -> list[int]:
    chain = []
    while i != -1:
        chain.append(i)
        i = parents[i]
    return chain[::-1]


def _alone(model, ids: list[int]) -> torch.Tensor:
    """Last-position logits of one sequence run by itself, no cache, no padding."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("name", list(MODELS))
def test_tree_step_equals_each_path_alone(name):
    model, tok = MODELS[name]()
    decoder = Decoder(model, tok)
    rng = random.Random(1)
    vocab = [tok.convert_tokens_to_ids(c) for c in "0123456789+="]  # operand-like tokens exercise coupling
    for n in (1, 7, 24):
        parents, tree_tokens = _random_tree(n, vocab, rng)
        prompts = decoder.encode(PROMPTS)
        trees = [[rng.choice(vocab) for _ in range(n)] if b else tree_tokens for b in range(len(prompts))]
        with torch.no_grad():
            ids, mask = decoder.left_pad(prompts)
            cache, _ = decoder.prefill(ids, mask)
            logits = decoder.tree_step(ids, mask, cache, torch.tensor(trees), parents)
        assert logits.shape == (len(prompts), n, model.config.vocab_size)
        assert cache.get_seq_length() == ids.shape[1] + n
        for b, prompt in enumerate(prompts):
            for i in range(n):
                ref = _alone(model, prompt + [trees[b][j] for j in _path(parents, i)])
                assert torch.allclose(logits[b, i], ref, atol=1e-4), (name, n, b, i, (logits[b, i] - ref).abs().max())


@pytest.mark.parametrize("name", ["llama-sdpa", "builtin-coupled"])
def test_compacting_to_an_accepted_path_continues_like_plain_decoding(name):
    model, tok = MODELS[name]()
    decoder = Decoder(model, tok)
    parents = [-1, 0, 0, 1, 2, 3]
    digits = [tok.convert_tokens_to_ids(c) for c in "314159"]
    prompts = decoder.encode(PROMPTS[:2])
    with torch.no_grad():
        ids, mask = decoder.left_pad(prompts)
        cache, _ = decoder.prefill(ids, mask)
        T = ids.shape[1]
        decoder.tree_step(ids, mask, cache, torch.tensor([digits, digits]), parents)
        # row 0 keeps the path 0 -> 1 -> 3 -> 5, row 1 keeps 0 -> 2 -> 4 (padded with a repeat of its last node
        # and masked out, as a row that accepts fewer tokens does)
        keep_nodes = torch.tensor([[0, 1, 3, 5], [0, 2, 4, 4]])
        decoder.compact_tail(cache, T, keep_nodes)
        accepted = [[digits[j] for j in [0, 1, 3, 5]], [digits[j] for j in [0, 2, 4]]]
        nxt = tok.convert_tokens_to_ids("7")
        full = torch.cat([ids, torch.tensor([[digits[j] for j in row] for row in keep_nodes.tolist()])], dim=1)
        full_mask = torch.cat([mask, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])], dim=1)
        logits = decoder.step(torch.cat([full, torch.tensor([[nxt], [nxt]])], 1),
                              torch.cat([full_mask, torch.ones(2, 1, dtype=torch.long)], 1), cache)
    for b in (0, 1):  # row 1 has a masked hole where it accepted one token less: positions skip it
        ref = _alone(model, prompts[b] + accepted[b] + [nxt])
        assert torch.allclose(logits[b], ref, atol=1e-4), (name, b, (logits[b] - ref).abs().max())


def test_chunked_prefill_equals_one_prefill():
    model, tok = MODELS["builtin-sequential"]()
    long = ["1234567890+" * 6 + "=", "99+1="]
    whole = Decoder(model, tok).decode(long, max_new_tokens=6)
    chunked_decoder = Decoder(model, tok, prefill_chunk=16)
    chunked = chunked_decoder.decode(long, max_new_tokens=6)
    assert [d[0].token_ids for d in chunked] == [d[0].token_ids for d in whole]
    assert max(abs(a - b) for x, y in zip(chunked, whole) for a, b in zip(x[0].logprobs, y[0].logprobs)) < 1e-4
    assert chunked_decoder.forward_passes > 6  # 67 prompt tokens in chunks of 16, then the steps


def test_ancestor_matrix_rejects_trees_out_of_order():
    assert ancestor_matrix([-1, 0, 1, 0]).tolist() == [
        [True, False, False, False], [True, True, False, False], [True, True, True, False], [True, False, False, True]]
    with pytest.raises(ValueError, match="parents must come before"):
        ancestor_matrix([-1, 2, 0])
    with pytest.raises(ValueError, match="root"):
        ancestor_matrix([0, 0])
