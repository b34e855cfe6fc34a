"""The ``peft:`` section of a recipe: adapters and selective fine-tuning."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from posttrain.core.config import Section


class PeftConfig(Section):
    method: str = Field(  # validated against peft's registry when the model is built
        "none",
        description="none (full or selective fine-tuning), lora, dora, rslora, pissa, olora, eva, "
        "prompt_tuning, ia3, or any other peft method name (vera, loha, lokr, adalora, boft, ...)",
    )
    r: int = Field(16, gt=0, description="adapter rank (LoRA-like methods)")
    alpha: float = Field(32, description="LoRA scaling numerator (lora_alpha)")
    dropout: float = Field(0.0, ge=0, lt=1, description="adapter dropout")
    target_modules: str | list[str] = Field(
        "all-linear", description="modules that get adapters (LoRA family; other methods default to peft's choice)"
    )
    num_virtual_tokens: int = Field(20, gt=0, description="prompt tuning: learned prompt length")
    options: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the peft config")
    trainable: list[str] = Field(
        default_factory=list,
        description="selective fine-tuning: train only parameters whose name matches a glob (e.g. '*norm*')",
    )
    frozen: list[str] = Field(default_factory=list, description="freeze parameters whose name matches a glob")
    random_freeze: float = Field(
        0.0, ge=0, lt=1, description="HFT: freeze this fraction of each layer's weight matrices, chosen at random"
    )
