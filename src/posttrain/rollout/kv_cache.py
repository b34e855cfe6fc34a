"""A KV cache for decoding that writes in place, and a prefill that lays its prompts out packed.

transformers' ``DynamicCache`` concatenates each new token's keys and values onto the whole cache, so every decoding
step copies every layer's cache once: at 48 rows of 220 tokens that copy was a quarter of a CPU decoding pass.
:class:`ReservedLayer` reserves room for the whole generation once and writes each step's keys into it; attention
reads a view of the filled part.

The prefill can also run packed (one row, no padding, a common prefix such as a system prompt computed once:
model/attention.py) while the cache is stored left-padded for decoding: each layer gathers the packed keys into the
padded layout as it stores them, and the prefill's own attention reads the packed ones.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from posttrain.data.batching import common_prefix_length, segment_layout
from posttrain.model.attention import uses_segment_attention


class ReservedLayer(DynamicLayer):
    """A full-attention cache layer over a buffer with room for ``capacity`` positions. ``keys`` / ``values`` are
    views of the filled part, so everything transformers does with a dynamic layer (reorder, select, crop) still
    works; a step after such an operation moves the result into a new buffer once."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.gather: tuple[torch.Tensor, int, int] | None = None  # set by prefill_packed, for the next update only

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.gather is not None:  # a packed prefill: store it padded, attend over it packed
            index, rows, width = self.gather
            self.gather = None
            self.keys, self.values = (_unpack(s, index, rows, width) for s in (key_states, value_states))
            keys, values = self._room(width, self.keys)
            self.keys, self.values = keys[:, :, :width], values[:, :, :width]
            return key_states, value_states
        length, new = self.get_seq_length(), key_states.shape[-2]
        keys, values = self._room(length + new, key_states)
        keys[:, :, length : length + new].copy_(key_states)
        values[:, :, length : length + new].copy_(value_states)
        self.keys, self.values = keys[:, :, : length + new], values[:, :, : length + new]
        return self.keys, self.values

    def _room(self, needed: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers, moved to new ones when too small or when ``keys`` no longer views them (after a reorder)."""
        length = self.get_seq_length()
        if (self.buffers is not None and length and self.buffers[0].shape[2] >= needed
                and self.keys.data_ptr() == self.buffers[0].data_ptr() and self.keys.shape[0] == like.shape[0]):
            return self.buffers
        shape = (like.shape[0], like.shape[1], max(needed, self.capacity), like.shape[3])
        self.buffers = (like.new_empty(shape), like.new_empty(shape))
        if length:
            self.buffers[0][:, :, :length].copy_(self.keys)
            self.buffers[1][:, :, :length].copy_(self.values)
        return self.buffers

    def reset(self) -> None:
        self.buffers = None
        super().reset()


def _unpack(states: torch.Tensor, index: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """[1, H, T, D] packed -> [rows, H, width, D] left-padded, by the flat gather ``index`` [rows * width]."""
    heads, dim = states.shape[1], states.shape[3]
    return states[0].index_select(1, index).view(heads, rows, width, dim).transpose(0, 1)


def reserved_cache(config, capacity: int) -> DynamicCache:
    """A dynamic cache whose full-attention layers write in place (sliding-window layers stay transformers')."""
    cache = DynamicCache(config=config)
    cache.layers = [ReservedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def prefill_packed(model, cache: DynamicCache, prompts: list[list[int]], width: int) -> torch.Tensor | None:
    """Prefill left-padded ``prompts`` (at most ``width`` tokens) as one packed row, their common prefix once; the
    next-token logits of each [P, V], or None where the model cannot (no per-sequence attention, sliding windows) or
    a prompt is empty."""
    import numpy as np

    if not uses_segment_attention(model) or not all(isinstance(layer, ReservedLayer) for layer in cache.layers) \
            or not all(prompts):
        return None
    sequences = [np.asarray(p, dtype=np.int64) for p in prompts]
    shared = min(common_prefix_length(sequences), min(len(s) for s in sequences) - 1)  # each keeps a last token
    layout = segment_layout(sequences, [list(range(len(sequences)))], [shared])
    index = torch.from_numpy(np.concatenate([np.concatenate([np.full(width - len(w), w[0]), w]) for w in layout.where]))
    device = next(model.parameters()).device
    for layer in cache.layers:
        layer.gather = (index.to(device), len(prompts), width)
    last = torch.tensor([int(w[-1]) for w in layout.where], device=device)
    return model(input_ids=torch.from_numpy(layout.input_ids[None]).to(device),
                 position_ids=torch.from_numpy(layout.position_ids[None]).to(device), segments=layout.segments,
                 past_key_values=cache, use_cache=True, logits_to_keep=last).logits[0]
