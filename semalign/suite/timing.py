"""Where a transfer's wall time goes: named sections around the work of the training loops.

The transfer-cost benchmark (``benchmarks/transfer_cost.py``) compares methods component by component at equal
optimizer steps; every loop names the same kind of work the same way (:data:`SECTIONS`), so KD's and SemAlign's
columns mean the same thing. Sections nest and each is charged its *exclusive* time (a section's elapsed time minus
that of the sections opened inside it), so the components add up to the timed total without double counting.

Off unless :func:`enable` is called (the benchmark's child processes): a section is then a bare ``yield``, with no
clock read and no device synchronisation in the workflow's own transfers. On CUDA the clock synchronises at each
section edge, so asynchronous kernels are charged to the section that launched them.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SECTIONS = {
    "prefix refresh": "SemAlign: the frozen layers below the stage's layer, run once per stage over all rows",
    "student forward": "the student's forward to the read-out (all layers + head at the answer positions)",
    "layer forward": "SemAlign: the stage's trainable layer on the stored prefix states",
    "suffix + head": "SemAlign: the frozen layers above the stage's layer + the head (output term only)",
    "aligned targets": "SemAlign: teacher states from the cache, summed over the block and recomposed (M x)",
    "teacher logits": "the teacher's logits from its cached final state (cached state @ head), answer positions",
    "loss": "the objective itself (KL, cross-entropy, layer loss)",
    "backward": "autograd through what the step ran",
    "optimizer": "AdamW step, schedule and zeroing the gradients",
    "stage setup": "SemAlign: LoRA on the stage's layer, its merge after the stage",
    "checkpoint": "atomic checkpoint writes (per epoch, per stage)",
}

_totals: dict[str, float] | None = None
_stack: list[float] = []  # per open section: the time its nested sections took


def enable() -> None:
    """Start recording (and reset): the sections from now on add to :func:`totals`."""
    global _totals
    _totals = defaultdict(float)
    _stack.clear()


def totals() -> dict[str, float]:
    """Exclusive seconds per section name since :func:`enable` (empty when never enabled)."""
    return dict(_totals or {})


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def section(name: str) -> Iterator[None]:
    """Charge the enclosed work to ``name`` (one of :data:`SECTIONS`), minus the sections nested in it."""
    if _totals is None:
        yield
        return
    if name not in SECTIONS:
        raise ValueError(f"unknown timing section {name!r}; add it to SECTIONS with what it covers")
    _sync()
    start = time.perf_counter()
    _stack.append(0.0)
    try:
        yield
    finally:
        _sync()
        elapsed = time.perf_counter() - start
        nested = _stack.pop()
        _totals[name] += elapsed - nested
        if _stack:
            _stack[-1] += elapsed
