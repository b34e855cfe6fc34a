"""The one registry of training commands: name -> recipe schema, task, one-line summary.

Adding a command is one entry here (plus its schema and task); the CLI, recipe validation and the
run builder all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import (DPORecipe, GRPORecipe, KTORecipe, OnlineDPORecipe, PPORecipe, PRMRecipe, RankRecipe, Recipe,
                              RFTRecipe, RMRecipe, SFTRecipe)


@dataclass(frozen=True)
class Command:
    schema: type[Recipe]
    task: str  # "module:Class", imported when the command runs
    summary: str

    def task_class(self):
        import importlib

        module, name = self.task.split(":")
        return getattr(importlib.import_module(module), name)


COMMANDS: dict[str, Command] = {
    "sft": Command(SFTRecipe, "posttrain.train.tasks.sft:SFTTask",
                   "supervised fine-tuning (full, selective or PEFT; SFT variants under sft.*)"),
    "dpo": Command(DPORecipe, "posttrain.train.tasks.preference:PreferenceTask",
                   "pairwise preference optimization (DPO, IPO, SimPO, ORPO, ... chosen by loss.name)"),
    "kto": Command(KTORecipe, "posttrain.train.tasks.unpaired:UnpairedTask",
                   "unpaired preference optimization: KTO, BCO, APO-zero on thumbs-up / thumbs-down data"),
    "rank": Command(RankRecipe, "posttrain.train.tasks.ranking:RankingTask",
                    "ranking / listwise alignment over several scored responses: AFT, RRHF, PRO, ListNet"),
    "grpo": Command(GRPORecipe, "posttrain.train.tasks.grpo:GRPOTask",
                    "online RL from rewards: GRPO, Dr. GRPO, DAPO, GSPO, CISPO, RLOO, REINFORCE++, ReMax (chosen by rl.*)"),
    "ppo": Command(PPORecipe, "posttrain.train.tasks.ppo:PPOTask",
                   "PPO with a value model: GAE, clipped value loss, KL penalty in the reward, epochs x mini-batches"),
    "rft": Command(RFTRecipe, "posttrain.train.tasks.rft:RFTTask",
                   "rejection-sampling fine-tuning / expert iteration / STaR: sample, keep what the rewards accept, SFT, repeat"),
    "online-dpo": Command(OnlineDPORecipe, "posttrain.train.tasks.online_dpo:OnlineDPOTask",
                          "online / iterative DPO: sample pairs from the policy, label them by rewards or an LLM judge, "
                          "train any pairwise loss"),
    "rm": Command(RMRecipe, "posttrain.train.tasks.reward_model:RewardModelTask",
                  "reward model: Bradley-Terry on preference pairs (margins, centering), multi-objective heads on ratings; "
                  "final/ loads with AutoModelForSequenceClassification"),
    "prm": Command(PRMRecipe, "posttrain.train.tasks.process_reward:ProcessRewardTask",
                   "process reward model: a correctness label per solution step, read at each step's separator "
                   "(TRL's PRM layout); final/ loads with AutoModelForTokenClassification"),
}
