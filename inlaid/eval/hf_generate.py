"""Batched greedy generation with HF transformers (+ PEFT): the baseline the task suite scores.

    texts = generate(model, tokenizer, prompts, max_new_tokens=32, batch_size=16)

Each prompt is one user message; the tokenizer's chat template (when it has one) adds the
generation prompt. Batches are left-padded and sorted by length so little padding is computed; the
answers come back in the order of ``prompts``, decoded without special tokens and stripped. The
inlaid engine will replace this function behind the same signature.
"""

from __future__ import annotations

import torch


def render_prompt(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers to ``prompts`` (model in eval mode, on its own device)."""
    texts = [render_prompt(tokenizer, p) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding: every prompt ends at the last column
            input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
            attention[row, width - len(ids[i]):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                             eos_token_id=tokenizer.eos_token_id)
        for row, i in enumerate(chunk):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers
