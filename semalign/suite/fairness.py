"""The fairness protocol, checked on the resolved configs of one task before anything runs (README "Fairness
protocol"): each pair below must agree on what makes its comparison a controlled one, or the DAG does not start.

- ``semalign`` (``budget: kd_steps``) and ``kd``: the same epochs and batch size, hence the same optimizer steps on
  the same batches (:func:`semalign.frontier.stage_batches`).
- ``lora_sft`` and ``seeking``: the same SFT (every field of :class:`baselines.lora_sft.LoRASFTConfig`), so
  Seeking minus LoRA-SFT is the injected teacher knowledge.
- ``layerwise_kd`` and ``semalign``: the same pairing file, so the two differ in objective only.
"""
from __future__ import annotations

import dataclasses
from typing import Any


def _differ(a: Any, b: Any, keys: list[str]) -> list[str]:
    return [k for k in keys if getattr(a, k) != getattr(b, k)]


def violations(configs: dict[str, Any]) -> list[str]:
    """One line per broken rule among ``configs`` (method -> resolved config of one task); methods absent or
    without a config are not checked."""
    from baselines.lora_sft import LoRASFTConfig
    from semalign.method import Pairing

    out = []
    kd, sem, sft, seek, lkd = (configs.get(m) for m in ("kd", "semalign", "lora_sft", "seeking", "layerwise_kd"))
    if kd is not None and sem is not None and sem.budget == "kd_steps":
        if keys := _differ(kd, sem, ["epochs", "batch_size"]):
            out.append(f"semalign runs at KD's optimizer steps (budget: kd_steps) but sets {keys} unlike kd: "
                       "set them alike, or budget: epochs_per_stage")
    if sft is not None and seek is not None:
        if keys := _differ(sft, seek, [f.name for f in dataclasses.fields(LoRASFTConfig)]):
            out.append(f"lora_sft is seeking's control but differs in {keys}: set them alike")
    if lkd is not None and sem is not None:
        if Pairing.of(lkd.pairing, lkd.attribution) != Pairing.of(sem.pairing, sem.attribution):
            out.append("layerwise_kd must read semalign's pairing file (pairing, attribution) so the two differ in "
                       "objective only")
    return out
