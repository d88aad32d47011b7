"""Layer-wise distillation (task-aware layer-wise KD, Liang et al., ICML 2023, without its task filters):
learned linear projectors map student hidden states onto the paired teacher layers, plus output KL.

Loss per batch: KL(p_T || p_S) on answer tokens + lambda_layer * mean_k nMSE(P_k h_S^(k), h_T^(l(k))), over all
real tokens, where (k, l(k)) are the pairs of the configured pairing (SemAlign's own pairing file by default, so the two
differ in objective, not in which layers they match) and nMSE is the MSE divided by the teacher state's mean
square: teacher residual streams carry outlier dimensions of very different scale per layer, and the ratio keeps
every layer's term O(1). All student layers train together (LoRA or full), the projectors always in full.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from semalign.frontier import SemAlignConfig
from semalign.losses import wide
from semalign.method import Pairing
from semalign.suite.cache import layer_outputs
from semalign.suite.lora import prepare_trainable, trainable_parameters
from semalign.suite.objectives import answer_logits, output_kl
from semalign.suite.registry import Artifact, Method, TeacherCache, TransferContext, register_method
from semalign.suite.train import TrainConfig, fit, fit_budget


@dataclass
class LayerwiseKDConfig(TrainConfig):
    # SemAlign's pairing file by default, so the two differ in objective only (checked at DAG start when a profile
    # changes one of them: semalign.suite.fairness)
    pairing: str = SemAlignConfig.pairing  # semalign.pairing strategy; the workflow builds the pairing file it names
    attribution: str = SemAlignConfig.attribution  # only read by attribution-driven pairings
    lambda_layer: float = 1.0
    lambda_kl: float = 1.0
    temperature: float = 1.0


def normalised_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_tokens ||pred - target||² / Σ_tokens ||target||² over ``mask`` (1 = a perfect copy costs 0, 0 costs 1)."""
    pred, target = wide(pred), wide(target)
    m = mask.unsqueeze(-1).to(pred.dtype)
    return ((pred - target) ** 2 * m).sum() / (target**2 * m).sum().clamp_min(1e-12)


def make_projectors(pairs: list[dict], d_student: int, d_teacher: int) -> torch.nn.ModuleDict:
    """One Linear(d_S -> d_T) per paired student layer, keyed by the layer number."""
    return torch.nn.ModuleDict({str(p["student"]): torch.nn.Linear(d_student, d_teacher) for p in pairs})


@register_method("layerwise_kd")
class LayerwiseKD(Method):
    config_cls = LayerwiseKDConfig

    @classmethod
    def needs(cls, cfg: LayerwiseKDConfig) -> list[Artifact]:
        pairing = Pairing.of(cfg.pairing, cfg.attribution)
        return [pairing, TeacherCache(pairing.name, "end")]

    def run(self, ctx: TransferContext) -> Path:
        pairs = json.loads(ctx.artifact("pairing", self.name).read_text())["pairs"]
        cfg, cache, model, tokenizer = self.begin(ctx)
        d_teacher = cache.head_weight.shape[1]
        projectors = make_projectors(pairs, model.config.hidden_size, d_teacher).to(next(model.parameters()).device)
        model = prepare_trainable(model, cfg)
        store, _, handles = layer_outputs(model, [p["student"] for p in pairs], detach=False)
        head_t = cache.head_weight.to(next(model.parameters()).device)

        def loss_fn(rows: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
            for v in store.values():
                v.clear()
            logits, labels, mask = answer_logits(model, b)
            T, dev = mask.shape[1], logits.device
            kl = output_kl(logits, cache.answer_logits(rows, mask, head_t), torch.ones(len(labels), device=dev),
                           cfg.temperature)
            layer = sum(
                normalised_mse(projectors[str(p["student"])](store[p["student"]][0].float()),
                               cache.state(p["teacher"], rows, T, dev), b["attention_mask"])
                for p in pairs
            ) / len(pairs)
            return cfg.lambda_kl * kl + cfg.lambda_layer * layer

        trainables = torch.nn.ModuleDict({"student": model, "projectors": projectors})
        data = cache.tokens()
        try:
            curve = fit(trainables, data, loss_fn, cfg, ctx.out_dir, ctx.seed, "layerwise_kd",
                        fingerprint={"pairs": pairs, **ctx.fingerprint()})
        finally:  # the hooks keep the last step's graph alive and would fire in any later forward
            for h in handles:
                h.remove()
            store.clear()
        stats = {
            "trainable_params": trainable_parameters(trainables),
            "budget": fit_budget(data, cfg, curve),
            "projector_params": sum(p.numel() for p in projectors.parameters()),
            "pairs": pairs,
            "config": asdict(cfg),
            "teacher_forwards": 0,
        }
        return self.save(ctx, model, tokenizer, stats)
