"""Reference rows: the untouched student and the teacher, evaluated exactly like every transferred model."""
from __future__ import annotations

from pathlib import Path

from semalign.registry import Method, TransferContext, register_method


@register_method("none")
class NoTransfer(Method):
    """The student as is: the floor every transfer method must beat."""

    reference = "student"

    def run(self, ctx: TransferContext) -> Path:
        return ctx.student


@register_method("teacher")
class TeacherReference(Method):
    """The source model: the ceiling, and the denominator of the paper's gap-to-teacher."""

    reference = "teacher"

    def run(self, ctx: TransferContext) -> Path:
        return ctx.teacher
