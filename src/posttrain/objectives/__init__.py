"""Objectives: pure functions of tensors, each documented with its formula and paper."""

from posttrain.objectives.advantages import ADVANTAGES, advantages
from posttrain.objectives.pairwise import PAIRWISE, pairwise_loss
from posttrain.objectives.policy import POLICY_LOSSES, aggregate, kl_estimate
from posttrain.objectives.ranking import RANKING, ranking_loss
from posttrain.objectives.sft import sft_loss
from posttrain.objectives.unpaired import UNPAIRED, unpaired_loss
from posttrain.objectives.value import explained_variance, gae, value_loss

REGISTRIES = {"pairwise": PAIRWISE, "unpaired": UNPAIRED, "ranking": RANKING}

__all__ = ["ADVANTAGES", "PAIRWISE", "POLICY_LOSSES", "RANKING", "REGISTRIES", "UNPAIRED", "advantages", "aggregate",
           "explained_variance", "gae", "kl_estimate", "pairwise_loss", "ranking_loss", "sft_loss", "unpaired_loss",
           "value_loss"]
