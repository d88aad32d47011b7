"""Figures (png + pdf, written atomically) from the tables and the runs' curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from semalign.suite.io import atomic_path  # noqa: E402
from semalign.suite.labels import ROW_LABELS, TASK_LABELS  # noqa: E402
from semalign.suite.paper import Reported  # noqa: E402


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


MARKS = {"none": "*", "kd": "†"}  # significance vs the untouched student, vs KD
DELTAS = [("score", "score_ci95", 100, "Δ score vs student (points)"),
          ("nll", "nll_ci95", 1, "Δ gold-answer NLL vs student (nats)")]


def main_figure(summary: pd.DataFrame, methods: list[str], tasks: list[str], stem: Path,
                labels: dict[str, str] | None = None, title: str = "Main results", tests: pd.DataFrame | None = None,
                paper: Reported | None = None) -> None:
    """Each method's change against the untouched student (``none``) per task, one row of panels per pair: score in
    points (left), gold-answer NLL in nats (right); absolute values stay in the main table. Error bars: the
    method's 95% t-interval over seeds (the student's evaluation does not depend on the seed, so it is the
    interval of the difference too). Above a bar, ``*`` / ``†``: the paired test against the student / KD is
    significant after Holm (``tests``, :mod:`semalign.suite.stats`). Black diamonds: the paper's reported change
    (its method minus its student), only where the pair is the paper's own setting (``paper`` not a proxy).
    Also the ablation figures (``methods`` = an axis' variants, ``labels`` = their values)."""
    labels = {**ROW_LABELS, **(labels or {})}
    shown = [m for m in methods if m not in ROW_LABELS]  # the student is the zero line; the teacher stays in the table
    pairs = list(summary.pair.unique())
    fig, axes = plt.subplots(len(pairs), 2, figsize=(12, 4 * len(pairs)), squeeze=False)
    width = 0.8 / max(1, len(shown))
    for row, pair in enumerate(pairs):
        ps = summary[summary.pair == pair]
        base = ps[ps.method == "none"].set_index("task").reindex(tasks)
        sig = tests[(tests.pair == pair) & tests.significant] if tests is not None else pd.DataFrame()
        for ax, (col, ci, scale, ylabel) in zip(axes[row], DELTAS):
            for i, method in enumerate(shown):
                ms = ps[ps.method == method].set_index("task").reindex(tasks)
                delta, err = ((ms[col] - base[col]) * scale).to_numpy(), (ms[ci] * scale).to_numpy()
                xs = np.arange(len(tasks)) + i * width
                ax.bar(xs, delta, width, yerr=err, capsize=2, color=f"C{i}", label=labels.get(method, method))
                for x, task, d, e in zip(xs, tasks, delta, err):
                    hits = sig[(sig.task == task) & (sig.method == method) & (sig.quantity == col)] if len(sig) else sig
                    mark = "".join(MARKS[b] for b in MARKS if len(hits) and b in set(hits.baseline))
                    if mark and np.isfinite(d):
                        ax.annotate(mark, (x, d + np.sign(d or 1) * np.nan_to_num(e)), ha="center",
                                    va="bottom" if d >= 0 else "top", fontsize=9)
                if paper is not None and not paper.proxy and col == "score":
                    reported = paper.by_pair.get(pair, pd.Series(dtype=float))
                    ys = [reported.get((method, t), np.nan) - reported.get(("none", t), np.nan) for t in tasks]
                    ax.scatter(xs, ys, marker="D", color="black", s=18, zorder=3,
                               label="paper (reported)" if i == 0 else None)
            ax.axhline(0, color="grey", lw=0.8)
            ax.margins(y=0.12)  # room for the marks beyond the error bars
            ax.set_xticks(np.arange(len(tasks)) + width * (len(shown) - 1) / 2)
            ax.set_xticklabels([TASK_LABELS.get(t, t) for t in tasks])
            ax.set_ylabel(ylabel)
            ax.set_title(pair, fontsize="medium")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{title}: change vs the untouched student (95% intervals over seeds"
                 + ("; * / †: paired test vs student / KD, Holm p < 0.05" if tests is not None else "") + ")")
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
