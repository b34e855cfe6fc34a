"""Rejection-sampling fine-tuning: expert iteration (Anthony et al., 2017), RFT (Yuan et al., 2023, "Scaling
Relationship on Learning Mathematical Reasoning with Large Language Models"), STaR (Zelikman et al., 2022).

Each round, at its first optimizer step: sample ``rollout.num_generations`` completions of the round's prompts
with the current weights, score them, keep those the rewards accept (a verifier's threshold, or each prompt's
top k by a reward model), drop duplicates, and train ``rft.steps_per_round`` steps of SFT (token-mean NLL over
each step) on the kept ones. With ``rft.hint`` (STaR's rationalization) prompts that no sample solved are
sampled again with a hint built from the record (its answer), and accepted completions are trained on under
the original prompt. Rounds, their pool and its checkpointing are ``rounds.py``'s.
"""

from __future__ import annotations

import torch

from posttrain.core.errors import UserError
from posttrain.data.batching import Batch
from posttrain.data.formats import Message, Segment
from posttrain.data.tokenize import completion_example
from posttrain.model.forward import TargetLogprobs, model_inputs
from posttrain.rollout.backend import sample_seed
from posttrain.train.tasks.rounds import PoolTask
from posttrain.train.tasks.sampling import PromptExample


class RFTTask(PoolTask):
    name = "rft"
    progress = {"accepted": "rft/acceptance_rate"}
    step_size_formula = "rft.prompts_per_round (default: every training prompt)"
    fields = ("prompt", "completion")

    def __init__(self, recipe, tokenizer):
        super().__init__(recipe, tokenizer, recipe.rft)
        self.num_prompts = 0

    @property
    def steps_per_batch(self) -> int:
        return self.cfg.steps_per_round

    def build_dataset(self, which: str, quiet: bool = False) -> list[PromptExample]:
        examples = super().build_dataset(which, quiet)
        if which == "train":
            self.num_prompts = len(examples)
            if self.cfg.hint is not None:
                for ex in examples:
                    self.hinted(ex)  # a template that names a missing field fails now, not after a round of sampling
        return examples

    def examples_per_step(self) -> int:
        """Prompts per round."""
        return self.cfg.prompts_per_round or self.num_prompts

    def module(self, model) -> TargetLogprobs:
        return TargetLogprobs(model, self.recipe.train.logprob_chunk)

    # -- a round's data -----------------------------------------------------------------------------
    def collate_pool(self, indices: list[int]) -> Batch:
        examples = [completion_example(*self.pool[i], index=i) for i in indices]
        return self.pack_completions(examples, [len(self.pool[i][0]) for i in indices])

    @torch.no_grad()
    def collect(self, round_: int, step: int, examples: list) -> list[tuple[list[int], list[int]]]:
        """Sample, score and filter this round's prompts (each process its share); every process gets the whole
        kept set, in the same order."""
        cfg = self.cfg
        world, rank = self.processes()
        indices = self.step_indices(round_, len(examples))
        mine = [(pos, examples[indices[pos]]) for pos in range(rank, len(indices), world)]
        generated_before, seconds_before = self.backend.stats.tokens, self.backend.stats.seconds
        kept, stats = self.sample_and_accept(step, mine, hinted=False)
        unsolved = [(pos, ex) for pos, ex in mine if pos not in kept]
        hint_stats = {"sampled": 0, "accepted": 0, "solved": 0}
        if cfg.hint is not None and unsolved:
            hinted_kept, hint_stats = self.sample_and_accept(step, unsolved, hinted=True)
            kept.update(hinted_kept)
        local = {"pool": [(pos, pair) for pos in sorted(kept) for pair in kept[pos]], "stats": stats,
                 "hint": hint_stats,
                 "generated": self.backend.stats.tokens - generated_before,
                 "seconds": self.backend.stats.seconds - seconds_before}
        every = self.gathered(local)
        # in prompt order, as one process would have it: the process count must not change what a step trains on
        pool = [pair for _, pair in sorted((entry for part in every for entry in part["pool"]), key=lambda e: e[0])]
        total = {key: sum(p["stats"][key] for p in every) for key in stats}
        hints = {key: sum(p["hint"][key] for p in every) for key in hint_stats}
        prompts = len(indices)
        self.round_metrics = {
            "rft/round": float(round_ + 1),
            "rft/acceptance_rate": total["accepted"] / max(total["sampled"], 1),
            "rft/solved_fraction": (total["solved"] + hints["solved"]) / max(prompts, 1),
            "rft/pool_size": float(len(pool)),
            "rft/duplicates_dropped": float(total["duplicates"]),
            "reward/mean": total["reward_sum"] / max(total["sampled"], 1),
            "time/generate_s": max(p["seconds"] for p in every),
            "generate/tokens_per_s": sum(p["generated"] for p in every) / max(max(p["seconds"] for p in every), 1e-9),
        }
        if cfg.hint is not None:
            self.round_metrics["rft/hint_solved_fraction"] = hints["solved"] / max(prompts - total["solved"], 1)
        self.say(f"round {round_ + 1}/{cfg.rounds}: {total['solved']} of {prompts} prompts solved, "
                 f"{total['accepted']} of {total['sampled']} samples accepted "
                 f"({self.round_metrics['rft/acceptance_rate']:.1%})"
                 + (f", {hints['solved']} more solved with the hint" if cfg.hint is not None else "")
                 + f"; training on {len(pool)} distinct completions")
        return pool

    def sample_and_accept(self, step: int, prompts: list[tuple[int, PromptExample]], hinted: bool) -> tuple[dict, dict]:
        """{position: [(prompt ids, completion ids), ...]} of the accepted completions, and counts."""
        cfg, g = self.cfg, self.recipe.rollout.num_generations
        flat = [(pos, ex) for pos, ex in prompts for _ in range(g)]
        seeds = [
            sample_seed(self.recipe.train.seed, step, pos, k % g + (g if hinted else 0))
            for k, (pos, _) in enumerate(flat)
        ]
        sampled_ids = [self.hinted(ex) if hinted else ex.prompt_ids for _, ex in flat]
        completions = self.backend.generate(sampled_ids, seeds, self.settings)
        scores = self.score([ex for _, ex in flat], completions, [pos for pos, _ in flat])
        for error in scores.errors[:3]:
            self.say(f"reward error: {error}")
        kept: dict[int, list] = {}
        stats = {"sampled": len(flat), "accepted": 0, "solved": 0, "duplicates": 0,
                 "reward_sum": float(sum(scores.total))}
        for lo in range(0, len(flat), g):
            pos, ex = flat[lo]
            group = list(range(lo, lo + g))
            if cfg.accept == "threshold":
                accepted = [i for i in group if scores.total[i] >= cfg.threshold]
            else:
                accepted = sorted(group, key=lambda i: -scores.total[i])[: cfg.top_k]
            stats["accepted"] += len(accepted)
            distinct, seen = [], set()
            for i in accepted:
                key = tuple(completions[i].token_ids)
                if key in seen:
                    stats["duplicates"] += 1
                    continue
                seen.add(key)
                distinct.append((list(ex.prompt_ids), list(completions[i].token_ids)))
            distinct = distinct[: cfg.max_per_prompt] if cfg.max_per_prompt else distinct
            if distinct:
                kept[pos] = distinct
                stats["solved"] += 1
        return kept, stats

    def hinted(self, ex: PromptExample) -> list[int]:
        """The prompt's token ids with ``rft.hint`` (filled with the record's fields) after the last user turn."""
        try:
            hint = self.cfg.hint.format(**ex.columns)
        except (KeyError, IndexError) as exc:
            raise UserError(f"rft.hint names a field the records lack: {exc}") from None
        if self.formatter is None:
            text = ex.conversation + " " + hint
        else:
            messages = [Message(m["role"], [Segment(m["content"])]) for m in ex.conversation]
            messages[-1] = Message(messages[-1].role, [Segment(messages[-1].content + " " + hint)])
            text = self.formatter.render(messages, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.recipe.data.max_length:]

    # -- loss -----------------------------------------------------------------------------------------
    def normalizer(self, batch: Batch) -> float:
        return float(batch.num_targets)

    def loss(self, module, batch: Batch, normalizer: float) -> tuple[torch.Tensor, dict]:
        logps = module(**model_inputs(batch))
        weights = batch.target_weights.to(logps.dtype)
        return -(logps * weights).sum() / normalizer, {}
