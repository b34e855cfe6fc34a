"""Standalone models from a run: HF directories (safetensors, adapters merged into the base weights) or one
GGUF file."""

from __future__ import annotations

import tempfile
from pathlib import Path

from posttrain.apps.gguf_export import write_gguf
from posttrain.apps.recipes import validate_recipe
from posttrain.core.errors import UserError
from posttrain.model.load import load_model, load_tokenizer, resolve_model, save_final
from posttrain.model.peft import apply_peft, merged
from posttrain.train import sharding
from posttrain.train.commands import COMMANDS
from posttrain.train.recipes import Recipe


def export_merged(source: str, out: Path) -> None:
    """Export a model directory (a run's ``final/``: full weights or an adapter)."""
    model = load_model(source)
    save_final(merged(model), load_tokenizer(resolve_model(source)), out)  # a run directory means its final/


def export_checkpoint(run_dir: Path, name: str, out: Path) -> None:
    """Export ``checkpoints/step-N``: the recipe's model and adapter with the checkpoint's trainable weights."""
    import yaml
    from safetensors.torch import load_file

    directory = run_dir / "checkpoints" / name
    sharded = (directory / sharding.SHARDED).is_dir()
    if not sharded and not (directory / "trainable.safetensors").exists():
        raise UserError(f"export: {directory} is not a complete checkpoint")
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.exists():
        raise UserError(f"export: {recipe_file} is missing")
    tree = yaml.safe_load(recipe_file.read_text())
    weights = sharding.full_trainable_weights(directory) if sharded else load_file(directory / "trainable.safetensors")
    classifier = next((command for command in ("rm", "prm") if command in tree), None)  # their own recipe section
    if classifier:
        return export_classifier_checkpoint(classifier, tree, weights, out)
    recipe = Recipe.model_validate(
        {k: v for k, v in tree.items() if k in Recipe.model_fields}
    )  # keys every command shares
    path = resolve_model(recipe.model)
    model = apply_peft(load_model(path, recipe.trust_remote_code, allow_pickle=recipe.allow_pickle), recipe.peft,
                       set(), recipe.train.seed)
    params = dict(model.named_parameters())
    for key, value in weights.items():
        if key.startswith(("value_head.", "critic.")):  # PPO checkpoints its value model next to the policy
            continue
        params[key.removeprefix("policy.")].data.copy_(value)
    save_final(merged(model), load_tokenizer(path, recipe.trust_remote_code, recipe.data.chat_template), out)


def export_classifier_checkpoint(command: str, tree: dict, weights: dict, out: Path) -> None:
    """A reward or process reward model checkpoint, saved as ``final/`` would be (its learned weighting included;
    reward statistics are measured at the end of training only)."""
    recipe = validate_recipe(command, tree)
    path = resolve_model(recipe.model)
    tokenizer = load_tokenizer(path, recipe.trust_remote_code, recipe.data.chat_template)
    task = COMMANDS[command].task(recipe, tokenizer)
    model = apply_peft(task.load_model(path), recipe.peft, set(), recipe.train.seed, task.peft_task_type)
    task.setup(model, None, [], [])
    params = dict(task.trained(model).named_parameters())
    for key, value in weights.items():
        params[key].data.copy_(value)
    task.save_final(model, tokenizer, out)


def export_gguf(source: str, out: Path, quant: str = "q8_0", checkpoint: str | None = None,
                tokenizer_pre: str | None = None) -> dict:
    """A GGUF file of a run's ``final/`` (or a checkpoint), a model directory or ``default``; adapters are merged
    into a temporary HF directory first."""
    path = Path(resolve_model(source))
    if checkpoint is None and not (path / "adapter_config.json").exists():
        return write_gguf(path, out, quant, tokenizer_pre)
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / "model"
        if checkpoint:
            export_checkpoint(Path(source), checkpoint, staged)
        else:
            export_merged(source, staged)
        return write_gguf(staged, out, quant, tokenizer_pre)
