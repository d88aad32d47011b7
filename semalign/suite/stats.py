"""Paired significance per test item: is a method's difference from the untouched student (``none``) or from KD
more than the test set's sampling noise?

Every method is evaluated on the same test items, so the tests are paired by item. A method's per-item value is
its mean over the seeds it ran (the item, not the (item, seed) pair, is the independent unit: the seeds of one
item share its difficulty):

- correctness: an exact sign test on the per-item differences, i.e. McNemar's exact test (two-sided binomial test
  at 1/2 of the items where the method is better against those where it is worse); with one seed per method the
  differences are -1/0/+1 and this *is* McNemar's exact test on the 2x2 table of correct/wrong;
- gold-answer NLL: Wilcoxon's signed-rank test on the per-item differences (zeros dropped);
- Holm's step-down correction over every test of one pair (all tasks, methods, both baselines, both quantities),
  so a "significant" mark holds for the whole main table of that pair at family-wise level 0.05.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binomtest, wilcoxon

BASELINES = ("none", "kd")
BASELINE_LABELS = {"none": "student", "kd": "KD"}  # in table headers and figure legends
QUANTITIES = ("score", "nll")
ALPHA = 0.05


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (b: only the method right, c: only the baseline
    right): the binomial test of b in b + c trials at 1/2; 1.0 when no item is discordant."""
    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)


def sign_test(d: np.ndarray) -> float:
    """McNemar's exact test generalised to seed-averaged correctness: the signs of the per-item differences."""
    d = np.asarray(d, dtype=float)
    return mcnemar_exact(int((d > 0).sum()), int((d < 0).sum()))


def signed_rank(d: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of the per-item differences; 1.0 when every difference is 0."""
    d = np.asarray(d, dtype=float)
    return 1.0 if not np.any(d != 0) else float(wilcoxon(d, zero_method="wilcox").pvalue)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values: sorted ascending, the i-th (0-based) of m is multiplied by m - i, made
    monotone by a running maximum and capped at 1; returned in the input's order."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]))
    out = np.empty_like(p)
    out[order] = adjusted
    return out


def load_items(paths: list[str | Path]) -> pd.DataFrame:
    """One row per (evaluation record, test item): pair, task, method, seed, id, score, nll."""
    rows = []
    for path in paths:
        r = json.loads(Path(path).read_text())
        if "items" not in r:
            raise ValueError(f"{path}: no per-item records (evaluated before they were kept); re-run its evaluate job")
        rows += [{"pair": r["pair"], "task": r["task"], "method": r["method"], "seed": r["seed"], **item}
                 for item in r["items"]]
    return pd.DataFrame(rows, columns=["pair", "task", "method", "seed", "id", "score", "nll"])


def paired_tests(items: pd.DataFrame, methods: list[str], baselines: tuple[str, ...] = BASELINES) -> pd.DataFrame:
    """Every method against every baseline on every (pair, task) both ran, per quantity: items compared, mean
    difference (method - baseline, per item over seeds, then over items), items better / worse for the method
    (higher score, lower NLL), raw p and Holm-adjusted p (family: one pair), and ``significant`` (p_holm < 0.05)."""
    per_item = items.groupby(["pair", "task", "method", "id"], sort=False)[list(QUANTITIES)].mean()
    rows = []
    for (pair, task), g in per_item.groupby(level=["pair", "task"], sort=False):
        g = g.droplevel(["pair", "task"])
        ran = set(g.index.get_level_values("method"))
        for baseline in (b for b in baselines if b in ran):
            base = g.loc[baseline]
            for method in (m for m in methods if m in ran and m != baseline):
                ours = g.loc[method]
                common = ours.index.intersection(base.index)
                if len(common) != len(ours) or len(common) != len(base):
                    raise ValueError(f"{pair}/{task}: {method} and {baseline} were evaluated on different items")
                for q in QUANTITIES:
                    d = (ours.loc[common, q] - base.loc[common, q]).to_numpy()
                    better = d > 0 if q == "score" else d < 0
                    rows.append({"pair": pair, "task": task, "method": method, "baseline": baseline, "quantity": q,
                                 "n_items": len(d), "mean_diff": float(d.mean()), "better": int(better.sum()),
                                 "worse": int(((d != 0) & ~better).sum()),
                                 "p": sign_test(d) if q == "score" else signed_rank(d)})
    tests = pd.DataFrame(rows, columns=["pair", "task", "method", "baseline", "quantity", "n_items", "mean_diff",
                                        "better", "worse", "p"])
    tests["p_holm"] = tests.groupby("pair")["p"].transform(lambda p: holm(p.to_numpy())) if len(tests) else []
    tests["significant"] = tests["p_holm"] < ALPHA
    return tests


def p_cell(p: float) -> str:
    """A Holm-adjusted p-value as the tables show it: 3 decimals, "<0.001" below that, "*" when significant."""
    text = "<0.001" if p < 0.001 else f"{p:.3f}"
    return text + ("*" if p < ALPHA else "")
