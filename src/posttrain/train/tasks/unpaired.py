"""Unpaired task (KTO, BCO, APO-zero): completions labelled desirable or undesirable on their own.

KTO's reference point z0 is the policy / reference KL on *mismatched* pairs: the prompt of
example i with the completion of example i+1 *of the dataset* (TRL pairs within the batch; a
fixed partner keeps the estimate independent of batching and lets the precomputed reference
cache it). It is estimated over the whole optimizer step, every micro-batch and every process,
before any backward pass (TRL estimates it per micro-batch, so there accumulation changes it).
BCO's reward shift is a running mean of every reward seen in training; it is part of the
checkpoint, so a resumed run continues with the same shift.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from posttrain.core.errors import UserError
from posttrain.data.store import load_examples
from posttrain.data.tokenize import ExampleTokenizer, TokenizedExample
from posttrain.model.forward import final_hidden_states, sequence_logps
from posttrain.objectives.unpaired import check_unpaired, density_ratio, fit_prompt_classifier, unpaired_loss
from posttrain.train.reference import Reference
from posttrain.train.task import OfflineTask
from posttrain.data.encoders import LabelledExample, UnpairedBatch, UnpairedEncoder


class UnpairedTask(OfflineTask):
    name = "kto"

    def __init__(self, recipe, tokenizer):
        self.recipe, self.tokenizer, self.loss_cfg = recipe, tokenizer, recipe.loss
        self.spec = check_unpaired(self.loss_cfg.name, self.loss_cfg.beta)
        self.beta = self.spec.beta(self.loss_cfg.beta)
        self.step_kl: torch.Tensor | None = None  # KTO's z0 for the current optimizer step
        udm = self.loss_cfg.changed({"density_ratio", "min_density_ratio", "max_density_ratio", "prompt_sample_size"})
        if udm and ("density_ratio" not in self.spec.needs or not self.loss_cfg.density_ratio):
            raise UserError(f"loss: {', '.join(sorted(udm))} need loss.name: bco and loss.density_ratio: true")
        self.ratios: dict[str, torch.Tensor] = {}
        self.reference = Reference(recipe, True, [self.loss_cfg.name])
        self.tokenize = ExampleTokenizer(tokenizer, recipe.data)
        self.datasets: dict[str, list[LabelledExample]] = {}
        self.reward_sum, self.reward_count = 0.0, 0  # BCO's running mean

    # -- data ---------------------------------------------------------------------------------
    def build_dataset(self, which: str, quiet: bool = False):
        out = load_examples(self.recipe.data, self.recipe.train.seed, which, UnpairedEncoder(self.tokenize),
                            lambda sequences, extra,
                            index: LabelledExample(sequences[0], extra["label"], index, which), quiet)
        if not out and self.recipe.data.sources(which):
            raise UserError(f"data.{which}: every example was dropped (too long for "
                            f"data.max_length={self.recipe.data.max_length})")
        if not out:
            return out
        desirable = out.summary["desirable"]
        if which == "train" and desirable in (0, len(out)):
            raise UserError("data.train: unpaired losses need both desirable and undesirable examples")
        self.track_sources(which, out)
        self.datasets[which] = out
        if not quiet:
            r = out.summary
            print(f"data.{which}: {r['records']} records -> {len(out)} examples ({desirable:.0f} desirable, "
                  f"{len(out) - desirable:.0f} undesirable), dropped {r['dropped']}", flush=True)
        return out

    def adapter_init_examples(self, examples: Sequence[LabelledExample]) -> Iterable[TokenizedExample]:
        """EVA initializes from the prompts with their desirable completions."""
        return (e.example for e in examples if e.label)

    def collate(self, examples: list[LabelledExample]) -> UnpairedBatch:
        batch = self.pack([e.example for e in examples], max_length=self.recipe.data.max_length)
        mismatched = None
        if "kl" in self.spec.needs:
            dataset = self.datasets[examples[0].split]
            shifted = [self.mismatch(e, dataset[(e.index + 1) % len(dataset)]) for e in examples]
            mismatched = self.pack(shifted, max_length=self.recipe.data.max_length)
        labels = torch.tensor([e.label for e in examples])
        return UnpairedBatch(batch, mismatched, labels, torch.tensor([e.index for e in examples]), examples[0].split)

    def mismatch(self, prompt_of: LabelledExample, completion_of: LabelledExample) -> TokenizedExample:
        p, c = prompt_of.prompt_length, completion_of.prompt_length
        ids = np.concatenate([prompt_of.example.input_ids[:p], completion_of.example.input_ids[c:]])
        weights = np.concatenate([np.zeros(p, np.float32), (completion_of.example.weights[c:] > 0).astype(np.float32)])
        limit = self.recipe.data.max_length
        return TokenizedExample(ids[:limit], weights[:limit])

    # -- reference ----------------------------------------------------------------------------
    def setup(self, model, accelerator, train: list, evaluation: list) -> None:
        super().setup(model, accelerator, train, evaluation)
        if self.loss_cfg.density_ratio:
            self.fit_density_ratios(model, accelerator.device, {"train": train, "eval": evaluation})
        self.reference.prepare(model, accelerator, {"train": train, "eval": evaluation}, self.collate, _reference_stats)

    # -- BCO's underlying distribution matching ---------------------------------------------------
    @torch.no_grad()
    def fit_density_ratios(self, model, device, splits: dict[str, list]) -> None:
        """Fit p(desirable | prompt) on prompt embeddings of the initial model (mean-pooled last hidden states:
        the BCO paper uses a separate embedding model), then weight every undesirable example by its density ratio."""
        cfg = self.loss_cfg
        embeddings = {split: self.prompt_embeddings(model, device,
                                                    examples) for split, examples in splits.items() if examples}
        generator = torch.Generator().manual_seed(self.recipe.train.seed)
        train = splits["train"]
        sample = torch.randperm(len(train), generator=generator)[: cfg.prompt_sample_size]
        labels = torch.tensor([train[i].label for i in sample.tolist()])
        classify = fit_prompt_classifier(embeddings["train"][sample], labels)
        self.ratios = {split: density_ratio(classify(e), cfg.min_density_ratio, cfg.max_density_ratio).float()
                       for split, e in embeddings.items()}

    def prompt_embeddings(self, model, device, examples: list[LabelledExample], size: int = 16) -> torch.Tensor:
        context = model.disable_adapter() if hasattr(model, "peft_config") else contextlib.nullcontext()
        out = []
        with context:
            for start in range(0, len(examples), size):
                prompts = [e.example.input_ids[: max(e.prompt_length, 1)] for e in examples[start : start + size]]
                width = max(len(p) for p in prompts)
                ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros(len(prompts), width, dtype=torch.long)
                for row, prompt in enumerate(prompts):
                    ids[row, : len(prompt)] = torch.from_numpy(prompt)
                    mask[row, : len(prompt)] = 1
                hidden = final_hidden_states(model, ids.to(device), None, mask.to(device))
                out.append(((hidden * mask.to(device)[..., None]).sum(1) / mask.sum(1,
                                                                                    keepdim=True).to(device)).float().cpu())
        return torch.cat(out)

    def reference_stats(self, module, batch: UnpairedBatch, names=("logps",)) -> dict[str, torch.Tensor]:
        if self.reference.mode == "precomputed":
            return self.reference.cached(batch.split, batch.index, list(names), batch.batch.input_ids.device)
        return self.reference.run(module, _reference_stats, batch, names)

    # -- loss ---------------------------------------------------------------------------------
    def normalizer(self, batch: UnpairedBatch) -> float:
        return float(len(batch.labels))

    def step_batches(self, step: int, examples: list, module) -> list[UnpairedBatch]:
        batches = super().step_batches(step, examples, module)
        if "kl" in self.spec.needs:
            self.step_kl = self.reference_point(module, batches)
        return batches

    @torch.no_grad()
    def reference_point(self, module, batches: list[UnpairedBatch]) -> torch.Tensor:
        """KTO's z0: the mean mismatched-pair log-ratio over the whole step, before any backward pass."""
        total, count = 0.0, 0
        for batch in batches:
            reference = self.reference_stats(module, batch, ("mismatched_logps",))["mismatched_logps"]
            total += float((sequence_logps(module, batch.mismatched) - reference).sum())
            count += len(batch.labels)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            device = batches[0].labels.device
            packed = self.accelerator.reduce(torch.tensor([total, count], dtype=torch.float64, device=device), "sum")
            total, count = float(packed[0]), int(packed[1])
        return torch.tensor(total / count, device=batches[0].labels.device)

    def kl_estimate(self, module, batch: UnpairedBatch, training: bool) -> torch.Tensor | None:
        """The step's z0 in training; a held-out batch's own estimate in evaluation."""
        if "kl" not in self.spec.needs:
            return None
        if training:
            return self.step_kl
        with torch.no_grad():
            reference = self.reference_stats(module, batch, ("mismatched_logps",))["mismatched_logps"]
            return (sequence_logps(module, batch.mismatched) - reference).mean()

    def compute(self, module, batch: UnpairedBatch, training: bool):
        """Training steps update BCO's shift; evaluation (where processes may see different numbers of
        batches) does not."""
        logps = sequence_logps(module, batch.batch)
        reference = self.reference_stats(module, batch)
        kl = self.kl_estimate(module, batch, training)
        if training and "reward_shift" in self.spec.needs:
            self.update_shift(self.beta * (logps.detach() - reference["logps"]))
        cfg = self.loss_cfg
        ratios = self.ratios[batch.split][batch.index].to(logps.device) if cfg.density_ratio else None
        losses, metrics = unpaired_loss(cfg.name, logps, reference["logps"], batch.labels, self.beta, kl, self.shift,
                                        cfg.desirable_weight, cfg.undesirable_weight, ratios)
        return losses, metrics, self.beta * (logps.detach() - reference["logps"])

    def loss(self, module, batch: UnpairedBatch, normalizer: float):
        losses, metrics, _ = self.compute(module, batch, training=True)
        labels = batch.labels
        out = {"kl": float(metrics["kl"]) * len(labels) / normalizer,
               "reward_shift": self.shift * len(labels) / normalizer}
        for name, mask in (("chosen", labels), ("rejected", ~labels)):
            count = int(mask.sum())
            if count:
                out[f"rewards/{name}"] = (float(metrics[f"rewards/{name}"]) * count, count)
                out[f"logps/{name}"] = (float(metrics[f"logps/{name}"]) * count, count)
        return losses.sum() / normalizer, out

    # -- BCO's reward shift ---------------------------------------------------------------------
    @property
    def shift(self) -> float:
        return self.reward_sum / self.reward_count if self.reward_count else 0.0

    def update_shift(self, rewards: torch.Tensor) -> None:
        total, count = float(rewards.sum()), len(rewards)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            packed = self.accelerator.reduce(torch.tensor([total, count], dtype=torch.float64, device=rewards.device),
                                             "sum")
            total, count = float(packed[0]), int(packed[1])
        self.reward_sum += total
        self.reward_count += count

    def state_dict(self) -> dict:
        return {"reward_sum": self.reward_sum, "reward_count": self.reward_count}

    def load_state_dict(self, state: dict) -> None:
        self.reward_sum, self.reward_count = state.get("reward_sum", 0.0), state.get("reward_count", 0)

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def eval_sums(self, module, batch: UnpairedBatch) -> dict[str, float]:
        """A desirable example counts as right when its implicit reward is above the shift, an undesirable one below."""
        losses, _, rewards = self.compute(module, batch, training=False)
        rewards = rewards - self.shift
        right = torch.where(batch.labels, rewards > 0, rewards < 0).float() + 0.5 * (rewards == 0).float()
        return {"examples": float(len(batch.labels)), "loss": float(losses.sum()), "correct": float(right.sum())}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["examples"], 1.0)
        return {"eval/loss": sums["loss"] / n, "eval/accuracy": sums["correct"] / n}


def _reference_stats(module, batch: UnpairedBatch, names=("logps", "mismatched_logps")) -> dict[str, torch.Tensor]:
    stats = {}
    if "logps" in names:
        stats["logps"] = sequence_logps(module, batch.batch)
    if "mismatched_logps" in names and batch.mismatched is not None:
        stats["mismatched_logps"] = sequence_logps(module, batch.mismatched)
    return stats
