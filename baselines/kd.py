"""Plain knowledge distillation: the student matches the teacher's next-token distribution on the train split.

The teacher's logits come from the shared cache (one teacher forward per example for all epochs), so KD and
SemAlign pay the same teacher cost and differ only in what the student is trained to match.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from semalign.suite.lora import prepare_trainable, trainable_parameters
from semalign.suite.objectives import answer_ce, answer_logits, output_kl
from semalign.suite.registry import Artifact, Method, TeacherCache, TransferContext, register_method
from semalign.suite.train import TrainConfig, fit, fit_budget


@dataclass
class KDConfig(TrainConfig):
    temperature: float = 1.0
    ce_weight: float = 0.0  # 0 = pure logit KL; >0 adds the SFT loss on the gold answer


@register_method("kd")
class KnowledgeDistillation(Method):
    config_cls = KDConfig

    @classmethod
    def needs(cls, cfg: KDConfig) -> list[Artifact]:
        return [TeacherCache()]  # the final state only: logits are recovered from it

    def run(self, ctx: TransferContext) -> Path:
        cfg, cache, model, tokenizer = self.begin(ctx)
        model = prepare_trainable(model, cfg)

        head_t = cache.head_weight.to(next(model.parameters()).device)

        def loss_fn(rows: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
            logits, labels, mask = answer_logits(model, b)  # the answer positions only, student and teacher
            t_logits = cache.answer_logits(rows, mask, head_t)
            loss = output_kl(logits, t_logits, torch.ones(len(labels), device=logits.device), cfg.temperature)
            if cfg.ce_weight:
                loss = loss + cfg.ce_weight * answer_ce(logits, labels)
            return loss

        data = cache.tokens()
        curve = fit(model, data, loss_fn, cfg, ctx.out_dir, ctx.seed, "kd", fingerprint=ctx.fingerprint())
        stats = {"trainable_params": trainable_parameters(model), "budget": fit_budget(data, cfg, curve),
                 "config": asdict(cfg), "teacher_forwards": 0}
        return self.save(ctx, model, tokenizer, stats)
