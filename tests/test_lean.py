"""Lean decoder layers (model/lean.py): the same losses and gradients with fewer activations saved."""

import copy

import numpy as np
import pytest
import torch

from conftest import build_model
from posttrain.data.batching import collate
from posttrain.data.tokenize import TokenizedExample
from posttrain.objectives import sft_loss
from posttrain.model.lean import lean_lora_forward, make_lean
from posttrain.model.forward import TargetLogprobs, batch_logprobs


def tiny(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    if family == "llama":
        return build_model(300).double()
    sizes = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, pad_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **sizes)).double()


def batch():
    rng = np.random.default_rng(0)
    examples = []
    for n in (13, 7, 21):
        weights = np.zeros(n, np.float32)
        weights[n // 3:] = rng.uniform(0.5, 2.0, n - n // 3)
        examples.append(TokenizedExample(rng.integers(3, 300, n), weights))
    return collate(examples, pad_id=2, packing=False)


def loss_grads_and_saved(model, b):
    """(loss, gradients, bytes autograd saved outside parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = batch_logprobs(TargetLogprobs(model, chunk_size=16), b)
    loss = sft_loss(logps, b.target_weights, b.num_targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(seen.values())


@pytest.mark.parametrize("family, switched", [("llama", {"mlp": 2, "norm": 5}), ("qwen3", {"mlp": 2, "norm": 9}),
                                              ("mistral", {"mlp": 2, "norm": 5}), ("gemma", {"mlp": 2, "norm": 0})])
def test_lean_layers_give_the_same_loss_and_gradients(family, switched):
    """Qwen3 also normalizes queries and keys per head; Gemma's norm scales by 1 + weight, so it keeps its own."""
    original = tiny(family)
    lean = copy.deepcopy(original)
    assert make_lean(lean) == {**switched, "lora": 0}
    loss_a, grads_a, saved_a = loss_grads_and_saved(original, batch())
    loss_b, grads_b, saved_b = loss_grads_and_saved(lean, batch())
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    for name in grads_a:  # transformers' norms round a float64 model's activations to float32, the lean ones do not
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6 * float(grads_a[name].abs().max()), rtol=0,
                                   msg=name)
    assert saved_b < saved_a


@pytest.mark.parametrize("config, fused", [({}, 14), ({"lora_dropout": 0.1}, 0), ({"use_dora": True}, 0)])
def test_lean_layers_keep_lora_gradients(config, fused):
    """Plain LoRA layers add ``B(A(x)) * scaling`` in one in-place addmm: the same loss and gradients as peft's
    forward (B is random here, not peft's zeros); with dropout or DoRA peft's own forward stays."""
    from peft import LoraConfig, get_peft_model

    original = get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                                        lora_alpha=12, **config))
    original.eval()  # dropout off in both, so that the two forwards see the same inputs
    lean = copy.deepcopy(original)
    assert make_lean(lean) == {"mlp": 2, "norm": 5, "lora": fused}
    unfused = copy.deepcopy(lean)  # lean MLPs and norms, peft's own LoRA forward: isolates the fusion
    for module in unfused.modules():
        if getattr(vars(module).get("forward"), "__func__", None) is lean_lora_forward:
            del module.forward
    loss_a, grads_a, _ = loss_grads_and_saved(original, batch())
    loss_b, grads_b, _ = loss_grads_and_saved(lean, batch())
    loss_c, grads_c, _ = loss_grads_and_saved(unfused, batch())
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)  # transformers' norms round to float32
    torch.testing.assert_close(loss_c, loss_b, atol=1e-13, rtol=0)
    trained = [n for n, p in original.named_parameters() if p.requires_grad]
    assert trained
    for name in trained:
        scale = float(grads_a[name].abs().max())
        # lean norms do not round to float32 (measured: up to 1e-5 of the largest gradient); the fusion only
        # reorders float64 rounding (measured: below 1e-13)
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-4 * scale, rtol=0, msg=name)
        torch.testing.assert_close(grads_c[name], grads_b[name], atol=1e-12 * scale, rtol=0, msg=name)


def test_activation_checkpointing_keeps_its_own_mlps():
    model = tiny("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert make_lean(model) == {"mlp": 0, "norm": 5, "lora": 0}
