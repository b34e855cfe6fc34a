"""Packed, padding-free and padded batches give the same loss and gradients."""

import numpy as np
import pytest
import torch

from conftest import build_model
from posttrain.data.batching import collate, pack_rows
from posttrain.data.tokenize import TokenizedExample
from posttrain.objectives import sft_loss
from posttrain.model.forward import TargetLogprobs, batch_logprobs


def examples(lengths, vocab=300, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        weights = np.zeros(n, np.float32)
        weights[n // 3 :] = rng.uniform(0.5, 2.0, n - n // 3)
        out.append(TokenizedExample(rng.integers(3, vocab, n), weights))
    return out


def loss_and_grads(model, batch):
    model.zero_grad()
    logps = batch_logprobs(TargetLogprobs(model, chunk_size=16), batch)
    loss = sft_loss(logps, batch.target_weights, batch.num_targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", [{"packing": True, "max_length": 40}, {"packing": True, "padding_free": True}])
def test_packed_and_unpacked_loss_and_gradients_are_equal(mode):
    model = build_model(300).double()
    batch_examples = examples([17, 9, 33, 12, 25, 5])
    padded = collate(batch_examples, pad_id=2, packing=False)
    packed = collate(batch_examples, pad_id=2, **mode)
    assert packed.attention_mask is None and packed.input_ids.numel() < padded.input_ids.numel()
    assert_same_training(model, padded, packed, atol=1e-5)


def assert_same_training(model, one, other, atol: float):
    loss_a, grads_a = loss_and_grads(model, one)
    loss_b, grads_b = loss_and_grads(model, other)
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=0, msg=name)


def test_packing_would_differ_without_the_position_reset():
    """Guard: the equality above is not vacuous. Packed rows without restarting positions
    (one long causal sequence) give a different loss."""
    model = build_model(300).double()
    batch_examples = examples([17, 9, 33])
    padded = collate(batch_examples, pad_id=2, packing=False)
    packed = collate(batch_examples, pad_id=2, packing=True, padding_free=True)
    packed.position_ids = torch.arange(packed.input_ids.shape[1])[None]
    assert not torch.allclose(loss_and_grads(model, padded)[0], loss_and_grads(model, packed)[0])


def test_first_fit_decreasing_respects_capacity():
    lengths = [30, 10, 25, 5, 20, 15]
    rows = pack_rows(lengths, 40)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(lengths[i] for i in row) <= 40 for row in rows)
    assert len(rows) == 3  # 105 tokens in rows of 40


def test_targets_point_at_the_predicting_position():
    ex = TokenizedExample(np.array([5, 6, 7, 8]), np.array([0, 0, 1, 2], np.float32))
    batch = collate([ex], pad_id=0, packing=False)
    assert batch.target_index.tolist() == [1, 2] and batch.target_ids.tolist() == [7, 8]
    assert batch.target_weights.tolist() == [1.0, 2.0]


# -- per-sequence attention (model/attention.py) ------------------------------------------------------------------

def per_sequence_model(config=None):
    from posttrain.model.attention import use_segment_attention

    model = (build_model(300) if config is None else model_from(config)).double()
    assert use_segment_attention(model)
    return model


def model_from(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def sharing(prefix_lengths, tails, vocab=300, seed=1):
    """Groups of examples that start with the same tokens: group g has a common prefix of ``prefix_lengths[g]``
    tokens, then one tail per entry of ``tails[g]`` (their lengths)."""
    rng = np.random.default_rng(seed)
    out, groups = [], []
    for shared, lengths in zip(prefix_lengths, tails):
        prefix = rng.integers(3, vocab, shared)
        groups.append([])
        for n in lengths:
            tokens = np.concatenate([prefix, rng.integers(3, vocab, n)])
            weights = np.zeros(len(tokens), np.float32)
            weights[shared:] = rng.uniform(0.5, 2.0, n)
            groups[-1].append(len(out))
            out.append(TokenizedExample(tokens, weights))
    return out, groups


def test_per_sequence_attention_in_one_row_equals_padded_rows():
    model = per_sequence_model()
    batch_examples = examples([17, 9, 33, 12, 25, 5])
    padded = collate(batch_examples, pad_id=2, packing=False)
    row = collate(batch_examples, pad_id=2, packing=True, max_length=40, segments=True)
    assert row.input_ids.shape == (1, 101) and len(row.segments.rows[0]) == 6
    assert_same_training(model, padded, row, atol=1e-10)


def test_shared_prompts_are_computed_once_and_change_nothing():
    """DPO pairs and GRPO groups: each group's common tokens appear once in the row, and every loss and gradient is
    what the sequences give on their own rows (an answer sees its prompt, never another answer)."""
    model = per_sequence_model()
    batch_examples, groups = sharing([12, 20, 7], [[5, 9], [3, 8, 6, 1], [11]])
    padded = collate(batch_examples, pad_id=2, packing=False)
    shared = collate(batch_examples, pad_id=2, packing=True, segments=True, groups=groups)
    assert shared.input_ids.shape[1] == 12 + 5 + 9 + 20 + 3 + 8 + 6 + 1 + 7 + 11
    assert shared.segments.shares_prefixes
    with torch.no_grad():
        module = TargetLogprobs(model, chunk_size=16)
        for one, other in ((padded, shared), (shared, padded)):
            assert (batch_logprobs(module, one)[one.target_example.argsort(stable=True)]
                    .sub(batch_logprobs(module, other)[other.target_example.argsort(stable=True)]).abs().max() < 1e-12)
    loss_a, grads_a = loss_and_grads(model, padded)
    loss_b, grads_b = loss_and_grads(model, shared)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-10, rtol=0)
    # transformers' RMSNorm computes in float32 even in a float64 model, and a shared prompt sums its answers'
    # gradients before that norm's backward instead of after: float32 rounding (1e-7 relative), nothing more.
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6 * float(grads_a[name].abs().max()), rtol=0,
                                   msg=name)


def test_a_group_without_a_common_prefix_and_an_answer_inside_the_prefix():
    """Groups whose members differ from the first token share nothing; a member that is all prefix (an answer
    that is a prefix of another) reads its targets from the shared span."""
    model = per_sequence_model()
    rng = np.random.default_rng(3)
    a, b = rng.integers(3, 300, 10), rng.integers(3, 300, 14)
    b[0] = a[0] + 1 if a[0] < 299 else 3
    long = np.concatenate([a, rng.integers(3, 300, 6)])
    batch_examples = [TokenizedExample(x, np.linspace(0.5, 1.5, len(x)).astype(np.float32)) for x in (a, b, long)]
    padded = collate(batch_examples, pad_id=2, packing=False)
    shared = collate(batch_examples, pad_id=2, packing=True, segments=True, groups=[[0, 2], [1]])
    assert shared.input_ids.shape[1] == 10 + 14 + 6
    torch.testing.assert_close(loss_and_grads(model, padded)[0], loss_and_grads(model, shared)[0], atol=1e-10, rtol=0)


def test_sliding_window_models_keep_their_window_per_sequence():
    from transformers import MistralConfig

    config = MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=6, pad_token_id=2)
    model = per_sequence_model(config)
    batch_examples, groups = sharing([9, 4], [[5, 9], [12]])
    padded = collate(batch_examples, pad_id=2, packing=False)
    shared = collate(batch_examples, pad_id=2, packing=True, segments=True, groups=groups)
    torch.testing.assert_close(loss_and_grads(model, padded)[0], loss_and_grads(model, shared)[0], atol=1e-10, rtol=0)


def test_shared_prompts_refuse_a_model_that_attends_by_position_ids():
    batch_examples, groups = sharing([8], [[4, 6]])
    shared = collate(batch_examples, pad_id=2, packing=True, segments=True, groups=groups)
    with pytest.raises(ValueError, match="segment attention"):
        loss_and_grads(build_model(300).double(), shared)


def test_saved_models_do_not_name_posttrains_attention(tmp_path):
    """Other tools (vLLM, llama.cpp, plain transformers) load what posttrain saves."""
    import json

    model = per_sequence_model()
    model.save_pretrained(tmp_path)
    assert "posttrain" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
