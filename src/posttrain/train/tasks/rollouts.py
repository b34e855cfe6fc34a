"""What one rollout batch holds and what it says: completions with their tokens, tool masks, sampler log-probs and
advantages (``Rollouts``), the micro-batch the policy loss reads (``RLBatch``), the groups DAPO's dynamic sampling
keeps (``Sampled``), and the statistics logged for a step's sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from posttrain.data.batching import Batch
from posttrain.train.tasks.sampling import mean_or_zero


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
        return cls(split(t["prompt_tokens"], t["prompt_lengths"]),
                   split(t["completion_tokens"], t["completion_lengths"]),
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


def placeholder(flat: list, completions: list) -> Rollouts:
    """A dropped group trained with weight 0, for a process whose every group was dropped while others train:
    each process must run a backward pass for the gradients to be reduced across processes. It takes no
    part in the advantages or metrics."""
    sampler_logps = torch.tensor([x for c in completions for x in c.sampler_logps], dtype=torch.float64)
    return Rollouts([ex.prompt_ids for _, ex in flat], [c.token_ids for c in completions],
                    torch.zeros(len(completions), dtype=torch.bool),
                    torch.zeros(len(sampler_logps), dtype=torch.float64),
                    sampler_logps, masks=tool_masks(completions))


def overlong_shaping(totals: list[float], completions: list, buffer: int | None, penalty: float,
                     limit: int) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al., 2025, Eq. 13): 0 up to ``L_max - L_cache`` tokens, then
    linearly down to ``-overlong_penalty`` at ``L_max`` = max_new_tokens."""
    if buffer is None:
        return totals
    return [
        r + penalty * min(0.0, (limit - buffer - len(c.token_ids)) / buffer)
        for r, c in zip(totals, completions)
    ]


def mini_batch_members(seed: int, step: int, count: int, steps_per_batch: int, mini_batches: int) -> list[int]:
    """The completions of the rollout batch that optimizer ``step`` trains on: all of them, or with
    mini-batches, one part of a seeded shuffle of them per epoch (a function of the step, so resumable)."""
    if mini_batches == 1:
        return list(range(count))
    position = step % steps_per_batch
    epoch, part = divmod(position, mini_batches)
    seed = (seed * 1_000_003 + step - position) * 1_009 + epoch
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return [int(i) for i in np.array_split(order, mini_batches)[part]]


def sampling_metrics(every: list[dict], advantage: torch.Tensor, tools: bool) -> dict[str, float]:
    """What this step's sampling produced, over all processes: the numbers that explain a flat loss."""

    def cat(key):
        return torch.cat([p[key] for p in every])

    rewards, lengths, truncated = cat("rewards"), cat("lengths").double(), cat("truncated").double()
    seconds = {key: max(p[key] for p in every) for key in ("generate_s", "reward_s")}  # processes work side by side
    metrics = {
        "reward/mean": mean_or_zero(rewards.tolist()),
        "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "groups/zero_std_fraction": sum(p["zero_std_groups"] for p in every)
        / max(sum(p["group_count"] for p in every), 1),
        "groups/trained": float(sum(p["trained_groups"] for p in every)),
        "groups/resample_rounds": float(max(p["rounds"] for p in every)),
        "advantage/mean": mean_or_zero(advantage.tolist()),
        "advantage/std": float(advantage.std()) if len(advantage) > 1 else 0.0,
        "completion/length_mean": mean_or_zero(lengths.tolist()),
        "completion/length_max": float(lengths.max()) if len(lengths) else 0.0,
        "completion/truncated_fraction": mean_or_zero(truncated.tolist()),
        "time/generate_s": seconds["generate_s"],
        "time/reward_s": seconds["reward_s"],
        "generate/tokens_per_s": sum(p["generated"] for p in every) / max(seconds["generate_s"], 1e-9),
    }
    if tools:
        calls = cat("tool_calls").double()
        metrics.update({"tools/calls_per_completion": mean_or_zero(calls.tolist()),
                        "tools/call_rate": mean_or_zero((calls > 0).double().tolist()),
                        "tools/error_fraction": sum(p["tool_errors"] for p in every) / max(float(calls.sum()),
                                                                                           1.0)})
    for name in every[0]["by_reward"]:
        metrics[f"reward/{name}/mean"] = mean_or_zero(
            [v for p in every for v in p["by_reward"][name] if v is not None]
        )
        metrics[f"reward/{name}/failed"] = float(sum(p["failed"][name] for p in every))
    if every[0]["kl"] is not None:
        metrics["policy/kl_ref"] = mean_or_zero(torch.cat([p["kl"] for p in every]).tolist())
    return metrics
