"""The context memory (memory/context.py) on tiny real models: exact when its window covers the input, block
bookkeeping (what leaves the window, representatives, offload and reload), bounded residency, and a refinement
job whose history is longer than the policy's trained window."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from agent.config import BuiltinConfig

from agent.policy import Policy, build_builtin_policy
from agent.refine import refine
from memory.context import ContextMemory, ContextMemoryConfig, Rotary, representative
from search import SearchConfig
from search.decoder import Decoder
from tasks import Problem

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "


def _builtin(seed=0, window=256):
    model, tok = build_builtin_policy(BuiltinConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                                    max_positions=window, position_scheme="sequential", seed=seed))
    return model.eval(), tok


def _qwen_gqa(tok):
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).eval()


model_tok = _builtin()


@pytest.mark.parametrize("kind", ["builtin", "qwen2_gqa"])
@torch.inference_mode()
def test_window_covering_the_input_equals_full_attention(kind):
    tok = model_tok[1]
    model = model_tok[0] if kind == "builtin" else _qwen_gqa(tok)
    prompts = [TEXT * 2, "a short one"]  # left padding in the second row
    plain = Decoder(model, tok, prefill_chunk=24)
    wide = ContextMemoryConfig(n_init=4, n_local=4096, block_size=16, topk=2, exec_chunk=8)
    memory = Decoder(model, tok, prefill_chunk=24, cache_factory=lambda m: ContextMemory(m, wide))
    ids, mask = plain.left_pad(plain.encode(prompts))
    c0, l0 = plain.prefill(ids, mask)
    c1, l1 = memory.prefill(ids, mask)  # chunked prefill: 24-token forwards, 8-query spans inside
    assert isinstance(c1, ContextMemory) and c1.block_count() == 0
    torch.testing.assert_close(l1, l0, atol=1e-4, rtol=1e-4)
    for _ in range(4):  # one-token steps after the prefill
        token = l0.argmax(-1)
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        l0, l1 = plain.step(ids, mask, c0), memory.step(ids, mask, c1)
        torch.testing.assert_close(l1, l0, atol=1e-4, rtol=1e-4)
    # the whole sampling loop, n samples from one prefill (rows repeated inside the memory)
    assert [d.token_ids for d in memory.decode(prompts, max_new_tokens=6)[1]] == \
        [d.token_ids for d in plain.decode(prompts, max_new_tokens=6)[1]]
    # a model switched to the memory's attention still runs plain caches exactly (its sdpa fallback)
    assert model.config._attn_implementation == "arbor_context_memory"
    _, again = plain.prefill(ids[:, :-4], mask[:, :-4])
    assert torch.isfinite(again).all()


@torch.inference_mode()
def test_block_bookkeeping_offload_and_reload():
    model, tok = model_tok
    cfg = ContextMemoryConfig(n_init=4, n_local=16, block_size=8, topk=2, repr_topk=3, exec_chunk=4, max_cached=2)
    dec = Decoder(model, tok, prefill_chunk=24, cache_factory=lambda m: ContextMemory(m, cfg))
    ids, mask = dec.left_pad(dec.encode([TEXT[:70], TEXT[:45]]))  # rows of 70 and 45 real tokens
    cache, _ = dec.prefill(ids, mask)
    assert cache.get_seq_length() == 70  # the Decoder's count: input columns, padding included
    # reference keys: a plain cache holds them rotated at positions 0..T-1; the memory keeps them pre-RoPE
    plain = DynamicCache(config=model.config)
    model(input_ids=ids[:1], cache=plain, use_cache=True)
    rot = Rotary(model)
    raw = rot(plain.layers[0].keys[0], -torch.arange(70))  # layer 0 [H, 70, D] pre-RoPE (its keys see no attention)
    for layer_idx, layer in enumerate(cache.layers):
        row = layer.rows[0]
        # 70 tokens: 15 stay in the window (n_local - 1), the first 4 to leave are the initial tokens,
        # the next 48 make 6 blocks of 8, and 3 wait in the remainder
        assert row.count == 70 and row.recent_k.shape[1] == 15 and row.init_k.shape[1] == 4
        assert len(row.store) == 6 and row.rem_k.shape[1] == 3
        assert all(k.device.type == "cpu" for k in row.store.keys)  # blocks live off the accelerator
        assert layer.rows[1].count == 45 and len(layer.rows[1].store) == 3  # the padded row: its own 45 tokens
        # retrieval loaded blocks; the device cache never holds more than max_cached
        assert row.store.loads >= 2 and len(row.store.cached) <= 2
        if layer_idx == 0:  # which token went where: the exact pre-RoPE keys
            torch.testing.assert_close(row.init_k, raw[:, :4], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(row.recent_k, raw[:, -15:], atol=1e-5, rtol=1e-5)
            for b in range(6):
                torch.testing.assert_close(row.store.keys[b], raw[:, 4 + 8 * b: 12 + 8 * b], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(row.rem_k, raw[:, 52:55], atol=1e-5, rtol=1e-5)
    # reload: a block evicted from the device cache comes back with the same contents
    store = cache.layers[0].rows[0].store
    evicted = next(i for i in range(6) if i not in store.cached)
    loads = store.loads
    k, v = store.fetch([evicted])
    assert store.loads == loads + 1 and evicted in store.cached and len(store.cached) <= 2
    torch.testing.assert_close(k, store.keys[evicted])
    torch.testing.assert_close(v, store.values[evicted])
    # representatives: per query head, the mean key of the r most-attended tokens
    keys = torch.randn(2, 8, 4)
    score = torch.zeros(4, 8)
    score[:, [1, 5, 6]] = 1.0
    rep = representative(keys, score, 3).reshape(4, 4)
    torch.testing.assert_close(rep[0], keys[0, [1, 5, 6]].mean(0))  # query heads 0-1 read key head 0 (grouped)
    torch.testing.assert_close(rep[3], keys[1, [1, 5, 6]].mean(0))
    # a forked row (beam, n samples) shares the stored blocks but owns its index and later blocks
    cache.batch_select_indices(torch.tensor([0, 0]))
    a, b = cache.layers[0].rows
    assert a.store.keys[0] is b.store.keys[0] and a.store is not b.store and a.store.index is None


@torch.inference_mode()
def test_resident_keys_and_values_stay_bounded():
    model, tok = model_tok
    cfg = ContextMemoryConfig(n_init=4, n_local=32, block_size=8, topk=2, exec_chunk=8, max_cached=4)
    sliding = replace(cfg, topk=0)
    sizes = {}
    for name, c in (("memory", cfg), ("sliding", sliding)):
        dec = Decoder(model, tok, prefill_chunk=64, cache_factory=lambda m, c=c: ContextMemory(m, c))
        for n in (300, 1200):
            ids, mask = dec.left_pad(dec.encode([(TEXT * 20)[:n]]))
            cache, logits = dec.prefill(ids, mask)
            assert torch.isfinite(logits).all()
            sizes[name, n] = cache.nbytes()
    bytes_per_token = 2 * 2 * 4 * 16 * 4  # layers * (k, v) * heads * head_dim * float32
    bound = (cfg.n_init + cfg.n_local + cfg.block_size + cfg.max_cached * cfg.block_size) * bytes_per_token
    assert sizes["memory", 300][0] <= bound and sizes["memory", 1200][0] <= bound
    assert sizes["memory", 1200][1] > 3 * sizes["memory", 300][1]  # the offloaded blocks grow with the input
    assert sizes["sliding", 1200] == sizes["sliding", 300] and sizes["sliding", 1200][1] == 0  # nothing kept


def _history_policy(window: int):
    """A tiny sequential policy trained to answer (last attempt's digit + 1) mod 10, or 0 without an attempt, on
    prompts within its window (at most two attempts); trained until it is right on a held batch. One layer: the
    digit sits at a fixed distance before the answer."""
    model, tok = build_builtin_policy(BuiltinConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                                                    max_positions=window, position_scheme="sequential", seed=3))
    rng = random.Random(0)
    chunk = "# attempt: {}\n# feedback: rejected by the exact checker\n"

    def batch(n):
        texts, answers = [], []
        for _ in range(n):
            digits = [rng.randrange(10) for _ in range(rng.randint(0, 2))]
            texts.append("".join(chunk.format(d) for d in digits) + "next=")
            answers.append(str((digits[-1] + 1) % 10) if digits else "0")
        enc = tok([t + a for t, a in zip(texts, answers)], add_special_tokens=False, padding=True, return_tensors="pt")
        ids = torch.cat([enc.input_ids, torch.full_like(enc.input_ids[:, :1], tok.eos_token_id)], 1)
        mask = torch.cat([enc.attention_mask, torch.ones_like(enc.attention_mask[:, :1])], 1)
        labels = torch.full_like(ids, -100)
        labels[:, -2:] = ids[:, -2:]  # the loss is on the answer and EOS only (left padding)
        return {"input_ids": ids, "attention_mask": mask}, labels

    held, held_labels = batch(64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(1500):
        model.train()
        enc, labels = batch(32)
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 9:
            model.eval()
            with torch.no_grad():
                pred = model(**held).logits[:, -3:-1].argmax(-1)  # the positions that predict the digit and EOS
            if bool((pred == held_labels[:, -2:]).all()):
                break
    model.eval()
    return Policy(model, tok, "history-test")


def test_refinement_job_with_history_longer_than_window_solves_its_problem():
    window = 128
    policy = _history_policy(window)
    cfg = SearchConfig(strategy="greedy", max_new_tokens=3)
    seen = []
    results = refine(Problem("next=", "7", id="h"), policy, cfg, rounds=10,
                     on_round=lambda r, x: seen.append((len(x.result.problem.prompt), x.best.completion)))
    # each round answers from the last attempt in its prompt; the job ends at the first verified attempt
    assert results[-1].best.verified and seen[-1][1] == "7" and len(results) >= 6, seen
    assert [c for _, c in seen[:3]] == ["0", "1", "2"], seen
    assert seen[-1][0] > 2.5 * window  # the last prompt: six or seven attempts with feedback
    # the rounds past the window went through the context memory: the model now runs the memory's attention
    assert policy.model.config._attn_implementation == "arbor_context_memory"


def test_memory_flag_on_a_model_that_cannot_run_it_is_one_line(tmp_path):
    from arbor.cli import app

    coupled, tok = build_builtin_policy(BuiltinConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2))
    coupled.save_pretrained(tmp_path / "coupled")
    tok.save_pretrained(tmp_path / "coupled")
    res = CliRunner().invoke(app, ["search", "--model", str(tmp_path / "coupled"), "--memory", "--prompt", "1+1="])
    assert res.exit_code != 0 and "context memory needs sequential positions" in res.output
    assert "Traceback" not in res.output
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    res = CliRunner().invoke(app, ["search", "--model", str(tmp_path / "gpt2"), "--memory", "--prompt", "1+1="])
    assert res.exit_code != 0 and "needs a Llama-architecture model" in res.output and "'gpt2'" in res.output
    with pytest.raises(ValueError, match="greedy, best_of_n, beam, diverse_beam and auto"):
        SearchConfig(strategy="mcts", memory=True)


@pytest.mark.parametrize("strategy", ["beam", "best_of_n"])
def test_search_with_memory_equals_plain_search_inside_the_window(strategy):
    from search import run_search

    model, tok = model_tok
    policy = Policy(model, tok, "t")
    problems = [Problem(TEXT[:50], id="a"), Problem(TEXT[:20], id="b")]  # padded together, well inside the window
    cfg = SearchConfig(strategy=strategy, beams=2, n=3, max_new_tokens=4, temperature=1.0, seed=0)
    plain = run_search(problems, cfg, policy)
    memory = run_search(problems, replace(cfg, memory=True), policy)  # rows repeated and reordered inside the memory
    assert [[c.token_ids for c in r.candidates] for r in memory] == [[c.token_ids for c in r.candidates] for r in plain]
