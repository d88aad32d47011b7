"""Tables and figures from the evaluation records. Every number here is read from a run's JSON output."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from scipy import stats  # noqa: E402

from semalign.data import atomic_path, atomic_write_text  # noqa: E402

TASK_LABELS = {"mmlu": "MMLU", "gsm8k": "GSM8K", "humaneval": "HumanEval", "mbpp": "MBPP"}
ROW_LABELS = {"teacher": "teacher", "none": "student (no transfer)"}
PAPER_REPORTED = Path(__file__).with_name("paper_reported.yaml")
FINETUNED_TASKS = ("humaneval", "mbpp")  # the paper's Table 2 reports the code tasks only
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


def load_paper_reported(path: str | Path = PAPER_REPORTED) -> pd.DataFrame:
    """The paper's numbers as a long table (table, caption, version, teacher/student source and label, setting,
    method, task, score), so a number is found by what was run (the models' sources), never by its position in a table.
    A table's student row is repeated under each of its teachers: it belongs to every pair."""
    doc = yaml.safe_load(Path(path).read_text())
    rows = [
        {"table": int(number), "caption": table["caption"], "version": doc["version"], "teacher": teacher,
         "teacher_label": block["label"], "student": doc["student"]["source"], "student_label": doc["student"]["label"],
         "setting": block["setting"], "method": method, "task": task, "score": float(score)}
        for number, table in doc["tables"].items()
        for teacher, block in table["teachers"].items()
        for method, scores in {"none": table["student"], **block}.items() if isinstance(scores, dict)
        for task, score in scores.items()
    ]
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Reported:
    """The paper's numbers matched to our pairs (per pair: score indexed by (method, task)) and the header words
    naming their setting, so a proxy setting can never be read as the run's own."""

    by_pair: dict[str, pd.Series]
    header: str

    def column(self, task: str) -> str:
        return f"{TASK_LABELS.get(task, task)} {self.header}"

    def cell(self, pair: str, method: str, task: str) -> str:
        """The reported score, "–" where the paper has none (methods it did not run, tasks it did not report)."""
        score = self.by_pair.get(pair, pd.Series(dtype=float)).get((method, task))
        return "–" if score is None else f"{score:.2f}"


def match_reported(paper: pd.DataFrame, sources: dict[str, tuple[str, str]]) -> Reported:
    """Each pair gets the numbers of the paper's setting with its teacher and student (hub ids, case-insensitive).
    When some pair is not a paper setting (small-scale profiles), every pair gets Table 1's (the paper's main
    setting) and the header names that setting: the numbers are a reference point, not the same experiment."""
    teacher, student = paper.teacher.str.lower(), paper.student.str.lower()
    own = {pair: paper[(teacher == t.lower()) & (student == s.lower())] for pair, (t, s) in sources.items()}
    header = "paper reported"
    if any(rows.empty for rows in own.values()):
        main = paper[paper.table == 1]
        header = f"paper ({main.setting.iloc[0]}, {main.version.iloc[0]} Tab. 1)"
        own = dict.fromkeys(sources, main)
    # Table 2 repeats Table 1's Llama-2 rows with the same values (tests check): the first is kept
    return Reported({pair: rows.drop_duplicates(["method", "task"]).set_index(["method", "task"])["score"]
                     for pair, rows in own.items()}, header)


def _task_cells(r: pd.Series, pair: str, method: str, task: str, paper: Reported | None) -> dict[str, str]:
    """One task's columns of a row: our metric (± CI), the paper's number beside it when given, our NLL."""
    label = TASK_LABELS.get(task, task)
    seeds = int(r["seeds"])
    cells = {f"{label} {r['metric']}": _cell(100 * r["score"], 100 * r["score_ci95"], 1, seeds)}
    if paper is not None:
        cells[paper.column(task)] = paper.cell(pair, method, task)
    return {**cells, f"{label} NLL": _cell(r["nll"], r["nll_ci95"], 3, seeds)}


def main_table(summary: pd.DataFrame, methods: list[str], tasks: list[str], paper: Reported | None = None) -> pd.DataFrame:
    """Wide Table 1: rows = methods (teacher and untouched student included), columns = task x {metric, NLL},
    and the paper's number beside our metric when ``paper`` is given.

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
                    row.update(_task_cells(ms.loc[task], pair, method, task, paper))
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
    wall time and its ratio to ``reference`` on the same pair and task, peak memory, trainable parameters,
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
    digits = {"wall (s)": 1, "peak RSS (MB)": 0, "peak GPU (MB)": 0, "trainable params": 0,
              "teacher fwd / example": 2, "student layer fwd / example": 1, "student layer bwd / example": 1,
              "tokens/s": 0}
    return df.round(digits).astype({"trainable params": int})


def run_facts(train_jsonl: Path, teacher_manifest: Path, student_manifest: Path, cache: Path | None) -> dict:
    """The per-(pair, task) denominators of :func:`cost_table`, read from the DAG's own outputs."""
    import torch

    from semalign.data import read_jsonl

    meta = torch.load(cache, map_location="cpu", mmap=True, weights_only=True)["meta"] if cache else {}
    return {"n_train": len(read_jsonl(train_jsonl)),
            "teacher_layers": json.loads(Path(teacher_manifest).read_text())["num_layers"],
            "student_layers": json.loads(Path(student_manifest).read_text())["num_layers"],
            "cache_forwards": meta.get("forward_passes", 0)}


def hparam_table(configs: dict[str, dict]) -> pd.DataFrame:
    """Every trained method's resolved hyperparameters (defaults + profile overrides), one column per method;
    "–" where a method has no such parameter. Generated from the config dataclasses, so it cannot drift."""
    names = list(dict.fromkeys(k for cfg in configs.values() for k in cfg))
    return pd.DataFrame(
        [{"parameter": k, **{m: str(cfg[k]) if k in cfg else "–" for m, cfg in configs.items()}} for k in names]
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


def write_layer_profile(
    curves: dict[str, dict[int, float]], csv_path: Path, png_path: Path, *, columns: tuple[str, str, str],
    ylabel: str, title: str, normalise: bool = False, ylim: tuple[float, float] | None = None,
) -> None:
    """One value per layer for several series (bases, attribution methods): a long csv and a line plot (png, pdf).

    ``columns`` names the csv columns (series, layer, value); ``normalise`` min-max scales each series in the
    plot only, for series whose units differ."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{columns[0]: name, columns[1]: k, columns[2]: v} for name, c in curves.items() for k, v in sorted(c.items())]
    pd.DataFrame(rows).to_csv(csv_path, index=False, float_format="%.8g")
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, c in curves.items():
        ks = sorted(c)
        ys = pd.Series([c[k] for k in ks], dtype=float)
        if normalise:
            ys = (ys - ys.min()) / max(ys.max() - ys.min(), 1e-12)
        ax.plot(ks, ys, marker="o", ms=3, label=name)
    ax.set(xlabel="layer", ylabel=ylabel)
    ax.set_title(title, fontsize="medium")  # "<analysis>: <pair> / <task>" overran the axes at the default size
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend()
    fig.tight_layout()
    _save(fig, png_path.with_suffix(""))


def _save(fig: plt.Figure, stem: Path) -> None:
    for ext in ("png", "pdf"):
        with atomic_path(stem.with_suffix(f".{ext}")) as tmp:
            fig.savefig(tmp, format=ext, dpi=150)
    plt.close(fig)


def main_figure(summary: pd.DataFrame, methods: list[str], tasks: list[str], stem: Path,
                labels: dict[str, str] | None = None, title: str = "Main results") -> None:
    """Grouped bars per task: paper metric (left) and gold-answer NLL (right), 95% CIs as error bars; also the
    ablation figures (``methods`` = an axis' variants, ``labels`` = their values)."""
    labels = {**ROW_LABELS, **(labels or {})}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(1, len(methods))
    for ax, (col, ci, label) in zip(axes, [("score", "score_ci95", "score (acc / pass@1, %)"),
                                           ("nll", "nll_ci95", "gold-answer NLL (nats, lower is better)")]):
        for i, method in enumerate(methods):
            ms = summary[summary.method == method].set_index("task").reindex(tasks)
            scale = 100 if col == "score" else 1
            xs = [j + i * width for j in range(len(tasks))]
            ax.bar(xs, ms[col] * scale, width, yerr=ms[ci] * scale, label=labels.get(method, method), capsize=2)
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(tasks))])
        ax.set_xticklabels([TASK_LABELS.get(t, t) for t in tasks])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} ({', '.join(summary.pair.unique())})")
    fig.tight_layout()
    _save(fig, stem)


def cost_gain_figure(cost: pd.DataFrame, summary: pd.DataFrame, stem: Path) -> None:
    """Per method and pair: transfer wall time relative to KD (x, mean over tasks) against the mean change of the
    gold-answer NLL versus the untouched student (y, negative = the transfer helped), one marker per method."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for pair, pc in cost.groupby("pair", sort=False):
        ps = summary[summary.pair == pair]
        base = ps[ps.method == "none"].set_index("task")["nll"]
        for method, mc in pc.groupby("method", sort=False):
            ms = ps[ps.method == method].set_index("task")["nll"]
            common = ms.index.intersection(base.index)
            if common.empty or "wall / kd" not in mc:
                continue
            x, y = mc["wall / kd"].mean(), (ms[common] - base[common]).mean()
            ax.scatter(x, y)
            ax.annotate(method, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(1, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("transfer wall time / KD's")
    ax.set_ylabel("mean gold-answer NLL change vs student (nats)")
    ax.set_title("Cost vs gain")
    fig.tight_layout()
    _save(fig, stem)


def loss_curves_figure(curves: dict[str, pd.DataFrame], stem: Path, title: str) -> None:
    """Training curves of one (pair, task, seed): frontier methods (curves with a ``stage`` column) get one
    segment per stage, each layer loss divided by its stage's first value so stages of different scale share an
    axis, with the output KL where a stage has one; every other method's loss against its optimiser step."""
    frontier = {m: c for m, c in curves.items() if "stage" in c}
    others = {m: c for m, c in curves.items() if "stage" not in c}
    fig, axes = plt.subplots(1, 1 + bool(frontier), figsize=(6 + 6 * bool(frontier), 4), squeeze=False)
    if frontier:
        ax = axes[0, 0]
        for method, c in frontier.items():
            x0 = 0
            for i, (stage, sc) in enumerate(c.groupby("stage", sort=False)):
                xs = range(x0, x0 + len(sc))
                first = sc["layer_loss"].iloc[0]
                if first:
                    ax.plot(xs, sc["layer_loss"] / first, color=plt.cm.viridis(i / max(1, c.stage.nunique() - 1)))
                if sc["kl"].any():
                    kl_label = f"{method}: output KL / its first value"
                    shown = kl_label in ax.get_legend_handles_labels()[1]
                    ax.plot(xs, sc["kl"] / sc["kl"].iloc[0], color="tab:red", ls="--", label=None if shown else kl_label)
                ax.text(x0 + len(sc) / 2, 1.02, str(stage), ha="center", va="bottom", fontsize=7,
                        transform=ax.get_xaxis_transform())
                x0 += len(sc)
                ax.axvline(x0 - 0.5, color="grey", lw=0.4)
        ax.set(xlabel="optimiser step (one segment per frontier stage, labelled by student layer)",
               ylabel="layer loss / its stage's first value")
        ax.set_title(f"{', '.join(frontier)}: frontier stages", pad=14)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax = axes[0, -1]
    for method, c in others.items():
        y = c["loss"] if "loss" in c else c["total"]
        ax.plot(range(len(c)), y, marker="o", ms=2, label=method)
    ax.set(xlabel="optimiser step", ylabel="training loss (each method's own objective)", yscale="log",
           title="Other transfer methods")
    if others:
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, stem)


def cka_figure(before: dict[str, np.ndarray], after: dict[str, np.ndarray], stem: Path, after_label: str, title: str = "") -> None:
    """Paper Figs. 4-5 in one 2x2 grid: student self-similarity (top) and teacher-student CKA (bottom), before
    (untouched student) and after transfer with ``after_label``; ``before``/``after`` are
    :func:`semalign.similarity.read_cka` dicts. One colour scale 0..1, so the panels compare by colour."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 8.5), layout="constrained")
    rows = [("student_self", "student layer", "student self-similarity"),
            ("teacher_student", "teacher layer", "teacher-student CKA")]
    for r, (name, xlabel, what) in enumerate(rows):
        for c, (label, mats) in enumerate([("before (untouched student)", before), (f"after ({after_label})", after)]):
            m, ax = mats[name], axes[r, c]
            image = ax.imshow(m, origin="lower", vmin=0, vmax=1, cmap="viridis", aspect="auto",
                              extent=(0.5, m.shape[1] + 0.5, 0.5, m.shape[0] + 0.5))
            ax.set(xlabel=xlabel, ylabel="student layer", title=f"{what}: {label}")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(MaxNLocator(nbins=10, integer=True, min_n_ticks=1))
    fig.colorbar(image, ax=axes, shrink=0.8, label="linear CKA")
    if title:
        fig.suptitle(title)
    _save(fig, stem)
