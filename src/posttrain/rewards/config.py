"""One entry of a recipe's ``rewards:``: a reward function or a reward model, with its weight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from posttrain.core.config import Section


class RewardSpec(Section):
    name: str | None = Field(None, description="a registered reward (math_answer, format, length, majority_vote, "
                             "code_tests) or module:function; with model: the name its scores are logged under")
    model: str | None = Field(None, description="a reward model instead: a sequence-classification model directory "
                              "(one score per completion, e.g. trained by posttrain rm)")
    weight: float = Field(1.0, description="weight in the summed reward")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the reward function "
                                    "(reward models: batch_size)")

    @model_validator(mode="after")
    def _function_or_model(self) -> "RewardSpec":
        if self.name is None and self.model is None:
            raise ValueError("a reward needs name (a reward function) or model (a reward model)")
        if self.model is not None and set(self.options) - {"batch_size"}:
            raise ValueError(f"reward model options: only batch_size (got {', '.join(sorted(self.options))})")
        return self

    @property
    def label(self) -> str:
        """The name the reward's scores are logged under."""
        return self.name or Path(self.model.rstrip("/")).name
