"""The one registry of training commands: name -> recipe schema, task, one-line summary.

Adding a command is one entry here (plus its schema and task); the CLI, recipe validation and the
run builder all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.train.online_recipes import GRPORecipe, OnlineDPORecipe, PPORecipe, RFTRecipe
from posttrain.train.recipes import DPORecipe, KTORecipe, PRMRecipe, RankRecipe, Recipe, RMRecipe, SFTRecipe
from posttrain.train.tasks.grpo import GRPOTask
from posttrain.train.tasks.online_dpo import OnlineDPOTask
from posttrain.train.tasks.ppo import PPOTask
from posttrain.train.tasks.preference import PreferenceTask
from posttrain.train.tasks.process_reward import ProcessRewardTask
from posttrain.train.tasks.ranking import RankingTask
from posttrain.train.tasks.reward_model import RewardModelTask
from posttrain.train.tasks.rft import RFTTask
from posttrain.train.tasks.sft import SFTTask
from posttrain.train.tasks.unpaired import UnpairedTask


@dataclass(frozen=True)
class Command:
    schema: type[Recipe]
    task: type  # built with (recipe, tokenizer): train/task.py
    summary: str


COMMANDS: dict[str, Command] = {
    "sft": Command(SFTRecipe, SFTTask,
                   "supervised fine-tuning (full, selective or PEFT; SFT variants under sft.*)"),
    "dpo": Command(DPORecipe, PreferenceTask,
                   "pairwise preference optimization (DPO, IPO, SimPO, ORPO, ... chosen by loss.name)"),
    "kto": Command(KTORecipe, UnpairedTask,
                   "unpaired preference optimization: KTO, BCO, APO-zero on thumbs-up / thumbs-down data"),
    "rank": Command(RankRecipe, RankingTask,
                    "ranking / listwise alignment over several scored responses: AFT, RRHF, PRO, ListNet"),
    "grpo": Command(GRPORecipe, GRPOTask,
                    "online RL from rewards: GRPO, Dr. GRPO, DAPO, GSPO, CISPO, RLOO, REINFORCE++, ReMax (chosen by "
                    "rl.*)"),
    "ppo": Command(PPORecipe, PPOTask,
                   "PPO with a value model: GAE, clipped value loss, KL penalty in the reward, epochs x mini-batches"),
    "rft": Command(RFTRecipe, RFTTask,
                   "rejection-sampling fine-tuning / expert iteration / STaR: sample, keep what the rewards accept, "
                   "SFT, repeat"),
    "online-dpo": Command(OnlineDPORecipe, OnlineDPOTask,
                          "online / iterative DPO: sample pairs from the policy, label them by rewards or an LLM "
                          "judge, "
                          "train any pairwise loss"),
    "rm": Command(RMRecipe, RewardModelTask,
                  "reward model: Bradley-Terry on preference pairs (margins, centering), multi-objective heads on "
                  "ratings; "
                  "final/ loads with AutoModelForSequenceClassification"),
    "prm": Command(PRMRecipe, ProcessRewardTask,
                   "process reward model: a correctness label per solution step, read at each step's separator "
                   "(TRL's PRM layout); final/ loads with AutoModelForTokenClassification"),
}
