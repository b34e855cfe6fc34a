"""Decoder layers that keep less for backward, without recomputing a single matmul.

Training memory is mostly what autograd saves for backward. A gated MLP ``down(act(gate(x)) * up(x))`` saves
``gate(x)``, ``act(gate(x))``, ``up(x)`` and their product, four tensors of the intermediate width per token; an
RMSNorm saves its input and its normalized input. Elementwise results are cheap to recompute from what is saved
anyway, so here the MLP saves ``gate(x)`` and ``up(x)`` only (the activation and the product are recomputed in
backward, when ``down``'s weight gradient needs them) and the norm saves its input and one scale per token. For
SmolLM2 that is about a third of a layer's saved activations, for elementwise work in backward.

A module is switched only if its own forward, run once on a random input, gives bitwise the same output as the
lean one, so an architecture whose MLP or norm computes something else keeps its own code. Activation
checkpointing already discards these tensors: with it on, the MLPs keep their own forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn


class GatedProduct(torch.autograd.Function):
    """``act(gate) * up``, saving only ``gate`` and ``up``."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_()
            activated = ctx.act(leaf)
        (grad_gate,) = torch.autograd.grad(activated, leaf, grad * up)
        return grad_gate, grad * activated.detach(), None


class _Recomputed:
    """What autograd keeps instead of a saved product: how to make it again."""

    def __init__(self, gate, up, act, view: torch.Tensor):
        self.gate, self.up, self.act = gate, up, act
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            return (self.act(self.gate) * self.up).as_strided(self.size, self.stride, self.offset)


def lean_mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = GatedProduct.apply(gate, up, self.act_fn)
    if not torch.is_grad_enabled():
        return self.down_proj(product)
    storage = product.untyped_storage().data_ptr()

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() == storage:
            return _Recomputed(gate.detach(), up.detach(), self.act_fn, tensor)
        return tensor

    def unpack(saved):
        return saved() if isinstance(saved, _Recomputed) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return self.down_proj(product)


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x / rms(x))``, saving ``x`` and ``1 / rms(x)``: backward recomputes the normalized input.

    Computed in float32 at least, as transformers' Llama-family norms do for half precision; float64 stays float64
    (transformers would round it to float32, which makes exact float64 comparisons between batch layouts fail)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        scale = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, scale)
        return weight * (wide * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, scale = ctx.saved_tensors
        normed = x.to(scale.dtype) * scale
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        grad_normed = (grad * weight).to(scale.dtype)
        grad_x = scale * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


def lean_norm_forward(self, x):
    return RMSNormFunction.apply(x, self.weight, _epsilon(self))


def lean_lora_forward(self, x, *args, **kwargs):
    """peft's ``base(x) + B(A(x)) * scaling`` as one in-place ``addmm`` on the base output, the scaling folded into
    the matmul: no scaled copy and no sum are allocated, and backward has no elementwise pass for them either.
    Anything else (adapters off or merged, several active, autocast, mixed dtypes) takes peft's own forward."""
    adapters = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1 or adapters[0] not in self.lora_A \
            or torch.is_autocast_enabled(x.device.type):
        return type(self).forward(self, x, *args, **kwargs)
    down, up = self.lora_A[adapters[0]].weight, self.lora_B[adapters[0]].weight
    if not x.dtype == down.dtype == up.dtype == self.base_layer.weight.dtype:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    low = nn.functional.linear(x, down)
    result.view(-1, result.shape[-1]).addmm_(low.view(-1, low.shape[-1]), up.t(), alpha=self.scaling[adapters[0]])
    return result


def _is_plain_lora(module) -> bool:
    """A LoRA linear layer with nothing but ``B(A(x)) * scaling`` added: no dropout, no DoRA-like variant, no bias."""
    try:
        from peft.tuners.lora import Linear
    except ImportError:
        return False
    return type(module) is Linear and isinstance(module.base_layer, nn.Linear) and not module.lora_variant \
        and not module.fan_in_fan_out and all(isinstance(d, nn.Identity) for d in module.lora_dropout.values()) \
        and all(b.bias is None for b in module.lora_B.values())


def _epsilon(module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        if isinstance(getattr(module, name, None), float):
            return getattr(module, name)
    return None


def _is_gated_mlp(module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")) \
        and callable(getattr(module, "act_fn", None))


def _is_rms_norm(module) -> bool:
    weight = getattr(module, "weight", None)
    return "RMSNorm" in type(module).__name__ and isinstance(weight, nn.Parameter) and weight.dim() == 1 \
        and _epsilon(module) is not None


def _same_output(module, lean_forward, width: int, at_most_float32: bool = False) -> bool:
    """The module's own forward and the lean one agree bitwise on a random input (a norm's in float32 at most:
    transformers' norms round float64 down to it)."""
    parameter = next(module.parameters())
    dtype = torch.float32 if at_most_float32 and parameter.dtype == torch.float64 else parameter.dtype
    x = torch.randn(2, 3, width, dtype=dtype, device=parameter.device)
    with torch.no_grad():
        return torch.equal(module.forward(x), lean_forward(module, x))


def make_lean(model) -> dict[str, int]:
    """Switch ``model``'s gated MLPs and RMSNorms to their lean forwards where they compute the same thing, and its
    plain LoRA layers to one fused update; how many modules of each kind were switched. Activation checkpointing
    keeps its own MLPs: it discards their tensors already, and the MLP's recomputation hooks would keep them from it."""
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    verdicts: dict[type, bool] = {}
    switched = {"mlp": 0, "norm": 0, "lora": 0}
    for module in model.modules():
        if _is_plain_lora(module):  # the same sum, term for term (tested against peft); no probe: B starts at zero
            module.forward = types.MethodType(lean_lora_forward, module)
            switched["lora"] += 1
            continue
        if _is_gated_mlp(module) and not checkpointing:
            kind, forward, width = "mlp", lean_mlp_forward, module.gate_proj.in_features
        elif _is_rms_norm(module):
            kind, forward, width = "norm", lean_norm_forward, module.weight.shape[0]
        else:
            continue
        if type(module) not in verdicts:
            verdicts[type(module)] = _same_output(module, forward, width, at_most_float32=kind == "norm")
        if verdicts[type(module)]:
            module.forward = types.MethodType(forward, module)
            switched[kind] += 1
    return switched
