"""Layer pairing: exact maps written by hand from the paper's formulas, ranges, deeper students, CKA."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from semalign.pairing import STRATEGIES, pair_layers, validate_pairing

# l(k) = max(1, floor(L_T / L_S * k)), written out by hand.
DEPTH_RATIO = {
    (40, 32): [1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 18, 20,
               21, 22, 23, 25, 26, 27, 28, 30, 31, 32, 33, 35, 36, 37, 38, 40],
    (30, 10): [3, 6, 9, 12, 15, 18, 21, 24, 27, 30],
    (24, 32): [1, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12,
               12, 13, 14, 15, 15, 16, 17, 18, 18, 19, 20, 21, 21, 22, 23, 24],
    (20, 10): [2, 4, 6, 8, 10, 12, 14, 16, 18, 20],
}


def sources(pairing):
    return [p["teacher"][0][0] for p in pairing["pairs"]]


@pytest.mark.parametrize("depths", sorted(DEPTH_RATIO))
def test_depth_ratio_exact(depths):
    L_T, L_S = depths
    pairing = pair_layers(L_T, L_S, "depth_ratio")
    assert [p["student"] for p in pairing["pairs"]] == list(range(1, L_S + 1))
    assert sources(pairing) == DEPTH_RATIO[depths]
    assert json.loads(json.dumps(pairing)) == pairing


def test_interpolated_exact():
    p = {q["student"]: q["teacher"] for q in pair_layers(40, 32, "interpolated")["pairs"]}
    assert p[1] == [[1, 0.75], [2, 0.25]]  # u = 1.25
    assert p[4] == [[5, 1.0]]  # u = 5: integer ratio point, one source
    assert p[32] == [[40, 1.0]]  # u = 40: a = 39, lambda = 1
    q = {x["student"]: x["teacher"] for x in pair_layers(24, 32, "interpolated")["pairs"]}
    assert q[1] == [[1, 1.0]]  # u = 0.75 < a = 1: lambda clipped to 0
    assert q[2] == [[1, 0.5], [2, 0.5]]  # u = 1.5
    assert q[32] == [[24, 1.0]]
    assert [x["teacher"] for x in pair_layers(20, 10, "interpolated")["pairs"]] == [[[2 * k, 1.0]] for k in range(1, 11)]


def test_attributed_places_the_critical_layer_at_its_remapped_student_layer():
    # 40 -> 32: teacher layer 4 is skipped by the depth-ratio map; k† = min{k: l(k) >= 4} = 4, so (4 <- 4).
    scores = [0.0] * 40
    scores[3], scores[39] = 5.0, 3.0
    p = pair_layers(40, 32, "attributed", scores=scores, n_critical=2)
    assert p["critical"] == [{"teacher_attributed": 4, "student": 4, "depth_ratio_teacher": 5},
                             {"teacher_attributed": 40, "student": 32, "depth_ratio_teacher": 40}]
    expected = list(DEPTH_RATIO[(40, 32)])
    expected[4 - 1] = 4
    assert sources(p) == expected  # one source per target; only the critical target's source changed
    assert sources(p) == sorted(sources(p))  # depth order kept
    assert [q["student"] for q in p["pairs"] if q["critical"]] == [4, 32]
    only = pair_layers(40, 32, "attributed", scores=scores, n_critical=2, critical_only=True)
    assert [(q["student"], q["teacher"]) for q in only["pairs"]] == [(4, [[4, 1.0]]), (32, [[40, 1.0]])]
    # The paper's Fig. 3: 20 -> 10, the last teacher layer is critical -> the last student layer.
    fig3 = pair_layers(20, 10, "attributed", scores=list(range(20)), critical_only=True)
    assert [(q["student"], q["teacher"]) for q in fig3["pairs"]] == [(10, [[20, 1.0]])]
    # 30 -> 10 with layer 7 critical: k† = 3 (l(2) = 6 < 7 <= l(3) = 9), source 7 instead of 9.
    mid = pair_layers(30, 10, "attributed", scores=[1.0 if l == 7 else 0.0 for l in range(1, 31)])
    assert sources(mid) == [3, 6, 7, 12, 15, 18, 21, 24, 27, 30]
    # Two critical layers sharing k†: the higher-scoring one is the source.
    both = pair_layers(30, 10, "attributed", scores=[2.0 if l == 8 else 1.0 if l == 7 else 0.0 for l in range(1, 31)],
                       n_critical=2)
    assert sources(both)[2] == 8 and [c["student"] for c in both["critical"]] == [3]
    # Deeper student: teacher layer 1 -> the first student layer with l(k) >= 1, i.e. k = 1.
    deep = pair_layers(24, 32, "attributed", scores=[1.0] + [0.0] * 23)
    assert deep["critical"] == [{"teacher_attributed": 1, "student": 1, "depth_ratio_teacher": 1}]
    with pytest.raises(ValueError, match="one score per teacher layer"):
        pair_layers(40, 32, "attributed", scores=[1.0] * 3)


def v1_pairs(p):
    return [(q["student"], q["teacher"]) for q in p["pairs"]]


def test_attributed_v1_trains_only_the_remapped_critical_layers_on_their_depth_ratio_source():
    # Integer ratio, 30 -> 10, layer 7 critical: k† = 3 (l(2) = 6 < 7 <= l(3) = 9); v1's pair (l(k†), k†) = (9, 3).
    one = pair_layers(30, 10, "attributed_v1", scores=[1.0 if l == 7 else 0.0 for l in range(1, 31)])
    assert v1_pairs(one) == [(3, [[9, 1.0]])]
    assert one["critical"] == [{"teacher_attributed": 7, "student": 3, "depth_ratio_teacher": 9}]
    # The paper's Fig. 3: 20 -> 10, the last teacher layer critical -> only the last student layer, on layer 20.
    assert v1_pairs(pair_layers(20, 10, "attributed_v1", scores=list(range(20)))) == [(10, [[20, 1.0]])]
    # Non-integer ratio, 40 -> 32, layers 4 (score 5) and 40 (score 3): k† = 4 (l(3) = 3 < 4 <= l(4) = 5) and 32.
    scores = [0.0] * 40
    scores[3], scores[39] = 5.0, 3.0
    two = pair_layers(40, 32, "attributed_v1", scores=scores, n_critical=2)
    assert v1_pairs(two) == [(4, [[5, 1.0]]), (32, [[40, 1.0]])]
    # 40 -> 32 with n_critical = 1: only the top layer (4) -> one trained student layer.
    assert v1_pairs(pair_layers(40, 32, "attributed_v1", scores=scores)) == [(4, [[5, 1.0]])]
    # Two critical layers sharing k† (30 -> 10: 7 and 8 both -> k† = 3): one pair, (9, 3).
    both = pair_layers(30, 10, "attributed_v1", n_critical=2,
                       scores=[2.0 if l == 8 else 1.0 if l == 7 else 0.0 for l in range(1, 31)])
    assert v1_pairs(both) == [(3, [[9, 1.0]])]
    # Deeper student, 24 -> 32, layer 5 critical: l(6) = floor(24*6/32) = 4 < 5 <= l(7) = 5 -> (5, 7).
    deep = pair_layers(24, 32, "attributed_v1", scores=[1.0 if l == 5 else 0.0 for l in range(1, 25)])
    assert v1_pairs(deep) == [(7, [[5, 1.0]])]
    # beside the default: same critical layers, but `attributed` trains every layer and sources k† from l* itself
    default = pair_layers(30, 10, "attributed", scores=[1.0 if l == 7 else 0.0 for l in range(1, 31)])
    assert len(default["pairs"]) == 10 and default["pairs"][2]["teacher"] == [[7, 1.0]]
    with pytest.raises(ValueError, match="one score per teacher layer"):
        pair_layers(30, 10, "attributed_v1")


def test_last_only_and_random():
    assert pair_layers(24, 32, "last_only")["pairs"] == [{"student": 32, "teacher": [[24, 1.0]]}]
    a, b = pair_layers(40, 32, "random", seed=3), pair_layers(40, 32, "random", seed=3)
    assert a == b and sources(a) == sorted(sources(a)) and len(set(sources(a))) == 32  # distinct when possible
    assert sources(pair_layers(40, 32, "random", seed=4)) != sources(a)
    deep = sources(pair_layers(24, 32, "random", seed=0))
    assert deep == sorted(deep) and all(1 <= l <= 24 for l in deep)


def test_cka_monotone_argmax():
    cka = np.array([[0.9, 0.1, 0.0], [0.1, 0.2, 0.9], [0.8, 0.3, 0.1]])
    # Unconstrained argmax per row is (1, 3, 1), not monotone; the best non-decreasing path is (1, 3, 3):
    # 0.9 + 0.9 + 0.1 = 1.9 beats (1, 1, 1) = 1.8 and (1, 2, 2) = 1.4.
    assert sources(pair_layers(3, 3, "cka", cka=cka)) == [1, 3, 3]
    with pytest.raises(ValueError, match=r"\[L_S, L_T\]"):
        pair_layers(3, 2, "cka", cka=cka)


@pytest.mark.parametrize("depths", sorted(DEPTH_RATIO))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_in_range(strategy, depths):
    L_T, L_S = depths
    rng = np.random.default_rng(0)
    p = pair_layers(L_T, L_S, strategy, scores=list(rng.random(L_T)), cka=rng.random((L_S, L_T)), seed=1)
    validate_pairing(p, L_T, L_S)
    students = [q["student"] for q in p["pairs"]]
    if strategy == "attributed_v1":  # one critical layer by default: one trained student layer
        assert len(students) == 1
    else:
        assert students == ([L_S] if strategy == "last_only" else list(range(1, L_S + 1)))
    for q in p["pairs"]:
        assert len(q["teacher"]) == 1 or (strategy == "interpolated" and len(q["teacher"]) == 2)
        assert sum(w for _, w in q["teacher"]) == pytest.approx(1.0)
        assert all(1 <= l <= L_T for l, _ in q["teacher"])


def test_pairing_errors():
    p = pair_layers(20, 10, "interpolated")
    with pytest.raises(ValueError, match="unknown pairing strategy"):
        pair_layers(4, 2, "nope")
    with pytest.raises(ValueError, match="pairing is for"):
        validate_pairing(p, L_T=40, L_S=10)



def test_schema_lists_exactly_the_strategies():
    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    semalign = schema["properties"]["method_params"]["properties"]["semalign"]["properties"]
    assert semalign["pairing"]["enum"] == list(STRATEGIES)
