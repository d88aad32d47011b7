"""Plain knowledge distillation: the student matches the teacher's next-token distribution on the train split.

The teacher's logits come from the shared cache (one teacher forward per example for all epochs), so KD and
SemAlign pay the same teacher cost and differ only in what the student is trained to match.
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from semalign.registry import Method, TransferContext, register_method
from semalign.training import (
    apply_lora,
    atomic_torch_save,
    batches,
    check_finite,
    checkpoint_dir,
    next_token_ce,
    output_kl,
    set_seed,
    shift_mask,
    trainable_parameters,
    trim,
)


@dataclass
class KDConfig:
    trainable: str = "lora"  # "lora" | "full"
    epochs: int = 5  # paper protocol (LaTen's post-alignment SFT): 5 epochs, lr 3e-4, batch 64
    lr: float = 3e-4
    batch_size: int = 64
    micro_batch_size: int = 8  # gradient accumulation keeps memory bounded on a laptop
    temperature: float = 1.0
    ce_weight: float = 0.0  # 0 = pure logit KL; >0 adds the SFT loss on the gold answer
    weight_decay: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["up_proj", "down_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if self.trainable not in ("lora", "full"):
            raise ValueError(f"kd.trainable must be 'lora' or 'full', got {self.trainable!r}")


def prepare_trainable(model: torch.nn.Module, cfg: KDConfig) -> torch.nn.Module:
    """LoRA adapters on the protocol's modules, or every weight trainable."""
    if cfg.trainable == "lora":
        return apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@register_method("kd")
class KnowledgeDistillation(Method):
    uses_teacher_cache = True
    config_cls = KDConfig

    def run(self, ctx: TransferContext) -> Path:
        cfg, cache, model, tokenizer = self.begin(ctx)
        model = prepare_trainable(model, cfg)
        model.train()
        dev = next(model.parameters()).device
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # epochs is left out: extending a finished run by more epochs resumes it
        shaping = {k: v for k, v in asdict(cfg).items() if k != "epochs"}
        ckpt = checkpoint_dir(ctx.out_dir, {"config": shaping, "seed": ctx.seed}) / "last.pt"
        start_epoch, curve = 0, []
        if ckpt.exists():  # resume: trainable weights, optimizer and curve of the last finished epoch
            state = torch.load(ckpt, map_location=dev, weights_only=False)
            model.load_state_dict(state["model"], strict=False)
            opt.load_state_dict(state["optimizer"])
            start_epoch, curve = state["epoch"], state["curve"]
        n = len(cache)
        tensors = {"input_ids": cache.input_ids, "attention_mask": cache.attention_mask, "loss_mask": cache.loss_mask}
        for epoch in range(start_epoch, cfg.epochs):
            set_seed(ctx.seed * 1000 + epoch)  # dropout masks independent of whether we resumed
            bar = tqdm(batches(n, min(cfg.batch_size, n), ctx.seed, epoch), desc=f"kd epoch {epoch + 1}/{cfg.epochs}")
            for step, idx in enumerate(bar):
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for micro in idx.split(cfg.micro_batch_size):
                    b = {k: v.to(dev) for k, v in trim({k: t[micro] for k, t in tensors.items()}).items()}
                    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                    t_logits = cache.logits(micro, dev)[:, : logits.shape[1]]
                    loss = output_kl(logits, t_logits, shift_mask(b["loss_mask"]), cfg.temperature)
                    if cfg.ce_weight:
                        loss = loss + cfg.ce_weight * next_token_ce(logits, b["input_ids"], b["loss_mask"])
                    check_finite(loss, f"kd epoch {epoch + 1} step {step}")
                    (loss * len(micro) / len(idx)).backward()
                    total += loss.item() * len(micro) / len(idx)
                opt.step()
                curve.append({"epoch": epoch + 1, "step": step, "loss": total})
                bar.set_postfix(loss=f"{total:.4f}")
            trainable = {k: v for k, v in model.state_dict().items() if "lora_" in k or cfg.trainable == "full"}
            atomic_torch_save({"epoch": epoch + 1, "model": trainable, "optimizer": opt.state_dict(), "curve": curve}, ckpt)
        with open(ctx.out_dir / "loss_curve.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["epoch", "step", "loss"])
            w.writeheader()
            w.writerows(curve)
        stats = {"trainable_params": trainable_parameters(model), "config": asdict(cfg), "teacher_forwards": 0}
        return self.save(ctx, model, tokenizer, stats)
