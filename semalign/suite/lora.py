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


def untie_targeted_embeddings(model: torch.nn.Module, targets: list[str]) -> None:
    """Give the output head its own copy of a tied embedding matrix when LoRA targets either use of it: peft wraps
    each use with its own adapter, and merging both deltas into the one shared matrix would add each to the other's
    use. The saved model then has a separate head (V x d more parameters), as upstream's untied Llama-2."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not emb.weight:
        return
    shared = [n for n, m in model.named_modules() if m is emb or m is head]
    if any(n == t or n.endswith("." + t) for n in shared for t in targets):
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        model.config.tie_word_embeddings = False


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
        untie_targeted_embeddings(model, cfg.lora_targets)
        return apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    return full_precision(model).requires_grad_(True)


