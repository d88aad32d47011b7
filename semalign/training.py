"""Training utilities shared by every method: tokenisation of chat records, batching, LoRA, KL, atomic saves.

One place for each of these so that KD, SemAlign and the baselines train on byte-identical inputs and differ
only in their objective.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from semalign.data import atomic_path, write_csv

# Open-Instruct / Tulu format: what the PKT protocol data was written for; used when a tokenizer has no template.
TULU_USER, TULU_ASSISTANT = "<|user|>\n", "<|assistant|>\n"


def set_seed(seed: int) -> None:
    """Seed every RNG a run touches, so the same seed gives the same numbers on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


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


def answer_logits(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [n, V], labels [n], mask [b, T]) at the n scored positions only (position t predicts token t+1).

    The LM head over a 49k-152k vocabulary, and every loss after it, are the bulk of a small student's step, and
    prompt positions carry no loss: reading out only where the loss looks gives the same loss for a fraction of
    the work (SemAlign's frontier does the same).
    """
    from semalign.models import backbone, lm_head

    mask = shift_mask(b["loss_mask"]).bool()
    hidden = backbone(model)(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    labels = F.pad(b["input_ids"][:, 1:], (0, 1))[mask]
    return lm_head(model)(hidden[mask]), labels, mask


def answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens; 0 (not NaN) when a batch's answers were all truncated away,
    which then simply contributes nothing (as ``output_kl`` does)."""
    return F.cross_entropy(logits.float(), labels, reduction="sum") / max(1, len(labels))


def sft_loss(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The SFT objective on a batch: :func:`answer_ce` of :func:`answer_logits`."""
    logits, labels, _ = answer_logits(model, b)
    return answer_ce(logits, labels)


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
    manifest = {**manifest, "n_params": sum(p.numel() for p in model.parameters()),
                "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False))}  # Seeking unties
    return save_prepared(model, tokenizer, manifest, out_dir)


def checkpoint_dir(out_dir: Path, fingerprint: dict[str, Any]) -> Path:
    """Checkpoints live under a hash of everything that shapes the run (config, seed, pairing), so a re-run with
    the same settings resumes, and a re-run with changed settings starts fresh instead of resuming stale state."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(out_dir) / "ckpt" / digest


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def check_finite(loss: torch.Tensor, where: str) -> None:
    """NaN/inf losses stop training with a message naming the stage, instead of silently corrupting weights."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}) at {where}; last good checkpoint kept")



@dataclass
class TrainConfig:
    """Knobs of the shared mini-batch loop (:func:`fit`); each trained method's config extends it, so KD,
    LoRA-SFT, layer-wise KD and Seeking's fine-tuning differ only in what they add. Defaults: the SemAlign
    v1 protocol for the post-transfer SFT baselines (5 epochs, lr 3e-4, batch 64, LoRA r=16 on up/down/v/o)."""

    trainable: str = "lora"  # "lora" | "full"
    epochs: int = 5
    lr: float = 3e-4
    batch_size: int = 64
    micro_batch_size: int = 8  # gradient accumulation keeps memory bounded on a laptop; same result
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant" | "linear" (warmup then linear decay to 0, the HF Trainer default)
    warmup_ratio: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["up_proj", "down_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        for key, value, allowed in (("trainable", self.trainable, ("lora", "full")),
                                    ("schedule", self.schedule, ("constant", "linear"))):
            if value not in allowed:
                raise ValueError(f"{type(self).__name__}.{key} must be one of {allowed}, got {value!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError(f"{type(self).__name__}: epochs, batch_size and micro_batch_size must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"{type(self).__name__}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def fingerprint(self) -> dict[str, Any]:
        """What shapes the run. A constant schedule leaves ``epochs`` out, so extending a finished run resumes it;
        a decaying schedule depends on the total step count, so there it is part of the run's identity."""
        cfg = asdict(self)
        if self.schedule == "constant":
            cfg.pop("epochs")
        return cfg


def prepare_trainable(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """LoRA adapters on ``cfg.lora_targets``, or every weight trainable."""
    if cfg.trainable == "lora":
        return apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lr_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant, or linear warmup over ``warmup_ratio`` of the steps then linear decay to 0 (HF's default)."""
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(
    module: torch.nn.Module,
    data: dict[str, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    cfg: TrainConfig,
    out_dir: Path,
    seed: int,
    tag: str,
    fingerprint: dict[str, Any] | None = None,
) -> list[dict]:
    """The one training loop of the suite: shuffled mini-batches with gradient accumulation, AdamW over every
    parameter of ``module`` that requires grad (wrap extra trainables, e.g. projectors, in a ModuleDict with
    the model), an atomic checkpoint after each epoch, and exact resume from it.

    ``data``: row-aligned tensors with ``input_ids``/``attention_mask``/``loss_mask`` [N, T], right padded.
    ``loss_fn(rows, batch)``: mean loss over ``rows`` (indices into ``data``); ``batch`` holds those rows,
    trimmed to their longest sequence and on the module's device. Writes ``out_dir/loss_curve.csv``.
    """
    module.train()
    dev = next(module.parameters()).device
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{tag}: nothing to train (no parameter requires grad)")
    n = len(data["input_ids"])
    batch_size = min(cfg.batch_size, n)
    steps_per_epoch = -(-n // batch_size)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = lr_schedule(opt, cfg, cfg.epochs * steps_per_epoch)
    ckpt = checkpoint_dir(out_dir, {"config": cfg.fingerprint(), "seed": seed, **(fingerprint or {})}) / "last.pt"
    start_epoch, curve = 0, []
    if ckpt.exists():  # resume: trainable weights, optimizer, schedule and curve of the last finished epoch
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        module.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, curve = state["epoch"], state["curve"]
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    for epoch in range(start_epoch, cfg.epochs):
        set_seed(seed * 1000 + epoch)  # dropout masks independent of whether we resumed
        bar = tqdm(batches(n, batch_size, seed, epoch), desc=f"{tag} epoch {epoch + 1}/{cfg.epochs}")
        for step, idx in enumerate(bar):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for rows in idx.split(cfg.micro_batch_size):
                batch = {k: v.to(dev) for k, v in trim({k: t[rows] for k, t in data.items()}).items()}
                loss = loss_fn(rows, batch)
                check_finite(loss, f"{tag} epoch {epoch + 1} step {step}")
                (loss * len(rows) / len(idx)).backward()
                total += loss.item() * len(rows) / len(idx)
            opt.step()
            sched.step()
            curve.append({"epoch": epoch + 1, "step": step, "loss": total})
            bar.set_postfix(loss=f"{total:.4f}")
        weights = {k: v for k, v in module.state_dict().items() if k in trainable}
        atomic_torch_save({"epoch": epoch + 1, "model": weights, "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "curve": curve}, ckpt)
    write_csv(Path(out_dir) / "loss_curve.csv", curve, ["epoch", "step", "loss"])
    return curve
