"""Vocabulary-defined semantic bases and the training-free teacher -> student map (paper §3.1, §4.2).

Math (paper eqs. 1-2). For a model with LM head W in R^{V x d} (logits = W h), the semantic basis of token i is
column i of the pseudoinverse, s_i = W^+ e_i in R^d, unit-normalised: S = normalise_columns(W^+) in R^{d x V}.
A teacher state h_T in R^{d_T} is *decomposed* into cosine coefficients a = S_T^T h_T / ||h_T|| in R^V and
*recomposed* with the student's bases, h~_S = S_S a. Both steps are linear, so

    h~_S = M h_T / ||h_T||,   M = S_S S_T^T in R^{d_S x d_T}   (orientation: student rows, teacher columns)

and M is all we ever form: per-token V-dimensional coefficients are never materialised, and M itself is
accumulated over vocabulary chunks from thin SVD factors (W = U diag(s) V^T  =>  W^+ e_i = V diag(1/s) U[i]^T),
so the peak extra memory is one [d, chunk] block per model rather than two dense [d, V] pseudoinverses.

The lens (``fold_final_norm``, default on): the model reads its last residual state as logits = W diag(γ) norm(h),
with γ the final RMSNorm's weight (Llama family: y = γ ⊙ h / rms(h)). The bases are built from that lens,
W_lens = W diag(γ), so that s_i is the state direction the model itself reads as token i; ``fold=False`` uses W
alone (the paper's literal W^+, an ablation). Since W has full column rank, pinv(W diag(γ)) = diag(1/γ) W^+, so
folding reweights each basis channel by 1/γ before the unit normalisation; with γ = 1 it changes nothing.

Choices where the paper is silent:
- pinv cutoff: singular values below ``rtol * s_max`` (rtol = max(V, d) * eps of the compute dtype, torch's pinv
  default) are treated as zero; the SVD runs in float64 by default because columns are renormalised afterwards,
  which amplifies relative error in small columns.
- ``align(..., normalize=True)`` follows eq. 1 exactly (division by ||h_T||, per token); ``normalize=False`` keeps
  the map linear (M h), which the relation-geometry loss (v2) uses so that per-token magnitudes survive centring.
- "Input-side" bases (Fig. 2, undefined in the paper): the unit-normalised input embedding rows E[i], i.e. the
  token -> representation direction used at the input; "random": V Gaussian unit vectors (seeded).
- Tied embeddings (lm_head is the embedding) need nothing special: output-side bases are pinv(E), input-side are
  E^T itself, so the two Fig. 2 curves still differ.

Note (reviewer 3's "overcomplete" point, measurable with :func:`decomposition_check`): recomposition in the same
space gives S S^T h, and S S^T is PSD, so the Fig. 2 cosine is >= 0 for every basis; for V >> d random unit
vectors S S^T ~ (V/d) I, so random bases recompose *well*, contrary to the paper's "r ⊥ Σ c'_i" claim.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from semalign.suite.models import VocabularyMismatchError, embed_tokens, final_norm, lm_head

BASES = ("output", "output_unfolded", "input", "random")  # Fig. 2 rows; "output" reads through the folded lens


class BasisShapeError(VocabularyMismatchError):
    """Two LM heads with different vocabulary sizes: index-aligned bases are impossible."""


def _svd_factors(head_weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r, V_r diag(1/s_r)) of the thin SVD of W [V, d], keeping singular values above torch's pinv cutoff,
    so that W^+[:, idx] = (V_r diag(1/s_r)) @ U_r[idx].T."""
    w = head_weight.detach().to(dtype)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    rtol = max(w.shape) * torch.finfo(dtype).eps
    keep = s > rtol * s.max()
    return u[:, keep], vh[keep].T / s[keep]


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=0, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def lens_weight(model: torch.nn.Module, fold: bool = True) -> torch.Tensor:
    """The map from the final residual state's direction to logits, [V, d] in float64: W_head diag(γ_final_norm)
    (``fold``) or W_head alone. float64 because the SVD that follows runs in it."""
    w = lm_head(model).weight.detach().to(torch.float64)
    return w * final_norm(model).weight.detach().to(w.device, torch.float64) if fold else w


def semantic_bases(head_weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """S = normalise_columns(pinv(W_head)) in R^{d x V}: the dense bases (for figures and small models)."""
    u, vs = _svd_factors(head_weight, dtype)
    return _unit_columns(vs @ u.T)


def check_vocab_shapes(head_s: torch.Tensor, head_t: torch.Tensor) -> None:
    if head_s.ndim != 2 or head_t.ndim != 2 or head_s.shape[0] != head_t.shape[0]:
        raise BasisShapeError(
            f"LM heads {tuple(head_s.shape)} (student) and {tuple(head_t.shape)} (teacher) do not share a vocabulary "
            "axis [V, d]; semantic bases need index-aligned vocabularies"
        )


def aligned_map(
    head_student: torch.Tensor,
    head_teacher: torch.Tensor,
    chunk_size: int = 8192,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """M = S_S S_T^T in R^{d_S x d_T} (float32), summed over vocabulary chunks: Σ_c S_S[:, c] S_T[:, c]^T."""
    check_vocab_shapes(head_student, head_teacher)
    u_s, vs_s = _svd_factors(head_student, dtype)
    u_t, vs_t = _svd_factors(head_teacher, dtype)
    m = torch.zeros(vs_s.shape[0], vs_t.shape[0], dtype=dtype, device=u_s.device)
    for i in range(0, u_s.shape[0], chunk_size):
        s_s = _unit_columns(vs_s @ u_s[i : i + chunk_size].T)  # [d_S, c]
        s_t = _unit_columns(vs_t @ u_t[i : i + chunk_size].T)  # [d_T, c]
        m += s_s @ s_t.T
    return m.float()


def align(h: torch.Tensor, m: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Teacher states [..., d_T] -> student space [..., d_S]: M h / ||h|| (eq. 1-2) or M h (``normalize=False``)."""
    out = h.to(m.dtype) @ m.T
    if normalize:
        out = out / h.to(m.dtype).norm(dim=-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    return out


def basis_matrix(model: torch.nn.Module, basis: str, seed: int = 0) -> torch.Tensor:
    """Unit-column bases [d, V] of a model: "output" = pinv(W_head diag(γ)), "output_unfolded" = pinv(W_head),
    "input" = embedding rows, "random"."""
    if basis in ("output", "output_unfolded"):
        return semantic_bases(lens_weight(model, fold=basis == "output"))
    emb = embed_tokens(model).weight.detach().to(torch.float64)
    if basis == "input":
        return _unit_columns(emb.T)
    if basis == "random":
        g = torch.Generator().manual_seed(seed)
        return _unit_columns(torch.randn(emb.shape[1], emb.shape[0], generator=g, dtype=torch.float64)).to(emb.device)
    raise ValueError(f"basis must be one of {BASES}, got {basis!r}")


def bases_gram(bases: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
    """S S^T (d x d, float64) of unit-column bases S [d, V], accumulated over vocabulary chunks so no [d, V] float64
    copy is formed. Once per basis: it is the expensive part of the check (d² V multiply-adds)."""
    gram = torch.zeros(bases.shape[0], bases.shape[0], dtype=torch.float64, device=bases.device)
    for i in range(0, bases.shape[1], chunk_size):
        block = bases[:, i : i + chunk_size].to(torch.float64)
        gram += block @ block.T
    return gram


def recomposition_cosine(h: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per-row cos(h, S S^T h / ||h||) for h [n, d] given ``gram`` = S S^T (:func:`bases_gram`): decompose into
    cosines over the bases, recompose, compare, with no [n, V] coefficient matrix."""
    x = h.to(gram.device, torch.float64)
    return torch.nn.functional.cosine_similarity(x, x @ gram, dim=-1)


def decomposition_check(
    model: torch.nn.Module,
    hidden_states_by_layer: dict[int, torch.Tensor],
    basis: str = "output",
    seed: int = 0,
) -> dict[int, float]:
    """Paper Fig. 2: mean recomposition cosine per layer. Inputs are [..., d] states of real tokens only
    (the caller drops padding); output {layer: mean cosine}."""
    gram = bases_gram(basis_matrix(model, basis, seed))
    return {
        k: recomposition_cosine(h.reshape(-1, h.shape[-1]), gram).mean().item()
        for k, h in tqdm(sorted(hidden_states_by_layer.items()), desc=f"decomposition ({basis})", leave=False)
    }


@torch.no_grad()
def collect_layer_states(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], layers: list[int]
) -> dict[int, torch.Tensor]:
    """Residual stream after each 1-based layer (0 = embeddings) at real-token positions, as [n_tokens, d]."""
    from semalign.suite.cache import layer_outputs

    store, _final, handles = layer_outputs(model, layers)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    real = batch["attention_mask"].bool()
    return {k: torch.cat(v)[real].float() for k, v in store.items()}


def write_decomposition(results: dict[str, dict[int, float]], csv_path: Path, png_path: Path, title: str = "") -> None:
    """Fig. 2 table (basis, layer, cosine) and line plot, one line per basis."""
    from semalign.suite.figures import write_layer_profile

    write_layer_profile(results, csv_path, png_path, columns=("basis", "layer", "cosine"),
                        ylabel="cos(h, recomposed h)", title=title or "semantic decomposition", ylim=(-0.05, 1.05))


def pair_map(teacher_dir: Path, student_dir: Path, fold: bool = True, device: str | None = None) -> tuple[torch.Tensor, dict]:
    """M = S_S S_T^T of two prepared models through their lenses (:func:`lens_weight`), after checking that they
    share a vocabulary; returns (M on the CPU, stats)."""
    from semalign.suite.models import check_same_vocab, load_model

    check_same_vocab(teacher_dir, student_dir)
    lens, stats = {}, {"fold_final_norm": fold}
    for role, path in (("teacher", teacher_dir), ("student", student_dir)):
        model, _ = load_model(path, device=device)
        lens[role] = lens_weight(model, fold)
        stats[f"{role}_tied"] = lm_head(model).weight.data_ptr() == embed_tokens(model).weight.data_ptr()
        del model
    m = aligned_map(lens["student"], lens["teacher"].to(lens["student"].device)).cpu()
    stats.update(vocab=lens["student"].shape[0], d_student=m.shape[0], d_teacher=m.shape[1], map_fro_norm=m.norm().item())
    return m, stats


def build_aligned_map(
    teacher_dir: Path, student_dir: Path, out_path: Path, device: str | None = None, fold: bool = True
) -> dict:
    """The aligned_map rule's work: M (:func:`pair_map`) saved atomically as a float32 [d_S, d_T] tensor, which the
    semalign method loads via ``extras["aligned_map"]``; returns stats."""
    from semalign.suite.io import atomic_torch_save

    m, stats = pair_map(teacher_dir, student_dir, fold, device)
    atomic_torch_save(m, Path(out_path))
    return stats


def decomposition_report(
    model_dir: Path, records: list[dict], max_len: int, csv_path: Path, png_path: Path, seed: int = 0,
    title: str = "",
) -> dict[str, dict[int, float]]:
    """Paper Fig. 2 for one model: recomposition cosine per layer (0 = embeddings .. L) for output-side bases
    through the folded lens and without γ (the two rows show what folding changes), input-side and random bases,
    over the real tokens of ``records``; writes the csv and png."""
    from semalign.suite.chat import tokenize_records
    from semalign.suite.models import decoder_layers, load_model

    model, tokenizer = load_model(model_dir, device="cpu")
    batch = tokenize_records(tokenizer, records, max_len, train_on_inputs=True)
    states = collect_layer_states(model, batch, list(range(len(decoder_layers(model)) + 1)))
    results = {basis: decomposition_check(model, states, basis, seed) for basis in BASES}
    write_decomposition(results, csv_path, png_path, title=title or Path(model_dir).name)
    return results
