"""SemAlign (Gu et al., arXiv 2510.24208): layer-wise transfer through vocabulary-defined semantic alignment,
trained with the shallow-to-deep frontier schedule (semalign.frontier).

Inputs beyond the shared ones: ``ctx.extras["pairing"]`` (JSON from semalign.pairing, written by the pairing
rule), optionally ``ctx.extras["aligned_map"]`` (a saved M tensor from the semantic_bases rule; otherwise M is
computed here from the two LM heads), and the teacher cache, which must hold the paired teacher layers
(``teacher_layers_needed``).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from semalign.bases import aligned_map
from semalign.frontier import SemAlignConfig, stage_trainable_params, train_frontier
from semalign.models import lm_head
from semalign.registry import Method, TransferContext, register_method


@register_method("semalign")
class SemAlign(Method):
    uses_teacher_cache = True
    config_cls = SemAlignConfig

    def run(self, ctx: TransferContext) -> Path:
        if "pairing" not in ctx.extras:
            raise ValueError("semalign needs ctx.extras['pairing'] (the pairing rule's JSON)")
        pairing = json.loads(Path(ctx.extras["pairing"]).read_text())
        cfg, cache, model, tokenizer = self.begin(ctx)
        m = None
        if cfg.recompose == "semantic":
            if "aligned_map" in ctx.extras:
                m = torch.load(ctx.extras["aligned_map"], map_location="cpu", weights_only=True)
            else:
                head_s = lm_head(model).weight
                m = aligned_map(head_s, cache.head_weight.to(head_s.device))
        model = train_frontier(model, cache, pairing, cfg, ctx.out_dir, ctx.seed, m)
        stats = {
            "trainable_params": stage_trainable_params(model, cfg),  # per stage: one layer's worth at a time
            "stages": [p["student"] for p in pairing["pairs"]],
            "pairing_strategy": pairing["strategy"],
            "config": asdict(cfg),
            "teacher_forwards": 0,  # all teacher signals come from the shared cache
        }
        return self.save(ctx, model, tokenizer, stats)
