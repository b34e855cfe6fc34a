"""Batched generation with the KV cache (HF ``generate``): left-padded, length-sorted batches."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def render_prompt(tokenizer, prompt, chat: bool = True) -> str:
    """A chat prompt (string or messages) rendered up to the assistant's turn; raw text when ``chat`` is off. The
    template is the tokenizer's: a run's tokenizer, and the one its ``final/`` saves, carries the recipe's
    ``data.chat_template`` (``models.load_tokenizer``), so evals and ``generate`` / ``chat`` see the trained one."""
    if not chat:
        return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    chat: bool = True,
    progress: bool = False,
) -> list[str]:
    """Completions for ``prompts`` (strings or message lists), in order. ``temperature`` 0 is greedy."""
    texts = [render_prompt(tokenizer, p, chat) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    outputs: list[str] = [""] * len(texts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    sampling = {"do_sample": True, "temperature": temperature,
                "top_p": top_p} if temperature > 0 else {"do_sample": False}
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=not progress, unit="batch"):
            chosen = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in chosen], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, top_k=None, **sampling)
            for i, row in zip(chosen, out[:, enc["input_ids"].shape[1] :]):
                outputs[i] = tokenizer.decode(row, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs
