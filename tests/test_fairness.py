"""The fairness protocol and per-task settings: resolution order, the DAG-start checks, the controls' defaults."""
from __future__ import annotations

import dataclasses

import pytest

from baselines.kd import KDConfig
from baselines.layerwise_kd import LayerwiseKDConfig
from baselines.lora_sft import LoRASFTConfig
from baselines.seeking import SeekingConfig
from semalign.frontier import SemAlignConfig
from semalign.suite.fairness import violations
from semalign.suite.registry import method_class, task_params


def test_task_settings_win_over_the_method_over_the_default():
    section = {"epochs": 2, "lr": 0.001, "tasks": {"humaneval": {"epochs": 3}, "mbpp": {"lr": 0.5}}}
    semalign = method_class("semalign")
    on = {t: semalign.config(task_params(section, t)) for t in ("gsm8k", "humaneval", "mbpp")}
    assert (on["gsm8k"].epochs, on["gsm8k"].lr) == (2, 0.001)  # the method's own
    assert (on["humaneval"].epochs, on["humaneval"].lr) == (3, 0.001)  # the task's, over the method's
    assert (on["mbpp"].epochs, on["mbpp"].lr) == (2, 0.5)
    assert on["gsm8k"].batch_size == SemAlignConfig.batch_size == 64  # neither sets it: the default
    assert task_params(section, None) == {"epochs": 2, "lr": 0.001}  # method level: no `tasks` key leaks through
    with pytest.raises(ValueError, match="unknown parameter"):
        method_class("laten").config(task_params({"tasks": {"mmlu": {"stepz": 2}}}, "mmlu"))


def test_lora_sft_is_seekings_sft_by_default():
    sft, seek = LoRASFTConfig(), SeekingConfig()
    assert all(getattr(sft, f.name) == getattr(seek, f.name) for f in dataclasses.fields(LoRASFTConfig))
    assert (sft.epochs, sft.schedule, sft.warmup_ratio) == (3, "linear", 0.03)  # upstream train.sh
    assert {"embed_tokens", "lm_head", "q_proj", "gate_proj"} <= set(sft.lora_targets)


def test_layerwise_kd_reads_semaligns_pairing_by_default():
    assert (LayerwiseKDConfig().pairing, LayerwiseKDConfig().attribution) == (SemAlignConfig().pairing,
                                                                              SemAlignConfig().attribution)


def test_violations_name_each_broken_rule():
    fair = {"kd": KDConfig(epochs=2, batch_size=16), "semalign": SemAlignConfig(epochs=2, batch_size=16),
            "lora_sft": LoRASFTConfig(epochs=2), "seeking": SeekingConfig(epochs=2),
            "layerwise_kd": LayerwiseKDConfig()}
    assert violations(fair) == []
    assert "semalign" in violations({**fair, "semalign": SemAlignConfig(epochs=5, batch_size=16)})[0]
    assert violations({**fair, "semalign": SemAlignConfig(epochs=5, budget="epochs_per_stage")}) == []
    assert "['warmup_ratio']" in violations({**fair, "lora_sft": LoRASFTConfig(epochs=2, warmup_ratio=0.0)})[0]
    assert "layerwise_kd" in violations({**fair, "layerwise_kd": LayerwiseKDConfig(pairing="depth_ratio")})[0]
    assert violations({"kd": KDConfig(epochs=9)}) == []  # a rule binds only when both of its methods run
