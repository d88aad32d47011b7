"""Layer similarity by linear CKA (paper Figs. 4-5, and the ``cka`` pairing strategy).

Representations are decoder-layer outputs (the residual stream after each 1-based layer) at real (non-padding)
token positions. Teacher and student share a tokenizer (checked by ``check_same_vocab``), so one tokenised batch
gives both models the same tokens, and the same positions are kept on both sides. CKA matrices are stored long
(csv: matrix, student_layer, other_layer, cka) with two matrices per file: ``teacher_student`` [L_S, L_T]
(other_layer = teacher layer) and ``student_self`` [L_S, L_S] (other_layer = student layer).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from semalign.suite.cache import layer_outputs
from semalign.suite.chat import tokenize_records
from semalign.suite.models import backbone, check_same_vocab, decoder_layers, load_model, model_device


def token_positions(attention_mask: torch.Tensor, max_tokens: int | None = None, seed: int = 0) -> torch.Tensor:
    """Bool [N, T]: the real tokens, or a fixed-seed subsample of ``max_tokens`` of them. A function of the mask
    and seed alone, so teacher and student keep the same positions; the cap bounds memory (layers x tokens x d)."""
    real = attention_mask.bool()
    n = int(real.sum())
    if max_tokens is None or n <= max_tokens:
        return real
    flat = real.flatten().nonzero().squeeze(1)
    keep = flat[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_tokens]]
    out = torch.zeros(real.numel(), dtype=torch.bool)
    out[keep] = True
    return out.view_as(real)


@torch.no_grad()
def layer_representations(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], positions: torch.Tensor, batch_size: int = 8
) -> list[np.ndarray]:
    """Per decoder layer (index 0 = layer 1), the outputs at ``positions`` [N, T] of ``batch``: [n_tokens, d]
    float32 on the CPU, rows in the same (row-major) order for every model."""
    L = len(decoder_layers(model))
    store, final, handles = layer_outputs(model, list(range(1, L + 1)))
    dev = model_device(model)
    kept: list[list[torch.Tensor]] = [[] for _ in range(L)]
    try:
        for i in range(0, batch["input_ids"].shape[0], batch_size):
            sl = slice(i, i + batch_size)
            backbone(model)(input_ids=batch["input_ids"][sl].to(dev), attention_mask=batch["attention_mask"][sl].to(dev))
            sel = positions[sl].to(dev)
            for k in range(L):
                kept[k].append(store[k + 1].pop()[sel].to("cpu", torch.float32))
            final.clear()  # the hook also keeps the post-norm state, unused here
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(k).numpy() for k in kept]


def _centred(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(0)


def _inner_features(x: np.ndarray, y: np.ndarray) -> float:
    """||Y^T X||_F^2 from [n, p] and [n, q] representations."""
    return float(np.linalg.norm(y.T @ x) ** 2)


def _inner_gram(kx: np.ndarray, ky: np.ndarray) -> float:
    """The same from their [n, n] Gram matrices: <X X^T, Y Y^T>_F."""
    return float(np.vdot(kx, ky))


def cka_matrix(reps_a: list[np.ndarray], reps_b: list[np.ndarray]) -> np.ndarray:
    """Linear CKA between every layer of ``a`` (rows) and of ``b`` (columns), [len(a), len(b)]. The inner product
    ||Y_c^T X_c||_F^2 = <X_c X_c^T, Y_c Y_c^T>_F is taken in whichever space is cheaper: widths (p x q cross
    products per pair) or tokens (one n x n Gram matrix per layer), e.g. ~20x fewer flops with the Gram matrices
    at paper scale (4096 tokens, widths 4-5k). Each layer is centred and its self-norm computed once."""
    n = {x.shape[0] for x in [*reps_a, *reps_b]}
    if len(n) != 1:
        raise ValueError(f"CKA needs the same examples in every representation, got token counts {sorted(n)}")
    ca, cb = [_centred(x) for x in reps_a], [_centred(y) for y in reps_b]
    p, q = sum(x.shape[1] for x in ca), sum(y.shape[1] for y in cb)
    gram = n.pop() * (p + q) < p * q
    if gram:
        ca, cb = [x @ x.T for x in ca], [y @ y.T for y in cb]
    inner = _inner_gram if gram else _inner_features
    na, nb = ([inner(x, x) ** 0.5 for x in c] for c in (ca, cb))
    out = np.zeros((len(ca), len(cb)))
    for i, (x, nx) in enumerate(zip(ca, na)):
        for j, (y, ny) in enumerate(zip(cb, nb)):
            if nx > 0 and ny > 0:
                out[i, j] = inner(x, y) / (nx * ny)
    return out


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) between [n, p] and [n, q] representations of the same n examples:
    ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F), columns centred. Invariant to orthogonal transforms
    and isotropic scaling, so it compares layers of different widths (0 when either side is constant)."""
    return float(cka_matrix([x], [y])[0, 0])


def write_cka(matrices: dict[str, np.ndarray], path: Path) -> None:
    """Both matrices in one long csv (see the module doc); layers 1-based."""
    rows = [{"matrix": name, "student_layer": i + 1, "other_layer": j + 1, "cka": float(m[i, j])}
            for name, m in matrices.items() for i in range(m.shape[0]) for j in range(m.shape[1])]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False, float_format="%.8g")


def read_cka(path: Path | str) -> dict[str, np.ndarray]:
    """The matrices of a :func:`write_cka` csv, by name: [L_S, L_T] ``teacher_student``, [L_S, L_S] ``student_self``."""
    df = pd.read_csv(path)
    return {name: g.pivot(index="student_layer", columns="other_layer", values="cka").sort_index()
            .sort_index(axis=1).to_numpy() for name, g in df.groupby("matrix")}


def cka_report(
    teacher_dir: Path, student_dir: Path, records: list[dict], max_len: int, out_csv: Path,
    max_tokens: int | None = 4096, batch_size: int = 8, seed: int = 0, device: str | None = None,
) -> dict[str, np.ndarray]:
    """The cka rule's work: one tokenisation for both models, the teacher's and the student's representations
    once each, then the teacher-student and student self-similarity matrices written to ``out_csv``."""
    check_same_vocab(teacher_dir, student_dir)
    teacher, tokenizer = load_model(teacher_dir, device=device)
    batch = tokenize_records(tokenizer, records, max_len)
    positions = token_positions(batch["attention_mask"], max_tokens, seed)
    reps_t = layer_representations(teacher, batch, positions, batch_size)
    del teacher  # one model in memory at a time
    student, _ = load_model(student_dir, device=device)
    reps_s = layer_representations(student, batch, positions, batch_size)
    matrices = {"teacher_student": cka_matrix(reps_s, reps_t), "student_self": cka_matrix(reps_s, reps_s)}
    write_cka(matrices, out_csv)
    print(f"CKA on {int(positions.sum())} tokens of {len(records)} examples: "
          f"{len(reps_s)} student x {len(reps_t)} teacher layers")
    return matrices
