"""The output-side objectives shared by the methods: KL to the teacher and cross-entropy of the gold answer, read
out only at the scored (answer) positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from semalign.suite import timing


def shift_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Mask over *predicting positions*: position t predicts token t+1, which is scored iff loss_mask[t+1]."""
    out = torch.zeros_like(loss_mask)
    out[:, :-1] = loss_mask[:, 1:]
    return out


def output_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Token-mean KL(p_teacher || p_student) over ``mask`` positions, scaled by T^2 (Hinton et al.)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0) * t * t


def answer_logits(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [n, V], labels [n], mask [b, T]) at the n scored positions only (position t predicts token t+1).

    The LM head over a 49k-152k vocabulary, and every loss after it, are the bulk of a small student's step, and
    prompt positions carry no loss: reading out only where the loss looks gives the same loss for a fraction of
    the work (SemAlign's frontier does the same).
    """
    from semalign.suite.models import backbone, lm_head

    mask = shift_mask(b["loss_mask"]).bool()
    with timing.section("student forward"):
        hidden = backbone(model)(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        labels = F.pad(b["input_ids"][:, 1:], (0, 1))[mask]
        return lm_head(model)(hidden[mask]), labels, mask


def answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens; 0 (not NaN) when a batch's answers were all truncated away,
    which then simply contributes nothing (as ``output_kl`` does)."""
    return F.cross_entropy(logits.float(), labels, reduction="sum") / max(1, len(labels))


def sft_loss(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The SFT objective on a batch: :func:`answer_ce` of :func:`answer_logits`."""
    logits, labels, _ = answer_logits(model, b)
    return answer_ce(logits, labels)


