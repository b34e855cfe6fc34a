"""Learning from a pool of the model's own samples that is rebuilt every few optimizer steps.

A *round* starts at an optimizer step that is a multiple of ``steps_per_batch``: ``collect`` samples,
scores and filters with the current weights, and every process gets the same pool (entries of token-id
lists: a prompt and its completion for RFT; a prompt, a chosen and a rejected completion for online DPO).
The round's steps read the pool in a seeded order, reshuffled per pass, a function of the step; the
pool is part of the checkpoint, so a resume mid-round trains on the same entries.
"""

from __future__ import annotations

import torch

from posttrain.core.errors import UserError
from posttrain.train.tasks.sampling import SamplingTask


class PoolTask(SamplingTask):
    empty_steps_allowed = True  # a round may keep nothing
    fields: tuple[str, ...] = ()  # the token-id lists of a pool entry

    def __init__(self, recipe, tokenizer, cfg):
        super().__init__(recipe, tokenizer, cfg)
        if recipe.rollout.tool != "none":
            raise UserError("rollout.tool: tool-using rollouts train with grpo or ppo (their loss masks the tool's "
                            "output)")
        self.pool: list[tuple[list[int], ...]] | None = None
        self.round_metrics: dict[str, float] = {}

    def collect(self, round_: int, step: int, examples: list) -> list[tuple[list[int], ...]]:
        """The round's pool, the same on every process."""
        raise NotImplementedError

    def collate_pool(self, indices: list[int]):
        """A micro-batch of pool entries."""
        raise NotImplementedError

    def step_batches(self, step: int, examples: list, module) -> list:
        if step % self.steps_per_batch == 0 or self.pool is None:
            self.pool = self.collect(step // self.steps_per_batch, step, examples)
        if not self.pool:
            return []
        size = self.recipe.train.batch_size
        mine = self.step_entries(step)
        return [self.collate_pool(mine[lo : lo + size]).to(self.device) for lo in range(0, len(mine), size)]

    def step_entries(self, step: int) -> list[int]:
        """This process's pool entries of optimizer ``step``."""
        train = self.recipe.train
        world, rank = self.processes()
        per_rank = train.batch_size * train.grad_accum
        return self.pool_indices(step, per_rank * world)[rank * per_rank : (rank + 1) * per_rank]

    def pool_indices(self, step: int, count: int) -> list[int]:
        """The pool entries of one step: a seeded permutation of the round's pool, read in order, reshuffled for
        each pass over it (a function of the step, so a resume continues the round exactly)."""
        size = len(self.pool)
        round_, position = divmod(step, self.steps_per_batch)
        start = position * count
        out: list[int] = []
        while len(out) < count:
            epoch, offset = divmod(start + len(out), size)
            seed = (self.recipe.train.seed * 1_000_003 + round_) * 1_009 + epoch
            order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
            out.extend(order[offset : offset + count - len(out)])
        return out

    def step_metrics(self) -> dict[str, float]:
        return dict(self.round_metrics)

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The round's pool (a resume mid-round must train on the same entries) and its metrics."""
        if self.pool is None:
            return {}
        state = {f"metrics/{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.round_metrics.items()}
        for f, name in enumerate(self.fields):
            state[f"{name}_lengths"] = torch.tensor([len(entry[f]) for entry in self.pool], dtype=torch.long)
            state[f"{name}_tokens"] = torch.tensor([t for entry in self.pool for t in entry[f]], dtype=torch.long)
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        columns = [[chunk.tolist() for chunk in torch.split(state[f"{name}_tokens"], state[f"{name}_lengths"].tolist())]
                   for name in self.fields]
        self.pool = list(zip(*columns)) if columns and columns[0] else []
        self.round_metrics = {
            k.removeprefix("metrics/"): float(v) for k, v in state.items() if k.startswith("metrics/")
        }
