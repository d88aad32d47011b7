"""Which weights a method trains: peft LoRA adapters (optionally on some decoder layers only) or all of them."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from semalign.suite.train import TrainConfig

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


def full_precision(model: torch.nn.Module) -> torch.nn.Module:
    """The model in fp32 for full fine-tuning: AdamW keeps no master copy, and a bf16 weight drops every step
    below half its ulp (2^-9·|w|: a 3e-5 step on |w| >= 0.015), so the steps accumulate in fp32 and the saved
    model is cast back to its stored dtype once (:func:`semalign.suite.models.save_model`). LoRA needs none of
    this: peft keeps adapters in fp32 over a bf16 base."""
    return model.float()


def prepare_trainable(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """LoRA adapters on ``cfg.lora_targets``, or every weight trainable (in fp32, :func:`full_precision`)."""
    if cfg.trainable == "lora":
        return apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    return full_precision(model).requires_grad_(True)


