"""Knowledge distillation at target positions, in chunks: never a ``[tokens, vocabulary]`` tensor for a batch.

The teacher pass keeps only its top-k tokens per target (cached to disk, so the teacher can be
freed before training). The student pass computes one chunk of logits at a time and, through
activation checkpointing, recomputes it in backward instead of keeping every chunk alive.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from posttrain.objectives.sft import token_divergence


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden @ weight.T.to(hidden.dtype)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@torch.no_grad()
def target_topk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int,
                temperature: float = 1.0, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely next tokens at each row of ``hidden`` [N, H] and their log-probs at ``temperature``."""
    ids, logps = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        scaled = (_logits(hidden[start : start + chunk_size], weight, bias) / temperature).log_softmax(-1)
        top = scaled.topk(min(k, scaled.shape[-1]), dim=-1)
        ids.append(top.indices)
        logps.append(top.values)
    return torch.cat(ids), torch.cat(logps)


def target_divergence(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, teacher_ids: torch.Tensor,
                      teacher_logps: torch.Tensor, divergence: str, jsd_beta: float, temperature: float,
                      chunk_size: int = 1024) -> torch.Tensor:
    """Per-row divergence [N] between the student's distribution (from ``hidden``) and the teacher's top-k."""
    def chunk(h, ids, logps):
        return token_divergence(_logits(h, weight, bias), ids, logps, divergence, jsd_beta, temperature)

    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        args = (hidden[rows], teacher_ids[rows], teacher_logps[rows])
        parts.append(checkpoint(chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk(*args))
    return torch.cat(parts) if parts else hidden.new_zeros(0)
