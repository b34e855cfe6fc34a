"""Attention over packed rows, one sequence at a time, with shared prompts computed once.

Packed rows hold several sequences. transformers' SDPA path masks such a row with a block-diagonal causal mask,
so it computes (and then discards) every score between sequences: a row of total length T made of sequences of
lengths l_i costs T^2 instead of sum l_i^2, and on CPU the fused kernel skips none of the masked blocks. Here each
sequence runs its own causal ``scaled_dot_product_attention`` (the fused flash kernel on CPU and GPU), so a whole
micro-batch fits in one row with no padding and no wasted scores.

A *shared prefix* (the prompt that DPO's chosen and rejected answers, or a GRPO group's completions, start with)
is laid out once: its tokens attend causally among themselves, and each continuation attends to all of the
prefix and then causally to itself, at positions that continue the prefix's. Under causal attention a prefix's
hidden states do not depend on what follows it, so this is exact, and the prompt's forward and backward run once
instead of once per answer.

Models opt in through transformers' attention interface (:func:`use_segment_attention` switches a model that
would use SDPA); without a :class:`Segments` layout in the call (generation, padded batches) the function is
transformers' own SDPA attention, so the model behaves exactly as before everywhere else.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from posttrain.data.batching import Segments

NAME = "posttrain_segments"

def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      segments: Segments | None = None, **kwargs):
    """transformers attention-interface function: query [B, H, L, D], key / value [B, KV, L, D] -> [B, L, H, D]."""
    if segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError(f"{type(module).__name__}: soft-capped or biased attention cannot run per segment")
    window = kwargs.get("sliding_window")
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for r, spans in enumerate(segments.rows):
        pieces = []
        for start, end, p0, p1 in spans:
            q, k, v = query[r:r + 1, :, start:end], key[r:r + 1, :, start:end], value[r:r + 1, :, start:end]
            if p1 > p0:
                k = torch.cat([key[r:r + 1, :, p0:p1], k], dim=2)
                v = torch.cat([value[r:r + 1, :, p0:p1], v], dim=2)
            mask = segments.mask(p1 - p0, end - start, window, query.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                                 scale=scaling, enable_gqa=gqa)
            pieces.append(out.transpose(1, 2))
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


@functools.cache
def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the masks SDPA needs when no layout is given


def use_segment_attention(model) -> bool:
    """Switch a model that attends with SDPA to :func:`segment_attention`; True if it now does."""
    register()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    if getattr(config, "attn_logit_softcapping", None):
        return False
    inner.set_attn_implementation(NAME)
    return inner.config._attn_implementation == NAME


def uses_segment_attention(model) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(inner, "config", None), "_attn_implementation", None) == NAME
