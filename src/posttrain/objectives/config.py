"""The ``loss:`` sections of the offline preference commands: a registered loss and its hyperparameters."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from posttrain.core.config import Section


class PairwiseLossConfig(Section):
    """Every hyperparameter left unset takes the chosen loss's own paper default (listed under --help)."""

    family: ClassVar[str] = "pairwise"
    name: str | list[str] = Field("dpo", description="a pairwise loss, or a list of them summed with loss.weights")
    weights: list[float] | None = Field(None, description="weights of the losses in loss.name (default: all 1)")
    beta: float | None = Field(None, gt=0, description="inverse temperature / KL strength (lambda for ORPO, ASFT); "
                               "unset: the loss's default")
    label_smoothing: float | None = Field(None, ge=0, lt=1, description="label-noise rate: cdpo / robust / exo_pair / "
                                          "aot / aot_pair / simpo / cpo / tpo / tpo_l")
    gamma: float | None = Field(None, description="simpo / tpo_l: target reward margin")
    alpha: float | None = Field(None, description="rpo / cpo / tpo / tpo_l: weight of the NLL term")
    length_alpha: float | None = Field(None, description="rdpo_length: coefficient of the length difference")
    ld_alpha: float | None = Field(None, ge=0, le=1,
                                   description="ld_dpo: weight of the tokens beyond the shorter answer")
    discopop_tau: float | None = Field(None, gt=0, description="discopop: temperature of the mixing sigmoid")
    tau: float | None = Field(None, gt=0, description="dft / dft2: temperature of the negatives' scores")
    dft_gamma: float = Field(0.95, gt=0, le=1,
                             description="dft / dft2: moving-average rate of the log partition estimate")
    dft_u_init: float = Field(0.0, description="dft / dft2: initial log partition estimate of every prompt")
    divergence: Literal["reverse_kl", "forward_kl", "js", "alpha"] | None = Field(None,
                                                                                  description="f_dpo: the f-divergence")
    divergence_alpha: float | None = Field(None, description="f_dpo with divergence alpha: its coefficient")
    wpo: bool = Field(False, description="WPO: weight each pair by how likely the policy is to produce it")

    def names(self) -> list[str]:
        return [self.name] if isinstance(self.name, str) else list(self.name)

    def hyperparameters(self) -> dict:
        """The loss settings the recipe sets (beta apart); the losses' own defaults fill in the rest."""
        skip = {"name", "weights", "beta", "wpo", "dft_gamma", "dft_u_init"}
        return {k: v for k, v in self.model_dump().items() if k not in skip and v is not None}


class UnpairedLossConfig(Section):
    family: ClassVar[str] = "unpaired"
    name: str = Field("kto", description="kto | bco | apo_zero_unpaired")
    beta: float | None = Field(None, gt=0, description="implicit reward scale; unset: the loss's default")
    desirable_weight: float = Field(1.0, gt=0, description="loss weight of desirable (thumbs-up) examples")
    undesirable_weight: float = Field(1.0, gt=0, description="loss weight of undesirable examples")
    density_ratio: bool = Field(False, description="bco: weight undesirable examples by the prompt density ratio (UDM)")
    min_density_ratio: float = Field(0.5, gt=0, description="bco UDM: lower clip of the density ratio")
    max_density_ratio: float = Field(10.0, gt=0, description="bco UDM: upper clip of the density ratio")
    prompt_sample_size: int = Field(1024, gt=1, description="bco UDM: prompts used to fit the classifier")


class RankingLossConfig(Section):
    family: ClassVar[str] = "ranking"
    name: str = Field("aft", description="aft | rrhf | pro | listnet")
    beta: float | None = Field(None, gt=0, description="listnet: reward scale; unset: the loss's default")
    constraint: Literal["boundary", "detach"] | None = Field(None, description="aft: how negatives are constrained")
    tau: float | None = Field(None, gt=0, description="aft boundary: how far below a positive a negative may be pushed")
    sft_weight: float | None = Field(None, ge=0, description="aft / rrhf / pro: weight of the best response's NLL term")
    reward_temperature: bool | None = Field(None, description="pro: scale scores by the reward gaps (the authors' "
                                            "temperature); false: plain Plackett-Luce over the order")
    score_temperature: float | None = Field(None, gt=0, description="listnet: temperature of the target distribution")

    def hyperparameters(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k not in ("name", "beta") and v is not None}
