"""Training utilities shared by every method: tokenisation of chat records, batching, LoRA, KL, atomic saves.

One place for each of these so that KD, SemAlign and the baselines train on byte-identical inputs and differ
only in their objective.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Open-Instruct / Tulu format: what the PKT protocol data was written for; used when a tokenizer has no template.
TULU_USER, TULU_ASSISTANT = "<|user|>\n", "<|assistant|>\n"


def set_seed(seed: int) -> None:
    """Seed every RNG a run touches, so the same seed gives the same numbers on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def _render(tokenizer: Any, messages: list[dict]) -> tuple[str, str]:
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
        prompt, full = _render(tokenizer, messages)
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


def batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Shuffled index batches; a function of (seed, epoch) alone so a resumed run sees the same order."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns no row of this batch uses (right padding), saving compute on short batches."""
    T = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :T] for k, v in batch.items()}


def shift_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Mask over *predicting positions*: position t predicts token t+1, which is scored iff loss_mask[t+1]."""
    out = torch.zeros_like(loss_mask)
    out[:, :-1] = loss_mask[:, 1:]
    return out


def output_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Token-mean KL(p_teacher || p_student) over ``mask`` positions, scaled by T^2 (Hinton et al.)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0) * t * t


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer tokens (the SFT loss), mean over scored tokens."""
    pred_mask = shift_mask(loss_mask)[:, :-1].bool()
    return F.cross_entropy(logits[:, :-1][pred_mask].float(), input_ids[:, 1:][pred_mask])


def apply_lora(
    model: torch.nn.Module,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str],
    layers: list[int] | None = None,
) -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA adapters, optionally only on the given 1-based decoder layers."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        layers_to_transform=[k - 1 for k in layers] if layers is not None else None,
        layers_pattern="layers" if layers is not None else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_model(model: torch.nn.Module, tokenizer: Any, out_dir: Path, manifest: dict) -> Path:
    """Save a trained model as a prepared dir (LoRA merged in), atomically, with the parent's manifest updated."""
    from semalign.models import save_prepared

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    manifest = {**manifest, "n_params": sum(p.numel() for p in model.parameters())}
    return save_prepared(model, tokenizer, manifest, out_dir)


def checkpoint_dir(out_dir: Path, fingerprint: dict[str, Any]) -> Path:
    """Checkpoints live under a hash of everything that shapes the run (config, seed, pairing), so a re-run with
    the same settings resumes, and a re-run with changed settings starts fresh instead of resuming stale state."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(out_dir) / "ckpt" / digest


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_finite(loss: torch.Tensor, where: str) -> None:
    """NaN/inf losses stop training with a message naming the stage, instead of silently corrupting weights."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}) at {where}; last good checkpoint kept")

