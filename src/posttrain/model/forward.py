"""The forward pass every task shares: final hidden states -> log-probs of the batch's targets.

The whole computation lives in one module's ``forward`` so that DistributedDataParallel (which
only synchronizes what runs inside the wrapped forward) and autocast see all of it.
"""

from __future__ import annotations

import torch
from torch import nn

from posttrain.data.batching import Batch, Segments
from posttrain.data.encoders import PairBatch
from posttrain.model.attention import uses_segment_attention
from posttrain.model.distill import target_divergence
from posttrain.model.logprobs import target_logprobs
from posttrain.model.peft import is_prompt_learning


class TargetLogprobs(nn.Module):
    """Returns target log-probs [N], or (log-probs, log sum_v p_v^2) with ``with_sum_sq`` (for WPO), or
    (log-probs, entropy) with ``with_entropy`` (RL), or
    (log-probs, per-target divergence from a teacher's top-k) when called with ``teacher_ids`` and
    ``teacher_logps`` (knowledge distillation; ``distill`` holds divergence, jsd_beta, temperature).
    ``temperature`` divides the logits first, as a sampler at that temperature does (RL's ratios must
    compare the trainer with the sampler)."""

    def __init__(self, model, chunk_size: int = 1024, with_sum_sq: bool = False, distill: dict | None = None,
                 with_entropy: bool = False, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.with_sum_sq, self.with_entropy = with_sum_sq, with_entropy
        self.distill = distill
        self.temperature = temperature

    def forward(self, input_ids, position_ids, attention_mask, target_index, target_ids, teacher_ids=None,
                teacher_logps=None,
                segments=None):
        flat = target_hidden_states(self.model, input_ids, position_ids, attention_mask, target_index, segments)
        logps = self.target_logprobs(flat, target_ids)
        if teacher_ids is None:
            return logps
        head = self.model.get_output_embeddings()
        divergence = target_divergence(flat, head.weight, head.bias, teacher_ids, teacher_logps,
                                       chunk_size=self.chunk_size,
                                       **self.distill)
        return logps, divergence

    def target_logprobs(self, flat: torch.Tensor, target_ids: torch.Tensor):
        """From the hidden states that predict the targets [N, H]: their log-probs (and what else was asked)."""
        head = self.model.get_output_embeddings()
        bias = head.bias
        if self.temperature != 1.0:  # (h W + b) / T
            flat, bias = flat / self.temperature, (bias / self.temperature if bias is not None else None)
        return target_logprobs(flat, head.weight, target_ids, bias, self.chunk_size, self.with_sum_sq,
                               self.with_entropy)


def model_inputs(batch: Batch) -> dict:
    """A log-prob module's arguments for ``batch``, its layout included (a group's prompt is laid out once)."""
    return {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "attention_mask": batch.attention_mask,
            "target_index": batch.target_index, "target_ids": batch.target_ids, "segments": batch.segments}


def batch_logprobs(module: nn.Module, batch: Batch):
    """Log-probs [N] of ``batch.target_ids`` under ``module`` (a :class:`TargetLogprobs`, possibly DDP-wrapped)."""
    return module(**model_inputs(batch))


def per_example_sum(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    return torch.zeros(batch.num_examples, dtype=values.dtype, device=values.device).index_add(0, batch.target_example,
                                                                                               values)


def sequence_logps(module: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed target log-probs per example [num_examples]."""
    logps = batch_logprobs(module, batch)
    return torch.zeros(batch.num_examples, dtype=logps.dtype, device=logps.device).index_add(0, batch.target_example,
                                                                                             logps)


def target_hidden_states(model, input_ids, position_ids, attention_mask, target_index, segments=None) -> torch.Tensor:
    """The last-layer hidden states [N, H] at the positions that predict the targets."""
    hidden = final_hidden_states(model, input_ids, position_ids, attention_mask, segments)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index)


def layout(model, segments: Segments | None) -> dict:
    """The decoder's keyword for a packed batch's layout: only models that attend per sequence take it, and a
    layout that shares prefixes runs on no other (position ids alone would let answers attend to each other)."""
    if segments is None:
        return {}
    if uses_segment_attention(model):
        return {"segments": segments}
    if segments.shares_prefixes:
        raise ValueError("a batch laid out with shared prefixes needs a model with posttrain's segment attention")
    return {}


def final_hidden_states(model, input_ids, position_ids, attention_mask, segments=None) -> torch.Tensor:
    """Last-layer hidden states [R, L, H], without ever computing the vocabulary projection."""
    decoder = model.get_decoder()
    if not is_prompt_learning(model):
        return decoder(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
            **layout(model, segments),
        ).last_hidden_state
    # Prompt tuning / P-tuning: learned virtual-token embeddings go in front of every row.
    embeds = model.get_input_embeddings()(input_ids)
    prompts = model.get_prompt(batch_size=input_ids.shape[0]).to(embeds.dtype)
    virtual = prompts.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], virtual), attention_mask], dim=1)
    out = decoder(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask, use_cache=False)
    return out.last_hidden_state[:, virtual:]


class HeadOutputs(nn.Module):
    """A classification head's outputs [N, C] at flat positions ``index`` of a (packed) batch: reward models read
    each sequence's last token, process reward models each step's separator.

    A decoder classifier (head ``score``: Llama, Qwen, Mistral, GPT-2, ...) runs its trunk once over packed rows and
    applies the head only where it is read. Any other sequence-classification model (BERT-style ``classifier`` with
    a pooler) runs its own forward on padded rows, one row per sequence. ``combine`` (an optional module) turns
    several outputs per sequence into one reward, inside this forward so that distributed training sees it.
    """

    def __init__(self, model, combine: nn.Module | None = None):
        super().__init__()
        self.model, self.combine = model, combine

    def forward(self, input_ids, position_ids, attention_mask, index, segments=None):
        trunk, head = decoder_trunk_and_head(self.model)
        if trunk is not None:
            hidden = trunk(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                           use_cache=False, **layout(self.model, segments)).last_hidden_state
            out = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, index))
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            out = logits.reshape(-1, logits.shape[-1]).index_select(0, index) if logits.dim() == 3 else logits
        return out if self.combine is None else (out, self.combine(out))


def decoder_trunk_and_head(model) -> tuple[nn.Module | None, nn.Module | None]:
    """(trunk, ``score`` head) of a decoder classifier, through a PEFT wrapper; (None, None) for other models."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(inner, "score", None)
    if not isinstance(head, nn.Module):
        return None, None
    return getattr(inner, inner.base_model_prefix), head


def sequence_stats(module, pair_batch: PairBatch) -> dict[str, torch.Tensor]:
    """Summed log-probs, completion lengths and LD-DPO tails (log-probs beyond the shorter of chosen and
    rejected), for the chosen, rejected (and gold) sequences laid out one after the other."""
    batch, pairs = pair_batch.batch, pair_batch.num_pairs
    out = batch_logprobs(module, batch)
    logps, sum_sq = out if isinstance(out, tuple) else (out, None)
    sums = per_example_sum(logps, batch)
    lengths = torch.bincount(batch.target_example, minlength=batch.num_examples).to(logps.dtype)
    shared = torch.minimum(lengths[:pairs], lengths[pairs : 2 * pairs]).repeat(batch.num_examples // pairs)
    beyond = batch.target_rank >= shared[batch.target_example]
    tails = torch.zeros_like(sums).index_add(0, batch.target_example[beyond], logps[beyond])
    stats = {"logps": sums, "lengths": lengths, "tails": tails}
    if sum_sq is not None:  # WPO: mean over the completion of log p(y_t) - log sum_v p(v)^2
        stats["aligned"] = per_example_sum(logps.detach() - sum_sq, batch) / lengths.clamp(min=1)
    return stats
