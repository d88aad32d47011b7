"""LoRA-SFT: the student fine-tuned on the train split's gold answers, no teacher at all.

The control row of Seeking (its post-injection SFT without the injected teacher factors): its defaults are
Seeking's SFT settings (upstream train.sh: 3 epochs, linear schedule with 3% warmup, LoRA r = alpha = 16 on every
projection, the embeddings and the head), and :class:`baselines.seeking.SeekingConfig` extends this config, so the
two cannot drift apart: Seeking minus LoRA-SFT is what the injected teacher knowledge adds. The workflow checks at
DAG start that a profile sets the two alike (:mod:`semalign.suite.fairness`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from semalign.suite.lora import prepare_trainable, trainable_parameters
from semalign.suite.objectives import sft_loss
from semalign.suite.registry import Method, TransferContext, register_method
from semalign.suite.train import TrainConfig, fit, fit_budget


@dataclass
class LoRASFTConfig(TrainConfig):
    """Seeking's SFT (upstream ParaKnowTransfer train.sh)."""

    epochs: int = 3
    schedule: str = "linear"
    warmup_ratio: float = 0.03
    lora_targets: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"])


@register_method("lora_sft")
class LoRASFT(Method):
    config_cls = LoRASFTConfig

    def run(self, ctx: TransferContext) -> Path:
        cfg, _, model, tokenizer = self.begin(ctx)
        model = prepare_trainable(model, cfg)

        def loss_fn(rows: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
            return sft_loss(model, b)

        train = self.split(ctx, tokenizer, "train")
        curve = fit(model, train, loss_fn, cfg, ctx.out_dir, ctx.seed, "lora_sft",
                    fingerprint=ctx.fingerprint())
        stats = {"trainable_params": trainable_parameters(model), "budget": fit_budget(train, cfg, curve),
                 "config": asdict(cfg), "teacher_forwards": 0}
        return self.save(ctx, model, tokenizer, stats)
