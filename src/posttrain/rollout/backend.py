"""Sampling completions for learning from the model's own samples.

A *generation backend* turns prompt token ids into completions with the policy's current weights
(LoRA adapters active) and reports, per completion: the token ids, the sampler's log-probability of
each sampled token at the sampling temperature (to compare with the trainer's), and whether the
token budget cut it off. The default backend decodes with the model itself: the batch's distinct
prompts prefilled once (packed in one row with their common start computed once, where the model
attends per sequence), then one forward pass per token over the rows still writing, with a KV cache
written in place (rollout/kv_cache.py); rows that ended leave the batch.

Each completion's randomness is its own: sampling is Gumbel-max over the processed logits with noise
from a generator seeded by (seed, step, prompt, sample), so what a prompt's k-th sample is does not
depend on which other prompts share its batch, on the generation batch size, on the number of
processes, or on whether the run was resumed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

from posttrain.rollout.kv_cache import prefill_packed, reserved_cache


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    token_ids: list[int]
    sampler_logps: list[float]  # log pi_sampler(token) at the sampling temperature, one per token
    truncated: bool  # stopped by max_new_tokens, not by EOS or a stop string
    text: str = ""
    mask: list[int] | None = (
        None  # with tool calls: 1 for the model's tokens, 0 for tool output (None: all the model's)
    )
    tool_calls: int = 0

    @property
    def model_tokens(self) -> int:
        """Tokens the model generated (the ones with sampler log-probs, and a loss)."""
        return len(self.token_ids) if self.mask is None else sum(self.mask)


@dataclass
class GenerationStats:
    seconds: float = 0.0
    tokens: int = 0
    extra: dict = field(default_factory=dict)


class GenerationBackend(Protocol):
    def generate(self, prompts: list[list[int]], seeds: list[int], settings: SamplingSettings) -> list[Completion]:
        """One completion per (prompt, seed), in order."""

    def sync(self, model) -> None:
        """Make the backend sample from ``model``'s current weights (a no-op when it samples from the model itself)."""


def sample_seed(seed: int, step: int, prompt_index: int, sample: int) -> int:
    """The generator seed of one completion: a function of where it sits in the run, nothing else."""
    return ((seed * 1_000_003 + step) * 1_000_033 + prompt_index) * 1_009 + sample


def _at_least_float32(scores: torch.Tensor) -> torch.Tensor:
    return scores.to(torch.promote_types(scores.dtype, torch.float32))


class _Sampler:
    """Each row's next token from its logits: greedy at temperature 0; otherwise a draw from ``softmax(logits / T)``
    restricted by top-k / top-p, taken as ``argmax(logits / T + Gumbel noise)`` with noise from the row's own
    generator. Also the sampler's log-prob of the picked token at temperature T (at 1 when greedy), in the logits'
    precision (at least float32) so that it can be compared with the trainer's."""

    def __init__(self, seeds: list[int], settings: SamplingSettings, device):
        from transformers import TopKLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.greedy = settings.temperature <= 0
        self.temperature = settings.temperature or 1.0
        self.device = device
        self.warpers = ([TopKLogitsWarper(top_k=settings.top_k)] if settings.top_k else []) + (
            [TopPLogitsWarper(top_p=settings.top_p)] if settings.top_p < 1.0 else [])

    def __call__(self, logits: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [A] and their log-probs [A] for the batch rows whose sample numbers are ``rows``."""
        scores = _at_least_float32(logits) / self.temperature
        logps = torch.log_softmax(scores, dim=-1)
        if self.greedy:
            tokens = logits.argmax(-1)
        else:
            for warp in self.warpers:
                scores = warp(None, scores)
            vocab = scores.shape[-1]
            uniform = torch.stack([torch.rand(vocab, generator=self.generators[r], dtype=torch.float64,
                                              device=self.device)
                                   for r in rows])
            tokens = (scores.double() - torch.log(-torch.log(uniform.clamp_(1e-300, 1.0 - 1e-16)))).argmax(-1)
        return tokens, logps.gather(1, tokens[:, None]).squeeze(1)


def _prompt_inputs(model, input_ids: torch.Tensor) -> tuple[object, dict, int]:
    """The module to decode with, its prefill inputs and the number of virtual tokens: prompt / p-tuning adapters
    put learned embeddings before the input (PEFT's own forward would add them again at every decoding step), so
    their base model is fed those embeddings, then the prompt's."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning:
        return model, {"input_ids": input_ids}, 0
    base = model.get_base_model()
    embeddings = base.get_input_embeddings()(input_ids)
    virtual = model.get_prompt(batch_size=input_ids.shape[0]).to(embeddings.dtype)
    return base, {"inputs_embeds": torch.cat([virtual, embeddings], 1)}, virtual.shape[1]


def _last_logits_only(model) -> dict:
    """Ask the prefill for the last position's logits only, where the model's forward can (every transformers LM;
    remote code may not)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


class TransformersBackend:
    """Samples with the trained model itself (one forward pass per token, KV cache, left padding); nothing to sync."""

    def __init__(self, model, tokenizer, batch_size: int = 64, progress: bool = False):
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress
        self.stats = GenerationStats()
        eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids |= set(config_eos if isinstance(config_eos,
                                                     list) else [config_eos] if config_eos is not None else [])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids))

    def sync(self, model) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], seeds: list[int], settings: SamplingSettings) -> list[Completion]:
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
        out: list[Completion | None] = [None] * len(prompts)
        try:
            for first in tqdm(range(0, len(order), self.batch_size), desc="sampling", leave=False,
                              disable=not self.progress):
                chosen = order[first : first + self.batch_size]
                for i, completion in zip(chosen,
                                         self._batch([prompts[i] for i in chosen], [seeds[i] for i in chosen],
                                                     settings)):
                    out[i] = completion
        finally:
            self.model.train(was_training)
        self.stats.seconds += time.perf_counter() - start
        self.stats.tokens += sum(len(c.token_ids) for c in out)
        return out

    def _batch(self, prompts: list[list[int]], seeds: list[int], settings: SamplingSettings) -> list[Completion]:
        """Prefill each distinct prompt once (a group's samples copy its cache), then decode one token
        per row per forward pass. A row stops at EOS (or once its tail holds a stop string) and finished rows leave
        the batch as soon as they are a quarter of it, so the passes shrink with the work left instead of running
        every row to the longest."""
        device = next(self.model.parameters()).device
        rows, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        mask = torch.ones((rows, width + settings.max_new_tokens), dtype=torch.long)
        for r, prompt in enumerate(prompts):
            input_ids[r, width - len(prompt):] = torch.tensor(prompt)
            mask[r, : width - len(prompt)] = 0
        distinct: dict[tuple, int] = {}
        source = torch.tensor([distinct.setdefault(tuple(p), r) for r, p in enumerate(prompts)])
        firsts = torch.tensor(sorted(distinct.values()))
        model, inputs, virtual = _prompt_inputs(self.model, input_ids[firsts].to(device))
        mask = torch.cat([torch.ones((rows, virtual), dtype=torch.long), mask], 1).to(device)
        width += virtual
        positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        cache = reserved_cache(model.config, width + settings.max_new_tokens)
        sampler = _Sampler(seeds, settings, device)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logps: list[list[float]] = [[] for _ in range(rows)]
        live, done = list(range(rows)), [False] * rows  # batch row -> prompt row; prompt rows that ended
        logits = None if virtual else prefill_packed(model, cache, [prompts[f] for f in firsts.tolist()], width)
        if logits is None:
            logits = model(**inputs, **_last_logits_only(model), attention_mask=mask[firsts, :width],
                           position_ids=positions[firsts], past_key_values=cache, use_cache=True).logits[:, -1]
        if len(firsts) < rows:  # each row takes its prompt's cache and logits
            expand = torch.searchsorted(firsts, source).to(device)
            cache.reorder_cache(expand)
            logits = logits[expand]
        positions = positions[:, -1] + 1
        for step in range(settings.max_new_tokens):
            picked, picked_logps = sampler(logits, live)
            for r, token, logp in zip(live, picked.tolist(), picked_logps.tolist()):
                if not done[r]:
                    tokens[r].append(token)
                    logps[r].append(logp)
                    done[r] = token in self.eos_ids or self._stopped(tokens[r], settings)
            finished = [i for i, r in enumerate(live) if done[r]]
            if len(finished) == len(live) or step == settings.max_new_tokens - 1:
                break
            if 4 * len(finished) >= len(live):
                keep = torch.tensor([i for i, r in enumerate(live) if not done[r]], device=device)
                cache.reorder_cache(keep)
                mask, positions, picked = mask[keep], positions[keep], picked[keep]
                live = [live[i] for i in keep.tolist()]
            at = width + step
            logits = model(input_ids=picked[:, None], attention_mask=mask[:, : at + 1], position_ids=positions[:, None],
                           past_key_values=cache, cache_position=torch.tensor([at], device=device),
                           use_cache=True).logits[:, -1]
            positions = positions + 1
        return [self._completion(tokens[r], logps[r], settings) for r in range(rows)]

    def _stopped(self, tokens: list[int], settings: SamplingSettings) -> bool:
        """Whether the last tokens hold a stop string (only to end decoding early: ``_completion`` cuts exactly)."""
        if not settings.stop:
            return False
        tail = self.tokenizer.decode(tokens[-4 * max(len(s) for s in settings.stop) - 4 :], skip_special_tokens=True)
        return any(s in tail for s in settings.stop)

    def _completion(self, tokens: list[int], logps: list[float], settings: SamplingSettings) -> Completion:
        """Cut a generated row where it ended: after its EOS, or after the shortest prefix that holds a stop string
        (decoding only checked the row's tail for one)."""
        end = next((t + 1 for t, token in enumerate(tokens) if token in self.eos_ids), None)
        finished, end = end is not None, end or len(tokens)
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        if settings.stop and any(s in text for s in settings.stop):
            for t in range(1, end + 1):  # the shortest prefix that holds a stop string
                prefix = self.tokenizer.decode(tokens[:t], skip_special_tokens=True)
                if any(s in prefix for s in settings.stop):
                    end, finished, text = t, True, prefix
                    break
        return Completion(tokens[:end], logps[:end], truncated=not finished, text=text)
