"""An LLM judge for pairs of answers: a local causal LM is asked which of two answers is better, and the
answer is read from its next-token probabilities of "A" and "B" (no sampling, no parsing of free text).

Every comparison is made in both orders and averaged (position swapping, as in MT-Bench / AlpacaEval), so a
judge that always prefers the first slot gives 0.5, not a preference; how often the two orders agree is
reported as the judge's consistency.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.core.errors import UserError
from posttrain.data.batching import right_padded
from posttrain.model.forward import final_hidden_states
from posttrain.rollout.generate import render_prompt

TEMPLATE = (
    "Here is a conversation and two candidate replies from the assistant.\n\n{conversation}\n\n"
    "Reply A:\n{first}\n\nReply B:\n{second}\n\n"
    "Which reply is more helpful, honest and harmless? Answer with one letter, A or B."
)


def conversation_text(conversation: str | list[dict]) -> str:
    if isinstance(conversation, str):
        return conversation
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in conversation)


@dataclass
class Verdicts:
    first_better: torch.Tensor  # [n] probability that the first answer is better, averaged over both orders
    consistent: torch.Tensor  # [n] bool: both orders picked the same answer
    first_slot: torch.Tensor  # [2n] P(the reply shown as A is better): as given, then with the replies swapped


class PairwiseJudge:
    def __init__(self, model, tokenizer, template: str | None = None, batch_size: int = 8, max_length: int = 2048):
        self.model, self.tokenizer = model, tokenizer
        self.template = template or TEMPLATE
        for field in ("{conversation}", "{first}", "{second}"):
            if field not in self.template:
                raise UserError(f"online.judge.template must contain {field}")
        self.letters = [tokenizer(letter, add_special_tokens=False)["input_ids"][0] for letter in ("A", "B")]
        if self.letters[0] == self.letters[1]:
            raise UserError("the judge's tokenizer does not tell 'A' from 'B' by their first token")
        self.batch_size, self.max_length = batch_size, max_length

    def question(self, conversation, first: str, second: str) -> str:
        text = self.template.format(conversation=conversation_text(conversation), first=first, second=second)
        if self.tokenizer.chat_template:
            return render_prompt(self.tokenizer, text)
        return text + "\nAnswer:"

    @torch.no_grad()
    def compare(self, conversations: list, firsts: list[str], seconds: list[str]) -> Verdicts:
        """Whether each ``firsts[i]`` is a better reply than ``seconds[i]``, asked in both orders."""
        n = len(firsts)
        questions = [self.question(c, a, b) for c, a, b in zip(conversations, firsts, seconds)]
        questions += [self.question(c, b, a) for c, a, b in zip(conversations, firsts, seconds)]
        p_a = torch.cat([self.prob_a(questions[lo : lo + self.batch_size]) for lo in range(0, len(questions),
                                                                                           self.batch_size)]) \
            if questions else torch.zeros(0)
        in_order, swapped = p_a[:n], 1 - p_a[n:]  # each: P(the first answer is better)
        return Verdicts((in_order + swapped) / 2, (in_order > 0.5) == (swapped > 0.5), p_a)

    def prob_a(self, texts: list[str]) -> torch.Tensor:
        """P("A") / (P("A") + P("B")) as the judge's next token after each text."""
        return choice_probs(self.model, self.tokenizer, texts, self.letters, self.max_length)[:, 0]


@torch.no_grad()
def choice_probs(model, tokenizer, texts: list[str], token_ids: list[int], max_length: int = 2048,
                 add_special_tokens: bool = False) -> torch.Tensor:
    """[n, k] next-token probabilities after each text, renormalized over ``token_ids`` only (the vocabulary
    projection is computed for those k rows, not the whole vocabulary)."""
    ids = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"][-max_length:] for t in texts]
    input_ids, mask, ends = right_padded(ids, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        hidden = final_hidden_states(model, input_ids.to(device), None, mask.to(device))
    finally:
        model.train(was_training)
    last = hidden[torch.arange(len(ids)), ends]
    head = model.get_output_embeddings()
    logits = last @ head.weight[token_ids].T
    if head.bias is not None:
        logits = logits + head.bias[token_ids]
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1).cpu()


def round_robin(judge: PairwiseJudge, conversations: list, groups: list[list[str]]) -> tuple[list[list[float]],
                                                                                             Verdicts]:
    """Every pair of answers within each group (the answers to ``conversations[k]``), judged in one batch: each
    answer's summed probability of beating the others in its group, and all verdicts."""
    pairs = [(k, i, j) for k, answers in enumerate(groups) for i in range(len(answers)) for j in range(i + 1,
                                                                                                       len(answers))]
    verdicts = judge.compare([conversations[k] for k, _, _ in pairs], [groups[k][i] for k, i, _ in pairs],
                             [groups[k][j] for k, _, j in pairs])
    wins = [[0.0] * len(answers) for answers in groups]
    for (k, i, j), p in zip(pairs, verdicts.first_better.tolist()):
        wins[k][i] += p
        wins[k][j] += 1 - p
    return wins, verdicts
