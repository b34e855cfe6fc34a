"""The contract between the engine and an algorithm.

The engine runs one loop for every command; a *task* decides what is trained, what one
optimizer step's micro-batches are, and what their loss is. ``Task`` is the protocol the engine
calls; ``OfflineTask`` implements the parts that learning from a fixed dataset shares (SFT,
DPO, KTO, ranking): the seeded slice of examples of each step, chunked evaluation summed over
processes, no extra state. An online task (RL) overrides ``step_batches`` to generate, score
and compute advantages over the whole step before splitting it into micro-batches.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from posttrain.core.errors import UserError
from posttrain.data.batching import Layout
from posttrain.model.attention import uses_segment_attention
from posttrain.model.forward import TargetLogprobs
from posttrain.model.load import load_model, save_final
from posttrain.train.sharding import is_sharded, most_over_processes


@runtime_checkable
class Task(Protocol):
    name: str
    empty_steps_allowed: bool  # a step may have no micro-batch (RL's dynamic sampling can drop every group)
    progress: dict[str, str]  # progress-bar label -> a step metric shown next to the loss

    def build_dataset(self, which: str, quiet: bool = False) -> list:
        """The examples of ``which`` (train or eval) split, tokenized."""

    peft_task_type: str  # CAUSAL_LM, or SEQ_CLS / TOKEN_CLS for a classification head

    def load_model(self, path: str):
        """The model the recipe names, in the shape this task trains (a causal LM, a classifier)."""

    def save_final(self, model, tokenizer, directory) -> None:
        """``final/``: what users load after training (an adapter or full weights, a classifier with its stats)."""

    def module(self, model) -> torch.nn.Module:
        """What the engine differentiates (and wraps for distribution): a log-prob module, a reward head, ..."""

    def trained(self, model) -> torch.nn.Module:
        """Whose trainable parameters the optimizer steps and checkpoints hold: the model, or more (a value head)."""

    def setup(self, model, accelerator, train: list, evaluation: list) -> None:
        """Once before training: reference log-probs, caches, anything that needs the model."""

    def examples_per_step(self) -> int:
        """Training examples (prompts, for RL) one optimizer step consumes, all processes together."""

    step_size_formula: str  # how examples_per_step follows from the recipe, for error messages
    steps_per_batch: int  # optimizer steps one batch of examples_per_step feeds (RL reusing a rollout batch: > 1)

    def step_batches(self, step: int, examples: list, module) -> list:
        """This process's micro-batches of optimizer step ``step`` (a function of the step, never of history)."""

    generates: bool  # step_batches / evaluate sample from the model (under FSDP they run on gathered parameters)

    def normalizer(self, batch) -> float:
        """How many units of the step loss this micro-batch holds; the engine sums it over the step."""

    def loss(self, module, batch, normalizer: float) -> tuple[torch.Tensor, dict]:
        """This micro-batch's share of the step loss (its sum over units / the step's normalizer), and metrics."""

    def after_step(self, model) -> None:
        """After each optimizer step (e.g. push new weights to a generation engine)."""

    def step_metrics(self) -> dict[str, float]:
        """Metrics of the whole step that the task computed globally (e.g. rewards), logged as they are."""

    def data_mixture(self) -> dict[str, float]:
        """``data/share/NAME``: the fraction of the examples drawn since the last call that came from each training
        file, when the training data mixes several; empty otherwise."""

    def close(self) -> None:
        """After training, also after a failure: release what ``setup`` started (worker processes, ...)."""

    def evaluate(self, module, examples: list) -> dict[str, float]:
        """Held-out metrics over ``examples``, the same on every process."""

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a resume; values may be tensors."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class OfflineTask:
    """Defaults for tasks that learn from a fixed dataset: subclasses provide ``collate``, ``normalizer``, ``loss``,
    ``eval_sums`` and ``eval_metrics``."""

    name = "offline"
    recipe = None
    accelerator = None
    sourced = None  # the training Examples (each knows its file), where tasks track them
    segments = False  # the model attends per sequence, so packed micro-batches are one row (set up with the model)
    drawn: list[int] | None = None  # training example indices drawn since the mixture was last logged
    empty_steps_allowed = False
    generates = False
    progress: dict[str, str] = {}
    step_size_formula = "train.batch_size x train.grad_accum x processes"
    steps_per_batch = 1

    peft_task_type = "CAUSAL_LM"

    def load_model(self, path: str):
        return load_model(path, self.recipe.trust_remote_code, allow_pickle=self.recipe.allow_pickle)

    def save_final(self, model, tokenizer, directory) -> None:
        save_final(model, tokenizer, directory)

    def module(self, model) -> torch.nn.Module:
        return TargetLogprobs(model, self.recipe.train.logprob_chunk)

    def trained(self, model) -> torch.nn.Module:
        return model

    def setup(self, model, accelerator, train: list, evaluation: list) -> None:
        self.accelerator = accelerator
        self.segments = uses_segment_attention(model)
        if self.recipe.train.max_tokens_per_micro_batch and type(self).step_batches is not OfflineTask.step_batches:
            raise UserError(f"train.max_tokens_per_micro_batch splits the micro-batches of training on a fixed "
                            f"dataset; {self.name} forms its own: lower its batch sizes instead")

    @property
    def layout(self) -> Layout:
        """The recipe's micro-batch layout for this model."""
        train = self.recipe.train
        return Layout(self.tokenizer.pad_token_id, train.packing, train.padding_free, self.segments)

    def pack(self, sequences: list, groups: list[list[int]] | None = None, max_length: int | None = None,
             shared_lengths: list[int] | None = None):
        """A micro-batch of tokenized ``sequences`` in the recipe's layout (:meth:`Layout.collate`)."""
        return self.layout.collate(sequences, groups, max_length, shared_lengths)

    def pack_completions(self, examples: list, prompt_lengths: list[int]):
        """A micro-batch of sampled completions (``examples`` = prompt + completion, ``prompt_lengths`` each): the
        completions of one prompt share it, laid out once, and never more than the prompt is shared."""
        shared: dict[tuple, list[int]] = {}
        for i, (example, length) in enumerate(zip(examples, prompt_lengths)):
            shared.setdefault(tuple(example.input_ids[:length].tolist()), []).append(i)
        return self.pack(examples, list(shared.values()), shared_lengths=[len(prompt) for prompt in shared])

    # -- the data of one step ---------------------------------------------------------------------
    def track_sources(self, which: str, examples) -> None:
        """Note where the training examples came from (for the logged mixture)."""
        if which == "train":
            self.sourced = examples

    def data_mixture(self) -> dict[str, float]:
        examples, drawn = self.sourced, self.drawn or []
        self.drawn = []
        names = source_names(set(examples.paths)) if examples is not None else {}
        if len(names) < 2 or not drawn:
            return {}
        counts = dict.fromkeys(names.values(), 0)
        for i in drawn:
            counts[names[examples.source(i)]] += 1
        return {f"data/share/{name}": count / len(drawn) for name, count in counts.items()}

    def step_indices(self, step: int, num_examples: int) -> list[int]:
        """All processes' example indices of one optimizer step: a seeded permutation per epoch, read in order,
        so a resumed run sees exactly the data the uninterrupted run would."""
        per_step = self.examples_per_step()
        seed = self.recipe.train.seed
        start = step * per_step
        out: list[int] = []
        while len(out) < per_step:
            epoch, offset = divmod(start + len(out), num_examples)
            order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            out.extend(order[offset : offset + per_step - len(out)].tolist())
        self.drawn = (self.drawn or []) + out
        return out

    def examples_per_step(self) -> int:
        train = self.recipe.train
        return train.batch_size * train.grad_accum * self.processes()[0]

    @property
    def device(self):
        return self.accelerator.device if self.accelerator is not None else "cpu"

    def processes(self) -> tuple[int, int]:
        """(process count, this process's rank)."""
        acc = self.accelerator
        return (acc.num_processes, acc.process_index) if acc is not None else (1, 0)

    def step_batches(self, step: int, examples: list, module) -> list:
        world, rank = self.processes()
        size, per_rank = self.recipe.train.batch_size, self.recipe.train.batch_size * self.recipe.train.grad_accum
        mine = self.step_indices(step, len(examples))[rank * per_rank : (rank + 1) * per_rank]
        return [batch.to(self.device) for j in range(0, per_rank, size)
                for batch in self.within_token_budget([examples[i] for i in mine[j : j + size]], step)]

    def within_token_budget(self, examples: list, step: int) -> list:
        """The micro-batch of ``examples``, halved (recursively, whole examples) while its layout holds more than
        ``train.max_tokens_per_micro_batch`` tokens. The engine normalizes each micro-batch's loss by the whole
        step's, so the parts add up to the same step loss and gradient."""
        budget = self.recipe.train.max_tokens_per_micro_batch
        if budget and len(examples) > 1 and laid_out_tokens(self.collate(examples)) > budget:
            half = (len(examples) + 1) // 2
            return self.within_token_budget(examples[:half], step) + self.within_token_budget(examples[half:], step)
        return [self.collate_train(examples, step)]

    def collate_train(self, examples: list, step: int):
        """Training batches; the same as evaluation batches unless a task transforms its inputs."""
        return self.collate(examples)

    def after_step(self, model) -> None:
        pass

    def step_metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, module, examples: list) -> dict[str, float]:
        """Sums of ``eval_sums`` over batches of the held-out examples, split between processes and added up."""
        world, rank = self.processes()
        size = self.recipe.train.batch_size
        chunks = [examples[i : i + size] for i in range(0, len(examples), size)]
        mine = chunks[rank::world]
        sums: dict[str, float] = {}
        main = self.accelerator is None or self.accelerator.is_main_process
        # a sharded model's forward is collective: a process with fewer chunks runs its first again, uncounted
        passes = most_over_processes(len(mine), self.accelerator) if is_sharded(self.accelerator) else len(mine)
        for i in tqdm(range(passes), desc="eval", leave=False, disable=not main or passes < 4):
            batch = self.collate(mine[i] if i < len(mine) else (mine or chunks)[0]).to(self.device)
            for key, value in self.eval_sums(module, batch).items():
                if i < len(mine):
                    sums[key] = sums.get(key, 0.0) + value
        return self.eval_metrics(sum_over_processes(sums, self.accelerator))

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def sum_over_processes(sums: dict[str, float], accelerator) -> dict[str, float]:
    """Add dicts of numbers up over processes (a process may have seen no batch at all)."""
    if accelerator is None or accelerator.num_processes == 1:
        return sums
    from accelerate.utils import gather_object

    total: dict[str, float] = {}
    for part in gather_object([sums]):
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


def source_names(paths: set[str]) -> dict[str, str]:
    """Short metric names for training files: the file name without its suffix, the whole path where two agree."""
    from pathlib import Path

    stems = {path: Path(path).stem for path in paths}
    clashing = {stem for stem in stems.values() if list(stems.values()).count(stem) > 1}
    return {path: path if stem in clashing else stem for path, stem in stems.items()}


def laid_out_tokens(batch) -> int:
    """Token slots a micro-batch's forward runs over (padding and shared prompts as laid out)."""
    return (batch if hasattr(batch, "input_ids") else batch.batch).input_ids.numel()
