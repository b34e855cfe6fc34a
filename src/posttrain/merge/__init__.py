"""Weight-space tools: merging methods as pure functions on state dicts (``posttrain.merge.methods``)."""

from posttrain.merge.methods import (dare, dare_ties, lines, linear, model_stock, slerp, task_arithmetic, ties, transfer,
                                     wise_ft)

__all__ = ["dare", "dare_ties", "lines", "linear", "model_stock", "slerp", "task_arithmetic", "ties", "transfer", "wise_ft"]
