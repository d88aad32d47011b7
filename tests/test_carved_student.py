"""The carved-student diagnostic (benchmarks/carved_student.py): the carved model is the teacher with layers skipped,
and the profile it writes is one the suite accepts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from snakemake.utils import update_config

from benchmarks.carved_student import carve, profile
from semalign.suite import config as suite_config
from semalign.suite.models import decoder_layers, load_model

REPO = Path(__file__).resolve().parents[1]


def test_carving_runs_the_kept_layers_as_the_teacher_with_the_others_skipped(tiny_pair):
    teacher, _ = load_model(tiny_pair[0], device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 7))

    def passthrough(module, args, kwargs, out):  # the layer's output replaced by its input: the layer skipped
        return args[0] if args else kwargs["hidden_states"]

    skip = [layer.register_forward_hook(passthrough, with_kwargs=True)
            for i, layer in enumerate(decoder_layers(teacher)) if i in (1, 3)]
    with torch.no_grad():
        skipped = teacher(ids).logits
    for hook in skip:
        hook.remove()
    carved = carve(teacher, [0, 2])
    assert len(decoder_layers(carved)) == carved.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(carved(ids).logits, skipped, rtol=0, atol=1e-6)
    # the KV cache is indexed by the new layer positions: cached greedy decoding is the uncached one
    prompt = ids[:1]
    cached = carved.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = carved.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("keep", [[], [1, 0], [0, 4], [-1, 2]])
def test_carving_refuses_a_layer_list_it_cannot_keep(tiny_pair, keep):
    teacher, _ = load_model(tiny_pair[0], device="cpu")
    with pytest.raises(ValueError, match="increasing layer indices"):
        carve(teacher, keep)


def test_the_carved_profile_is_one_the_suite_accepts(tiny_pair):
    cfg = profile(tiny_pair[1])
    merged = yaml.safe_load((REPO / "config" / "base.yaml").read_text())
    update_config(merged, cfg)
    suite_config.load(merged)
    assert merged["pairs"] == {"smollm2-135m_to_carved": {"teacher": "smollm2-135m", "student": "carved-student"}}
    assert merged["models"]["carved-student"]["source"] == str(tiny_pair[1].resolve())
    assert merged["method_params"]["semalign"]["budget"] == "epochs_per_stage"  # the budget where mini's student breaks
    variants = [str(v) for v in suite_config.ablation_variants(merged)]
    assert variants == ["semalign@budget=kd_steps", "semalign@kl_every_stage=true", "semalign@loss=v1",
                        "semalign@loss=kl_only", "kd@epochs=20"], variants
