"""The training commands (one per entry of ``train/commands.py``), ``posttrain recipes`` and ``quickstart``."""

from __future__ import annotations

import functools

from posttrain.apps.quickstart import quickstart
from posttrain.apps.recipes import load_recipe
from posttrain.apps.spec import CliCommand, arg
from posttrain.core.config import describe_schema, recipes_dir, section_type
from posttrain.objectives import REGISTRIES
from posttrain.objectives.advantages import ADVANTAGES
from posttrain.objectives.policy import POLICY_LOSSES
from posttrain.rewards import REWARDS
from posttrain.train.commands import COMMANDS
from posttrain.train.run import run

RL_VARIANTS = ("variants as recipe keys: Dr. GRPO = rl.advantage dr_grpo + rl.aggregation seq_mean_token_sum_norm; "
               "DAPO = rl.epsilon_high 0.28 + rl.dynamic_sampling resample + rl.overlong_buffer + token_mean; "
               "GSPO = rl.policy_loss gspo + seq_mean_token_mean; RLOO = rl.advantage rloo + rl.policy_loss "
               "reinforce")


def recipe_help(command: str) -> str:
    schema = COMMANDS[command].schema
    lines = ["recipe keys (default, meaning):", *describe_schema(schema)]
    loss = section_type(schema.model_fields["loss"]) if "loss" in schema.model_fields else None
    if loss is not None:
        lines += ["", "losses (loss.name) with their settings and the papers' defaults, used for every loss.* key "
                  "the recipe leaves unset:", *REGISTRIES[loss.family].describe()]
    if "rl" in schema.model_fields:
        lines += ["", "advantage estimators (rl.advantage) with their settings and defaults:", *ADVANTAGES.describe(),
                  "", "policy losses (rl.policy_loss) with their settings and defaults:", *POLICY_LOSSES.describe(),
                  "", "rewards (rewards: [{name, weight, options}]), or module:function:",
                  *[f"  {name:14s} {(fn.__doc__ or '').split(chr(10))[0]}" for name, fn in sorted(REWARDS.items())],
                  "", RL_VARIANTS]
    return "\n".join(lines)


def cmd_train(command: str, args) -> int:
    run(command, load_recipe(command, args.recipe, args.overrides))
    return 0


def cmd_recipes(args) -> int:
    for path in sorted(recipes_dir().glob("*.yaml")):
        lines = path.read_text().splitlines()
        about = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("#") else ""
        print(f"{path.stem:24s} {about}")
    print(f"\n(in {recipes_dir()}; run one with `posttrain <command> <name>`)")
    return 0


def cmd_quickstart(args) -> int:
    quickstart(args.out, args.questions, args.overrides)
    return 0


TRAINING = tuple(
    CliCommand(name, command.summary, functools.partial(cmd_train, name), raw=True, description=command.summary,
               epilog=functools.partial(recipe_help, name), args=(
                   arg("recipe", help="a recipe YAML file, or the name of a shipped recipe (see `posttrain recipes`)"),
                   arg("overrides", nargs="*", help="key=value overrides, e.g. train.lr=5e-5 peft.method=dora")))
    for name, command in COMMANDS.items())

HELPERS = (
    CliCommand("recipes", "list the shipped example recipes", cmd_recipes),
    CliCommand("quickstart", "fine-tune the embedded model on GSM8K and compare before / after", cmd_quickstart, args=(
        arg("--out", default="runs/quickstart", help="run directory"),
        arg("--questions", type=int, default=48, help="held-out questions to score"),
        arg("overrides", nargs="*", help="key=value overrides of the quickstart recipe"))),
)
