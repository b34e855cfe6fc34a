"""Decoding with a cache written in place after a packed prefill samples exactly what transformers' own
DynamicCache after a left-padded prefill samples (rollout/kv_cache.py)."""

import copy

import pytest
import torch
from transformers import DynamicCache

import posttrain.rollout.backend as backend_module
from posttrain.model.attention import use_segment_attention
from posttrain.rollout.backend import SamplingSettings, TransformersBackend

SYSTEM = [1, 40, 41, 42, 43, 44]  # a common start, as a chat template's system prompt gives every prompt
PROMPTS = [SYSTEM + [50, 51, 52, 53, 54, 55, 56], SYSTEM + [60], SYSTEM + [70, 71, 72],
           SYSTEM + [50, 51, 52, 53, 54, 55, 56],
           SYSTEM[:3], SYSTEM + [80, 81]]


def tiny(family: str, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"sliding_window": 4} if family == "mistral" else {}
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=2,
                                  eos_token_id=2, **extra)
    return AutoModelForCausalLM.from_config(config).double().eval()


def generate(model, tokenizer, transformers_cache: bool, monkeypatch, prompts=PROMPTS) -> tuple[list, list[int]]:
    """The completions, and the shape of each multi-token forward (the prefills)."""
    backend = TransformersBackend(model, tokenizer, batch_size=len(prompts))
    backend.eos_ids = backend.eos_ids | set(range(100, 140))  # rows end at different steps and leave the batch
    prefills, forward = [], model.forward

    def recording(*args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            prefills.append(tuple(ids.shape))
        return forward(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(model, "forward", recording)
        if transformers_cache:
            patch.setattr(backend_module, "reserved_cache", lambda config, capacity: DynamicCache(config=config))
        completions = backend.generate(prompts, list(range(len(prompts))),
                                       SamplingSettings(max_new_tokens=12, temperature=1.0))
    return completions, prefills


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_in_place_cache_and_packed_prefill_sample_what_transformers_cache_samples(family, tiny_tokenizer, monkeypatch):
    model = tiny(family, len(tiny_tokenizer))
    reference, padded = generate(copy.deepcopy(model), tiny_tokenizer, True, monkeypatch)
    assert use_segment_attention(model)
    ours, prefills = generate(model, tiny_tokenizer, False, monkeypatch)

    distinct = len({tuple(p) for p in PROMPTS})
    assert padded == [(distinct, max(map(len, PROMPTS)))]
    if family == "llama":  # one packed row: the shared start once (all but the shortest prompt's last token), then
        shared = len(SYSTEM[:3]) - 1  # each distinct prompt's remainder
        assert prefills == [(1, shared + sum(len(p) - shared for p in {tuple(p) for p in PROMPTS}))]
    else:  # a sliding-window cache keeps transformers' layers and the padded prefill
        assert prefills == padded
    lengths = {len(c.token_ids) for c in reference}
    assert len(lengths) > 2  # rows ended at different steps
    for a, b in zip(ours, reference):
        assert a.token_ids == b.token_ids
        assert a.sampler_logps == pytest.approx(b.sampler_logps, abs=1e-10)


def test_a_batch_with_an_empty_prompt_keeps_the_padded_prefill(tiny_tokenizer, monkeypatch):
    model = tiny("llama", len(tiny_tokenizer))
    assert use_segment_attention(model)
    completions, prefills = generate(model, tiny_tokenizer, False, monkeypatch, prompts=[[5, 6, 7], []])
    assert prefills == [(2, 3)] and all(c.token_ids for c in completions)
