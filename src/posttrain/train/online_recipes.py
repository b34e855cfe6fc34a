"""Recipe schemas of the commands that learn from the model's own samples: GRPO, PPO, RFT, online DPO."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from posttrain.core.config import Section
from posttrain.objectives.config import PairwiseLossConfig
from posttrain.rewards.config import RewardSpec
from posttrain.rollout.config import RolloutConfig
from posttrain.train.recipes import Recipe


class PolicyConfig(Section):
    """What every policy-gradient command shares: the policy loss, its aggregation, the KL, corrections, scoring."""

    family: ClassVar[str] = "rl"
    policy_loss: str = Field("ppo_clip", description="ppo_clip | gspo | cispo | reinforce")
    epsilon_low: float | None = Field(None, ge=0,
                                      description="lower clip range of the importance ratio; unset: the loss's default")
    epsilon_high: float | None = Field(None, ge=0,
                                       description="upper clip range (DAPO clip-higher: 0.28); unset: the loss's "
                                                   "default")
    dual_clip: float | None = Field(None, gt=1, description="ppo_clip: dual-clip constant c for negative advantages")
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="how per-token losses become the step loss (see README)")
    kl_coef: float = Field(0.0, ge=0, description="weight of the KL to the reference (0: no reference pass at all)")
    kl_estimator: Literal["k1", "k2", "k3", "none"] | None = Field(
        None, description="per-token KL estimator (none: no KL term); unset: k1 in the reward, k3 in the loss")
    kl_in: Literal["loss", "reward"] = Field("loss",
                                             description="add the KL to the loss, or subtract it from the reward")
    sampler_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = Field(
        "none", description="importance correction for sampler / trainer log-prob mismatch: truncate (TIS) or mask the "
        "ratio pi_trainer / pi_sampler per token or per completion")
    sampler_correction_cap: float = Field(2.0, gt=1,
                                          description="the ratio's cap (truncate) or [1/cap, cap] range (mask)")
    overlong_filter: bool = Field(False, description="DAPO: truncated completions get no loss")
    overlong_buffer: int | None = Field(None, gt=0, description="DAPO soft overlong punishment: length of the penalty "
                                        "zone before max_new_tokens")
    overlong_penalty: float = Field(1.0, ge=0, description="soft overlong punishment at max_new_tokens")
    reward_workers: int = Field(
        2, ge=0, description="processes that score completions (0: in the training process, no timeouts)"
    )
    reward_timeout: float = Field(120.0, gt=0, description="seconds per scoring call before its workers are killed")

    hyperparameter_names: ClassVar[tuple[str, ...]] = ("epsilon_low", "epsilon_high", "dual_clip")

    @model_validator(mode="after")
    def _kl_estimator_for_its_place(self) -> "PolicyConfig":
        """Unset: k1 in the reward (REINFORCE++, Eqs. 8-9; PPO as in RLHF), whose score-function gradient is the
        KL's; k3 in the loss (GRPO), where k1's gradient is zero in expectation. Resolved here, so recipe.yaml says."""
        if self.kl_estimator is None:
            self.kl_estimator = "k1" if self.kl_in == "reward" else "k3"
        return self

    def hyperparameters(self) -> dict:
        """The settings passed to the registered advantage and policy-loss functions (unset: their defaults)."""
        return {k: v for k in self.hyperparameter_names if (v := getattr(self, k)) is not None}


class RLConfig(PolicyConfig):
    """GRPO and its relatives: advantages from groups of completions of one prompt, no value model."""

    advantage: str = Field("grpo",
                           description="advantage estimator: grpo | dr_grpo | rloo | reinforce_pp | "
                                       "reinforce_pp_baseline | remax")
    scale_rewards: Literal["group", "batch", "none"] | None = Field(None, description="grpo: divide by the group's std "
                                                                    "(paper), the batch's, or not at all")
    num_iterations: int = Field(1, gt=0,
                                description="optimizer steps per rollout batch (>1 reuses it with old log-probs)")
    dynamic_sampling: Literal["none", "drop", "resample"] = Field(
        "none",
        description="DAPO: drop groups whose rewards before length shaping all agree (resample: and sample more "
        "prompts to refill)")
    max_resample: int = Field(4, ge=0, description="resample: extra sampling rounds per step at most")

    hyperparameter_names: ClassVar[tuple[str, ...]] = ("scale_rewards", "epsilon_low", "epsilon_high", "dual_clip")


class PPOConfig(PolicyConfig):
    """PPO with a learned value model (Schulman et al., 2017; Ouyang et al., 2022): per-token advantages by GAE.
    Defaults follow TRL's PPOTrainer: k1 KL penalty in the reward at 0.05, gamma 1, lam 0.95, value clip 0.2."""

    kl_coef: float = Field(0.05, ge=0,
                           description="weight of the per-token KL penalty to the reference (0: no reference pass)")
    kl_in: Literal["loss", "reward"] = Field("reward",
                                             description="subtract the KL from the per-token reward (PPO), or add it "
                                                         "to the loss")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount per token")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda: 1 is the Monte-Carlo return, 0 one-step TD")
    value_clip: float | None = Field(0.2, gt=0,
                                     description="clip each value's move per rollout batch (null: plain squared error)")
    vf_coef: float = Field(0.1, gt=0, description="weight of the value loss in the summed loss")
    whiten_advantages: bool = Field(True,
                                    description="normalize the advantages to mean 0, std 1 over the rollout batch")
    ppo_epochs: int = Field(4, gt=0, description="passes over each rollout batch")
    num_mini_batches: int = Field(1, gt=0, description="optimizer steps per pass: the rollout batch is "
                                  "num_mini_batches x train.batch_size x train.grad_accum completions per process")
    critic: Literal["shared", "separate"] = Field("shared", description="shared: a value head on the policy's trunk "
                                                 "(and its adapter); separate: a critic model of its own with its own "
                                                 "adapter")
    critic_model: str | None = Field(None, description="separate critic: start from this model (e.g. a reward model "
                                     "directory, whose score head starts the value head) instead of the policy's "
                                     "weights")


class GRPORecipe(Recipe):
    """Online RL: sample, score, compute advantages over the step, update. train.batch_size counts completions."""

    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="math_answer")],
                                      description="reward functions and reward models, summed with their weights")
    rl: RLConfig = Field(default_factory=RLConfig)
    reference: Literal["auto", "policy_copy", "adapter_disabled"] = Field(
        "auto",
        description="the KL reference (used when rl.kl_coef > 0): auto = adapter disabled with PEFT, else a frozen "
        "copy",
    )

    @model_validator(mode="after")
    def _whole_groups(self) -> "GRPORecipe":
        per_step = self.train.batch_size * self.train.grad_accum
        if per_step % self.rollout.num_generations:
            raise ValueError(f"train.batch_size x train.grad_accum ({self.train.batch_size} x {self.train.grad_accum} "
                             f"= "
                             f"{per_step} completions per process and step) must be a multiple of "
                             f"rollout.num_generations "
                             f"({self.rollout.num_generations}): a prompt's group is never split")
        if not self.rewards:
            raise ValueError("rewards: at least one reward function")
        if self.rl.kl_estimator == "none" and self.rl.kl_coef:
            raise ValueError(f"rl.kl_estimator: none means no KL term, but rl.kl_coef is {self.rl.kl_coef}: set one "
                             f"of them")
        if self.rl.kl_estimator == "k1" and self.rl.kl_in == "loss" and self.rl.kl_coef:
            raise ValueError("rl.kl_estimator: k1 in the loss has zero expected gradient (the mean of log pi - log "
                             "pi_ref "
                             "over samples of pi): it would not pull towards the reference. Use k3 or k2 in the loss, "
                             "or "
                             "k1 with rl.kl_in: reward")
        if self.rl.overlong_buffer is not None and self.rl.overlong_buffer >= self.rollout.max_new_tokens:
            raise ValueError("rl.overlong_buffer must be shorter than rollout.max_new_tokens")
        return self


class PPORolloutConfig(RolloutConfig):
    num_generations: int = Field(1, ge=1,
                                 description="completions sampled per prompt (the critic is the baseline: 1 is enough)")


class PPORecipe(GRPORecipe):
    """PPO with a value model: train.batch_size counts completions; a rollout batch feeds rl.ppo_epochs x
    rl.num_mini_batches optimizer steps."""

    rollout: PPORolloutConfig = Field(default_factory=PPORolloutConfig)
    rl: PPOConfig = Field(default_factory=PPOConfig)

    @model_validator(mode="after")
    def _critic_source(self) -> "PPORecipe":
        if self.rl.critic_model is not None and self.rl.critic != "separate":
            raise ValueError("rl.critic_model starts a separate critic: set rl.critic: separate")
        return self


class RFTConfig(Section):
    rounds: int = Field(3, gt=0, description="sample-filter-train rounds")
    steps_per_round: int = Field(20, gt=0, description="optimizer steps on each round's accepted completions")
    prompts_per_round: int | None = Field(None, gt=0,
                                          description="prompts sampled per round (default: every training prompt)")
    accept: Literal["threshold", "top_k"] = Field("threshold", description="threshold: keep completions whose summed "
                                                  "reward reaches rft.threshold (a verifier); top_k: each prompt's k "
                                                  "best")
    threshold: float = Field(1.0, description="threshold: the summed reward a completion needs")
    top_k: int = Field(1, gt=0, description="top_k: completions kept per prompt, best reward first")
    max_per_prompt: int | None = Field(None, gt=0,
                                       description="at most this many distinct accepted completions per prompt "
                                       "(duplicates are always dropped)")
    hint: str | None = Field(None, description="STaR rationalization: a template filled with the record's fields (e.g. "
                             "'(The answer is {answer}.)') appended to prompts none of whose samples were accepted; "
                             "they "
                             "are sampled again with it and accepted ones are trained on without it")
    reward_workers: int = Field(2, ge=0, description="processes that score completions (0: in the training process)")
    reward_timeout: float = Field(120.0, gt=0, description="seconds per scoring call before its workers are killed")

    @model_validator(mode="after")
    def _acceptance_settings(self) -> "RFTConfig":
        self.unused(("top_k",) if self.accept == "threshold" else ("threshold",),
                    f"not read with rft.accept: {self.accept}")
        return self


class RFTRolloutConfig(RolloutConfig):
    num_generations: int = Field(4, ge=1, description="completions sampled per prompt per round")


class RFTRecipe(Recipe):
    """Rejection-sampling fine-tuning / expert iteration / STaR: sample, keep what the rewards accept, SFT on it,
    repeat. train.batch_size counts accepted completions; train.max_steps is rft.rounds x rft.steps_per_round."""

    rollout: RFTRolloutConfig = Field(default_factory=RFTRolloutConfig)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="math_answer")],
                                      description="reward functions and reward models, summed with their weights")
    rft: RFTConfig = Field(default_factory=RFTConfig)

    @model_validator(mode="after")
    def _steps_from_rounds(self) -> "RFTRecipe":
        steps = self.rft.rounds * self.rft.steps_per_round
        if self.train.max_steps is None:
            self.train.max_steps = steps
        elif self.train.max_steps != steps:
            raise ValueError(f"train.max_steps ({self.train.max_steps}) must be rft.rounds x rft.steps_per_round "
                             f"({steps}) "
                             "or unset")
        if not self.rewards:
            raise ValueError("rewards: at least one reward function or model")
        return self


class JudgeConfig(Section):
    model: str = Field("policy", description="policy (self-rewarding: the model being trained judges) or a causal LM "
                       "directory / hub id (its own tokenizer and chat template; it need not share the policy's)")
    template: str | None = Field(None, description="the question put to the judge, with {conversation}, {first} and "
                                 "{second}; default: posttrain.rewards.judge.TEMPLATE")
    batch_size: int = Field(8, gt=0, description="judge prompts per forward pass")


class OnlineDPOConfig(Section):
    iterations: int | None = Field(None, gt=0,
                                   description="unset: online DPO (fresh pairs from the current policy every "
                                   "step); K: iterative DPO, K rounds of train.max_steps / K steps, each on a "
                                   "preference "
                                   "set the policy generated at the round's start")
    prompts_per_iteration: int | None = Field(None, gt=0, description="iterative: prompts per round (default: all)")
    judge: JudgeConfig | None = Field(None,
                                      description="label pairs with an LLM judge (both answer orders) instead of "
                                                  "rewards")
    reward_workers: int = Field(2, ge=0, description="processes that score completions (0: in the training process)")
    reward_timeout: float = Field(120.0, gt=0, description="seconds per scoring call before its workers are killed")

    @model_validator(mode="after")
    def _iterative_settings(self) -> "OnlineDPOConfig":
        if self.iterations is None:
            self.unused(("prompts_per_iteration",), "read only by iterative DPO (set online.iterations)")
        return self


class OnlineDPORecipe(Recipe):
    """Online / iterative DPO: sample completions of each prompt, label the best and the worst by the rewards or a
    judge, train a pairwise loss on them. train.batch_size counts pairs (prompts)."""

    rollout: RolloutConfig = Field(default_factory=lambda: RolloutConfig(num_generations=2))
    rewards: list[RewardSpec] = Field(default_factory=list, description="reward functions and reward models that label "
                                      "the pairs (or online.judge)")
    online: OnlineDPOConfig = Field(default_factory=OnlineDPOConfig)
    loss: PairwiseLossConfig = Field(default_factory=PairwiseLossConfig)
    reference: Literal["auto", "policy_copy", "adapter_disabled", "none"] = Field(
        "auto", description="auto = adapter disabled with PEFT, a frozen copy of the starting policy otherwise")

    @model_validator(mode="after")
    def _labels_and_steps(self) -> "OnlineDPORecipe":
        if bool(self.rewards) == (self.online.judge is not None):
            raise ValueError("online DPO labels pairs with rewards or with online.judge: set exactly one of them")
        if self.train.max_steps is None:
            raise ValueError("train.max_steps: online DPO samples as it trains; give the number of optimizer steps")
        if self.online.iterations and self.train.max_steps % self.online.iterations:
            raise ValueError(f"train.max_steps ({self.train.max_steps}) must be a multiple of online.iterations "
                             f"({self.online.iterations})")
        return self
