"""Preference task: (prompt, chosen, rejected) -> sequence log-probs -> a pairwise loss.

Chosen and rejected completions of a micro-batch go through the model in one packed forward
pass; per-sequence sums come from the per-target log-probs with one ``index_add``. The
reference log-probs come from the policy with its adapter disabled (no second model), a
frozen copy of the initial policy, or a cache computed once before training.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from posttrain.core.errors import UserError
from posttrain.data.encoders import PairBatch, PairEncoder, PairExample, collate_pairs
from posttrain.data.store import load_examples
from posttrain.data.tokenize import ExampleTokenizer, TokenizedExample
from posttrain.model.forward import TargetLogprobs, sequence_stats
from posttrain.objectives.pairwise import (PAIRWISE, Pair, check_pairwise, dft_log_partition, dft_scores,
                                           implicit_rewards, pairwise_loss)
from posttrain.train.reference import Reference
from posttrain.train.task import OfflineTask

STATS = ("logps", "tails")
_SIDE_KEYS = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in STATS)


def _side_stats(module, pair_batch: PairBatch) -> dict[str, torch.Tensor]:
    """Per-pair reference statistics, split into chosen and rejected, for the precomputed cache."""
    stats = sequence_stats(module, pair_batch)
    half = pair_batch.num_pairs
    return {f"{side}_{k}": stats[k][part] for k in STATS
            for side, part in (("chosen", slice(None, half)), ("rejected", slice(half, 2 * half)))}


class PreferenceTask(OfflineTask):
    name = "dpo"

    def __init__(self, recipe, tokenizer):
        self.recipe, self.tokenizer = recipe, tokenizer
        self.loss_cfg = recipe.loss
        self.names = self.loss_cfg.names()
        self.hyperparameters = self.loss_cfg.hyperparameters()
        specs = check_pairwise(self.names, self.hyperparameters, self.loss_cfg.beta, self.loss_cfg.weights)
        needs = set().union(*(spec.needs for spec in specs))
        self.needs_reference, self.needs_gold, self.needs_tails = ("reference" in needs, "gold" in needs,
                                                                   "tails" in needs)
        dft = [spec.name for spec in specs if "log_partition" in spec.needs]
        if len(dft) > 1:
            raise UserError("loss.name: dft and dft2 track the same per-prompt state; use one of them")
        self.dft = dft[0] if dft else None
        stray = self.loss_cfg.changed({"dft_gamma", "dft_u_init"})
        if stray and not self.dft:
            raise UserError(f"loss: {', '.join(sorted(stray))} not used by {', '.join(self.names)}")
        self.partition: dict[int, float] = {}
        self.tokenize = ExampleTokenizer(tokenizer, recipe.data)
        self.reference = Reference(recipe, self.needs_reference, self.names)

    # -- data ---------------------------------------------------------------------------------
    def build_dataset(self, which: str, quiet: bool = False):
        pairs = load_examples(self.recipe.data, self.recipe.train.seed, which,
                              PairEncoder(self.tokenize, self.needs_gold, self.names),
                              lambda sides, extra, index: PairExample(sides[0], sides[1], index, which,
                                                                      sides[2] if len(sides) > 2 else None), quiet)
        if not pairs and self.recipe.data.sources(which):
            raise UserError(f"data.{which}: every pair was dropped (too long for "
                            f"data.max_length={self.recipe.data.max_length})")
        self.track_sources(which, pairs)
        if pairs and not quiet:
            r = pairs.summary
            print(f"data.{which}: {r['records']} records -> {r['examples']} pairs, {r['tokens']:,.0f} tokens; "
                  f"truncated {r['truncated']:.0f} ({self.recipe.data.truncation}), dropped {r['dropped']}", flush=True)
        return pairs

    def adapter_init_examples(self, pairs: Sequence[PairExample]) -> Iterable[TokenizedExample]:
        """EVA initializes from the prompts with their preferred completions."""
        return (p.chosen for p in pairs)

    def collate(self, pairs: list[PairExample]) -> PairBatch:
        return collate_pairs(pairs, self.layout, self.recipe.data.max_length)

    def module(self, model) -> TargetLogprobs:
        """What the engine trains: target log-probs, plus log sum_v p_v^2 for WPO."""
        return TargetLogprobs(model, self.recipe.train.logprob_chunk, with_sum_sq=self.loss_cfg.wpo)

    # -- reference ----------------------------------------------------------------------------
    def setup(self, model, accelerator, train: list[PairExample], evaluation: list[PairExample]) -> None:
        super().setup(model, accelerator, train, evaluation)
        self.reference.prepare(model, accelerator, {"train": train, "eval": evaluation}, self.collate, _side_stats)

    def reference_stats(self, module, pair_batch: PairBatch) -> dict[str, torch.Tensor]:
        if self.reference.mode != "precomputed":
            return self.reference.run(module, sequence_stats, pair_batch)
        cached = self.reference.cached(pair_batch.split, pair_batch.pair_index, list(_SIDE_KEYS),
                                       pair_batch.batch.input_ids.device)
        return {k: torch.cat([cached[f"chosen_{k}"], cached[f"rejected_{k}"]]) for k in STATS}

    # -- loss ---------------------------------------------------------------------------------
    def normalizer(self, pair_batch: PairBatch) -> float:
        """The loss is a mean over the pairs of the whole optimizer step."""
        return float(pair_batch.num_pairs)

    def pair_losses(self, module, pair_batch: PairBatch, training: bool = False):
        policy = sequence_stats(module, pair_batch)
        reference = self.reference_stats(module, pair_batch) if self.needs_reference else None
        half = pair_batch.num_pairs
        split = lambda t: (t[:half], t[half : 2 * half])  # noqa: E731
        chosen, rejected = split(policy["logps"])
        chosen_len, rejected_len = split(policy["lengths"])
        extra = {}
        if self.needs_tails:
            extra = dict(zip(("chosen_tail_logps", "rejected_tail_logps"), split(policy["tails"])))
            extra.update(zip(("ref_chosen_tail_logps", "ref_rejected_tail_logps"), split(reference["tails"])))
        if self.needs_gold:
            extra.update(gold_logps=policy["logps"][2 * half :], gold_lengths=policy["lengths"][2 * half :])
        if "aligned" in policy:
            extra.update(zip(("chosen_wpo_logps", "rejected_wpo_logps"), split(policy["aligned"])))
        ref_chosen, ref_rejected = split(reference["logps"]) if reference else (None, None)
        if self.dft:
            tau = self.hyperparameters.get("tau", PAIRWISE[self.dft].defaults["tau"])
            scores = dft_scores(self.dft, rejected, ref_rejected, rejected_len, tau)
            extra["log_partition"] = self.log_partition(pair_batch, scores, training)
        losses, metrics = pairwise_loss(self.names, chosen, rejected, ref_chosen, ref_rejected, chosen_len,
                                        rejected_len,
                                        beta=self.loss_cfg.beta, weights=self.loss_cfg.weights, **self.hyperparameters,
                                        **extra)
        return losses, metrics, Pair(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len)

    def loss(self, module, pair_batch: PairBatch, normalizer: float):
        losses, metrics, _ = self.pair_losses(module, pair_batch, training=True)
        share = pair_batch.num_pairs / normalizer  # metrics are batch means; the engine sums shares into step means
        return losses.sum() / normalizer, {k: float(v) * share for k, v in metrics.items()}

    # -- DFT's per-prompt log partition estimates (task state: saved in checkpoints) -------------
    def log_partition(self, pair_batch: PairBatch, scores: torch.Tensor, training: bool) -> torch.Tensor:
        if not training:  # held-out prompts have no history: the batch's own scores (weight 1)
            return scores
        init = self.loss_cfg.dft_u_init
        previous = torch.tensor([self.partition.get(int(i), init) for i in pair_batch.pair_index],
                                dtype=scores.dtype, device=scores.device)
        updated = dft_log_partition(scores, previous, self.loss_cfg.dft_gamma)
        entries = list(zip(pair_batch.pair_index.tolist(), updated.tolist()))
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            entries = gather_object(entries)  # every process keeps every prompt's estimate
        self.partition.update(entries)
        return updated

    def state_dict(self) -> dict:
        return {"dft_log_partition": {str(k): v for k, v in self.partition.items()}} if self.dft else {}

    def load_state_dict(self, state: dict) -> None:
        self.partition = {int(k): v for k, v in state.get("dft_log_partition", {}).items()}

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def eval_sums(self, module, pair_batch: PairBatch) -> dict[str, float]:
        """Held-out preference accuracy: by the rewards the loss compares (ties count half) and by mean log-prob."""
        losses, _, pair = self.pair_losses(module, pair_batch)
        n_c, n_r = pair.lengths()
        logp_margin = pair.chosen_logps / n_c - pair.rejected_logps / n_r
        chosen, rejected = implicit_rewards(self.names, pair, self.loss_cfg.beta)
        reward_margin = chosen - rejected
        return {
            "pairs": float(pair_batch.num_pairs),
            "loss": float(losses.sum()),
            "correct": float((reward_margin > 0).sum() + 0.5 * (reward_margin == 0).sum()),
            "logp_correct": float((logp_margin > 0).sum()),
            "margin": float(reward_margin.sum()),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        pairs = max(sums["pairs"], 1.0)
        return {"eval/loss": sums["loss"] / pairs, "eval/accuracy": sums["correct"] / pairs,
                "eval/logp_accuracy": sums["logp_correct"] / pairs, "eval/margin": sums["margin"] / pairs}

