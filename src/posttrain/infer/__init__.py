"""Inference-time alignment: best-of-N and voting, URIAL, nudging, reward-guided decoding. Plain functions over a
model and tokenizer (or a scorer); ``posttrain generate`` is a thin layer over them (scoring a data file with a
reward model is ``evaluate/score.py``)."""

from posttrain.infer.decoding import (best_of_n, load_reward, majority_vote, nudge, reward_guided, sample_n,
                                      urial_answer, urial_prompt)

__all__ = ["best_of_n", "load_reward", "majority_vote", "nudge", "reward_guided", "sample_n",
           "urial_answer", "urial_prompt"]
