"""Online and iterative DPO: preference pairs sampled from the policy itself, labelled as they are made.

Online (Guo et al., 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL's OnlineDPOTrainer):
every optimizer step samples ``rollout.num_generations`` completions of each of its prompts with the current
weights, labels the best and the worst (by the rewards, a reward model, or an LLM judge asked in both answer
orders), and trains any registered pairwise loss on the pairs. Iterative (Xu et al., 2023, "Some things are more
CRINGE than others"; Yuan et al., 2024, "Self-Rewarding Language Models" when the judge is the policy itself):
``online.iterations`` rounds, each generating a whole preference set with the weights at the round's start and
training ``train.max_steps / iterations`` steps on it (``rounds.py``). A prompt whose best and worst completions
score the same gives no pair. The pairwise loss, its reference and its metrics are those of ``posttrain dpo``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from posttrain.core.errors import UserError
from posttrain.data.encoders import PairBatch, PairExample
from posttrain.data.tokenize import completion_example
from posttrain.evaluate.stats import wilson_interval
from posttrain.model.load import load_model, load_tokenizer, resolve_model
from posttrain.rewards.judge import PairwiseJudge, round_robin
from posttrain.rollout.backend import SamplingSettings, sample_seed
from posttrain.train.task import sum_over_processes
from posttrain.train.tasks.preference import PreferenceTask
from posttrain.train.tasks.rounds import PoolTask
from posttrain.train.tasks.sampling import PromptExample, mean_or_zero


@dataclass
class WeightedPairs:
    """Pairs with a weight: 0 for the stand-in pair of a process that got none while others train (every
    process must run a backward pass for gradients to be reduced)."""

    pairs: PairBatch
    weight: float = 1.0

    @property
    def num_tokens(self) -> int:
        return self.pairs.num_tokens

    def to(self, device) -> "WeightedPairs":
        return WeightedPairs(self.pairs.to(device), self.weight)


class OnlineDPOTask(PoolTask):
    name = "online-dpo"
    progress = {"margin": "rewards/margin", "pairs": "online/pairs"}
    step_size_formula = (
        "train.batch_size x train.grad_accum x processes (online), online.prompts_per_iteration (iterative)"
    )
    fields = ("prompt", "chosen", "rejected")

    def __init__(self, recipe, tokenizer):
        super().__init__(recipe, tokenizer, recipe.online)
        self.pairs = PreferenceTask(recipe, tokenizer)
        if self.pairs.needs_gold or self.pairs.dft:
            raise UserError(f"loss.name {self.pairs.names}: online DPO has no gold answers and no fixed prompts to "
                            f"track; "
                            "use a loss that compares chosen and rejected only")
        self.num_prompts = 0
        self.judge: PairwiseJudge | None = None
        self.baseline: dict[int, str] = {}  # held-out prompt -> the starting policy's greedy answer (judge runs)

    @property
    def steps_per_batch(self) -> int:
        iterations = self.cfg.iterations
        return 1 if iterations is None else self.recipe.train.max_steps // iterations

    def build_dataset(self, which: str, quiet: bool = False) -> list[PromptExample]:
        examples = super().build_dataset(which, quiet)
        if which == "train":
            self.num_prompts = len(examples)
        return examples

    def examples_per_step(self) -> int:
        """Prompts per round: one step's pairs (online), or ``online.prompts_per_iteration`` (iterative)."""
        if self.cfg.iterations is None:
            train = self.recipe.train
            return train.batch_size * train.grad_accum * self.processes()[0]
        return self.cfg.prompts_per_iteration or self.num_prompts

    def module(self, model):
        return self.pairs.module(model)

    def setup(self, model, accelerator, train: list, evaluation: list) -> None:
        super().setup(model, accelerator, train, evaluation)
        self.pairs.setup(model, accelerator, [], [])
        if self.cfg.judge is not None:
            self.judge = self.build_judge(model)
            world, rank = self.processes()
            mine = evaluation[rank::world]
            if mine:  # before any update (and before a resume loads later weights): the starting policy
                self.baseline = {ex.index: c.text for ex, c in zip(mine, self.greedy(mine))}

    def build_judge(self, model) -> PairwiseJudge:
        judge = self.cfg.judge
        if judge.model == "policy":
            return PairwiseJudge(model, self.tokenizer, judge.template, judge.batch_size)
        path = resolve_model(judge.model)
        frozen = load_model(path, self.recipe.trust_remote_code,
                            allow_pickle=self.recipe.allow_pickle).eval().requires_grad_(False)
        frozen.to(device=self.device, dtype=next(model.parameters()).dtype)
        return PairwiseJudge(frozen, load_tokenizer(path, self.recipe.trust_remote_code), judge.template,
                             judge.batch_size)

    def greedy(self, examples: list[PromptExample]) -> list:
        settings = SamplingSettings(self.settings.max_new_tokens, 0.0, stop=self.settings.stop)
        return self.backend.generate([ex.prompt_ids for ex in examples], [0] * len(examples), settings)

    # -- a round's pairs ----------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, round_: int, step: int, examples: list) -> list[tuple[list[int], ...]]:
        """Sample, label and pair this round's prompts (each process its share); every process gets every pair."""
        g = self.recipe.rollout.num_generations
        world, rank = self.processes()
        indices = self.step_indices(round_, len(examples))
        mine = [(pos, examples[indices[pos]]) for pos in range(rank, len(indices), world)]
        flat = [(pos, ex) for pos, ex in mine for _ in range(g)]
        seeds = [sample_seed(self.recipe.train.seed, step, pos, k % g) for k, (pos, _) in enumerate(flat)]
        generated, seconds = self.backend.stats.tokens, self.backend.stats.seconds
        completions = self.backend.generate([ex.prompt_ids for _, ex in flat], seeds, self.settings)
        values, consistent = self.label(mine, flat, completions)
        entries, chosen_scores, rejected_scores, chosen_lengths, rejected_lengths = [], [], [], [], []
        for k, (_, ex) in enumerate(mine):
            group = values[k * g : (k + 1) * g]
            best, worst = int(np.argmax(group)), int(np.argmin(group))
            chosen, rejected = completions[k * g + best].token_ids, completions[k * g + worst].token_ids
            if group[best] > group[worst] and chosen != rejected:
                entries.append((list(ex.prompt_ids), list(chosen), list(rejected)))
                chosen_scores.append(group[best]), rejected_scores.append(group[worst])
                chosen_lengths.append(len(chosen)), rejected_lengths.append(len(rejected))
        local = {"pool": entries, "prompts": len(mine), "values": values, "consistent": consistent,
                 "chosen": chosen_scores, "rejected": rejected_scores, "chosen_len": chosen_lengths,
                 "rejected_len": rejected_lengths, "generated": self.backend.stats.tokens - generated,
                 "seconds": self.backend.stats.seconds - seconds}
        every = self.gathered(local)
        pool = [entry for part in every for entry in part["pool"]]
        cat = lambda key: [v for part in every for v in part[key]]  # noqa: E731
        prompts = sum(p["prompts"] for p in every)
        generate_s = max(p["seconds"] for p in every)
        self.round_metrics = {
            "online/round": float(round_ + 1), "online/pairs": float(len(pool)),
            "online/tie_fraction": 1 - len(pool) / max(prompts, 1),
            "online/score_mean": mean_or_zero(cat("values")),
            "online/chosen_score": mean_or_zero(cat("chosen")), "online/rejected_score": mean_or_zero(cat("rejected")),
            "online/chosen_length": mean_or_zero(cat("chosen_len")),
            "online/rejected_length": mean_or_zero(cat("rejected_len")),
            "time/generate_s": generate_s,
            "generate/tokens_per_s": sum(p["generated"] for p in every) / max(generate_s, 1e-9),
        }
        if self.judge is not None:
            self.round_metrics["judge/consistency"] = mean_or_zero(cat("consistent"))
        if self.cfg.iterations is not None:
            self.say(f"iteration {round_ + 1}/{self.cfg.iterations}: {len(pool)} pairs from {prompts} prompts "
                     f"({self.round_metrics['online/tie_fraction']:.1%} tied)")
        return pool

    def label(self, mine: list, flat: list, completions: list) -> tuple[list[float], list[float]]:
        """A score per completion (its rewards, or its summed chance of beating the other completions of its prompt
        by the judge), and the judge's per-comparison consistency."""
        if self.judge is None:
            scores = self.score([ex for _, ex in flat], completions, [pos for pos, _ in flat])
            for error in scores.errors[:3]:
                self.say(f"reward error: {error}")
            return list(scores.total), []
        g = self.recipe.rollout.num_generations
        groups = [[c.text for c in completions[k * g : (k + 1) * g]] for k in range(len(mine))]
        wins, verdicts = round_robin(self.judge, [ex.conversation for _, ex in mine], groups)
        return [w for group in wins for w in group], verdicts.consistent.float().tolist()

    # -- batches and loss -------------------------------------------------------------------------------
    def step_entries(self, step: int) -> list[int]:
        if self.cfg.iterations is not None:
            return super().step_entries(step)
        world, rank = self.processes()  # online: each of the step's pairs once, split between processes
        return [int(i) for i in np.array_split(np.arange(len(self.pool)), world)[rank]]

    def step_batches(self, step: int, examples: list, module) -> list:
        batches = super().step_batches(step, examples, module)
        if not batches and self.pool:
            batches = [WeightedPairs(self.collate_pool([0]).pairs, 0.0).to(self.device)]
        return batches

    def collate_pool(self, indices: list[int]) -> WeightedPairs:
        pairs = [PairExample(completion_example(p, c), completion_example(p, r), i, "train")
                 for i in indices for p, c, r in [self.pool[i]]]
        return WeightedPairs(self.pairs.collate(pairs))

    def normalizer(self, batch: WeightedPairs) -> float:
        return batch.pairs.num_pairs * batch.weight

    def loss(self, module, batch: WeightedPairs, normalizer: float) -> tuple[torch.Tensor, dict]:
        losses, metrics, _ = self.pairs.pair_losses(module, batch.pairs, training=True)
        share = batch.pairs.num_pairs * batch.weight / normalizer
        return losses.sum() * batch.weight / normalizer, {k: float(v) * share for k, v in metrics.items()}

    # -- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, module, examples: list) -> dict[str, float]:
        """With rewards: greedy completions scored as in ``grpo``. With a judge: the win rate of the current
        greedy answers against the starting policy's, both orders asked, with a 95% Wilson interval (a tie, 0.5
        exactly, or the same answer, counts half); a policy judge with an adapter judges with its adapter off (the
        starting model)."""
        if self.judge is None:
            return super().evaluate(module, examples)
        world, rank = self.processes()
        mine = examples[rank::world]
        answers = [c.text for c in self.greedy(mine)] if mine else []
        fixed = self.cfg.judge.model == "policy" and hasattr(self.model, "peft_config")
        with self.model.disable_adapter() if fixed else nullcontext():
            verdicts = self.judge.compare([ex.conversation for ex in mine], answers,
                                          [self.baseline[ex.index] for ex in mine])
        same = torch.tensor([a == self.baseline[ex.index] for a, ex in zip(answers, mine)], dtype=torch.bool)
        tie = same | ((verdicts.first_better - 0.5).abs() < 1e-6)  # the same answer (or an undecided judge): half a win
        wins = (~tie & (verdicts.first_better > 0.5)).sum() + 0.5 * tie.sum()
        local = {"n": float(len(mine)), "wins": float(wins), "ties": float(tie.sum()),
                 "consistent": float(verdicts.consistent.sum()), "length": float(sum(len(a) for a in answers))}
        sums = sum_over_processes(local, self.accelerator)
        n = max(sums["n"], 1.0)
        low, high = wilson_interval(sums["wins"], int(sums["n"]))
        return {"eval/win_rate": sums["wins"] / n, "eval/win_rate_ci_low": low, "eval/win_rate_ci_high": high,
                "eval/tie_rate": sums["ties"] / n,
                "eval/judge_consistency": sums["consistent"] / n, "eval/answer_chars": sums["length"] / n,
                "eval/n": sums["n"]}
