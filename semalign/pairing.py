"""Student (target) layer -> teacher (source) layer maps for the frontier schedule (paper v1 §4.1).

Layers are 1-based (paper notation). Every strategy returns the same JSON-able shape::

    {"strategy": str, "teacher_layers": L_T, "student_layers": L_S,
     "pairs": [{"student": k, "teacher": [[l, w], ...]}, ...], ...strategy-specific provenance}

with weights summing to 1 and exactly one teacher layer per student layer except ``interpolated``; the frontier
trains exactly the student layers listed in ``pairs`` (all of them except ``last_only``, ``attributed_v1`` and
``attributed`` with ``critical_only``). Every map works when the student is deeper than the teacher (several
student layers then share a teacher layer, all within 1..L_T).

The two attribution-driven strategies share the remap of v1 §4.1: the attributed critical teacher layers l* (top
``n_critical`` by score) go to the nearest deeper-or-equal student index, "k† = min{k' ∈ {1..L_S} : l(k') >= l*},
default k† = L_S if the set is empty". They differ in what attribution decides:

- ``attributed_v1`` reads v1 §4.1, "Training then operates on the pair (l(k†), k†)", with v1's "steering a small
  set of paired layers is enough" (intro) and "update only the parameters θ^(k) of the paired student layer k"
  (§4.3): attribution decides WHICH student layers are trained. The pairs are (l(k†), k†) for the critical layers
  only, verbatim (the depth-ratio source of k†, not l* itself); every other student layer is never trained.
- ``attributed`` (default) reads the v2 abstract, "a layer attribution stage that attributes task-relevant source
  layers and selects exactly one source layer for each target layer": every student layer is trained on the
  depth-ratio map, except that the source of each k† is l* itself (read literally, v1's (l(k†), k†) would keep
  the map equal to ``depth_ratio`` whenever every layer is trained, and attribution would change nothing). Depth
  order is kept, since l(k†-1) < l* <= l(k†). ``critical_only=True`` keeps only the critical pairs.

Choices where the paper is silent (both): the number of critical layers (v1 Fig. 3 shows one -> default 1),
ties in scores (lower layer first), two l* with the same k† (the higher-scoring one; one pair).

Other strategies:
- ``depth_ratio``: l(k) = max(1, floor(L_T k / L_S)) (verbatim; integer arithmetic, so no float rounding).
- ``interpolated``: u = L_T k / L_S, a = max(1, min(floor(u), L_T - 1)), b = a + 1, lambda = clip(u - a, 0, 1),
  target = (1 - lambda) h^(a) + lambda h^(b) (verbatim formula, applied at every k; zero-weight terms dropped).
- ``last_only``: only the last student layer, supervised by the last teacher layer.
- ``cka``: the monotone (non-decreasing) map maximising the summed CKA (dynamic programming over a
  [L_S, L_T] CKA matrix, from :mod:`semalign.similarity`): the argmax per row constrained to keep depth order.
- ``random``: seeded; L_S teacher layers drawn without replacement when L_S <= L_T (with replacement otherwise),
  sorted so depth order is kept.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

STRATEGIES = ("depth_ratio", "attributed", "attributed_v1", "interpolated", "last_only", "cka", "random")
ATTRIBUTED = ("attributed", "attributed_v1")  # the strategies that read a layer attribution's scores


def reads_attribution(strategy: str) -> bool:
    """Whether ``strategy`` is driven by attribution scores (its pairing file is named after the attribution)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pairing strategy {strategy!r}; choose one of {STRATEGIES}")
    return strategy in ATTRIBUTED


def depth_ratio_layer(L_T: int, L_S: int, k: int) -> int:
    """l(k) = max(1, floor(L_T / L_S * k))."""
    return max(1, (L_T * k) // L_S)


def _single(k: int, l: int) -> dict:
    return {"student": k, "teacher": [[l, 1.0]]}


def _interpolated(L_T: int, L_S: int, k: int) -> dict:
    u = Fraction(L_T * k, L_S)
    a = max(1, min(int(u), L_T - 1))
    lam = float(min(max(u - a, 0), 1))
    terms = [[a, 1.0 - lam], [a + 1, lam]] if L_T > 1 else [[1, 1.0]]
    return {"student": k, "teacher": [[l, w] for l, w in terms if w > 0]}


def _monotone_argmax(cka: np.ndarray) -> list[int]:
    """Non-decreasing column choice per row maximising the summed entries (1-based columns)."""
    n, m = cka.shape
    best = np.empty((n, m))
    back = np.zeros((n, m), dtype=int)
    best[0] = cka[0]
    for i in range(1, n):
        arg = 0  # argmax of best[i-1][:j+1], earliest column on ties
        for j in range(m):
            if best[i - 1, j] > best[i - 1, arg]:
                arg = j
            back[i, j] = arg
            best[i, j] = cka[i, j] + best[i - 1, arg]
    cols = [int(np.argmax(best[-1]))]
    for i in range(n - 1, 0, -1):
        cols.append(int(back[i][cols[-1]]))
    return [c + 1 for c in reversed(cols)]


def _critical_targets(L_T: int, L_S: int, scores: list[float] | None, n_critical: int) -> dict[int, int]:
    """k† -> l* for the top ``n_critical`` teacher layers by score (v1 §4.1's remap; see the module doc)."""
    if scores is None or len(scores) != L_T:
        raise ValueError(f"attributed pairing needs one score per teacher layer ({L_T}), got "
                         f"{None if scores is None else len(scores)}")
    if not 1 <= n_critical <= L_T:
        raise ValueError(f"n_critical must be in 1..{L_T}, got {n_critical}")
    order = sorted(range(L_T), key=lambda i: (-scores[i], i))
    source: dict[int, int] = {}  # on a shared k† the higher-scoring l* wins (order is by score)
    for l_star in (i + 1 for i in order[:n_critical]):
        k_dag = next((k for k in range(1, L_S + 1) if depth_ratio_layer(L_T, L_S, k) >= l_star), L_S)
        source.setdefault(k_dag, l_star)
    return source


def pair_layers(
    L_T: int,
    L_S: int,
    strategy: str,
    scores: list[float] | None = None,
    seed: int = 0,
    cka: np.ndarray | None = None,
    n_critical: int = 1,
    critical_only: bool = False,
) -> dict:
    """The pairing of every (or, for last_only / attributed_v1 / critical_only, the trained) student layer; see
    the module doc.

    ``scores``: per teacher layer (index 0 = layer 1), for the attributed strategies. ``cka``: [L_S, L_T], for ``cka``."""
    if L_T < 1 or L_S < 1:
        raise ValueError(f"layer counts must be >= 1, got L_T={L_T}, L_S={L_S}")
    out: dict = {"strategy": strategy, "teacher_layers": L_T, "student_layers": L_S}
    ks = range(1, L_S + 1)
    if strategy == "depth_ratio":
        pairs = [_single(k, depth_ratio_layer(L_T, L_S, k)) for k in ks]
    elif strategy in ATTRIBUTED:
        source = _critical_targets(L_T, L_S, scores, n_critical)
        critical = [{"teacher_attributed": l, "student": k, "depth_ratio_teacher": depth_ratio_layer(L_T, L_S, k)}
                    for k, l in sorted(source.items())]
        if strategy == "attributed_v1":
            pairs = [{**_single(k, depth_ratio_layer(L_T, L_S, k)), "critical": True} for k in sorted(source)]
        else:
            pairs = [{**_single(k, source.get(k, depth_ratio_layer(L_T, L_S, k))), "critical": k in source}
                     for k in ks if k in source or not critical_only]
            out["critical_only"] = critical_only
        out.update(critical=critical, n_critical=n_critical)
    elif strategy == "interpolated":
        pairs = [_interpolated(L_T, L_S, k) for k in ks]
    elif strategy == "last_only":
        pairs = [_single(L_S, L_T)]
    elif strategy == "cka":
        if cka is None or np.shape(cka) != (L_S, L_T):
            raise ValueError(f"cka pairing needs a [L_S, L_T] = [{L_S}, {L_T}] matrix, got "
                             f"{None if cka is None else np.shape(cka)}")
        pairs = [_single(k, l) for k, l in zip(ks, _monotone_argmax(np.asarray(cka, dtype=float)))]
    elif strategy == "random":
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(np.arange(1, L_T + 1), size=L_S, replace=L_S > L_T))
        pairs = [_single(k, int(l)) for k, l in zip(ks, picks)]
        out["seed"] = seed
    else:
        raise ValueError(f"unknown pairing strategy {strategy!r}; choose one of {STRATEGIES}")
    out["pairs"] = pairs
    validate_pairing(out)
    return out


def validate_pairing(pairing: dict, L_T: int | None = None, L_S: int | None = None) -> None:
    """Ranges, weights and order; optionally that the pairing was made for these depths."""
    lt, ls = pairing["teacher_layers"], pairing["student_layers"]
    if (L_T is not None and L_T != lt) or (L_S is not None and L_S != ls):
        raise ValueError(f"pairing is for {lt} -> {ls} layers, but the models have {L_T} -> {L_S}")
    students = [p["student"] for p in pairing["pairs"]]
    if not students or students != sorted(set(students)) or not all(1 <= k <= ls for k in students):
        raise ValueError(f"pairing student layers must be increasing, unique, within 1..{ls}: {students}")
    for p in pairing["pairs"]:
        if not p["teacher"] or not all(1 <= l <= lt for l, _ in p["teacher"]):
            raise ValueError(f"pair {p} has teacher layers outside 1..{lt}")
        if abs(sum(w for _, w in p["teacher"]) - 1.0) > 1e-9:
            raise ValueError(f"pair {p}: weights must sum to 1")
