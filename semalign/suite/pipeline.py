"""What the workflow's scripts call: each function is one rule's work, with plain arguments, testable alone."""
from __future__ import annotations

import json
import resource
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from semalign.suite import timing
from semalign.suite.io import atomic_write_text
from semalign.suite.registry import TransferContext, get_method
from semalign.suite.train import record_resumes


def resolve_device(device: str) -> str:
    """``auto`` picks CUDA when present; asking for CUDA on a machine without it is an error, not a fallback."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} requested but no CUDA GPU is visible; set device: cpu or auto")
    return device


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def count_layer_passes(roles: dict[str, tuple[int, int]]) -> Iterator[Counter]:
    """Count decoder-layer passes of every model run inside the block, whoever runs it (method code, peft,
    frozen prefixes): ``{role}_layer_forward_rows`` / ``_tokens`` and ``{role}_layer_backward_rows``, where a
    row is one example through one layer. Models are told apart by (num_layers, hidden_size) in ``roles``;
    a layer of any other shape counts as ``other``. The cost table divides these by layers x examples."""
    counts: Counter = Counter()
    shape_role = {shape: role for role, shape in roles.items()}

    def hook(module: torch.nn.Module, _args: Any, output: Any) -> None:
        cfg = getattr(getattr(module, "self_attn", None), "config", None)
        if cfg is None or not type(module).__name__.endswith("DecoderLayer"):
            return
        role = shape_role.get((cfg.num_hidden_layers, cfg.hidden_size), "other")
        h = output[0] if isinstance(output, tuple) else output
        counts[f"{role}_layer_forward_rows"] += h.shape[0]
        counts[f"{role}_layer_forward_tokens"] += h.shape[0] * h.shape[1]
        if h.requires_grad:
            h.register_hook(lambda g: counts.update({f"{role}_layer_backward_rows": g.shape[0]}))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete the temporaries (``.<name>.<pid>.tmp``, ``.<name>.tmp.<suffix>``) a killed run left behind. Writes are
    atomic (temporary + rename), so a SIGKILL never leaves a partial checkpoint or model under its real name, but
    it can leave the temporary it was writing: the re-run removes it instead of letting it pile up."""
    for path in sorted(out_dir.rglob(".*.tmp*"), reverse=True):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def job_context(smk: Any, out_dir: Path, seed: int = 0) -> TransferContext:
    """The context of a transfer or prepare_transfer job: the models, the splits and every other input (the
    artifacts the method declared) from the rule's inputs, the rest from its params."""
    inp, p = smk.input, smk.params
    return TransferContext(
        teacher=Path(inp.teacher).parent,
        student=Path(inp.student).parent,
        splits=Path(inp.splits).parent,
        task=smk.wildcards.task,
        out_dir=out_dir,
        params=dict(p.method_params),
        seed=seed,
        device=resolve_device(p.device),
        max_len=p.max_len,
        train_on_inputs=p.train_on_inputs,
        artifacts={k: Path(v) for k, v in inp.items() if k not in ("teacher", "student", "splits")},
    )


def run_preparation(method: str, ctx: TransferContext, out: Path) -> dict[str, Any]:
    """Make ``method``'s seed-independent preparation for every seed of ``ctx``'s (pair, task) (rule
    prepare_transfer); returns what it cost."""
    from semalign.suite.io import atomic_torch_save

    impl = get_method(method)
    t0 = time.perf_counter()
    atomic_torch_save(impl.prepare(ctx, impl.config(ctx.params)), out)
    return {"method": method, "task": ctx.task, "wall_seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def run_transfer(method: str, ctx: TransferContext, out_json: Path, label: str | None = None) -> dict[str, Any]:
    """Run one method and record what it cost; ``transfer.json`` is written last, so it marks completion.
    ``label``: the row name in tables (an ablation variant ``method@key=value``), default ``method``."""
    from semalign.suite.io import load_manifest

    impl = get_method(method)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(ctx.out_dir)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    shapes = {role: (m["num_layers"], m["hidden_size"])
              for role, m in (("teacher", load_manifest(ctx.teacher)), ("student", load_manifest(ctx.student)))}
    # a re-run after a crash resumes from checkpoints: its wall time is the remainder only, not the cost
    t0 = time.perf_counter()
    with count_layer_passes(shapes) as passes, record_resumes() as resumed_from:
        model_path = impl.run(ctx)
    wall = time.perf_counter() - t0
    stats_file = ctx.out_dir / "train_stats.json"
    record = {
        "method": label or method,
        "task": ctx.task,
        "seed": ctx.seed,
        "model_path": str(model_path),
        "wall_seconds": wall,
        "resumed": bool(resumed_from),
        "resumed_from": [str(p) for p in resumed_from],
        "threads": torch.get_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
        "params": ctx.params,
        "layer_passes": dict(passes),
        "uses_teacher_cache": impl.uses_teacher_cache(impl.config(ctx.params)),
        **(json.loads(stats_file.read_text()) if stats_file.exists() else {"trainable_params": 0}),
    }
    if sections := timing.totals():  # the cost benchmark's children: where the wall time went (suite.timing)
        record["time_breakdown"] = {**sections, "other (load, save, setup)": wall - sum(sections.values())}
    atomic_write_text(out_json, json.dumps(record, indent=2))
    return record


def evaluated_model_dir(path: Path) -> Path:
    """A transfer record points at the model it produced; a model manifest (reference rows) sits in its dir."""
    if path.name == "transfer.json":
        return Path(json.loads(path.read_text())["model_path"])
    return path.parent
