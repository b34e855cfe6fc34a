"""Weight-space tools: merging methods as pure functions on state dicts (``methods``), LoRA adapters merged into
their base or combined exactly (``lora``), and ``posttrain merge`` (``run``)."""

from posttrain.apps.merge.lora import adapter_scaling, concat_adapters, merge_lora
from posttrain.apps.merge.methods import (dare, dare_ties, greedy_soup, linear, lines, model_stock, slerp,
                                          task_arithmetic, ties, transfer, wise_ft)

__all__ = ["adapter_scaling", "concat_adapters", "dare", "dare_ties", "greedy_soup", "lines", "linear", "merge_lora",
           "model_stock", "slerp", "task_arithmetic", "ties", "transfer", "wise_ft"]
