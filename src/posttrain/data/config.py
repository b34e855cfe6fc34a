"""The ``data:`` section of a recipe: which files train and evaluate, and how records become tokens."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from posttrain.core.config import Section


class DataSource(Section):
    expand_in_help: ClassVar[bool] = False

    path: str = Field(description="jsonl / json / parquet / csv file, or a saved HF dataset directory")
    weight: float = Field(1.0, gt=0, description="sampling multiplier: 2.0 repeats the source, 0.5 keeps half")
    adapter: Literal["auto", "none", "gsm8k", "hh_rlhf"] = Field(
        "auto", description="map a public layout (GSM8K, HH-RLHF) onto posttrain's record formats"
    )
    limit: int | None = Field(None, gt=0, description="use only the first N records")


class DataConfig(Section):
    train: str | list[DataSource] = Field(description="training data: a path or a list of {path, weight}")
    eval: str | list[DataSource] | None = Field(None, description="held-out data for eval loss")
    max_length: int = Field(1024, gt=1, description="tokens per example; longer examples are truncated")
    truncation: Literal["right", "left", "drop"] = Field(
        "right", description="where to cut over-long examples, or drop them (counts are reported)"
    )
    chat_template: str | None = Field(
        None, description="null: the tokenizer's template; 'chatml'; or a Jinja template string"
    )
    assistant_only_loss: bool = Field(True, description="train only on assistant / completion tokens")
    limit: int | None = Field(None, gt=0, description="use only the first N training records")
    eval_limit: int | None = Field(None, gt=0, description="use only the first N eval records")
    num_proc: int | None = Field(
        None, gt=0, description="worker processes that tokenize a file; null: one per core for files of 32 MB or more"
    )

    def sources(self, which: Literal["train", "eval"]) -> list[DataSource]:
        value = getattr(self, which)
        if value is None:
            return []
        return [DataSource(path=value)] if isinstance(value, str) else value
