"""SemAlign objectives: the three published variants (v1, v2, ACL) plus two ablation baselines.

The math is in pure functions (tensors in, scalar tensor out, masks given), so each is tested alone. Shapes:
hidden states [B, T, d], logits [B, T, V], masks [B, T] (1 = counted). A variant is an :class:`Objective`
registered by name in :data:`LOSSES`: it says what it supervises (its interface, whether it reads a layer target
at all, whether it trains the output every stage) and returns ``LossTerms(layer, output)``; the trainer combines
them as lambda_layer * layer + lambda_kl * output and logs both, and never branches on a variant's name. When a
stage has no output term (``kl_every_stage=False``) the logits are None and ``output`` is 0.

Choices where the paper is silent are stated at each function.
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch

from semalign.suite.objectives import output_kl

EPS = 1e-8
Tensor = torch.Tensor
Opt = torch.Tensor | None


class LossTerms(NamedTuple):
    layer: torch.Tensor
    output: torch.Tensor


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 (fp64 stays fp64): every reduction below sums over d, T or T^2 terms, which bf16's 8-bit
    mantissa would round away, whatever dtype the model runs in."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T] over mask positions (0 if the mask is empty, so an empty batch adds no gradient)."""
    x = wide(x)
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(||x||^2 + eps): smooth at 0, so gradcheck and all-zero residuals stay finite."""
    x = wide(x)
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + EPS)


def cosine_layer_loss(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Avg_t cos(h_t, target_t) (v1's L_layer). Scale-invariant, so the arbitrary magnitude of the
    recomposed target (eq. 2) does not matter."""
    return 1.0 - masked_mean((_unit(h) * _unit(target)).sum(-1), mask)


def onehot_cosine_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Avg_t cos(z_t, e_{y_t}) = 1 - Avg_t z_{t, y_t} / ||z_t|| (v1's L_out, a scale-invariant CE surrogate).
    ``labels`` [B, T] is the token each position predicts; masked-out labels may hold any valid id."""
    logits = wide(logits)
    z_y = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return 1.0 - masked_mean(z_y * torch.rsqrt((logits * logits).sum(-1) + EPS), mask)


def relation_matrices(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Centred token-token cosine geometry per sequence: x_c = x - mean_{t in mask} x_t, G = unit(x_c) unit(x_c)^T,
    [B, T, T]; rows/columns outside the mask are zeroed."""
    x = wide(x)
    m = mask.to(x.dtype).unsqueeze(-1)
    mean = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
    u = _unit((x - mean) * m)
    return u @ u.transpose(1, 2)


def relation_loss(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid token pairs of (G_x - G_y)^2 with G from :func:`relation_matrices` (v2's layer term).

    Our reading of the v2 abstract's "centered token-token relation geometry": centre over the sequence's valid
    tokens, cosine (not raw) Gram so scale and width drop out, squared Frobenius distance normalised by the
    number of valid pairs Σ_b n_b^2. Invariant to orthogonal maps and per-sequence shifts of either side, so it
    transfers *relations* between tokens, not absolute states."""
    diff = relation_matrices(x, mask) - relation_matrices(y, mask)
    n = mask.to(diff.dtype).sum(-1)
    return (diff * diff).sum() / (n * n).sum().clamp_min(1.0)


def fisher_quadratic(z_student: torch.Tensor, z_target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Avg_t 0.5 d^T (diag p - p p^T) d with d = z_S - z*, p = softmax(z*) (ACL's layer term; our reading).

    This is the second-order expansion of KL(softmax(z*) || softmax(z_S)) around z_S = z*, with the Fisher of
    the categorical taken at the (constant) aligned target distribution. Computed as
    0.5 (Σ_i p_i d_i^2 - (Σ_i p_i d_i)^2), never forming the V x V matrix; it is >= 0 and invariant to adding a
    constant to d (softmax shift invariance). Gradient wrt z_S: (diag p - p p^T) d = p * d - p (p . d)."""
    d = z_student.float() - z_target.float()
    p = torch.softmax(z_target.float(), dim=-1)
    pd = p * d
    quad = (pd * d).sum(-1) - pd.sum(-1) ** 2
    return masked_mean(0.5 * quad, mask)


def hidden_mse_loss(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Avg_t ||h_t - target_t||^2 / ||target_t||^2: representation matching by per-token relative squared error
    (ablation; the target's scale must still be calibrated by the caller, since eq. 2's magnitude is arbitrary).

    Per token, not per element: a plain MSE is carried by whichever tokens have the largest states, and on
    SmolLM2 the attention-sink position (token 0, ||h|| ~ 2.5e4 against ~1e2 elsewhere) would make up nearly all
    of it; dividing by the target's own squared norm weighs every token's error relative to its size, so each
    real token counts once. A relative error needs a nonzero target: at its default (output) interface the
    target is a state; an empty teacher block at the residual interface would make it ill-posed."""
    h, target = wide(h), wide(target)
    err = ((h - target) ** 2).sum(-1) / ((target * target).sum(-1) + EPS)
    return masked_mean(err, mask)


def _kl(student_logits: Opt, teacher_logits: Opt, out_mask: Opt, temperature: float) -> Tensor:
    """KL(p_teacher || p_student), or 0 when the stage has no output term."""
    if student_logits is None:
        return torch.zeros(())
    return output_kl(student_logits, teacher_logits, out_mask, temperature)


class Objective:
    """One loss variant of a frontier stage. ``layer`` compares the student quantity with the aligned teacher
    target at the variant's interface; ``output`` is the output-side term (KL to the teacher unless overridden)."""

    name: ClassVar[str] = ""
    interface: ClassVar[str] = "residual"  # default supervision interface: Δ_k = h_k - h_{k-1} or the output h_k
    interfaces: ClassVar[tuple[str, ...]] = ("residual", "output")  # the ones it is defined for
    uses_layer_target: ClassVar[bool] = True  # False: no aligned target, no teacher layers needed
    output_every_stage: ClassVar[bool] = False  # True: train the output term at every stage, whatever the config
    reads_out: ClassVar[bool] = False  # compare read-outs (final norm + head) of both sides, not states
    calibrated: ClassVar[bool] = False  # the target's arbitrary scale must be matched to the student's first

    def layer(self, student: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def output(self, student_logits: Opt, teacher_logits: Opt, labels: Opt, out_mask: Opt,
               temperature: float) -> Tensor:
        return _kl(student_logits, teacher_logits, out_mask, temperature)

    def terms(self, student: Tensor, target: Tensor, mask: Tensor, student_logits: Opt = None,
              teacher_logits: Opt = None, labels: Opt = None, out_mask: Opt = None,
              temperature: float = 1.0) -> LossTerms:
        return LossTerms(self.layer(student, target, mask),
                         self.output(student_logits, teacher_logits, labels, out_mask, temperature))


LOSSES: dict[str, Objective] = {}


def register_loss(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make the variant selectable as ``loss: <cls.name>``."""
    if cls.name in LOSSES:
        raise ValueError(f"loss {cls.name!r} is already registered")
    LOSSES[cls.name] = cls()
    return cls


@register_loss
class V1(Objective):
    """v1: L = [1 - Avg cos(Δ_k, target)] + [1 - Avg cos(z, onehot(y))], unweighted in the paper (its L_out is a
    scale-invariant surrogate of the gold-token cross-entropy, not a KL)."""

    name = "v1"

    def layer(self, student: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return cosine_layer_loss(student, target, mask)

    def output(self, student_logits: Opt, teacher_logits: Opt, labels: Opt, out_mask: Opt,
               temperature: float) -> Tensor:
        return torch.zeros(()) if student_logits is None else onehot_cosine_loss(student_logits, labels, out_mask)


@register_loss
class V2(Objective):
    """v2: relation geometry of the residual contribution Δ_k = h_k - h_{k-1} against the aligned supervisory
    residual, plus KL(p_teacher || p_student) on the output."""

    name = "v2"

    def layer(self, student: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return relation_loss(student, target, mask)


@register_loss
class ACL(Objective):
    """ACL: Fisher quadratic between the student layer's read-out logits and the aligned logits (both through the
    *student's* final norm + head, i.e. "target-space aligned logits"), plus the final KL."""

    name = "acl"
    interface = "output"
    interfaces = ("output",)  # a residual has no read-out of its own
    reads_out = True

    def layer(self, student: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return fisher_quadratic(student, target, mask)


@register_loss
class HiddenMSE(Objective):
    """Ablation: per-token relative MSE to the (scale-calibrated) aligned state + output KL."""

    name = "hidden_mse"
    interface = "output"
    calibrated = True

    def layer(self, student: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return hidden_mse_loss(student, target, mask)


@register_loss
class KLOnly(Objective):
    """Ablation: no layer supervision, the frontier schedule with the output KL only (at every stage, its only
    term, so the ablation differs from its reference in the layer supervision alone)."""

    name = "kl_only"
    interface = "output"
    uses_layer_target = False
    output_every_stage = True

    def layer(self, student: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return torch.zeros((), device=student.device)


def get_loss(name: str) -> Objective:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


def layer_loss(name: str, student: Tensor, target: Tensor, mask: Tensor, student_logits: Opt = None,
               teacher_logits: Opt = None, labels: Opt = None, out_mask: Opt = None,
               temperature: float = 1.0) -> LossTerms:
    """Both terms of variant ``name``. ``student``/``target`` are what the variant compares (states, residuals or,
    for read-out variants, logits); v1's output term uses ``labels``, the others ``teacher_logits``."""
    return get_loss(name).terms(student, target, mask, student_logits, teacher_logits, labels, out_mask, temperature)
