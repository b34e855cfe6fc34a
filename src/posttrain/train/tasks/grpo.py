"""Online RL from verifiable or programmatic rewards: GRPO and its variants, RLOO, REINFORCE++, ReMax.

One optimizer step: take the step's prompts (a seeded slice, as offline tasks), sample
``rollout.num_generations`` completions of each with the current policy, score them with the reward
functions (in worker processes), compute advantages over the whole step (all processes' completions
gathered: a group is never split, batch statistics are global), then cut the step into micro-batches
of ``train.batch_size`` completions. Each micro-batch's loss is a registered policy loss, plus the KL
to the reference where asked, aggregated by per-token weights over a normalizer the engine sums over
the step: accumulation and process count cannot change the update.

With ``rl.num_iterations`` = k > 1 a rollout batch is trained on for k optimizer steps, the ratio taken
against the log-probs at sampling time (kept in the checkpoint, so a resume mid-cycle continues it).
PPO (``ppo.py``) reuses all of this with a value model, epochs and mini-batches over a rollout batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from posttrain.data.batching import Batch
from posttrain.data.tokenize import completion_example
from posttrain.errors import UserError
from posttrain.objectives.advantages import ADVANTAGES, advantages
from posttrain.objectives.policy import POLICY_LOSSES, aggregation_weights, kl_estimate, sampler_correction
from posttrain.rollout.backend import SamplingSettings, sample_seed
from posttrain.train.forward import TargetLogprobs, model_inputs
from posttrain.train.reference import Reference
from posttrain.train.tasks.sampling import PromptExample, SamplingTask, eval_mode, mean_or_zero


def tool_masks(completions: list) -> list[list[int]] | None:
    """Per completion token, 1 for the model's and 0 for tool output; None when no completion used a tool."""
    if not any(c.mask for c in completions):
        return None
    return [c.mask or [1] * len(c.token_ids) for c in completions]


@dataclass
class Rollouts:
    """This process's completions of one step, completion by completion; per-token tensors are flat [N] over the
    tokens the model generated (with a tool, its output tokens are context: in ``completion_ids``, masked out)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    active: torch.Tensor  # [S] bool: trained on (overlong filtering masks truncated completions)
    advantages: torch.Tensor  # [N]
    sampler_logps: torch.Tensor  # [N]
    old_logps: torch.Tensor | None = None  # [N], when a rollout batch feeds several optimizer steps
    ref_logps: torch.Tensor | None = None  # [N], with the KL in the loss
    values: torch.Tensor | None = None  # [N], PPO: the value model's estimates at sampling time
    returns: torch.Tensor | None = None  # [N], PPO: the value targets
    masks: list[list[int]] | None = None  # with a tool: per completion token, 1 = the model's, 0 = tool output

    OPTIONAL = ("old_logps", "ref_logps", "values", "returns")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"prompt_lengths": torch.tensor([len(p) for p in self.prompt_ids]),
               "completion_lengths": torch.tensor([len(c) for c in self.completion_ids]),
               "prompt_tokens": torch.tensor([t for p in self.prompt_ids for t in p], dtype=torch.long),
               "completion_tokens": torch.tensor([t for c in self.completion_ids for t in c], dtype=torch.long),
               "active": self.active, "advantages": self.advantages, "sampler_logps": self.sampler_logps}
        out.update({k: v for k in self.OPTIONAL if (v := getattr(self, k)) is not None})
        if self.masks is not None:
            out["completion_mask"] = torch.tensor([t for m in self.masks for t in m], dtype=torch.long)
        return out

    def mask(self, i: int) -> list[int]:
        return self.masks[i] if self.masks is not None else [1] * len(self.completion_ids[i])

    def model_tokens(self) -> list[int]:
        """Per completion, the tokens the model generated (the per-token tensors' entries)."""
        return [sum(m) for m in self.masks] if self.masks is not None else [len(c) for c in self.completion_ids]

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Rollouts":
        def split(flat, lengths):
            return [chunk.tolist() for chunk in torch.split(flat, lengths.tolist())]

        masks = split(t["completion_mask"], t["completion_lengths"]) if "completion_mask" in t else None
        return cls(split(t["prompt_tokens"], t["prompt_lengths"]), split(t["completion_tokens"], t["completion_lengths"]),
                   t["active"], t["advantages"], t["sampler_logps"], **{k: t.get(k) for k in cls.OPTIONAL}, masks=masks)


@dataclass
class RLBatch:
    """A micro-batch of completions: the packed tokens plus per-target values aligned with ``batch`` targets."""

    batch: Batch
    advantages: torch.Tensor
    sampler_logps: torch.Tensor
    weights: torch.Tensor  # aggregation weight per target (0 for inactive completions)
    units: float  # this micro-batch's share of the aggregation normalizer
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    def to(self, device) -> "RLBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        moved["batch"] = self.batch.to(device)
        return RLBatch(**moved)


def varies(values: list[float], g: int) -> list[bool]:
    """Per group of ``g`` consecutive values, whether they differ."""
    return [max(values[i : i + g]) > min(values[i : i + g]) for i in range(0, len(values), g)]


@dataclass
class Sampled:
    """One process's sampled and scored groups of a step (completions of a group are contiguous)."""

    flat: list = field(default_factory=list)  # (group position, prompt) per completion
    completions: list = field(default_factory=list)
    totals: list[float] = field(default_factory=list)  # shaped, weighted reward per completion
    by_reward: dict[str, list] = field(default_factory=dict)  # every sampled completion, for the metrics
    failed: dict[str, int] = field(default_factory=dict)
    reward_s: float = 0.0
    group_count: int = 0  # groups a step trains on (the first round's)
    zero_std_groups: int = 0  # of the first round
    rounds: int = 0
    trained_groups: int = 0
    spare: tuple | None = None  # (flat, completions) of one dropped group, when every group was dropped

    def add(self, flat: list, completions: list, scores, totals: list[float]) -> None:
        """Append a sampling round (``totals``: its shaped rewards)."""
        self.flat += flat
        self.completions += completions
        self.totals += totals
        self.reward_s += scores.seconds
        for name, values in scores.by_reward.items():
            self.by_reward.setdefault(name, []).extend(values)
            self.failed[name] = self.failed.get(name, 0) + scores.failed[name]

    def select(self, groups: list[int], g: int) -> None:
        if not groups and self.flat:
            self.spare = (self.flat[:g], self.completions[:g])
        chosen = [i * g + k for i in groups for k in range(g)]
        self.flat, self.completions = [self.flat[i] for i in chosen], [self.completions[i] for i in chosen]
        self.totals = [self.totals[i] for i in chosen]
        self.trained_groups = len(groups)

    def counts(self) -> dict:
        return {"by_reward": self.by_reward, "failed": self.failed, "reward_s": self.reward_s, "rounds": self.rounds,
                "group_count": self.group_count, "zero_std_groups": self.zero_std_groups,
                "trained_groups": self.trained_groups}


class GRPOTask(SamplingTask):
    name = "grpo"
    empty_steps_allowed = True  # dynamic sampling may drop every group of a step
    progress = {"reward": "reward/mean", "len": "completion/length_mean"}
    step_size_formula = "train.batch_size x train.grad_accum x processes / rollout.num_generations"

    def __init__(self, recipe, tokenizer):
        super().__init__(recipe, tokenizer, recipe.rl)
        self.check_settings()
        self.reference = Reference(recipe, self.cfg.kl_coef > 0, ["rl.kl_coef"])
        self.buffer: Rollouts | None = None
        self.last_metrics: dict[str, float] = {}

    # a rollout batch feeds epochs x mini_batches optimizer steps; the ratio is then taken against its log-probs
    @property
    def epochs(self) -> int:
        return self.cfg.num_iterations

    mini_batches = 1

    @property
    def streams(self) -> int:
        """Prompt streams per rollout: the first, plus one per resampling round."""
        return self.cfg.max_resample + 1

    @property
    def dynamic_sampling(self) -> str:
        return self.cfg.dynamic_sampling

    @property
    def needs(self) -> tuple[str, ...]:
        """What the advantage estimator needs beyond rewards (ReMax: a greedy baseline)."""
        return ADVANTAGES[self.cfg.advantage].needs

    @property
    def steps_per_batch(self) -> int:
        return self.epochs * self.mini_batches

    @property
    def reuses_rollouts(self) -> bool:
        return self.steps_per_batch > 1

    def check_settings(self) -> None:
        chosen = {k for k in self.cfg.hyperparameters()}
        ADVANTAGES.check([self.cfg.advantage], set())
        POLICY_LOSSES.check([self.cfg.policy_loss], set())
        unused = chosen - set(ADVANTAGES[self.cfg.advantage].defaults) - set(POLICY_LOSSES[self.cfg.policy_loss].defaults)
        if unused:
            raise UserError(f"rl: {', '.join(sorted(unused))} not used by advantage {self.cfg.advantage} "
                            f"or policy_loss {self.cfg.policy_loss}")
        if self.cfg.advantage == "reinforce_pp" and self.cfg.kl_coef and self.cfg.kl_in != "reward":
            raise UserError("rl.advantage: reinforce_pp puts the KL penalty in the reward: set rl.kl_in: reward")
        if self.cfg.policy_loss == "reinforce" and self.cfg.num_iterations > 1:
            raise UserError("rl.policy_loss: reinforce is on-policy only; with rl.num_iterations > 1 use ppo_clip, gspo or cispo")

    # -- set-up -------------------------------------------------------------------------------
    def module(self, model) -> TargetLogprobs:
        return TargetLogprobs(model, self.recipe.train.logprob_chunk, with_entropy=True, temperature=self.settings.temperature)

    def setup(self, model, accelerator, train: list, evaluation: list) -> None:
        super().setup(model, accelerator, train, evaluation)
        self.reference.setup(model, accelerator)

    def examples_per_step(self) -> int:
        """Prompts per rollout batch, all processes together (a rollout batch feeds ``mini_batches`` steps per epoch)."""
        train = self.recipe.train
        return train.batch_size * train.grad_accum * self.mini_batches * self.processes()[0] // self.recipe.rollout.num_generations

    # -- one step's data ------------------------------------------------------------------------
    def step_batches(self, step: int, examples: list, module) -> list:
        cycle = self.steps_per_batch
        if step % cycle == 0 or self.buffer is None:
            self.buffer = self.collect(step - step % cycle, examples, module)
        members = self.mini_batch_members(step, len(self.buffer.completion_ids))
        size = self.recipe.train.batch_size
        return [self.micro_batch(self.buffer, members[lo : lo + size]).to(self.device) for lo in range(0, len(members), size)]

    def mini_batch_members(self, step: int, count: int) -> list[int]:
        """The completions of the rollout batch that optimizer ``step`` trains on: all of them, or with
        mini-batches, one part of a seeded shuffle of them per epoch (a function of the step, so resumable)."""
        if self.mini_batches == 1:
            return list(range(count))
        position = step % self.steps_per_batch
        epoch, part = divmod(position, self.mini_batches)
        seed = (self.recipe.train.seed * 1_000_003 + step - position) * 1_009 + epoch
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
        return [int(i) for i in np.array_split(order, self.mini_batches)[part]]

    def my_prompts(self, step: int, examples: list, stream: int = 0) -> list[tuple[int, PromptExample]]:
        """(position in the step, prompt) for this process; ``stream`` > 0 draws the extra prompts of resampling."""
        world, rank = self.processes()
        per_rank = self.examples_per_step() // world
        rollout = step // self.steps_per_batch
        indices = self.step_indices(rollout * self.streams + stream, len(examples))
        positions = range(rank * per_rank, (rank + 1) * per_rank)
        return [(stream * self.examples_per_step() + p, examples[indices[p]]) for p in positions]

    def sample(self, step: int, prompts: list[tuple[int, PromptExample]]) -> tuple[list, list, list]:
        """Completions and rewards of ``prompts``: (group positions, completions, scores)."""
        g = self.recipe.rollout.num_generations
        seed = self.recipe.train.seed
        flat = [(pos, ex) for pos, ex in prompts for _ in range(g)]
        seeds = [sample_seed(seed, step, pos, k % g) for k, (pos, _) in enumerate(flat)]
        completions = self.backend.generate([ex.prompt_ids for _, ex in flat], seeds, self.settings)
        return flat, completions, self.score([ex for _, ex in flat], completions, [pos for pos, _ in flat])

    @torch.no_grad()
    def collect(self, step: int, examples: list, module) -> Rollouts:
        """Sample and score this step's groups, then compute their advantages over all processes."""
        cfg = self.cfg
        gen_before, gen_tokens_before = self.backend.stats.seconds, self.backend.stats.tokens
        tool_errors_before = getattr(self.backend, "errors", 0)
        sampled = self.sample_groups(step, examples)
        flat, completions = sampled.flat, sampled.completions
        prompt_ids = [ex.prompt_ids for _, ex in flat]
        completion_ids = [c.token_ids for c in completions]
        masks = tool_masks(completions)
        lengths = torch.tensor([c.model_tokens for c in completions], dtype=torch.long)
        token_seq = torch.repeat_interleave(torch.arange(len(completion_ids)), lengths)
        truncated = torch.tensor([c.truncated for c in completions], dtype=torch.bool)
        active = ~truncated if cfg.overlong_filter else torch.ones(len(completions), dtype=torch.bool)
        sampler_logps = torch.tensor([x for c in completions for x in c.sampler_logps], dtype=torch.float64)
        policy_logps, ref_logps, values = self.rollout_logps(Rollouts(prompt_ids, completion_ids, active,
                                                                      torch.zeros(len(token_seq)), sampler_logps, masks=masks),
                                                             module)
        kl_values = kl_estimate(policy_logps, ref_logps, cfg.kl_estimator) if cfg.kl_coef and cfg.kl_in == "reward" else None
        baselines = None
        if "greedy_baseline" in self.needs:
            baselines, seconds = self.greedy_baselines(flat)
            sampled.reward_s += seconds
        mine = {"rewards": torch.tensor(sampled.totals, dtype=torch.float64),
                "groups": torch.tensor([pos for pos, _ in flat], dtype=torch.long),
                "token_seq": token_seq, "lengths": lengths, "truncated": truncated, "baselines": baselines, "kl": kl_values,
                "values": values,
                "penalty": -cfg.kl_coef * kl_values if kl_values is not None else torch.zeros(len(token_seq), dtype=torch.float64),
                "generated": self.backend.stats.tokens - gen_tokens_before, "generate_s": self.backend.stats.seconds - gen_before,
                "tool_calls": torch.tensor([c.tool_calls for c in completions], dtype=torch.long),
                "tool_errors": getattr(self.backend, "errors", 0) - tool_errors_before, **sampled.counts()}
        every = self.gathered(mine)
        advantage, returns = self.global_advantages(every)
        self.last_metrics = self.rollout_metrics(every)
        if not completions and sampled.spare is not None and self.processes()[0] > 1:
            return self.placeholder(*sampled.spare)
        return Rollouts(prompt_ids, completion_ids, active, advantage, sampler_logps,
                        policy_logps if self.reuses_rollouts else None,
                        ref_logps if cfg.kl_coef and cfg.kl_in == "loss" else None, values, returns, masks)

    @staticmethod
    def placeholder(flat: list, completions: list) -> Rollouts:
        """A dropped group trained with weight 0, for a process whose every group was dropped while others train:
        each process must run a backward pass for the gradients to be reduced across processes. It takes no
        part in the advantages or metrics."""
        sampler_logps = torch.tensor([x for c in completions for x in c.sampler_logps], dtype=torch.float64)
        return Rollouts([ex.prompt_ids for _, ex in flat], [c.token_ids for c in completions],
                        torch.zeros(len(completions), dtype=torch.bool), torch.zeros(len(sampler_logps), dtype=torch.float64),
                        sampler_logps, masks=tool_masks(completions))

    def sample_groups(self, step: int, examples: list) -> "Sampled":
        """This process's groups of the step, scored; with DAPO's dynamic sampling only groups whose rewards before
        length shaping vary (Yu et al., 2025, Eq. 11: not all right, not all wrong), refilled from extra prompts
        (``resample``) up to ``rl.max_resample`` rounds."""
        g = self.recipe.rollout.num_generations
        sampled = Sampled()
        keep: list[bool] = []
        rounds = 0
        while True:
            flat, completions, scores = self.sample(step, self.my_prompts(step, examples, stream=rounds))
            shaped = self.shape_rewards(list(scores.total), completions)
            sampled.add(flat, completions, scores, shaped)
            varied = varies(list(scores.total), g)  # DAPO filters on accuracy: the outcome before length shaping
            keep += varied if self.dynamic_sampling != "none" else [True] * len(varied)
            for error in scores.errors[:3]:
                self.say(f"reward error: {error}")
            if rounds == 0:
                sampled.group_count, sampled.zero_std_groups = len(varied), len(varied) - sum(varies(shaped, g))
            if self.dynamic_sampling != "resample" or sum(keep) >= sampled.group_count or rounds >= self.streams - 1:
                break
            rounds += 1
        sampled.rounds = rounds
        sampled.select([i for i, k in enumerate(keep) if k][: sampled.group_count], g)
        return sampled

    def rollout_logps(self, rollouts: Rollouts, module) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        """The sampling policy's log-probs (when a rollout batch feeds several steps, and for the KL in the reward)
        and the reference's (for any KL), computed without adapter dropout; no values (PPO has them)."""
        cfg = self.cfg
        policy_logps = ref_logps = None
        with eval_mode(module):
            if self.reuses_rollouts or (cfg.kl_coef and cfg.kl_in == "reward"):
                policy_logps = self.logps_of(rollouts, lambda batch: self.unwrapped(module)(**model_inputs(batch))[0])
            if cfg.kl_coef:
                ref_logps = self.logps_of(rollouts, lambda batch: self.reference.run(module, self.reference_logps, batch))
        return policy_logps, ref_logps, None

    def greedy_baselines(self, flat: list[tuple[int, PromptExample]]) -> tuple[torch.Tensor, float]:
        """ReMax's baseline: the (shaped) reward of each prompt's greedy completion, per completion [B]; and the
        seconds spent scoring (generation is counted by the backend)."""
        prompts = list({pos: ex for pos, ex in flat}.items())
        greedy = SamplingSettings(self.settings.max_new_tokens, 0.0, stop=self.settings.stop)
        completions = self.backend.generate([ex.prompt_ids for _, ex in prompts], [0] * len(prompts), greedy)
        scores = self.score([ex for _, ex in prompts], completions, [pos for pos, _ in prompts])
        by_position = dict(zip([pos for pos, _ in prompts], self.shape_rewards(list(scores.total), completions)))
        return torch.tensor([by_position[pos] for pos, _ in flat], dtype=torch.float64), scores.seconds

    def shape_rewards(self, totals: list[float], completions: list) -> list[float]:
        """DAPO's soft overlong punishment (Yu et al., 2025, Eq. 13): 0 up to ``L_max - L_cache`` tokens, then
        linearly down to ``-overlong_penalty`` at ``L_max`` = max_new_tokens."""
        buffer = self.cfg.overlong_buffer
        if buffer is None:
            return totals
        limit = self.settings.max_new_tokens
        return [r + self.cfg.overlong_penalty * min(0.0, (limit - buffer - len(c.token_ids)) / buffer) for r, c in zip(totals, completions)]

    def global_advantages(self, every: list[dict]) -> tuple[torch.Tensor, None]:
        """Advantages over every process's completions of the step: this process's part (and no value targets)."""
        offsets = np.cumsum([0] + [len(p["rewards"]) for p in every])
        token_offsets = np.cumsum([0] + [len(p["token_seq"]) for p in every])
        values = advantages(self.cfg.advantage, torch.cat([p["rewards"] for p in every]), torch.cat([p["groups"] for p in every]),
                            torch.cat([p["token_seq"] + int(o) for p, o in zip(every, offsets)]),
                            torch.cat([p["penalty"] for p in every]),
                            torch.cat([p["baselines"] for p in every]) if every[0]["baselines"] is not None else None,
                            **self.cfg.hyperparameters())
        rank = self.processes()[1]
        self.all_advantages = values
        return values[int(token_offsets[rank]) : int(token_offsets[rank + 1])], None

    def rollout_metrics(self, every: list[dict]) -> dict[str, float]:
        """What this step's sampling produced, over all processes: the numbers that explain a flat loss."""
        def cat(key):
            return torch.cat([p[key] for p in every])

        rewards, lengths, truncated, advantage = cat("rewards"), cat("lengths").double(), cat("truncated").double(), self.all_advantages
        seconds = {key: max(p[key] for p in every) for key in ("generate_s", "reward_s")}  # processes work side by side
        metrics = {
            "reward/mean": mean_or_zero(rewards.tolist()),
            "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "groups/zero_std_fraction": sum(p["zero_std_groups"] for p in every) / max(sum(p["group_count"] for p in every), 1),
            "groups/trained": float(sum(p["trained_groups"] for p in every)),
            "groups/resample_rounds": float(max(p["rounds"] for p in every)),
            "advantage/mean": mean_or_zero(advantage.tolist()),
            "advantage/std": float(advantage.std()) if len(advantage) > 1 else 0.0,
            "completion/length_mean": mean_or_zero(lengths.tolist()),
            "completion/length_max": float(lengths.max()) if len(lengths) else 0.0,
            "completion/truncated_fraction": mean_or_zero(truncated.tolist()),
            "time/generate_s": seconds["generate_s"], "time/reward_s": seconds["reward_s"],
            "generate/tokens_per_s": sum(p["generated"] for p in every) / max(seconds["generate_s"], 1e-9),
        }
        if self.recipe.rollout.tool != "none":
            calls = cat("tool_calls").double()
            metrics.update({"tools/calls_per_completion": mean_or_zero(calls.tolist()),
                            "tools/call_rate": mean_or_zero((calls > 0).double().tolist()),
                            "tools/error_fraction": sum(p["tool_errors"] for p in every) / max(float(calls.sum()), 1.0)})
        for name in every[0]["by_reward"]:
            metrics[f"reward/{name}/mean"] = mean_or_zero([v for p in every for v in p["by_reward"][name] if v is not None])
            metrics[f"reward/{name}/failed"] = float(sum(p["failed"][name] for p in every))
        if every[0]["kl"] is not None:
            metrics["policy/kl_ref"] = mean_or_zero(torch.cat([p["kl"] for p in every]).tolist())
        return metrics

    def reference_logps(self, reference_module, batch: Batch) -> torch.Tensor:
        inner = TargetLogprobs(reference_module.model, self.recipe.train.logprob_chunk, temperature=self.settings.temperature)
        return inner(**model_inputs(batch))

    def logps_of(self, rollouts: Rollouts, compute) -> torch.Tensor:
        """Per-token values of ``compute(batch)`` over the rollouts, in rollout order (micro-batch by micro-batch)."""
        size, out = self.recipe.train.batch_size, []
        for lo in range(0, len(rollouts.completion_ids), size):
            micro = self.micro_batch(rollouts, range(lo, min(lo + size, len(rollouts.completion_ids))))
            values = compute(micro.batch.to(self.device)).double().cpu()
            out.append(torch.empty_like(values).index_put_((micro.extra["order"],), values))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def micro_batch(self, rollouts: Rollouts, members) -> RLBatch:
        members = list(members)
        examples = [completion_example(rollouts.prompt_ids[i], rollouts.completion_ids[i], rollouts.mask(i), index=i)
                    for i in members]  # tool output tokens are context (weight 0), not targets
        batch = self.pack_completions(examples, [len(rollouts.prompt_ids[i]) for i in members])
        counts = rollouts.model_tokens()
        offsets = np.cumsum([0] + counts)
        lengths = torch.tensor([counts[i] for i in members])
        starts = torch.tensor([int(offsets[i]) for i in members])
        order = starts[batch.target_example] + batch.target_rank  # each target's place in the rollout's flat tensors
        local = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), lengths[:-1]]), 0)[batch.target_example] + batch.target_rank
        active = rollouts.active[members]
        weights, units = aggregation_weights(self.cfg.aggregation, batch.target_example, lengths, self.settings.max_new_tokens)
        weights = weights * active[batch.target_example].to(weights.dtype)
        if not bool(active.all()):  # inactive completions leave the normalizer too (renumbered among the active)
            kept = active[batch.target_example]
            renumbered = (torch.cumsum(active.long(), 0) - 1)[batch.target_example[kept]]
            _, units = aggregation_weights(self.cfg.aggregation, renumbered, lengths[active], self.settings.max_new_tokens)
        pick = lambda t: None if t is None else t[order]  # noqa: E731
        return RLBatch(batch, rollouts.advantages[order], rollouts.sampler_logps[order], weights, units,
                       pick(rollouts.old_logps), pick(rollouts.ref_logps), pick(rollouts.values), pick(rollouts.returns),
                       {"order": local})

    # -- loss ---------------------------------------------------------------------------------
    def normalizer(self, batch: RLBatch) -> float:
        return batch.units

    def loss(self, module, rl: RLBatch, normalizer: float) -> tuple[torch.Tensor, dict]:
        logps, entropy = module(**model_inputs(rl.batch))
        per_token, metrics = self.policy_terms(logps, entropy, rl)
        return (per_token * rl.weights.to(logps.dtype)).sum() / normalizer, metrics

    def policy_terms(self, logps: torch.Tensor, entropy: torch.Tensor, rl: RLBatch) -> tuple[torch.Tensor, dict]:
        """The per-token policy loss (with the sampler correction and the KL where asked) and its statistics, as
        (sum, count) pairs over the trained tokens."""
        cfg = self.cfg
        old = rl.old_logps.to(logps.dtype) if rl.old_logps is not None else logps.detach()
        spec = POLICY_LOSSES[cfg.policy_loss]
        out = spec.fn(logps, old, rl.advantages.to(logps.dtype), rl.batch.target_example, **spec.options(None, cfg.hyperparameters()))
        sampler = rl.sampler_logps.to(logps.dtype)
        correction, corrected = sampler_correction(old, sampler, rl.batch.target_example, cfg.sampler_correction,
                                                   cfg.sampler_correction_cap)
        per_token = out.loss * correction
        weights = rl.weights.to(logps.dtype)
        trained = weights > 0
        count = float(trained.sum())
        metrics = {
            "policy/clip_low_fraction": (float(out.clipped_low[trained].sum()), count),
            "policy/clip_high_fraction": (float(out.clipped_high[trained].sum()), count),
            "policy/entropy": (float(entropy[trained].sum()), count),
            "policy/approx_kl_old": (float((0.5 * (logps.detach() - old) ** 2)[trained].sum()), count),
            "policy/sampler_mismatch": (float((old - sampler).abs()[trained].sum()), count),
            "policy/sampler_kl": (float(kl_estimate(sampler, old, "k3")[trained].sum()), count),
        }
        if cfg.sampler_correction != "none":
            metrics["policy/sampler_corrected_fraction"] = (float(corrected[trained].sum()), count)
        if rl.ref_logps is not None:
            kl = kl_estimate(logps, rl.ref_logps.to(logps.dtype), cfg.kl_estimator)
            per_token = per_token + cfg.kl_coef * kl
            metrics["policy/kl_ref"] = (float(kl.detach()[trained].sum()), count)
        return per_token, metrics

    def step_metrics(self) -> dict[str, float]:
        return dict(self.last_metrics)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Mid-cycle of a reused rollout batch: the rollout batch still to train on, and its metrics."""
        if not self.reuses_rollouts or self.buffer is None:
            return {}
        metrics = {f"metrics/{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.last_metrics.items()}
        return {**self.buffer.tensors(), **metrics}

    def load_state_dict(self, state: dict) -> None:
        if state and self.reuses_rollouts:
            self.buffer = Rollouts.from_tensors({k: v for k, v in state.items() if not k.startswith("metrics/")})
            self.last_metrics = {k.removeprefix("metrics/"): float(v) for k, v in state.items() if k.startswith("metrics/")}
