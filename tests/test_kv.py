"""The growing KV layer holds exactly what transformers' DynamicLayer holds, through every cache operation the
Decoder uses, and grows in place instead of copying at every step."""

import torch
from transformers.cache_utils import DynamicLayer

from search.decoder import Decoder
from search.kv import GrowingLayer


def _same(a, b):
    assert a.keys.shape == b.keys.shape
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_growing_layer_matches_dynamic_layer_through_cache_operations():
    torch.manual_seed(0)
    grow, plain = GrowingLayer(), DynamicLayer()
    B, H, D = 6, 2, 4

    def both(fn):
        fn(grow), fn(plain)
        _same(grow, plain)

    def add(n):
        k, v = torch.randn(grow.keys.shape[0] if grow.is_initialized and grow.keys.dim() == 4 else B, H, n, D), None
        v = torch.randn_like(k)
        out_g, out_p = grow.update(k, v), plain.update(k, v)
        assert torch.equal(out_g[0], out_p[0]) and torch.equal(out_g[1], out_p[1])
        _same(grow, plain)

    with torch.inference_mode():  # the Decoder's mode: views there record no base
        add(7)  # prefill
        for _ in range(5):
            add(1)
        both(lambda layer: layer.batch_select_indices(torch.tensor([0, 2, 3, 5])))  # finished rows leave
        add(1)
        both(lambda layer: layer.crop(-2))
        add(3)  # a tree step's nodes
        keep = torch.tensor([[0, 2], [1, 2], [0, 1], [2, 0]])
        both(lambda layer: Decoder.compact_tail(_Cache(layer), layer.get_seq_length() - 3, keep))
        add(1)
        both(lambda layer: layer.batch_repeat_interleave(3))
        for _ in range(40):  # past the spare capacity: it reallocates and goes on
            add(1)


class _Cache:
    def __init__(self, layer):
        self.layers = [layer]


def test_one_token_steps_reuse_the_buffer():
    layer, calls = GrowingLayer(), []
    real = layer._reallocate
    layer._reallocate = lambda *a: (calls.append(a[1]), real(*a))
    with torch.inference_mode():
        layer.update(torch.randn(4, 2, 64, 8), torch.randn(4, 2, 64, 8))
        for _ in range(32):
            layer.update(torch.randn(4, 2, 1, 8), torch.randn(4, 2, 1, 8))
    assert calls == [96]  # the prefill's allocation leaves room for 32 more steps (torch.cat copies at each)
    assert layer.keys.shape == (4, 2, 96, 8)
