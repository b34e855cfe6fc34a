"""PPO with a learned value model (Schulman et al., 2017; RLHF as in Ouyang et al., 2022 and TRL's PPOTrainer).

GRPO's machinery (``grpo.py``: seeded prompts, sampling, scoring, global statistics, the policy losses and their
aggregation) with a critic instead of groups. One rollout batch: sample one (or more) completions per prompt,
score them, and in one pass without dropout compute the policy's log-probs and the values ``V(s_t)`` of the
state before each completion token (the reference's log-probs too, for the KL). The per-token reward is
``-kl_coef * KL_t`` at every token plus the outcome reward at the last one; GAE turns rewards and values into
advantages and value targets (``returns = A + V``), the advantages are whitened over the whole batch (all
processes), and the batch is trained on for ``rl.ppo_epochs`` passes of ``rl.num_mini_batches`` optimizer steps,
each step's loss ``policy loss + vf_coef * clipped value loss`` per token, aggregated like GRPO's.

The critic is a linear head on the policy's last hidden states (``shared``: one trunk pass serves both, the value
loss also trains the trunk's adapter), or a model of its own (``separate``: a copy of the starting policy, or
``rl.critic_model``, e.g. a reward model whose score head starts the value head), with its own adapter.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from posttrain.core.errors import UserError
from posttrain.model.forward import TargetLogprobs, model_inputs, target_hidden_states
from posttrain.model.load import load_model, load_tokenizer, resolve_model
from posttrain.model.peft import apply_peft
from posttrain.objectives.policy import POLICY_LOSSES
from posttrain.objectives.value import explained_variance, gae, value_loss
from posttrain.rewards.model import SCORE_HEADS
from posttrain.train.tasks.grpo import GRPOTask
from posttrain.train.tasks.policy_step import policy_terms
from posttrain.train.tasks.rollouts import RLBatch, Rollouts
from posttrain.train.tasks.sampling import eval_mode, mean_or_zero


class PolicyAndValue(TargetLogprobs):
    """(target log-probs, entropy, values): the value of the state before each target, from the policy's own
    hidden states (``critic`` None) or from the critic model's."""

    def __init__(self, model, value_head: nn.Linear, critic=None, chunk_size: int = 1024, temperature: float = 1.0):
        super().__init__(model, chunk_size, with_entropy=True, temperature=temperature)
        self.value_head, self.critic = value_head, critic

    def forward(self, input_ids, position_ids, attention_mask, target_index, target_ids, segments=None):
        flat = target_hidden_states(self.model, input_ids, position_ids, attention_mask, target_index, segments)
        logps, entropy = self.target_logprobs(flat, target_ids)
        if self.critic is not None:
            flat = target_hidden_states(self.critic, input_ids, position_ids, attention_mask, target_index, segments)
        values = self.value_head(flat).squeeze(-1)
        return logps, entropy, values.to(torch.promote_types(values.dtype, torch.float32))


class PPOTask(GRPOTask):
    name = "ppo"
    empty_steps_allowed = False
    progress = {"reward": "reward/mean", "ev": "value/explained_variance", "len": "completion/length_mean"}
    step_size_formula = (
        "train.batch_size x train.grad_accum x rl.num_mini_batches x processes / rollout.num_generations"
    )
    dynamic_sampling = "none"
    streams = 1
    needs = ()

    @property
    def epochs(self) -> int:
        return self.cfg.ppo_epochs

    @property
    def mini_batches(self) -> int:
        return self.cfg.num_mini_batches

    def check_settings(self) -> None:
        POLICY_LOSSES.check([self.cfg.policy_loss], set())
        unused = set(self.cfg.hyperparameters()) - set(POLICY_LOSSES[self.cfg.policy_loss].defaults)
        if unused:
            raise UserError(f"rl: {', '.join(sorted(unused))} not used by policy_loss {self.cfg.policy_loss}")
        if "on_policy" in POLICY_LOSSES[self.cfg.policy_loss].needs and self.reuses_rollouts:
            raise UserError(f"rl.policy_loss: {self.cfg.policy_loss} is on-policy only: set rl.ppo_epochs: 1 and "
                            "rl.num_mini_batches: 1, "
                            "or use ppo_clip")

    # -- the critic ---------------------------------------------------------------------------------
    def setup(self, model, accelerator, train: list, evaluation: list) -> None:
        super().setup(model, accelerator, train, evaluation)
        self.critic = self.build_critic(model) if self.cfg.critic == "separate" else None
        trunk = self.critic if self.critic is not None else model
        hidden = trunk.get_input_embeddings().weight.shape[1]
        weight = next(p for p in model.parameters()).dtype
        self.value_head = nn.Linear(hidden, 1, dtype=weight, device=self.device)
        with torch.no_grad():  # V = 0 everywhere at first: a neutral baseline, not a random one
            self.value_head.weight.copy_(self.initial_value_weights(hidden))
            self.value_head.bias.zero_()

    def build_critic(self, model):
        """A critic trunk of its own: a copy of the starting policy (its adapter too), or ``rl.critic_model``
        with the recipe's adapter."""
        if self.cfg.critic_model is None:
            return _without_unused_head(copy.deepcopy(model))
        path = resolve_model(self.cfg.critic_model)
        if load_tokenizer(path, self.recipe.trust_remote_code).get_vocab() != self.tokenizer.get_vocab():
            raise UserError(f"rl.critic_model {self.cfg.critic_model}: its tokenizer differs from the policy's; the "
                            f"critic "
                            "reads the policy's tokens, so both must share one tokenizer")
        critic = load_model(path, self.recipe.trust_remote_code, allow_pickle=self.recipe.allow_pickle)
        critic = apply_peft(critic, self.recipe.peft, self.recipe.peft.changed(), self.recipe.train.seed)
        dtype = next(p for p in self.model.parameters()).dtype
        return _without_unused_head(critic.to(dtype=dtype, device=self.device))

    def initial_value_weights(self, hidden: int) -> torch.Tensor:
        """Zeros, or the score head of a reward model given as ``rl.critic_model``."""
        if self.cfg.critic_model is not None:
            from safetensors import safe_open

            for file in sorted(Path(resolve_model(self.cfg.critic_model)).glob("*.safetensors")):
                with safe_open(file, "pt") as tensors:
                    for key in tensors.keys():
                        shape = tensors.get_slice(key).get_shape()
                        if key.split(".")[0] in SCORE_HEADS and key.endswith("weight") and shape == [1, hidden]:
                            return tensors.get_tensor(key)
        return torch.zeros(1, hidden)

    def module(self, model) -> PolicyAndValue:
        return PolicyAndValue(model, self.value_head, self.critic, self.recipe.train.logprob_chunk,
                              self.settings.temperature)

    def trained(self, model) -> nn.Module:
        parts = {"policy": model, "value_head": self.value_head}
        if self.critic is not None:
            parts["critic"] = self.critic
        return nn.ModuleDict(parts)

    # -- a rollout batch --------------------------------------------------------------------------------
    def rollout_logps(self, rollouts: Rollouts, module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The sampling policy's log-probs and the values at sampling time (one pass), and the reference's
        log-probs; without dropout."""
        with eval_mode(module):
            both = self.logps_of(rollouts, lambda batch: torch.stack(self._logps_and_values(module, batch), -1))
            ref_logps = None
            if self.cfg.kl_coef:
                ref_logps = self.logps_of(rollouts,
                                          lambda batch: self.reference.run(module, self.reference_logps, batch))
        return both[:, 0].contiguous(), ref_logps, both[:, 1].contiguous()

    def _logps_and_values(self, module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logps, _, values = self.unwrapped(module)(**model_inputs(batch))
        return logps.double(), values.double()

    def global_advantages(self, every: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE over every process's completions (the outcome reward at each completion's last token, the KL
        penalty at every token), whitened over all trained tokens; this process's advantages and value targets."""
        cfg = self.cfg
        lengths = torch.cat([p["lengths"] for p in every])
        token_seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        rewards = torch.cat([p["penalty"] for p in every]).clone()
        rewards[torch.cumsum(lengths, 0) - 1] += torch.cat([p["rewards"] for p in every])
        values = torch.cat([p["values"] for p in every])
        advantages, returns = gae(rewards, values, token_seq, cfg.gamma, cfg.lam)
        trained = torch.ones(len(lengths), dtype=torch.bool)
        if cfg.overlong_filter:
            trained = ~torch.cat([p["truncated"] for p in every])
        if cfg.whiten_advantages and int(trained[token_seq].sum()) > 1:
            kept = advantages[trained[token_seq]]
            advantages = (advantages - kept.mean()) * torch.rsqrt(kept.var() + 1e-8)
        self.all_advantages, self.all_values, self.all_returns = advantages, values, returns
        offsets = torch.cumsum(torch.tensor([0] + [len(p["token_seq"]) for p in every]), 0)
        lo, hi = int(offsets[self.processes()[1]]), int(offsets[self.processes()[1] + 1])
        return advantages[lo:hi], returns[lo:hi]

    def rollout_metrics(self, every: list[dict]) -> dict[str, float]:
        metrics = {
            k: v for k, v in super().rollout_metrics(every).items() if not k.startswith("groups/")
        }  # no groups here
        metrics.update({"value/mean": mean_or_zero(self.all_values.tolist()),
                        "value/returns_mean": mean_or_zero(self.all_returns.tolist()),
                        "value/explained_variance": explained_variance(self.all_values, self.all_returns)})
        return metrics

    # -- loss ---------------------------------------------------------------------------------------
    def loss(self, module, rl: RLBatch, normalizer: float) -> tuple[torch.Tensor, dict]:
        logps, entropy, values = module(**model_inputs(rl.batch))
        per_token, metrics = policy_terms(self.cfg, logps, entropy, rl)
        dtype = logps.dtype
        losses, clipped = value_loss(values.to(dtype), rl.values.to(dtype), rl.returns.to(dtype), self.cfg.value_clip)
        weights = rl.weights.to(dtype)
        trained = weights > 0
        count = float(trained.sum())
        metrics["value/loss"] = (float(losses.detach()[trained].sum()), count)
        metrics["value/clip_fraction"] = (float(clipped[trained].sum()), count)
        metrics["value/error"] = (float((values.detach().to(dtype) - rl.returns.to(dtype)).abs()[trained].sum()), count)
        return ((per_token + self.cfg.vf_coef * losses) * weights).sum() / normalizer, metrics


def _without_unused_head(critic):
    """The critic reads hidden states only: an untied vocabulary projection gets no gradient, so it is frozen
    (distributed training would otherwise wait for its gradient forever)."""
    head, embeddings = critic.get_output_embeddings(), critic.get_input_embeddings()
    if head is not None and head.weight is not embeddings.weight:
        head.requires_grad_(False)
    return critic
