"""Is it the student or the method? SemAlign into a student whose layers were pretrained: carved out of the teacher.

At the paper's budget SemAlign makes the mini student worse (README "Reference results"): a frontier layer aligned
to its teacher block breaks what the frozen layers above it expect. The mini student is bootstrapped from random
init on 266k tokens, so its upper layers may not read the residual stream as a trained model's do. This tool builds
the other kind of student offline: every ``stride``-th decoder layer of the teacher (DistilBERT's initialisation)
with the teacher's embeddings, final norm and head, healed by the suite's own bounded pretraining
(``bootstrap_student``), and writes a GSM8K-only profile around it: teacher, none, KD (16 optimizer steps and,
as a variant, 160) and SemAlign at the paper's epochs per stage (160 steps), with its variants at KD's budget, with
the output KL at every stage, with v1's cosine objective and with the output KL alone. A diagnostic, not a
main-table student: a carved student starts in the teacher's residual basis, and it would hand the parameter-reuse
baselines the teacher's own weights (semalign/suite/bootstrap.py says why mini's student is independent):

    snakemake --cores all results/mini/models/smollm2-135m/prepared/manifest.json
    python -m benchmarks.carved_student results/mini/models/smollm2-135m/prepared --out carved
    snakemake --cores all --configfile carved/config.yaml
    python -m benchmarks.semalign_stages results/carved/transfer/smollm2-135m_to_carved/gsm8k/semalign/seed0 \\
        --student results/carved/models/carved-student/bootstrapped --task gsm8k \\
        --test results/carved/splits/gsm8k/test.jsonl --out results/carved/bench/semalign_stages.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

CONFIG = Path(__file__).resolve().parents[1] / "config"
TEACHER = "smollm2-135m"  # the mini profile's teacher
HEAL = {"steps": 130, "seq_len": 256, "batch_size": 8, "lr": 5e-4, "max_minutes": 25}  # mini's, at a quarter its lr


def carve(model: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """Keep only the decoder layers ``keep`` (in that order), in place; the config and KV-cache indices follow."""
    from semalign.suite.models import backbone, decoder_layers

    layers = decoder_layers(model)
    if not keep or sorted(set(keep)) != keep or keep[-1] >= len(layers) or keep[0] < 0:
        raise ValueError(f"keep={keep}: give increasing layer indices in [0, {len(layers)})")
    backbone(model).layers = torch.nn.ModuleList(layers[i] for i in keep)
    for j, layer in enumerate(backbone(model).layers):
        layer.self_attn.layer_idx = j
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.config.num_hidden_layers = len(keep)
    return model


def profile(student_dir: Path, name: str = "carved") -> dict:
    """The mini profile narrowed to the question: GSM8K, seed 0, the carved student, SemAlign at both budgets."""
    cfg = yaml.safe_load((CONFIG / "mini.yaml").read_text())
    cfg.update(
        profile=name,
        models={TEACHER: cfg["models"][TEACHER],
                f"{name}-student": {"source": str(Path(student_dir).resolve()), "bootstrap": HEAL}},
        pairs={f"{TEACHER}_to_{name}": {"teacher": TEACHER, "student": f"{name}-student"}},
        tasks=["gsm8k"],
        seeds=[0],
        methods=["teacher", "none", "kd", "semalign"],
        ablations={"tasks": ["gsm8k"], "seeds": [0], "methods": {
            "semalign": {"budget": ["kd_steps"], "kl_every_stage": [True], "loss": ["v1", "kl_only"]},
            "kd": {"epochs": [20]},  # KD at the paper budget's 160 optimizer steps
        }},
    )
    cfg["method_params"]["semalign"]["budget"] = "epochs_per_stage"  # the paper's budget, where mini's student breaks
    return cfg


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("teacher_dir", type=Path, help="the teacher's prepared model dir (prepare_model)")
    parser.add_argument("--out", type=Path, required=True, help="writes <out>/student/ and <out>/config.yaml")
    parser.add_argument("--stride", type=int, default=3, help="keep layers 0, stride, 2*stride, ... (30 -> 10: 3)")
    args = parser.parse_args()
    if (args.out / "student").exists():
        parser.error(f"{args.out / 'student'} exists: remove it or choose another --out (never overwritten)")
    from semalign.suite.models import decoder_layers, load_model

    model, tokenizer = load_model(args.teacher_dir, dtype=torch.float32)
    keep = list(range(0, len(decoder_layers(model)), args.stride))
    carve(model, keep)
    model.save_pretrained(args.out / "student")
    tokenizer.save_pretrained(args.out / "student")
    (args.out / "config.yaml").write_text(yaml.safe_dump(profile(args.out / "student"), sort_keys=False))
    print(f"{args.out / 'student'}: teacher layers {keep}; run: snakemake --cores all --configfile {args.out}/config.yaml")
