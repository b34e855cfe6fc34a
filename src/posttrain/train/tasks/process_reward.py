"""Process reward models: a correctness label per solution step, read at the step's separator token.

The layout is TRL's ``PRMTrainer`` (raw text, no chat template): ``[bos] prompt step_1 sep step_2 sep ...``, each
step's label on the last token of ``step + separator``; a 2-class token head (``AutoModelForTokenClassification``)
is trained by cross-entropy averaged over every labeled token of the optimizer step. A step's score is the
probability of class 1 (a correct step) at its separator; a solution's score aggregates them (the minimum, by
default: one wrong step spoils a solution, as in Lightman et al., 2023 and Wang et al., 2024, Math-Shepherd).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from posttrain.core.errors import UserError
from posttrain.data.encoders import LabeledSteps, StepsBatch, StepsEncoder, labeled_steps
from posttrain.data.store import load_examples
from posttrain.data.tokenize import TokenizedExample
from posttrain.model.forward import HeadOutputs
from posttrain.train.tasks.reward_model import ClassifierTask


class ProcessRewardTask(ClassifierTask):
    name = "prm"
    peft_task_type = "TOKEN_CLS"
    per_token = True
    num_labels = 2
    progress = {"acc": "accuracy"}

    def __init__(self, recipe, tokenizer):
        self.recipe, self.tokenizer = recipe, tokenizer
        self.cfg = recipe.prm

    # -- data ---------------------------------------------------------------------------------
    def build_dataset(self, which: str, quiet: bool = False):
        last_only = self.cfg.train_on_last_step_only and which == "train"  # held-out data keeps every step's label
        encoder = StepsEncoder(self.tokenizer, self.cfg.step_separator, self.cfg.max_prompt_length, last_only,
                               self.recipe.data.max_length)
        out = load_examples(self.recipe.data, self.recipe.train.seed, which, encoder, labeled_steps, quiet)
        if not out and self.recipe.data.sources(which):
            raise UserError(f"data.{which}: no record has a labeled step within "
                            f"data.max_length={self.recipe.data.max_length}")
        if not out:
            return out
        self.track_sources(which, out)
        if not quiet:
            r = out.summary
            print(f"data.{which}: {r['records']} records -> {len(out)} solutions, {r['steps']:.0f} labeled steps "
                  f"({r['correct'] / r['steps']:.0%} correct); truncated {r['truncated']:.0f}, dropped {r['dropped']}",
                  flush=True)
        return out

    def adapter_init_examples(self, examples: Sequence[LabeledSteps]) -> Iterable[TokenizedExample]:
        return (e.tokens for e in examples)

    def collate(self, examples: list[LabeledSteps]) -> StepsBatch:
        batch = self.pack([e.tokens for e in examples], max_length=self.recipe.data.max_length)
        flat = np.concatenate([e.labels for e in examples])
        offsets = np.cumsum([0] + [len(e.labels) for e in examples])[:-1]
        labels = torch.from_numpy(flat)[torch.from_numpy(offsets)[batch.target_example] + batch.target_rank]
        return StepsBatch(batch, labels)

    def module(self, model) -> HeadOutputs:
        return HeadOutputs(model)

    # -- loss -----------------------------------------------------------------------------------
    def normalizer(self, sb: StepsBatch) -> float:
        """The loss is a mean over the labeled steps of the whole optimizer step (TRL: over a batch's labeled
        tokens)."""
        return float(len(sb.labels))

    def logits(self, module, sb: StepsBatch) -> torch.Tensor:
        b = sb.batch
        return module(b.input_ids, b.position_ids, b.attention_mask, b.target_index + 1, segments=b.segments)

    def loss(self, module, sb: StepsBatch, normalizer: float):
        logits = self.logits(module, sb)
        loss = F.cross_entropy(logits, sb.labels, reduction="sum") / normalizer
        right = float((logits.detach().argmax(-1) == sb.labels).sum())
        return loss, {"accuracy": (right, float(len(sb.labels)))}

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def eval_sums(self, module, sb: StepsBatch) -> dict[str, float]:
        logits = self.logits(module, sb)
        predicted, labels = logits.argmax(-1), sb.labels
        return {"steps": float(len(labels)), "loss": float(F.cross_entropy(logits, labels, reduction="sum")),
                **{f"{p}{y}": float(((predicted == p) & (labels == y)).sum()) for p in (0, 1) for y in (0, 1)}}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Token accuracy and step-level F1 of each class: ``f1_correct`` for steps labeled correct, ``f1_error`` for
        the wrong ones (finding errors is what a PRM is for), and their mean."""
        steps = max(sums["steps"], 1.0)
        f1 = {}
        for cls, name in ((1, "correct"), (0, "error")):
            true_pos, predicted, actual = (
                sums[f"{cls}{cls}"],
                sums[f"{cls}0"] + sums[f"{cls}1"],
                sums[f"0{cls}"] + sums[f"1{cls}"],
            )
            f1[name] = 2 * true_pos / (predicted + actual) if predicted + actual else 0.0
        return {"eval/loss": sums["loss"] / steps, "eval/accuracy": (sums["00"] + sums["11"]) / steps,
                "eval/f1_correct": f1["correct"], "eval/f1_error": f1["error"],
                "eval/f1": (f1["correct"] + f1["error"]) / 2}

    def annotate(self, model) -> None:
        config = model.config
        config.id2label, config.label2id = {0: "error", 1: "correct"}, {"error": 0, "correct": 1}
        config.step_separator = self.cfg.step_separator
