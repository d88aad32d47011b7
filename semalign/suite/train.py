"""The one training loop of the suite (:func:`fit`) and what makes runs reproducible and resumable: seeds, batch
order as a function of (seed, epoch), per-epoch atomic checkpoints keyed by what shaped the run."""
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
from tqdm import tqdm

from semalign.suite.io import atomic_torch_save, write_csv


def set_seed(seed: int) -> None:
    """Seed every RNG a run touches, so the same seed gives the same numbers on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Shuffled index batches; a function of (seed, epoch) alone so a resumed run sees the same order."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns no row of this batch uses (right padding), saving compute on short batches."""
    T = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :T] for k, v in batch.items()}


def checkpoint_dir(out_dir: Path, fingerprint: dict[str, Any]) -> Path:
    """Checkpoints live under a hash of everything that shapes the run (config, seed, pairing), so a re-run with
    the same settings resumes, and a re-run with changed settings starts fresh instead of resuming stale state."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(out_dir) / "ckpt" / digest


def check_finite(loss: torch.Tensor, where: str) -> None:
    """NaN/inf losses stop training with a message naming the stage, instead of silently corrupting weights."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}) at {where}; last good checkpoint kept")



def spent(examples: int, example_passes: int, optimizer_steps: int) -> dict[str, float | int]:
    """The training budget a run spent, as the cost table reports it: distinct training examples, epochs (example
    passes / examples: what a plain trainer calls epochs, whatever the schedule) and optimizer steps."""
    return {"examples": examples, "epochs": example_passes / examples, "optimizer_steps": optimizer_steps}


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


def fit_budget(data: dict[str, torch.Tensor], cfg: TrainConfig, curve: list[dict]) -> dict[str, float | int]:
    """What :func:`fit` spent on ``data``: every row once per epoch, one optimizer step per curve row."""
    n = len(data["input_ids"])
    return spent(n, cfg.epochs * n, len(curve))


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
