"""LoRA-SFT: the student fine-tuned on the train split's gold answers, no teacher at all.

The control row of every table: a transfer method has moved teacher knowledge only where it beats this row,
which sees the same data, epochs and trainable budget (SemAlign v1 Table 5 protocol: LoRA r=16 on up/down/v/o).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from semalign.suite.lora import prepare_trainable, trainable_parameters
from semalign.suite.objectives import sft_loss
from semalign.suite.registry import Method, TransferContext, register_method
from semalign.suite.train import TrainConfig, fit


@register_method("lora_sft")
class LoRASFT(Method):
    config_cls = TrainConfig

    def run(self, ctx: TransferContext) -> Path:
        cfg, _, model, tokenizer = self.begin(ctx)
        model = prepare_trainable(model, cfg)

        def loss_fn(rows: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
            return sft_loss(model, b)

        fit(model, self.split(ctx, tokenizer, "train"), loss_fn, cfg, ctx.out_dir, ctx.seed, "lora_sft",
            fingerprint=ctx.fingerprint())
        stats = {"trainable_params": trainable_parameters(model), "config": asdict(cfg), "teacher_forwards": 0}
        return self.save(ctx, model, tokenizer, stats)
