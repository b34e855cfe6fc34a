"""Build a training run from a recipe: accelerator, model, adapters, data, task, engine."""

from __future__ import annotations

import importlib.util
import itertools
import os

import torch

from posttrain.core.errors import Stopped, UserError
from posttrain.data.batching import collate
from posttrain.model.lean import make_lean
from posttrain.model.load import load_tokenizer, resolve_model
from posttrain.model.peft import apply_peft, is_prompt_learning, merged, needs_data_init, trainable_summary
from posttrain.train.commands import COMMANDS
from posttrain.train.engine import Engine
from posttrain.train.recipes import Recipe


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator

    precision = {"fp32": "no", "fp64": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.train.precision]
    trackers = list(recipe.train.report_to) or None
    missing = [t for t in trackers or () if importlib.util.find_spec(t) is None]
    if missing:  # accelerate would only warn and log nowhere
        raise UserError(f"train.report_to: {', '.join(missing)} not installed (pip install {' '.join(missing)}), "
                        "or remove it from train.report_to")
    # accelerate only sets up multi-process CPU training (gloo) when told cpu=True; without it,
    # each torchrun process would silently train alone on the whole batch.
    cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=precision, log_with=trackers, project_dir=recipe.output_dir, cpu=cpu_ddp)
    if int(os.environ.get("WORLD_SIZE", "1")) != accelerator.num_processes:
        raise UserError(f"launched {os.environ['WORLD_SIZE']} processes but accelerate set up "
                        f"{accelerator.num_processes}")
    return accelerator


def run(command: str, recipe: Recipe) -> dict:
    from accelerate.utils import set_seed

    accelerator = make_accelerator(recipe)
    quiet = not accelerator.is_main_process
    set_seed(recipe.train.seed)
    with accelerator.main_process_first():
        path = resolve_model(recipe.model)
    tokenizer = load_tokenizer(path, recipe.trust_remote_code, recipe.data.chat_template)
    task = COMMANDS[command].task(recipe, tokenizer)
    train_examples = task.build_dataset("train", quiet=quiet)  # each machine's first process tokenizes, the rest wait
    eval_examples = task.build_dataset("eval", quiet=quiet)

    model = task.load_model(path)
    if hasattr(model,
               "peft_config"):  # starting from an adapter run (e.g. DPO after LoRA SFT): train on the merged model
        model = merged(model)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_peft(model, recipe.peft, recipe.peft.changed(), recipe.train.seed, task.peft_task_type)
    lean = make_lean(model) if recipe.train.lean_layers else None
    if is_prompt_learning(model) and recipe.train.packing:
        raise UserError(f"peft.method: {recipe.peft.method} prepends virtual tokens to every row, which packed rows "
                        "cannot share; set train.packing: false")
    if needs_data_init(model):
        size = recipe.train.batch_size
        initialize_eva(model, task.tokenizer.pad_token_id, task.adapter_init_examples(train_examples), size)
    if recipe.train.precision == "fp64":  # after adapter set-up: PiSSA / OLoRA initialize only in 32 bits or fewer
        model.double()
    if not quiet:
        switched = (
            f"; lean layers: {lean['mlp']} MLPs, {lean['norm']} norms, {lean['lora']} LoRA updates" if lean else ""
        )
        print(f"model: {recipe.model} ({path}); {trainable_summary(model)}{switched}", flush=True)
    model.to(accelerator.device)
    task.setup(model, accelerator, train_examples, eval_examples)
    try:
        summary = Engine(recipe, task, model, tokenizer, train_examples, eval_examples, accelerator).run()
    except Stopped:  # every process stopped after the same step: they can leave together
        leave_process_group()
        raise
    finally:
        task.close()
    leave_process_group()
    return summary


def leave_process_group() -> None:
    """Destroy the process group once every process is done with it (not after a failure, where another process
    may still be in a collective). Left to interpreter exit, gloo's worker threads can still hold the tensors of
    asynchronous collectives (FSDP2's) and abort the process (SIGABRT, "terminate called without an active
    exception") after a finished run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


EVA_BATCHES = 16  # batches of training sequences EVA's SVD sees


def initialize_eva(model, pad: int, examples, batch_size: int) -> None:
    """EVA (Paischer et al., 2024): LoRA A matrices from the SVD of layer inputs on training sequences
    (each task says which: SFT examples, preferred completions, desirable ones, best-ranked ones, the prompts
    of the commands that sample)."""
    from peft import initialize_lora_eva_weights

    examples = list(itertools.islice(examples, batch_size * EVA_BATCHES))  # read lazily: the data may be huge
    batches = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad, packing=False)
        batches.append({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    with torch.no_grad():
        initialize_lora_eva_weights(model, batches, show_progress_bar=False)
