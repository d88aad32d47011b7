"""Where a SemAlign transfer goes wrong, stage by stage: the student's gold-answer NLL after each frontier stage.

SemAlign checkpoints the trained layer of every stage (``ckpt/<key>/stage_<k>.pt``); applying them one at a time to
the untouched student gives the partly trained student after stage k, whose test NLL (the main table's NLL column:
the same lm-eval task and prompts) shows which stage moves it, beside that stage's last training losses:

    python -m benchmarks.semalign_stages results/mini/transfer/smollm2-135m_to_mini/gsm8k/semalign/seed0 \\
        --student results/mini/models/mini-student/bootstrapped --task gsm8k \\
        --test results/mini/splits/gsm8k/test.jsonl --out results/mini/bench/semalign_stages.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch


def stage_checkpoints(transfer_dir: Path) -> list[Path]:
    """The stage files of the run's one checkpoint key, in stage order (a dir with several keys is ambiguous)."""
    keys = sorted(p for p in (Path(transfer_dir) / "ckpt").iterdir() if list(p.glob("stage_*.pt")))
    if len(keys) != 1:
        raise ValueError(f"{transfer_dir}: expected one checkpoint key with stage files, found {len(keys)}")
    return sorted(keys[0].glob("stage_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def stage_nll(transfer_dir: Path, student_dir: Path, task: str, test_file: Path, batch_size: int = 16) -> pd.DataFrame:
    """One row per stage (0 = the untouched student): gold-answer NLL on ``test_file`` after the stages up to it,
    and the stage's mean layer loss / KL / total over its last step."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from semalign.suite.evaluation import no_environment_report, task_configs
    from semalign.suite.models import decoder_layers, load_model

    model, tokenizer = load_model(student_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype="float32")
    chat = bool(getattr(tokenizer, "chat_template", None))
    nll_task = task_configs(task, test_file, max_gen_toks=1, chat=chat)[1]

    def nll() -> float:
        with no_environment_report():
            out = simple_evaluate(model=lm, tasks=[nll_task], task_manager=TaskManager(include_defaults=False),
                                  apply_chat_template=chat, bootstrap_iters=0)
        return float(out["results"][nll_task["task"]]["nll,none"])

    rows = [{"after_stage": 0, "nll": nll()}]
    layers = decoder_layers(model)
    for path in stage_checkpoints(transfer_dir):
        state = torch.load(path, map_location="cpu", weights_only=True)
        k = int(state["stage"])
        layers[k - 1].load_state_dict(state["layer"])
        last = state["curve"][-1] if state["curve"] else {}
        rows.append({"after_stage": k, "nll": nll(), "steps": len(state["curve"]),
                     **{f"last_{key}": last.get(key) for key in ("layer_loss", "kl", "total")}})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("transfer_dir", type=Path, help="a semalign transfer's output dir (with ckpt/)")
    parser.add_argument("--student", type=Path, required=True, help="the untouched student's model dir")
    parser.add_argument("--task", required=True)
    parser.add_argument("--test", type=Path, required=True, help="the task's test.jsonl (make_splits)")
    parser.add_argument("--out", type=Path, required=True, help="csv to write")
    args = parser.parse_args()
    table = stage_nll(args.transfer_dir, args.student, args.task, args.test)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_markdown(index=False))
