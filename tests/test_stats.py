"""Paired significance tests against hand-computed values."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from semalign.suite.stats import holm, load_items, mcnemar_exact, p_cell, paired_tests, sign_test, signed_rank


def test_mcnemar_exact_hand_values():
    # b=1, c=7: P(X<=1 | n=8, 1/2) = (1 + 8)/256, two-sided: 18/256
    assert mcnemar_exact(1, 7) == pytest.approx(18 / 256)
    assert mcnemar_exact(7, 1) == pytest.approx(18 / 256)
    # b=0, c=5: 2 * (1/2)^5 = 1/16
    assert mcnemar_exact(0, 5) == pytest.approx(1 / 16)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    # a 2x2 table: only the discordant cells count (b = right only with the method, c = only with the baseline)
    method = np.array([1, 1, 1, 0, 0, 1, 1, 1, 1, 1])
    base = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    assert sign_test(method - base) == pytest.approx(18 / 256)  # b = 7, c = 1


def test_signed_rank_hand_value():
    # d = 1..5 all positive: W- = 0, exact two-sided p = 2 / 2^5
    assert signed_rank(np.array([1.0, 2.0, 3.0, 4.0, 5.0])) == pytest.approx(2 / 32)
    assert signed_rank(np.zeros(4)) == 1.0


def test_holm_hand_values():
    # sorted 0.01, 0.02, 0.03, 0.04 -> x4, x3, x2, x1 = 0.04, 0.06, 0.06, 0.04 -> running max 0.04, 0.06, 0.06, 0.06
    assert holm(np.array([0.03, 0.01, 0.04, 0.02])) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    # capped at 1, order kept
    assert holm(np.array([0.5, 0.001, 0.4])) == pytest.approx([0.8, 0.003, 0.8])
    assert holm(np.array([0.9, 0.8])) == pytest.approx([1.0, 1.0])


def test_paired_tests_pair_items_and_average_seeds(tmp_path):
    """none right on item a only; the method right on b..h at both seeds: b=7, c=1 -> p = 18/256 raw; NLL lower on
    all 8 items by 1..8 -> exact Wilcoxon 2/256; Holm over the 2 tests of the pair: x2 each (smallest first)."""
    ids = list("abcdefgh")
    rows = [{"pair": "p", "task": "gsm8k", "method": "none", "seed": 0, "id": i, "score": float(i == "a"),
             "nll": 10.0} for i in ids]
    rows += [{"pair": "p", "task": "gsm8k", "method": "m", "seed": s, "id": i, "score": float(i != "a"),
              "nll": 10.0 - (k + 1) + (0.5 if s else -0.5)} for s in (0, 1) for k, i in enumerate(ids)]
    t = paired_tests(pd.DataFrame(rows), ["m"]).set_index("quantity")
    assert t.loc["score", "p"] == pytest.approx(18 / 256) and (t.loc["score", "better"], t.loc["score", "worse"]) == (7, 1)
    assert t.loc["nll", "p"] == pytest.approx(2 / 256) and t.loc["nll", "mean_diff"] == pytest.approx(-4.5)
    assert t.loc["nll", "p_holm"] == pytest.approx(4 / 256) and t.loc["score", "p_holm"] == pytest.approx(18 / 256)
    assert list(t["n_items"]) == [8, 8] and t.loc["nll", "significant"] and not t.loc["score", "significant"]
    with pytest.raises(ValueError, match="different items"):
        paired_tests(pd.DataFrame(rows[1:]), ["m"])


def test_load_items_and_p_cell(tmp_path):
    rec = {"pair": "p", "task": "gsm8k", "method": "kd", "seed": 1, "items": [{"id": "x", "score": 1.0, "nll": 2.0}]}
    (tmp_path / "r.json").write_text(json.dumps(rec))
    assert load_items([tmp_path / "r.json"]).to_dict("records") == [
        {"pair": "p", "task": "gsm8k", "method": "kd", "seed": 1, "id": "x", "score": 1.0, "nll": 2.0}]
    assert (p_cell(0.0004), p_cell(0.049), p_cell(0.2)) == ("<0.001*", "0.049*", "0.200")
