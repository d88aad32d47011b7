"""Chat records -> token tensors, one way for every method and the teacher cache, so that all of them train on
byte-identical inputs and differ only in their objective."""
from __future__ import annotations

from typing import Any

import torch

TULU_USER, TULU_ASSISTANT = "<|user|>\n", "<|assistant|>\n"


def render_chat(tokenizer: Any, messages: list[dict]) -> tuple[str, str]:
    """(prompt, full) texts; the answer is ``full[len(prompt):]``, so loss masks cover exactly the answer."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return prompt, full
    prompt = "".join(
        (TULU_USER if m["role"] == "user" else TULU_ASSISTANT) + m["content"] + "\n\n" for m in messages[:-1]
    ) + TULU_ASSISTANT
    return prompt, prompt + messages[-1]["content"] + (tokenizer.eos_token or "")


def tokenize_records(
    tokenizer: Any, records: list[dict], max_len: int, train_on_inputs: bool = False
) -> dict[str, torch.Tensor]:
    """Chat records ``{"messages": [..., {"role": "assistant", ...}]}`` -> right-padded tensors [N, T].

    ``loss_mask`` marks the assistant answer (or every real token with ``train_on_inputs``, which the MMLU
    protocol needs because its answer is one letter). Sequences are truncated to ``max_len`` from the right.
    """
    if not records:
        raise ValueError("tokenize_records: no records (empty split?)")
    rows, masks = [], []
    for i, rec in enumerate(records):
        messages = rec.get("messages")
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"record {i} (id={rec.get('id')}) has no final assistant message")
        prompt, full = render_chat(tokenizer, messages)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_len]
        mask = [1 if (train_on_inputs or j >= n_prompt) else 0 for j in range(len(ids))]
        rows.append(ids)
        masks.append(mask)
    T = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), T), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (ids, m) in enumerate(zip(rows, masks)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m)
    # The last token has no successor to predict: it never carries loss.
    loss_mask[:, -1] = 0
    if loss_mask.sum() == 0:
        raise ValueError(f"no answer tokens survive truncation to max_len={max_len}; raise data.max_len")
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}


