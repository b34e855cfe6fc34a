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


import numpy as np
import torch

from posttrain.core.errors import UserError
from posttrain.data.batching import Batch
from posttrain.model.forward import TargetLogprobs, model_inputs
from posttrain.objectives.advantages import ADVANTAGES, advantages
from posttrain.objectives.policy import POLICY_LOSSES, kl_estimate
from posttrain.rollout.backend import SamplingSettings, sample_seed
from posttrain.train.reference import Reference
from posttrain.train.tasks.policy_step import completions_batch, policy_terms
from posttrain.train.tasks.rollouts import (RLBatch, Rollouts, Sampled, mini_batch_members, overlong_shaping,
                                            placeholder, sampling_metrics, tool_masks, varies)
from posttrain.train.tasks.sampling import PromptExample, SamplingTask, eval_mode


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
        check_group_settings(self.cfg)

    # -- set-up -------------------------------------------------------------------------------
    def module(self, model) -> TargetLogprobs:
        return TargetLogprobs(model, self.recipe.train.logprob_chunk, with_entropy=True,
                              temperature=self.settings.temperature)

    def setup(self, model, accelerator, train: list, evaluation: list) -> None:
        super().setup(model, accelerator, train, evaluation)
        self.reference.setup(model, accelerator)

    def examples_per_step(self) -> int:
        """Prompts per rollout batch, all processes together (a rollout batch feeds ``mini_batches`` steps per
        epoch)."""
        train = self.recipe.train
        per_step = train.batch_size * train.grad_accum * self.mini_batches * self.processes()[0]
        return per_step // self.recipe.rollout.num_generations

    # -- one step's data ------------------------------------------------------------------------
    def step_batches(self, step: int, examples: list, module) -> list:
        cycle = self.steps_per_batch
        if step % cycle == 0 or self.buffer is None:
            self.buffer = self.collect(step - step % cycle, examples, module)
        members = self.mini_batch_members(step, len(self.buffer.completion_ids))
        size = self.recipe.train.batch_size
        return [self.micro_batch(self.buffer, members[lo : lo + size]).to(self.device) for lo in range(0, len(members),
                                                                                                       size)]

    def mini_batch_members(self, step: int, count: int) -> list[int]:
        return mini_batch_members(self.recipe.train.seed, step, count, self.steps_per_batch, self.mini_batches)

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
                                                                      torch.zeros(len(token_seq)), sampler_logps,
                                                                      masks=masks),
                                                             module)
        kl_values = kl_estimate(policy_logps, ref_logps,
                                cfg.kl_estimator) if cfg.kl_coef and cfg.kl_in == "reward" else None
        baselines = None
        if "greedy_baseline" in self.needs:
            baselines, seconds = self.greedy_baselines(flat)
            sampled.reward_s += seconds
        mine = {"rewards": torch.tensor(sampled.totals, dtype=torch.float64),
                "groups": torch.tensor([pos for pos, _ in flat], dtype=torch.long),
                "token_seq": token_seq, "lengths": lengths, "truncated": truncated, "baselines": baselines,
                "kl": kl_values, "values": values,
                "penalty": -cfg.kl_coef * kl_values if kl_values is not None else torch.zeros(len(token_seq)).double(),
                "generated": self.backend.stats.tokens - gen_tokens_before,
                "generate_s": self.backend.stats.seconds - gen_before,
                "tool_calls": torch.tensor([c.tool_calls for c in completions], dtype=torch.long),
                "tool_errors": getattr(self.backend, "errors", 0) - tool_errors_before, **sampled.counts()}
        every = self.gathered(mine)
        advantage, returns = self.global_advantages(every)
        self.last_metrics = self.rollout_metrics(every)
        if not completions and sampled.spare is not None and self.processes()[0] > 1:
            return placeholder(*sampled.spare)
        return Rollouts(prompt_ids, completion_ids, active, advantage, sampler_logps,
                        policy_logps if self.reuses_rollouts else None,
                        ref_logps if cfg.kl_coef and cfg.kl_in == "loss" else None, values, returns, masks)

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
                ref_logps = self.logps_of(rollouts,
                                          lambda batch: self.reference.run(module, self.reference_logps, batch))
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
        return overlong_shaping(totals, completions, self.cfg.overlong_buffer, self.cfg.overlong_penalty,
                                self.settings.max_new_tokens)

    def global_advantages(self, every: list[dict]) -> tuple[torch.Tensor, None]:
        """Advantages over every process's completions of the step: this process's part (and no value targets)."""
        offsets = np.cumsum([0] + [len(p["rewards"]) for p in every])
        token_offsets = np.cumsum([0] + [len(p["token_seq"]) for p in every])
        values = advantages(self.cfg.advantage, torch.cat([p["rewards"] for p in every]),
                            torch.cat([p["groups"] for p in every]),
                            torch.cat([p["token_seq"] + int(o) for p, o in zip(every, offsets)]),
                            torch.cat([p["penalty"] for p in every]),
                            torch.cat([p["baselines"] for p in every]) if every[0]["baselines"] is not None else None,
                            **self.cfg.hyperparameters())
        rank = self.processes()[1]
        self.all_advantages = values
        return values[int(token_offsets[rank]) : int(token_offsets[rank + 1])], None

    def rollout_metrics(self, every: list[dict]) -> dict[str, float]:
        return sampling_metrics(every, self.all_advantages, self.recipe.rollout.tool != "none")

    def reference_logps(self, reference_module, batch: Batch) -> torch.Tensor:
        inner = TargetLogprobs(reference_module.model, self.recipe.train.logprob_chunk,
                               temperature=self.settings.temperature)
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
        return completions_batch(rollouts, members, self.pack_completions, self.cfg.aggregation,
                                 self.settings.max_new_tokens)

    # -- loss ---------------------------------------------------------------------------------
    def normalizer(self, batch: RLBatch) -> float:
        return batch.units

    def loss(self, module, rl: RLBatch, normalizer: float) -> tuple[torch.Tensor, dict]:
        logps, entropy = module(**model_inputs(rl.batch))
        per_token, metrics = policy_terms(self.cfg, logps, entropy, rl)
        return (per_token * rl.weights.to(logps.dtype)).sum() / normalizer, metrics

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
            self.last_metrics = {
                k.removeprefix("metrics/"): float(v) for k, v in state.items() if k.startswith("metrics/")
            }


def check_group_settings(cfg) -> None:
    """The rl: settings an advantage estimator and a policy loss read, and the combinations that cannot work."""
    chosen = {k for k in cfg.hyperparameters()}
    ADVANTAGES.check([cfg.advantage], set())
    POLICY_LOSSES.check([cfg.policy_loss], set())
    unused = (
        chosen - set(ADVANTAGES[cfg.advantage].defaults) - set(POLICY_LOSSES[cfg.policy_loss].defaults)
    )
    if unused:
        raise UserError(f"rl: {', '.join(sorted(unused))} not used by advantage {cfg.advantage} "
                        f"or policy_loss {cfg.policy_loss}")
    if "kl_in_reward" in ADVANTAGES[cfg.advantage].needs and cfg.kl_coef and cfg.kl_in != "reward":
        raise UserError(f"rl.advantage: {cfg.advantage} puts the KL penalty in the reward: set rl.kl_in: reward")
    if "on_policy" in POLICY_LOSSES[cfg.policy_loss].needs and cfg.num_iterations > 1:
        raise UserError(f"rl.policy_loss: {cfg.policy_loss} is on-policy only; with rl.num_iterations > 1 use "
                        "ppo_clip, gspo or cispo")
