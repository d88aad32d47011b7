"""Tables from the runs' records (evaluation, transfer, manifests, configs). Every number is read from a run's
JSON output; the only other numbers are the paper's, from :mod:`semalign.suite.paper`, in their own columns."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from scipy import stats

from semalign.suite.io import atomic_write_text
from semalign.suite.labels import ROW_LABELS, TASK_LABELS
from semalign.suite.paper import Reported
from semalign.suite.stats import BASELINE_LABELS, BASELINES, p_cell

FINETUNED_TASKS = ("humaneval", "mbpp")
# the training budget each method spent (its train_stats "budget", semalign.suite.train.spent)
BUDGET_COLUMNS = {"examples": "examples", "epochs": "epochs", "optimizer_steps": "optimizer steps"}  # the paper's Table 2 reports the code tasks only
# cost columns a resumed run measures only in part (its remainder)
RESUME_PARTIAL = ("wall (s)", "teacher fwd / example", "student layer fwd / example", "student layer bwd / example",
                  "tokens/s")


def load_records(paths: list[str | Path]) -> pd.DataFrame:
    """One row per evaluation JSON: pair, task, method, seed, metric, score, nll, n."""
    rows = [json.loads(Path(p).read_text()) for p in paths]
    if not rows:
        raise ValueError("aggregate: no evaluation records")
    return pd.DataFrame(rows)


def mean_ci(values: pd.Series) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval (0 for a single seed: there is no spread to report)."""
    v = values.dropna().astype(float)
    if len(v) < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / len(v) ** 0.5)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Long table: pair, method, task, metric, score mean/ci, nll mean/ci, n seeds, n items."""
    out = []
    for (pair, method, task), g in df.groupby(["pair", "method", "task"], sort=False):
        s, s_ci = mean_ci(g["score"])
        nll, nll_ci = mean_ci(g["nll"])
        out.append(
            {"pair": pair, "method": method, "task": task, "metric": g["metric"].iloc[0], "score": s,
             "score_ci95": s_ci, "nll": nll, "nll_ci95": nll_ci, "seeds": len(g), "n_items": int(g["n"].iloc[0])}
        )
    return pd.DataFrame(out)


def _cell(mean: float, ci: float, digits: int, seeds: int) -> str:
    """``mean ± ci`` whenever there were seeds to spread over, so that identical seeds (± 0.0) never read as a
    single run; a single seed has no interval."""
    return f"{mean:.{digits}f}" + (f" ± {ci:.{digits}f}" if seeds > 1 else "")



def _task_cells(r: pd.Series, pair: str, method: str, task: str, paper: Reported | None,
                tests: pd.DataFrame | None = None) -> dict[str, str]:
    """One task's columns of a row: our metric (± CI), the paper's number beside it when given, our NLL, and, when
    ``tests`` (:func:`semalign.suite.stats.paired_tests`) are given, the Holm-adjusted p of the metric and the NLL
    against each baseline ("–" where no test applies: the baseline itself, reference rows)."""
    label = TASK_LABELS.get(task, task)
    seeds = int(r["seeds"])
    cells = {f"{label} {r['metric']}": _cell(100 * r["score"], 100 * r["score_ci95"], 1, seeds)}
    if paper is not None:
        cells[paper.column(task)] = paper.cell(pair, method, task)
    cells[f"{label} NLL"] = _cell(r["nll"], r["nll_ci95"], 3, seeds)
    if tests is not None:
        p = tests[(tests.pair == pair) & (tests.task == task) & (tests.method == method)]
        p = p.set_index(["baseline", "quantity"])["p_holm"]
        for baseline in BASELINES:
            for quantity, name in (("score", r["metric"]), ("nll", "NLL")):
                value = p.get((baseline, quantity))
                column = f"{label} p {name} vs {BASELINE_LABELS[baseline]}"
                cells[column] = "–" if value is None else p_cell(value)
    return cells


def main_table(summary: pd.DataFrame, methods: list[str], tasks: list[str], paper: Reported | None = None,
               tests: pd.DataFrame | None = None) -> pd.DataFrame:
    """Wide Table 1: rows = methods (teacher and untouched student included), columns = task x {metric, NLL},
    the paper's number beside our metric when ``paper`` is given, and the paired tests' Holm-adjusted p-values
    against the untouched student and KD when ``tests`` are given (:mod:`semalign.suite.stats`).

    ``gap_to_teacher`` follows the paper: the method's mean score over tasks minus the teacher's.
    """
    rows = []
    for pair, ps in summary.groupby("pair", sort=False):
        teacher = ps[ps.method == "teacher"].set_index("task")["score"]
        for method in methods:
            ms = ps[ps.method == method].set_index("task")
            if ms.empty:
                continue
            row = {"pair": pair, "method": ROW_LABELS.get(method, method), "seeds": int(ms["seeds"].max())}
            for task in tasks:
                if task in ms.index:
                    row.update(_task_cells(ms.loc[task], pair, method, task, paper, tests))
            common = [t for t in tasks if t in ms.index and t in teacher.index]
            if common:
                row["gap to teacher"] = f"{100 * (ms.loc[common, 'score'].mean() - teacher[common].mean()):+.1f}"
            rows.append(row)
    return pd.DataFrame(rows)


def finetuned_teachers_table(summary: pd.DataFrame, pairs: list[str], methods: list[str],
                             paper: Reported) -> pd.DataFrame:
    """The paper's Table 2 (one student, several teachers, some fine-tuned on code): the student once on top, then
    per pair its teacher row and each transfer method, on the code tasks; ours beside the paper's numbers.

    The pairs share their student (checked at DAG start), so the first pair's student row stands for all."""
    tasks = [t for t in FINETUNED_TASKS if t in set(summary.task)]
    transfers = [m for m in methods if m not in ROW_LABELS]
    order = [(pairs[0], "none")] + [(pair, m) for pair in pairs for m in ["teacher", *transfers]]
    rows = []
    for pair, method in order:
        ms = summary[(summary.pair == pair) & (summary.method == method)].set_index("task")
        if ms.empty:
            continue
        row = {"pair": "all pairs" if method == "none" else pair, "method": ROW_LABELS.get(method, method),
               "seeds": int(ms["seeds"].max())}
        for task in tasks:
            if task in ms.index:
                row.update(_task_cells(ms.loc[task], pair, method, task, paper))
        rows.append(row)
    return pd.DataFrame(rows)


def ablation_table(summary: pd.DataFrame, rows: list[list[str]], tasks: list[str], key: str) -> pd.DataFrame:
    """One ablation axis as a Table-1-style table: one row per value of ``key`` ([label, method or variant]),
    the configured value first, with the same metric, NLL and gap-to-teacher columns as the main table."""
    names = [name for _, name in rows]
    table = main_table(summary[summary.method.isin([*names, "teacher"])], names, tasks)
    table["method"] = table["method"].map(dict((name, label) for label, name in rows))
    return table.rename(columns={"method": key})


def write_table(df: pd.DataFrame, stem: Path, title: str) -> None:
    """csv for machines, md for the README/report, tex for the paper."""
    atomic_write_text(stem.with_suffix(".csv"), df.to_csv(index=False))
    atomic_write_text(stem.with_suffix(".md"), f"### {title}\n\n" + df.to_markdown(index=False) + "\n")
    atomic_write_text(stem.with_suffix(".tex"), df.to_latex(index=False, escape=True, caption=title))


def cost_table(records: list[dict], runs: dict[tuple[str, str], dict], reference: str = "kd") -> pd.DataFrame:
    """What each transfer cost, from ``run_transfer`` records (each with its ``pair``), mean over seeds:
    wall time and its ratio to ``reference`` on the same pair and task, peak memory, trainable parameters, the
    budget spent (training examples, epochs = example passes / examples, optimizer steps: SemAlign's trainable
    parameters are one stage's, trained in turn),
    teacher forwards per training example (the shared cache's, when the method reads it, plus its own),
    student decoder-layer forward/backward passes per example (a pass = one example through one layer:
    L_S x epochs for plain training, other counts for a frontier schedule), and student throughput in
    model-equivalent tokens per second (layer-token forwards / L_S / wall). Runs resumed from a checkpoint
    report only their remainder (time and passes), so they are left out of those means and counted instead.

    ``runs[(pair, task)]``: ``n_train``, ``teacher_layers``, ``student_layers``, ``cache_forwards``.
    """
    rows = []
    for r in records:
        run, c = runs[(r["pair"], r["task"])], r.get("layer_passes", {})
        n = run["n_train"]
        timed = not r.get("resumed", False)
        teacher_fwd = c.get("teacher_layer_forward_rows", 0) / (run["teacher_layers"] * n)
        if r.get("uses_teacher_cache"):
            teacher_fwd += run["cache_forwards"] / n
        row = {
            "pair": r["pair"], "task": r["task"], "method": r["method"],
            "wall (s)": r["wall_seconds"],
            "peak RSS (MB)": r["peak_rss_mb"],
            "peak GPU (MB)": r["peak_gpu_mb"],
            "trainable params": r.get("trainable_params", 0),
            **{label: r.get("budget", {}).get(key, float("nan")) for key, label in BUDGET_COLUMNS.items()},
            "teacher fwd / example": teacher_fwd,
            "student layer fwd / example": c.get("student_layer_forward_rows", 0) / n,
            "student layer bwd / example": c.get("student_layer_backward_rows", 0) / n,
            "tokens/s": c.get("student_layer_forward_tokens", 0) / run["student_layers"] / r["wall_seconds"],
            "resumed runs": int(not timed),
        }
        if not timed:  # only the remainder was measured: not a cost
            row.update(dict.fromkeys(RESUME_PARTIAL, float("nan")))
        rows.append(row)
    groups = pd.DataFrame(rows).groupby(["pair", "task", "method"], sort=False)
    df = groups.mean().reset_index()
    df["resumed runs"] = groups["resumed runs"].sum().to_numpy()
    ref = df[df["method"] == reference].set_index(["pair", "task"])["wall (s)"]
    if not ref.empty:
        keys = pd.MultiIndex.from_frame(df[["pair", "task"]])
        df.insert(4, f"wall / {reference}", (df["wall (s)"].to_numpy() / ref.reindex(keys).to_numpy()).round(2))
    digits = {"wall (s)": 1, "peak RSS (MB)": 0, "peak GPU (MB)": 0, "trainable params": 0, "epochs": 2,
              "teacher fwd / example": 2, "student layer fwd / example": 1, "student layer bwd / example": 1,
              "tokens/s": 0}
    return df.round(digits).astype({"trainable params": int})


def run_facts(train: Path, teacher: Path, student: Path, cache: Path | None) -> dict:
    """The per-(pair, task) denominators of :func:`cost_table`, read from the DAG's own outputs: the train split,
    the two model manifests and the teacher cache (None when no method reads one)."""
    import torch

    from semalign.suite.io import read_jsonl

    meta = torch.load(cache, map_location="cpu", mmap=True, weights_only=True)["meta"] if cache else {}
    return {"n_train": len(read_jsonl(train)),
            "teacher_layers": json.loads(Path(teacher).read_text())["num_layers"],
            "student_layers": json.loads(Path(student).read_text())["num_layers"],
            "cache_forwards": meta.get("forward_passes", 0)}


def hparam_columns(configs: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """method -> task -> resolved config, as columns: one per method when its tasks share a config, else one per
    distinct config, headed by its tasks, e.g. ``laten (MMLU)``, ``laten (GSM8K, HumanEval)``."""
    columns = {}
    for method, by_task in configs.items():
        groups: dict[str, list[str]] = {}
        for task, cfg in by_task.items():
            groups.setdefault(json.dumps(cfg, sort_keys=True, default=str), []).append(task)
        for key, tasks in groups.items():
            label = method if len(groups) == 1 else f"{method} ({', '.join(TASK_LABELS.get(t, t) for t in tasks)})"
            columns[label] = by_task[tasks[0]]
    return columns


def hparam_table(configs: dict[str, dict[str, dict]]) -> pd.DataFrame:
    """Every trained method's resolved hyperparameters (defaults + profile + per-task overrides, ``configs``:
    method -> task -> config), columns from :func:`hparam_columns`; "–" where a method has no such parameter.
    Generated from the config dataclasses, so it cannot drift."""
    columns = hparam_columns(configs)
    names = list(dict.fromkeys(k for cfg in columns.values() for k in cfg))
    return pd.DataFrame(
        [{"parameter": k, **{m: str(cfg[k]) if k in cfg else "–" for m, cfg in columns.items()}} for k in names]
    )


def model_table(manifests: dict[str, str | Path]) -> pd.DataFrame:
    """The paper's Table 3 (model shapes), generated from the prepare_model/bootstrap manifests."""
    rows = []
    for name, path in manifests.items():
        m = json.loads(Path(path).read_text())
        boot = m.get("bootstrap") or {}
        rows.append(
            {"model": name, "source": m.get("source") or "random init", "layers": m.get("num_layers"),
             "hidden": m.get("hidden_size"), "heads": m.get("num_heads"), "vocab": m.get("vocab_size"),
             "params (M)": round(m.get("n_params", 0) / 1e6, 1),
             "bootstrap steps": boot.get("steps_done", ""), "bootstrap tokens": boot.get("tokens_seen", "")}
        )
    return pd.DataFrame(rows)


