"""Student (target) layer -> teacher (source) layer maps for the frontier schedule (paper v1 §4.1).

Layers are 1-based (paper notation). Every strategy returns the same JSON-able shape::

    {"strategy": str, "teacher_layers": L_T, "student_layers": L_S,
     "pairs": [{"student": k, "teacher": [[l, w], ...]}, ...], ...strategy-specific provenance}

with weights summing to 1 and exactly one teacher layer per student layer except ``interpolated``; the frontier
trains exactly the student layers listed in ``pairs`` (all of them except ``last_only`` and
``attributed`` with ``critical_only``). Every map works when the student is deeper than the teacher (several
student layers then share a teacher layer, all within 1..L_T).

Strategies:
- ``depth_ratio``: l(k) = max(1, floor(L_T k / L_S)) (verbatim; integer arithmetic, so no float rounding).
- ``attributed`` (default): the depth-ratio map, with each attributed critical teacher layer l* (top
  ``n_critical`` by score) placed at the nearest deeper-or-equal student index k† = min{k : l(k) >= l*} (L_S
  if none). v1 writes "training then operates on the pair (l(k†), k†)", which read literally keeps the source
  l(k†) and makes attribution change nothing (the map would equal ``depth_ratio``); v2 says attribution "selects
  exactly one source layer for each target layer". We take the reading in which attribution matters: the source
  of k† is l* itself. Depth order is kept, since l(k†-1) < l* <= l(k†). ``critical_only=True`` trains only the
  critical pairs (v1: "steering a small set of paired layers is enough"). Choices where the paper is silent:
  the number of critical layers (Fig. 3 shows one -> default 1), ties in scores (lower layer first), two l*
  with the same k† (the higher-scoring one).
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

STRATEGIES = ("depth_ratio", "attributed", "interpolated", "last_only", "cka", "random")
ATTRIBUTED = ("attributed",)  # the strategies that read a layer attribution's scores


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
    """The pairing of every (or, for last_only / critical_only, the supervised) student layer; see module doc.

    ``scores``: per teacher layer (index 0 = layer 1), for ``attributed``. ``cka``: [L_S, L_T], for ``cka``."""
    if L_T < 1 or L_S < 1:
        raise ValueError(f"layer counts must be >= 1, got L_T={L_T}, L_S={L_S}")
    out: dict = {"strategy": strategy, "teacher_layers": L_T, "student_layers": L_S}
    ks = range(1, L_S + 1)
    if strategy == "depth_ratio":
        pairs = [_single(k, depth_ratio_layer(L_T, L_S, k)) for k in ks]
    elif strategy == "attributed":
        if scores is None or len(scores) != L_T:
            raise ValueError(f"attributed pairing needs one score per teacher layer ({L_T}), got "
                             f"{None if scores is None else len(scores)}")
        if not 1 <= n_critical <= L_T:
            raise ValueError(f"n_critical must be in 1..{L_T}, got {n_critical}")
        order = sorted(range(L_T), key=lambda i: (-scores[i], i))
        source: dict[int, int] = {}  # k† -> l*; on a shared k† the higher-scoring l* wins (order is by score)
        for l_star in (i + 1 for i in order[:n_critical]):
            k_dag = next((k for k in ks if depth_ratio_layer(L_T, L_S, k) >= l_star), L_S)
            source.setdefault(k_dag, l_star)
        critical = [{"teacher_attributed": l, "student": k, "depth_ratio_teacher": depth_ratio_layer(L_T, L_S, k)}
                    for k, l in sorted(source.items())]
        pairs = [{**_single(k, source.get(k, depth_ratio_layer(L_T, L_S, k))), "critical": k in source}
                 for k in ks if k in source or not critical_only]
        out.update(critical=critical, n_critical=n_critical, critical_only=critical_only)
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


def teacher_layers_needed(pairing: dict, residual: bool = True) -> list[int]:
    """Teacher layers the cache must hold; with ``residual`` also each predecessor l - 1 (0 = embeddings), for
    residual contributions h_l - h_{l-1}."""
    layers = {l for p in pairing["pairs"] for l, _ in p["teacher"]}
    if residual:
        layers |= {l - 1 for l in layers}
    return sorted(layers)

