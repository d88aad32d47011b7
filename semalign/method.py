"""SemAlign (Gu et al., arXiv 2510.24208) as a method of the suite: layer-wise transfer through vocabulary-defined
semantic alignment, trained with the shallow-to-deep frontier schedule (:mod:`semalign.frontier`).

What a run reads beyond the shared inputs (:meth:`SemAlign.needs`): its layer pairing (:class:`Pairing`, made by
the pairing rule from :mod:`semalign.pairing`), the aligned map M (:class:`AlignedMap`, from the aligned_map rule;
computed here from the two models' lenses when a caller passes none), and the shared teacher cache holding the paired
teacher layers.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch

from semalign.bases import pair_map
from semalign.frontier import SemAlignConfig, stage_batches, stage_trainable_params, train_frontier
from semalign.pairing import reads_attribution
from semalign.suite.ids import PairingName
from semalign.suite.registry import Artifact, Method, TeacherCache, TransferContext, register_method
from semalign.suite.train import spent


@dataclass(frozen=True)
class Pairing(Artifact):
    """A student -> teacher layer pairing (JSON, :func:`semalign.pairing.pair_layers`), per pair and task."""

    key: ClassVar[str] = "pairing"
    PATTERN: ClassVar[str] = "pairing/{pair}/{task}/{name}.json"
    name: PairingName

    @classmethod
    def of(cls, strategy: str, attribution: str) -> Pairing:
        """The pairing a config names: attribution-driven strategies are named after the attribution they read."""
        return cls(PairingName(strategy, attribution if reads_attribution(strategy) else None))


@dataclass(frozen=True)
class AlignedMap(Artifact):
    """M = S_S S_T^T for a pair (:func:`semalign.bases.pair_map`), through the lens with the final norm's γ folded
    in or not (``lens``: a member of ``LENSES``)."""

    key: ClassVar[str] = "aligned_map"
    PATTERN: ClassVar[str] = "bases/{pair}/aligned_map_{lens}.pt"
    LENSES: ClassVar[tuple[str, str]] = ("folded", "unfolded")
    lens: str = LENSES[0]

    @classmethod
    def of(cls, fold_final_norm: bool) -> AlignedMap:
        return cls(cls.LENSES[0] if fold_final_norm else cls.LENSES[1])

    @property
    def folded(self) -> bool:
        return self.lens == self.LENSES[0]


@register_method("semalign")
class SemAlign(Method):
    config_cls = SemAlignConfig

    @classmethod
    def needs(cls, cfg: SemAlignConfig) -> list[Artifact]:
        pairing = Pairing.of(cfg.pairing, cfg.attribution)
        needs: list[Artifact] = [pairing]
        if cfg.objective.uses_layer_target:
            needs.append(TeacherCache(pairing.name, cfg.states))
            if cfg.recompose == "semantic":
                needs.append(AlignedMap.of(cfg.fold_final_norm))
        else:
            needs.append(TeacherCache())
        return needs

    def run(self, ctx: TransferContext) -> Path:
        pairing = json.loads(ctx.artifact("pairing", self.name).read_text())
        cfg, cache, model, tokenizer = self.begin(ctx)
        m = None
        if cfg.recompose == "semantic" and cfg.objective.uses_layer_target:
            if "aligned_map" in ctx.artifacts:
                m = torch.load(ctx.artifacts["aligned_map"], map_location="cpu", weights_only=True)
            else:
                m, _ = pair_map(ctx.teacher, ctx.student, cfg.fold_final_norm, device=ctx.device)
        model = train_frontier(model, cache, pairing, cfg, ctx.out_dir, ctx.seed, m, fingerprint=ctx.fingerprint())
        stages = [p["student"] for p in pairing["pairs"]]
        schedule = stage_batches(len(cache), cfg, len(stages), ctx.seed)  # the batches train_frontier ran
        stats = {
            "trainable_params": stage_trainable_params(model, cfg),  # per stage: one layer's worth at a time
            "budget": spent(len(cache), sum(len(b) for s in schedule for b in s), sum(map(len, schedule))),
            "stage_steps": dict(zip(stages, map(len, schedule))),
            "stages": stages,
            "pairing_strategy": pairing["strategy"],
            "config": asdict(cfg),
            "teacher_forwards": 0,  # all teacher signals come from the shared cache
        }
        return self.save(ctx, model, tokenizer, stats)
