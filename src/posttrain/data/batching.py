"""Micro-batches: padded, packed (several examples per row) or padding-free (one row).

Packed rows restart ``position_ids`` at every example and carry no attention mask, so
transformers builds a block-diagonal causal mask from the position ids (flash-attention
kernels use the same signal): no token attends across an example boundary. Row tails are
filled with a separate dummy sequence that nothing attends to and no loss reads.

Each batch also lists its *targets*: the flat positions whose next token is trained on,
those tokens, their weights and the example each belongs to, so a loss never needs the
full ``[rows, length, vocabulary]`` logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from posttrain.data.tokenize import TokenizedExample

Span = tuple[int, int, int,
             int]  # (start, end, prefix_start, prefix_end) in a row; no prefix: prefix_start == prefix_end


class Segments:
    """Where each sequence of a packed batch lies. ``rows[r]`` lists spans that tile row ``r`` in order: the span's
    tokens are queries, and its keys are the prefix's tokens followed by the span's own, causally."""

    def __init__(self, rows: list[list[Span]]):
        self.rows = rows
        self._masks: dict[tuple, torch.Tensor | None] = {}

    @property
    def shares_prefixes(self) -> bool:
        return any(p1 > p0 for spans in self.rows for _, _, p0, p1 in spans)

    def mask(self, prefix: int, length: int, window: int | None, device) -> torch.Tensor | None:
        """Boolean [length, prefix + length] mask of a span, or None where plain causal attention is the mask
        (built once per shape and shared by every layer)."""
        if prefix == 0 and (window is None or length <= window):
            return None
        key = (prefix, length, window, str(device))
        if key not in self._masks:
            query_pos = prefix + torch.arange(length, device=device)
            key_pos = torch.arange(prefix + length, device=device)
            allowed = key_pos[None, :] <= query_pos[:, None]
            if window is not None:
                allowed &= query_pos[:, None] - key_pos[None, :] < window
            self._masks[key] = allowed
        return self._masks[key]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    attention_mask: torch.Tensor | None  # [R, L] for padded batches, None when packed
    target_index: torch.Tensor  # [N] flat index into R * L: the position that predicts the target
    target_ids: torch.Tensor  # [N]
    target_weights: torch.Tensor  # [N] float
    target_example: torch.Tensor  # [N] which example (0..num_examples-1) the target belongs to
    target_rank: torch.Tensor  # [N] the target's place among its example's targets (0, 1, ...)
    num_examples: int
    num_tokens: int  # real (non-padding) tokens
    example_index: torch.Tensor | None = None  # [num_examples] dataset positions of the examples
    segments: Segments | None = None  # where each sequence lies, for models that attend per sequence

    @property
    def num_targets(self) -> int:
        return int(self.target_weights.gt(0).sum())

    def to(self, device) -> "Batch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return Batch(**moved)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: example indices per row, no row longer than ``capacity``."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[index] <= free:
                rows[r].append(index)
                room[r] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(capacity - lengths[index])
    return [sorted(row) for row in rows]


def collate(
    examples: list[TokenizedExample],
    pad_id: int,
    packing: bool = True,
    padding_free: bool = False,
    max_length: int | None = None,
    segments: bool = False,
    groups: list[list[int]] | None = None,
    shared_lengths: list[int] | None = None,
) -> Batch:
    """A micro-batch of ``examples``. With ``segments`` (the model attends per sequence: model/attention.py) a packed
    micro-batch is one row with no padding at all, and each of ``groups`` (indices of examples that start alike:
    one prompt's answers) lays out the tokens its members have in common once, at most ``shared_lengths[g]`` of
    them (the prompt: then the layout of a prompt's answers, and so every value, does not depend on which of its
    answers share the micro-batch)."""
    if segments and (packing or padding_free):
        return _collate_segments(examples, groups or [], shared_lengths)
    lengths = [len(e.input_ids) for e in examples]
    if padding_free:
        rows = [list(range(len(examples)))]
    elif packing:
        rows = pack_rows(lengths, max(max_length or 0, max(lengths)))
    else:
        rows = [[i] for i in range(len(examples))]
    width = max(sum(lengths[i] for i in row) for row in rows)

    input_ids = np.full((len(rows), width), pad_id, np.int64)
    position_ids = np.zeros((len(rows), width), np.int64)
    attention_mask = np.zeros((len(rows), width), np.int64)
    target_index, target_ids, target_weights, target_example, target_rank = [], [], [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            example, n = examples[i], lengths[i]
            input_ids[r, offset : offset + n] = example.input_ids
            position_ids[r, offset : offset + n] = np.arange(n)
            attention_mask[r, offset : offset + n] = 1
            targets = np.nonzero(example.weights[1:])[0]  # position t predicts token t + 1
            target_index.append(r * width + offset + targets)
            target_ids.append(example.input_ids[targets + 1])
            target_weights.append(example.weights[targets + 1])
            target_example.append(np.full(len(targets), i))
            target_rank.append(np.arange(len(targets)))
            offset += n
        position_ids[r, offset:] = np.arange(width - offset)  # a dummy sequence fills the tail
    packed = packing or padding_free
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        attention_mask=None if packed else torch.from_numpy(attention_mask),
        target_index=torch.from_numpy(np.concatenate(target_index)),
        target_ids=torch.from_numpy(np.concatenate(target_ids)),
        target_weights=torch.from_numpy(np.concatenate(target_weights).astype(np.float32)),
        target_example=torch.from_numpy(np.concatenate(target_example)),
        target_rank=torch.from_numpy(np.concatenate(target_rank)),
        num_examples=len(examples),
        num_tokens=int(sum(lengths)),
        example_index=torch.tensor([e.index for e in examples]),
    )


@dataclass
class SegmentLayout:
    """Sequences laid out in one row by :func:`segment_layout`."""

    input_ids: np.ndarray  # [T]
    position_ids: np.ndarray  # [T]
    segments: Segments
    where: list[np.ndarray]  # each sequence's tokens' places in the row, its shared prefix included


@dataclass(frozen=True)
class Layout:
    """How sequences become one micro-batch: the padding token, packing, and whether the model attends per
    sequence (``segments``: one row, no padding, shared prompts laid out once; see model/attention.py)."""

    pad_id: int
    packing: bool = True
    padding_free: bool = False
    segments: bool = False

    def collate(self, sequences: list[TokenizedExample], groups: list[list[int]] | None = None,
                max_length: int | None = None, shared_lengths: list[int] | None = None) -> Batch:
        """``groups`` list sequences that start with the same prompt, which a model attending per sequence computes
        once (at most ``shared_lengths`` tokens of it; by default all they have in common)."""
        return collate(sequences, self.pad_id, self.packing, self.padding_free, max_length, self.segments, groups,
                       shared_lengths)


def segment_layout(sequences: list[np.ndarray], groups: list[list[int]],
                   caps: list[int] | None = None) -> SegmentLayout:
    """One row holding ``sequences`` with each group's common prefix (at most ``caps[g]`` tokens) laid out once."""
    # With explicit caps even a group of one lays its prompt out apart, so each answer is computed the same way
    # whoever shares its micro-batch; without them a lone sequence is one span.
    caps = caps or [0 if len(g) == 1 else max(len(sequences[i]) for i in g) for g in groups]
    grouped = {i for group in groups for i in group}
    groups = sorted([(list(g), cap) for g, cap in zip(groups, caps) if g]
                    + [([i], 0) for i in range(len(sequences)) if i not in grouped], key=lambda g: min(g[0]))
    input_ids, position_ids, spans = [], [], []
    where: list[np.ndarray] = [np.zeros(0, np.int64)] * len(sequences)
    offset = 0
    for group, cap in groups:
        members = [sequences[i] for i in group]
        shared = min(common_prefix_length(members), cap)
        prefix = (offset, offset + shared)
        if shared:
            spans.append((offset, offset + shared, offset, offset))
            input_ids.append(members[0][:shared])
            position_ids.append(np.arange(shared))
            offset += shared
        for i, sequence in zip(group, members):
            own = len(sequence) - shared
            if own:
                spans.append((offset, offset + own, *prefix) if shared else (offset, offset + own, offset, offset))
                input_ids.append(sequence[shared:])
                position_ids.append(np.arange(shared, len(sequence)))
            where[i] = np.concatenate([np.arange(*prefix), np.arange(offset, offset + own)])
            offset += own
    return SegmentLayout(np.concatenate(input_ids).astype(np.int64), np.concatenate(position_ids), Segments([spans]),
                         where)


def _collate_segments(examples: list[TokenizedExample], groups: list[list[int]], caps: list[int] | None) -> Batch:
    layout = segment_layout([e.input_ids for e in examples], groups, caps)
    where = layout.where
    targets = [np.nonzero(e.weights[1:])[0] for e in examples]  # position t predicts token t + 1
    return Batch(
        input_ids=torch.from_numpy(layout.input_ids[None]),
        position_ids=torch.from_numpy(layout.position_ids[None]),
        attention_mask=None,
        target_index=torch.from_numpy(np.concatenate([where[i][t] for i, t in enumerate(targets)])),
        target_ids=torch.from_numpy(np.concatenate([e.input_ids[t + 1] for e, t in zip(examples, targets)])),
        target_weights=torch.from_numpy(np.concatenate([e.weights[t + 1] for e, t in zip(examples,
                                                                                         targets)]).astype(np.float32)),
        target_example=torch.from_numpy(np.concatenate([np.full(len(t), i) for i, t in enumerate(targets)])),
        target_rank=torch.from_numpy(np.concatenate([np.arange(len(t)) for t in targets])),
        num_examples=len(examples),
        num_tokens=int(sum(len(e.input_ids) for e in examples)),
        example_index=torch.tensor([e.index for e in examples]),
        segments=layout.segments,
    )


def common_prefix_length(sequences: list[np.ndarray]) -> int:
    length = min(len(s) for s in sequences)
    first = sequences[0][:length]
    for sequence in sequences[1:]:
        differ = np.nonzero(first[:length] != sequence[:length])[0]
        if differ.size:
            length = int(differ[0])
    return length


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-id rows right-padded into one tensor: (input_ids [R, L], attention_mask [R, L], the index of each row's
    last real token [R]), for reading a model's output at the end of each sequence (reward models, judges)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
    return input_ids, mask, torch.tensor([len(row) - 1 for row in rows])
