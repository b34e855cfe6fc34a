"""SFT task: records -> weighted token targets -> a registered SFT loss over the target tokens.

Variants (``sft:`` in the recipe): the loss (``nll``, ``dynamic_ft``, ``poft`` against aligned
reference models, ``distill`` from a teacher's cached top-k, or on-policy as GKD, the teacher scoring
completions the student samples), and transforms that combine with any
token-level loss: Masked Thought (masked completion inputs, targets kept), Rho-1 token selection
(train on the tokens with the highest excess loss over a reference model) and S3FT (the model's own
correct answers replace gold ones). Every random choice is a function of (seed, step, example), so
accumulation, process count and resume leave the run unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from posttrain.core.errors import UserError
from posttrain.data.batching import Batch
from posttrain.data.encoders import SFTEncoder, sft_example
from posttrain.data.formats import parse_sft
from posttrain.data.store import load_examples
from posttrain.data.tokenize import ExampleTokenizer, TokenizedExample
from posttrain.model.distill import target_topk
from posttrain.model.forward import TargetLogprobs, batch_logprobs, final_hidden_states, per_example_sum
from posttrain.objectives.sft import SFT_LOSSES, poft, select_tokens, selected_count
from posttrain.rollout.backend import SamplingSettings, TransformersBackend, sample_seed
from posttrain.train.precompute import TargetTable, compute_targets, load_frozen
from posttrain.train.self_sample import self_sampled_answers, with_answer
from posttrain.train.task import OfflineTask, sum_over_processes


class SFTTask(OfflineTask):
    name = "sft"

    def __init__(self, recipe, tokenizer):
        self.recipe, self.tokenizer, self.cfg = recipe, tokenizer, recipe.sft
        self.spec = SFT_LOSSES.check([self.cfg.loss], {"beta"} if self.cfg.beta is not None else set())[0]
        if "references" in self.spec.needs and not self.cfg.references:
            raise UserError("sft.loss: poft needs sft.references: the aligned model(s) the trained model should beat")
        self.tokenize = ExampleTokenizer(tokenizer, recipe.data, recipe.data.assistant_only_loss)
        self.tables: dict[str, TargetTable] = {}
        self.ref_means: torch.Tensor | None = None  # PoFT: [n, R] mean log-probs of the reference models
        self.mask_id = self.mask_token_id() if self.cfg.mask_ratio else None
        self.distills = "teacher" in self.spec.needs
        self.on_policy = self.distills and self.cfg.distill.lmbda > 0
        self.generates = self.on_policy
        self.teacher = None  # on-policy distillation: the teacher model itself (off-policy uses a cached top-k)
        self.sampled = {"examples": 0.0, "on_policy": 0.0}

    # -- data ---------------------------------------------------------------------------------
    def build_dataset(self, which: str, quiet: bool = False):
        encoder = SFTEncoder(self.tokenize, keep_record=self.cfg.self_sample and which == "train")
        examples = load_examples(self.recipe.data, self.recipe.train.seed, which, encoder, sft_example, quiet)
        if not examples and self.recipe.data.sources(which):
            raise UserError(f"data.{which}: every record was dropped (too long for data.max_length="
                            f"{self.recipe.data.max_length} or no target tokens)")
        self.track_sources(which, examples)
        if examples and not quiet:
            r = examples.summary
            print(f"data.{which}: {r['records']} records -> {r['examples']} examples, {r['tokens']:,.0f} tokens "
                  f"({r['targets']:,.0f} trained on); truncated {r['truncated']:.0f} ({self.recipe.data.truncation}), "
                  f"dropped {r['dropped']}", flush=True)
        return examples

    def adapter_init_examples(self, examples: list[TokenizedExample]) -> list[TokenizedExample]:
        """Sequences for data-driven adapter initialization (EVA)."""
        return examples

    def collate(self, examples: list[TokenizedExample]) -> Batch:
        return self.pack(examples, max_length=self.recipe.data.max_length)

    def collate_train(self, examples: list[TokenizedExample], step: int) -> Batch:
        if self.on_policy:
            examples = self.student_samples(examples, step)
        batch = self.collate(examples)
        if self.cfg.mask_ratio:
            self.mask_inputs(batch, step)
        return batch

    # -- on-policy distillation ----------------------------------------------------------------------
    def student_samples(self, examples: list[TokenizedExample], step: int) -> list[TokenizedExample]:
        """GKD (Agarwal et al., 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
        Mistakes"): with probability ``lmbda`` (a draw per (seed, step, example)) an example's completion, from its
        first trained token on, is replaced by one the student samples now; the teacher then scores those tokens."""
        d, seed = self.cfg.distill, self.recipe.train.seed
        chosen = [i for i, e in enumerate(examples)
                  if torch.rand(1, generator=torch.Generator().manual_seed(sample_seed(seed, step, e.index, 1)),
                                dtype=torch.float64).item() < d.lmbda]
        self.sampled["examples"] += len(examples)
        self.sampled["on_policy"] += len(chosen)
        if not chosen:
            return examples
        prompts = [examples[i].input_ids[: int(np.argmax(examples[i].weights > 0))].tolist() for i in chosen]
        settings = SamplingSettings(d.max_new_tokens, d.sampling_temperature)
        completions = self.backend.generate(prompts, [sample_seed(seed, step, examples[i].index, 0) for i in chosen],
                                            settings)
        out = list(examples)
        for i, prompt, completion in zip(chosen, prompts, completions):
            ids = prompt + completion.token_ids
            weights = np.zeros(len(ids), np.float32)
            weights[len(prompt):] = 1.0
            out[i] = TokenizedExample(np.array(ids, dtype=np.int64), weights, index=examples[i].index)
        return out

    def step_metrics(self) -> dict[str, float]:
        if not self.on_policy:
            return {}
        counts = sum_over_processes(self.sampled, self.accelerator)  # the step's examples, every process's
        fraction = counts["on_policy"] / max(counts["examples"], 1.0)
        self.sampled = {"examples": 0.0, "on_policy": 0.0}
        return {"distill/on_policy_fraction": fraction}

    # -- Masked Thought -------------------------------------------------------------------------
    def mask_token_id(self) -> int:
        name = self.cfg.mask_token
        if name is not None:
            token_id = self.tokenizer.convert_tokens_to_ids(name)
            if token_id is None or token_id == self.tokenizer.unk_token_id and name != self.tokenizer.unk_token:
                raise UserError(f"sft.mask_token: {name!r} is not a token of the tokenizer")
            return token_id
        return self.tokenizer.unk_token_id if self.tokenizer.unk_token_id is not None else self.tokenizer.pad_token_id

    def mask_inputs(self, batch: Batch, step: int) -> None:
        """Masked Thought (Chen et al., 2024, "Masked Thought: Simply Masking Partial Reasoning Steps Can Improve
        Mathematical Reasoning Learning of Language Models"): each completion token except the last is replaced
        in the *input* by the mask token with probability ``mask_ratio``; the targets stay the original tokens.
        The draw for an example depends only on (seed, step, example), not on its batch."""
        counts = torch.bincount(batch.target_example, minlength=batch.num_examples)
        draws = torch.empty(len(batch.target_ids), dtype=torch.float64)
        for e in range(batch.num_examples):
            seed = (self.recipe.train.seed * 1_000_003 + step) * 1_000_033 + int(batch.example_index[e])
            mine = batch.target_example == e
            draws[mine] = torch.rand(int(counts[e]), generator=torch.Generator().manual_seed(seed),
                                     dtype=torch.float64)[batch.target_rank[mine]]
        last = batch.target_rank == counts[batch.target_example] - 1
        chosen = (draws < self.cfg.mask_ratio) & ~last
        batch.input_ids.view(-1)[batch.target_index[chosen] + 1] = self.mask_id

    # -- models computed once over the training data ------------------------------------------
    def module(self, model) -> TargetLogprobs:
        keys = {"divergence", "jsd_beta", "temperature"}
        distill = self.cfg.distill.model_dump(include=keys) if self.distills else None
        return TargetLogprobs(model, self.recipe.train.logprob_chunk, distill=distill)

    def setup(self, model, accelerator, train: list[TokenizedExample], evaluation: list) -> None:
        super().setup(model, accelerator, train, evaluation)
        if self.cfg.self_sample:
            self.self_sample(model, accelerator, train)
        chunk = self.recipe.train.logprob_chunk
        logps = lambda m, batch: {"logps": batch_logprobs(TargetLogprobs(m, chunk), batch)}  # noqa: E731
        args = (train, self.collate, logps, self.recipe, accelerator, self.tokenizer)
        if self.cfg.token_selection is not None:
            self.tables["selection"] = compute_targets(self.cfg.token_selection.reference, *args,
                                                       name="token_selection_reference")
        if "references" in self.spec.needs:
            counts = torch.tensor([max(e.num_targets, 1) for e in train], dtype=torch.float64)
            means = [compute_targets(spec, *args, name=f"poft_reference_{r}").per_example("logps").double() / counts
                     for r, spec in enumerate(self.cfg.references)]
            self.ref_means = torch.stack(means, 1)
        if self.on_policy:
            self.teacher = load_frozen(self.recipe.teacher, self.recipe, self.tokenizer, accelerator.device, "teacher")
            self.backend = TransformersBackend(model, self.tokenizer, self.recipe.train.batch_size)
        elif self.distills:
            d = self.cfg.distill
            self.tables["teacher"] = compute_targets(self.recipe.teacher, train, self.collate, self.teacher_topk,
                                                     self.recipe,
                                                     accelerator, self.tokenizer, name="teacher_topk",
                                                     settings=f"top_k={d.top_k}|temperature={d.temperature}")

    def teacher_topk(self, teacher, batch: Batch) -> dict[str, torch.Tensor]:
        hidden = final_hidden_states(teacher, batch.input_ids, batch.position_ids, batch.attention_mask, batch.segments)
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.target_index)
        head = teacher.get_output_embeddings()
        ids, logps = target_topk(flat, head.weight, head.bias, self.cfg.distill.top_k, self.cfg.distill.temperature,
                                 self.recipe.train.logprob_chunk)
        return {"ids": ids, "logps": logps}

    def self_sample(self, model, accelerator, train: list[TokenizedExample]) -> None:
        """S3FT: swap in the model's own correct answers (see :mod:`posttrain.train.self_sample`)."""
        from pathlib import Path

        sources = [train.extra(i) for i in range(len(train))]
        parsed = [parse_sft(s["path"], s["where"], s["record"]) for s in sources]
        with accelerator.main_process_first():
            answers = self_sampled_answers(model, self.tokenizer, parsed, [s["record"].get("answer") for s in sources],
                                           self.cfg.self_sample_max_new_tokens, self.recipe.train.batch_size * 4,
                                           Path(self.recipe.output_dir) / "self_sampled_answers.json")
        replaced = 0
        for i, answer in enumerate(answers):
            tokenized = self.tokenize(with_answer(parsed[i], answer)) if answer is not None else None
            if tokenized is not None:
                tokenized.index = i
                train[i] = tokenized
                replaced += 1
        self.self_sampled = replaced
        if accelerator.is_main_process:
            print(f"S3FT: {replaced} of {len(train)} training items answered correctly by the model: trained on its "
                  f"own "
                  f"answers; {len(train) - replaced} on the gold answers", flush=True)

    # -- loss ---------------------------------------------------------------------------------
    def normalizer(self, batch: Batch) -> float:
        """Token-level losses: a mean over the step's target tokens (the selected ones, with token selection);
        PoFT: a mean over the step's examples."""
        if "sequences" in self.spec.needs:
            return float(batch.num_examples)
        if self.cfg.token_selection is not None:
            counts = torch.bincount(batch.target_example[batch.target_weights > 0], minlength=batch.num_examples)
            return float(selected_count(counts.tolist(), self.cfg.token_selection.ratio))
        return float(batch.num_targets)

    def loss(self, module, batch: Batch, normalizer: float) -> tuple[torch.Tensor, dict]:
        teacher = self.teacher_targets(batch)
        out = module(batch.input_ids, batch.position_ids, batch.attention_mask, batch.target_index, batch.target_ids,
                     teacher.get("ids"), teacher.get("logps"), segments=batch.segments)
        logps, divergence = out if teacher else (out, None)
        if "sequences" in self.spec.needs:  # PoFT
            active = (batch.target_weights > 0).to(logps.dtype)
            means = per_example_sum(logps * active, batch) / per_example_sum(active, batch).clamp(min=1)
            references = self.ref_means[batch.example_index.cpu()].to(logps)
            losses = poft(means, references, **self.spec.options(self.cfg.beta, {}))
            return losses.sum() / normalizer, {
                "poft/margin": float((means[:, None] - references).mean()) * batch.num_examples / normalizer
            }
        per_token = self.spec.fn(divergence if divergence is not None else logps)
        weights = batch.target_weights.to(logps.dtype)
        metrics = {}
        if divergence is not None:
            metrics["distill/divergence"] = float((divergence.detach() * (weights > 0)).sum()) / normalizer
        if self.cfg.token_selection is not None:
            excess = self.tables["selection"].for_batch(batch)["logps"].to(logps.dtype) - logps.detach()
            active = weights > 0
            keep = torch.zeros_like(weights)
            keep[active] = select_tokens(excess[active], batch.target_example[active], batch.num_examples,
                                         self.cfg.token_selection.ratio)
            weights = weights * keep
            metrics["selection/excess_loss"] = (float((excess * keep).sum()), float(keep.sum()))
        return (per_token * weights).sum() / normalizer, metrics

    def teacher_targets(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The teacher's top-k at the batch's targets: from the cache, or (on-policy) computed now."""
        if self.teacher is not None:
            with torch.no_grad():
                return self.teacher_topk(self.teacher, batch)
        return self.tables["teacher"].for_batch(batch) if "teacher" in self.tables else {}

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def eval_sums(self, module, batch: Batch) -> dict[str, float]:
        """Held-out NLL and perplexity of the gold targets, whatever the training loss (so variants compare)."""
        logps = batch_logprobs(module, batch)
        mask = batch.target_weights > 0
        return {
            "weighted_nll": float(-(logps * batch.target_weights).sum()),
            "nll": float(-logps[mask].sum()),
            "targets": float(mask.sum()),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        targets = max(sums["targets"], 1.0)
        return {"eval/loss": sums["weighted_nll"] / targets, "eval/ppl": math.exp(min(sums["nll"] / targets, 50.0))}

