"""A KV cache layer that grows in place.

transformers' DynamicLayer appends each step's keys and values with `torch.cat`, which copies the whole cache
at every decoded token: for the loop's batches (thousands of rows, 100+ positions) that copy cost more than the
forward itself. GrowingLayer writes new positions into spare capacity and hands attention a view, so a step
copies only what it adds; it reallocates (one copy) only when the capacity runs out or after a row
selection made a new tensor. Measured on the built-in policy, best-of-4 over 500 addition problems (2-core
CPU): 2.1x the tokens per second at 30 digits (8.0k -> 16.4k) and 2.3x at 40 digits (6.0k -> 13.8k).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """DynamicLayer with spare capacity along the sequence axis. `keys`/`values` stay plain [B, H, T, D]
    tensors (views of the buffers), so every cache operation that reads or replaces them works unchanged."""

    min_headroom = 32  # positions reserved past the current length at each reallocation

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._keys_buffer = self._values_buffer = None

    def _in_buffer(self) -> bool:
        """The current keys/values are the leading positions of the buffers (no operation replaced them)."""
        keys, values = self._keys_buffer, self._values_buffer
        # storage identity, not `_base`: views made under inference_mode do not record their base
        return (keys is not None and self.keys.dim() == 4
                and self.keys.data_ptr() == keys.data_ptr() and self.values.data_ptr() == values.data_ptr()
                and self.keys.untyped_storage().data_ptr() == keys.untyped_storage().data_ptr()
                and self.keys.shape[0] == keys.shape[0] and self.keys.stride() == keys.stride()
                and self.values.stride() == values.stride())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        new = key_states.shape[-2]
        if not (self._in_buffer() and length + new <= self._keys_buffer.shape[-2]):
            self._reallocate(length, length + new + max(self.min_headroom, (length + new) // 2), key_states, value_states)
        self._keys_buffer[:, :, length: length + new] = key_states
        self._values_buffer[:, :, length: length + new] = value_states
        self.keys = self._keys_buffer[:, :, : length + new]
        self.values = self._values_buffer[:, :, : length + new]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the `indices` rows, buffers and spare capacity included: one gather, no reallocation later."""
        if self.get_seq_length() == 0 or not self._in_buffer():
            return super().batch_select_indices(indices)
        length = self.get_seq_length()
        self._keys_buffer = self._keys_buffer[indices]
        self._values_buffer = self._values_buffer[indices]
        self.keys = self._keys_buffer[:, :, :length]
        self.values = self._values_buffer[:, :, :length]

    def _reallocate(self, length: int, capacity: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, Dk = key_states.shape
        keys = key_states.new_empty((B, H, capacity, Dk))
        values = value_states.new_empty((B, H, capacity, value_states.shape[-1]))
        if length:
            keys[:, :, :length] = self.keys
            values[:, :, :length] = self.values
        self._keys_buffer, self._values_buffer = keys, values


def growing_cache(config) -> DynamicCache:
    """A DynamicCache for `config` whose full-attention layers grow in place (sliding-window layers stay as
    transformers builds them)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
