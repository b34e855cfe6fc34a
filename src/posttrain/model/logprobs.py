"""Log-probabilities of target tokens straight from final hidden states, in chunks.

``log p(y_i | h_i) = (h_i W^T)[y_i] - logsumexp(h_i W^T)``. A plain ``lm_head`` followed by
``log_softmax`` holds a ``[tokens, vocabulary]`` tensor (49,152 columns for SmolLM2) for the
whole batch, plus its softmax in backward. Here only one chunk of rows is alive at a time,
in forward and in backward (which recomputes the chunk's logits), and only target positions
are projected at all: prompt and padding positions never meet the vocabulary matrix.

The gradient uses ``d log p(y) / d logits = onehot(y) - softmax(logits)``.
"""

from __future__ import annotations

import torch


class _ChunkedTargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, statistic):
        dtype = _at_least_float32(hidden.dtype)
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        extra = torch.empty(hidden.shape[0] if statistic else 0, dtype=dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            logits = _logits(hidden[start:stop], weight, bias)
            normalizer = logits.logsumexp(1)
            out[start:stop] = logits.gather(1, targets[start:stop, None]).squeeze(1) - normalizer
            if statistic == "sum_sq":  # log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)
                extra[start:stop] = (2 * logits).logsumexp(1) - 2 * normalizer
            elif statistic == "entropy":  # H = logsumexp(z) - sum_v p_v z_v
                extra[start:stop] = normalizer - (logits.softmax(1) * logits).sum(1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(extra)
        return out, extra

    @staticmethod
    def backward(ctx, grad_out, _grad_extra):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        accum = _at_least_float32(weight.dtype)
        grad_w = torch.zeros_like(weight, dtype=accum) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=accum) if need_b else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            h, g_out = hidden[start:stop], grad_out[start:stop]
            grad_logits = _logits(h, weight, bias).softmax(1).mul_(-g_out[:, None])
            grad_logits.scatter_add_(1, targets[start:stop, None], g_out[:, None])
            if need_h:
                grad_h[start:stop] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += grad_logits.T.to(accum) @ h.to(accum)
            if need_b:
                grad_b += grad_logits.sum(0)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden @ weight.T.to(hidden.dtype)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits.to(_at_least_float32(logits.dtype))


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics in float32 at least (float64 stays float64, for tests)."""
    return torch.promote_types(dtype, torch.float32)


def target_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    with_sum_sq: bool = False,
    with_entropy: bool = False,
):
    """``log p(targets[i] | hidden[i])`` for ``hidden`` [N, H] and output embedding ``weight`` [V, H]; at least float32.

    ``with_sum_sq`` also returns ``log sum_v p(v | hidden[i])^2`` (no gradient), which WPO's
    aligned weights need, from the same pass over the vocabulary; ``with_entropy`` the entropy of each
    position's distribution (no gradient; RL logs it), never holding more than one chunk of logits."""
    if with_sum_sq and with_entropy:
        raise ValueError("one extra statistic per pass: with_sum_sq or with_entropy")
    statistic = "sum_sq" if with_sum_sq else "entropy" if with_entropy else None
    logps, extra = _ChunkedTargetLogprobs.apply(hidden, weight, bias, targets, chunk_size, statistic)
    return (logps, extra) if statistic else logps
