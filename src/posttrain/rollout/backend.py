"""Sampling completions for learning from the model's own samples.

A *generation backend* turns prompt token ids into completions with the policy's current weights
(LoRA adapters active) and reports, per completion: the token ids, the sampler's log-probability of
each sampled token at the sampling temperature (to compare with the trainer's), and whether the
token budget cut it off. The default backend is transformers ``generate`` with the KV cache and
left padding.

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
    mask: list[int] | None = None  # with tool calls: 1 for the model's tokens, 0 for tool output (None: all the model's)
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


class _SampledTokens:
    """Logits processors for HF ``generate`` in greedy mode that together *sample*: record the sampler's
    log-probs at temperature T, then temperature, top-k, top-p, and Gumbel noise from per-row generators
    (argmax of ``logits / T + Gumbel`` is a draw from ``softmax(logits / T)``, restricted as top-k / top-p say).
    Temperature 0 is greedy decoding: only the recording (at T = 1) runs, and ``generate`` takes the argmax."""

    def __init__(self, seeds: list[int], settings: SamplingSettings, device):
        from transformers import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = settings.temperature or 1.0
        self.device = device
        self.logps: list[torch.Tensor] = []
        self.previous: torch.Tensor | None = None
        warpers = []
        if settings.top_k:
            warpers.append(TopKLogitsWarper(top_k=settings.top_k))
        if settings.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=settings.top_p))
        sampling = [self._scale, *warpers, self._gumbel] if settings.temperature > 0 else []
        self.processors = LogitsProcessorList([self._record, *sampling])

    def _record(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:  # the token sampled last step is the last input now
            self.logps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(_at_least_float32(scores) / self.temperature, dim=-1)
        return scores

    def _scale(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return _at_least_float32(scores) / self.temperature

    def _gumbel(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64, device=self.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp_(1e-300, 1.0 - 1e-16)))
        return scores.double() + gumbel

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[rows, generated] sampler log-probs, once generation is over."""
        if self.previous is not None:
            self.logps.append(self.previous.gather(1, sequences[:, -1:]).squeeze(1))
        return torch.stack(self.logps, 1) if self.logps else torch.zeros(sequences.shape[0], 0)


class TransformersBackend:
    """Samples with the trained model itself (HF ``generate``, KV cache, left padding); nothing to sync."""

    def __init__(self, model, tokenizer, batch_size: int = 64, progress: bool = False):
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress
        self.stats = GenerationStats()
        eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids |= set(config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else [])
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
            for first in tqdm(range(0, len(order), self.batch_size), desc="sampling", leave=False, disable=not self.progress):
                chosen = order[first : first + self.batch_size]
                for i, completion in zip(chosen, self._batch([prompts[i] for i in chosen], [seeds[i] for i in chosen], settings)):
                    out[i] = completion
        finally:
            self.model.train(was_training)
        self.stats.seconds += time.perf_counter() - start
        self.stats.tokens += sum(len(c.token_ids) for c in out)
        return out

    def _batch(self, prompts: list[list[int]], seeds: list[int], settings: SamplingSettings) -> list[Completion]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, prompt in enumerate(prompts):
            input_ids[r, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[r, width - len(prompt):] = 1
        sampler = _SampledTokens(seeds, settings, device)
        stop = {"stop_strings": list(settings.stop), "tokenizer": self.tokenizer} if settings.stop else {}
        sequences = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=settings.max_new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1, logits_processor=sampler.processors,
            pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids), **stop)
        generated = sequences[:, width:]
        logps = sampler.finish(sequences).cpu()
        return [self._completion(row.tolist(), logps[r].tolist(), settings) for r, row in enumerate(generated.cpu())]

    def _completion(self, tokens: list[int], logps: list[float], settings: SamplingSettings) -> Completion:
        """Cut a generated row where it ended: after its EOS, or after the first stop string (rows that finished
        early are padded by ``generate``)."""
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
