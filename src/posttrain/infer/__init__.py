"""Inference-time tools: scoring data with reward models, best-of-N and voting, URIAL, nudging, reward-guided
decoding. Plain functions over a model and tokenizer (or a scorer); ``posttrain score`` and ``posttrain generate``
are thin layers over them."""

from posttrain.infer.decoding import (best_of_n, load_reward, majority_vote, nudge, reward_guided, sample_n, urial_answer,
                                      urial_prompt)
from posttrain.infer.score import score_records

__all__ = ["best_of_n", "load_reward", "majority_vote", "nudge", "reward_guided", "sample_n", "score_records",
           "urial_answer", "urial_prompt"]
