"""Reference rows: the untouched student and the teacher. They transfer nothing, so they have no ``run``: the
workflow evaluates the named model directly, exactly like every transferred model."""
from __future__ import annotations

from semalign.suite.registry import Method, register_method


@register_method("none")
class NoTransfer(Method):
    """The student as is: the floor every transfer method must beat."""

    reference = "student"


@register_method("teacher")
class TeacherReference(Method):
    """The source model: the ceiling, and the denominator of the paper's gap-to-teacher."""

    reference = "teacher"
