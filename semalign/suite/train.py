"""The one training loop of the suite (:func:`fit`) and what makes runs reproducible and resumable: seeds, batch
order as a function of (seed, epoch), per-epoch atomic checkpoints keyed by what shaped the run."""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from semalign.suite import timing
from semalign.suite.io import atomic_torch_save, atomic_write_text, first_line, move_aside, write_csv


def set_seed(seed: int) -> None:
    """Seed every RNG a run touches, so the same seed gives the same numbers on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Shuffled index batches; a function of (seed, epoch) alone so a resumed run sees the same order."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def length_chunks(attention_mask: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, int]]:
    """(rows, T): row indices in chunks of ``size`` in order of real length, each with its longest row's length.

    For no-grad or order-free passes (teacher forwards, attribution sums, frozen prefixes) over right-padded rows:
    real tokens never attend to the padding, so cutting a chunk to ``[:, :T]`` gives the same states for them, and
    sorting by length first keeps the cut tight (on mini the mean row is about half of ``max_len``: half the cost)."""
    lengths = attention_mask.sum(1)
    for rows in torch.argsort(lengths, stable=True).split(size):
        yield rows, int(lengths[rows].max())


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns no row of this batch uses (right padding), saving compute on short batches."""
    T = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :T] for k, v in batch.items()}


def checkpoint_dir(out_dir: Path, fingerprint: dict[str, Any]) -> Path:
    """Checkpoints live under a hash of everything the run depends on (config, seed, the content of its inputs:
    :meth:`semalign.suite.registry.TransferContext.fingerprint`), so a re-run with the same of all resumes, and a
    re-run with anything changed starts fresh instead of resuming stale state. Each dir keeps its key in
    ``key.json``; a fresh start beside older keys says in the log what changed."""
    root = Path(out_dir) / "ckpt"
    key = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = root / digest
    if not (path / "key.json").exists():
        older = sorted((p for p in root.glob("*/key.json") if p.parent != path), key=lambda p: p.stat().st_mtime)
        if older:
            changed = _changed_keys(json.loads(older[-1].read_text()), key)
            print(f"checkpoint key changed since {older[-1].parent} ({', '.join(changed)}): starting fresh in {path}")
        atomic_write_text(path / "key.json", json.dumps(key, indent=1, sort_keys=True))
    return path


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two checkpoint keys (the input files by name)."""
    changed = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            changed.append(f"{prefix}{k}")
    return changed


_RESUMED: list[list[Path]] = []  # open record_resumes() blocks, innermost last


@contextmanager
def record_resumes() -> Iterator[list[Path]]:
    """Collect the checkpoints :func:`load_checkpoint` actually loads inside the block: a run is "resumed" (its wall
    time a remainder) exactly when this list is non-empty, not merely because an old checkpoint dir exists."""
    loaded: list[Path] = []
    _RESUMED.append(loaded)
    try:
        yield loaded
    finally:
        _RESUMED.remove(loaded)


def load_checkpoint(path: Path, map_location: Any, weights_only: bool = True) -> Any | None:
    """The checkpoint at ``path``, or None when there is none to resume from. One that does not load (truncated,
    overwritten) is moved aside as ``<name>.corrupt-<time>`` with a log line naming it, and the run starts that
    unit of work fresh: a re-run heals instead of failing on it forever."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, pickle or zip errors alike
        aside = move_aside(path)
        print(f"corrupt checkpoint {path} ({type(e).__name__}: {first_line(e)}); moved to {aside.name}, starting fresh")
        return None
    for loaded in _RESUMED:
        loaded.append(path)
    return state


def check_finite(loss: torch.Tensor, where: str) -> None:
    """NaN/inf losses stop training with a message naming the stage, instead of silently corrupting weights."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}) at {where}; last good checkpoint kept")


class DivergenceError(FloatingPointError):
    """Training blew up while staying finite: loss or weight norm grew past ``divergence_factor`` x its start."""


@dataclass
class DivergenceGuard:
    """Stops a run whose loss or trainable-weight norm exceeds ``factor`` x its value at the first step: a learning
    rate of 1e12 gives finite but meaningless weights (norm ~1e12), which must be an error, not a table entry.
    ``observe`` runs after every optimizer step, so the weights left by the last step are checked too."""

    factor: float
    params: list[torch.Tensor]
    loss0: float | None = None
    norm0: float | None = None

    def __post_init__(self) -> None:
        self.norm0 = self.norm()

    def norm(self) -> float:
        """L2 norm of all trainable weights, accumulated in fp32 on their device: one host sync per step (0 with
        no weights: the loss alone is watched)."""
        if not self.params:
            return 0.0
        with torch.no_grad():
            dev = self.params[0].device
            norms = [torch.linalg.vector_norm(p.detach(), dtype=torch.float32).to(dev) for p in self.params]
            return float(torch.linalg.vector_norm(torch.stack(norms)))

    def observe(self, loss: float, where: str) -> None:
        if self.loss0 is None:
            self.loss0 = loss
        norm = self.norm()
        if not math.isfinite(norm):
            raise DivergenceError(f"diverged at {where}: non-finite trainable weights; last good checkpoint kept")
        if self.loss0 > 0 and loss > self.factor * self.loss0:
            raise DivergenceError(f"diverged at {where}: loss {loss:.4g} > {self.factor:g} x first-step loss "
                                  f"{self.loss0:.4g} (divergence_factor); lower lr. Last good checkpoint kept")
        if self.norm0 > 0 and norm > self.factor * self.norm0:
            raise DivergenceError(f"diverged at {where}: trainable weight norm {norm:.4g} > {self.factor:g} x initial "
                                  f"{self.norm0:.4g} (divergence_factor); lower lr. Last good checkpoint kept")


def spent(examples: int, example_passes: int, optimizer_steps: int) -> dict[str, float | int]:
    """The training budget a run spent, as the cost table reports it: distinct training examples, epochs (example
    passes / examples: what a plain trainer calls epochs, whatever the schedule) and optimizer steps."""
    return {"examples": examples, "epochs": example_passes / examples, "optimizer_steps": optimizer_steps}


@dataclass
class TrainConfig:
    """Knobs of the shared mini-batch loop (:func:`fit`); each trained method's config extends it, so KD,
    LoRA-SFT, layer-wise KD and Seeking's fine-tuning differ only in what they add. Defaults: the SemAlign
    v1 protocol for the post-transfer SFT baselines (5 epochs, lr 3e-4, batch 64, LoRA r=16 on up/down/v/o)."""

    trainable: str = "lora"  # "lora" | "full"
    epochs: int = 5
    lr: float = 3e-4
    batch_size: int = 64
    micro_batch_size: int = 8  # gradient accumulation keeps memory bounded on a laptop; same result
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant" | "linear" (warmup then linear decay to 0, the HF Trainer default)
    warmup_ratio: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["up_proj", "down_proj", "v_proj", "o_proj"])
    divergence_factor: float = 100.0  # stop when loss or trainable-weight norm exceeds this x its start (DivergenceGuard)

    def __post_init__(self) -> None:
        for key, value, allowed in (("trainable", self.trainable, ("lora", "full")),
                                    ("schedule", self.schedule, ("constant", "linear"))):
            if value not in allowed:
                raise ValueError(f"{type(self).__name__}.{key} must be one of {allowed}, got {value!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError(f"{type(self).__name__}: epochs, batch_size and micro_batch_size must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"{type(self).__name__}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.lr > 0 or not self.divergence_factor > 1:
            raise ValueError(f"{type(self).__name__}: lr must be > 0 and divergence_factor > 1, got "
                             f"{self.lr!r} and {self.divergence_factor!r}")

    def fingerprint(self) -> dict[str, Any]:
        """What shapes the run. A constant schedule leaves ``epochs`` out, so extending a finished run resumes it;
        a decaying schedule depends on the total step count, so there it is part of the run's identity."""
        cfg = asdict(self)
        cfg.pop("divergence_factor")  # a stopping rule: never changes the weights of a run that passes it
        if self.schedule == "constant":
            cfg.pop("epochs")
        return cfg


def fit_budget(data: dict[str, torch.Tensor], cfg: TrainConfig, curve: list[dict]) -> dict[str, float | int]:
    """What :func:`fit` spent on ``data``: every row once per epoch, one optimizer step per curve row."""
    n = len(data["input_ids"])
    return spent(n, cfg.epochs * n, len(curve))


def lr_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant, or linear warmup over ``warmup_ratio`` of the steps then linear decay to 0 (HF's default)."""
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(
    module: torch.nn.Module,
    data: dict[str, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    cfg: TrainConfig,
    out_dir: Path,
    seed: int,
    tag: str,
    fingerprint: dict[str, Any] | None = None,
) -> list[dict]:
    """The one training loop of the suite: shuffled mini-batches with gradient accumulation, AdamW over every
    parameter of ``module`` that requires grad (wrap extra trainables, e.g. projectors, in a ModuleDict with
    the model), an atomic checkpoint after each epoch, and exact resume from it.

    ``data``: row-aligned tensors with ``input_ids``/``attention_mask``/``loss_mask`` [N, T], right padded.
    ``loss_fn(rows, batch)``: mean loss over ``rows`` (indices into ``data``); ``batch`` holds those rows,
    trimmed to their longest sequence and on the module's device. Writes ``out_dir/loss_curve.csv``.
    """
    module.train()
    dev = next(module.parameters()).device
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{tag}: nothing to train (no parameter requires grad)")
    n = len(data["input_ids"])
    batch_size = min(cfg.batch_size, n)
    steps_per_epoch = -(-n // batch_size)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = lr_schedule(opt, cfg, cfg.epochs * steps_per_epoch)
    ckpt = checkpoint_dir(out_dir, {"config": cfg.fingerprint(), "seed": seed, **(fingerprint or {})}) / "last.pt"
    start_epoch, curve = 0, []
    guard = DivergenceGuard(cfg.divergence_factor, params)  # before resuming: its reference is the initial weights
    state = load_checkpoint(ckpt, map_location=dev, weights_only=False)
    if state is not None:  # resume: trainable weights, optimizer, schedule and curve of the last finished epoch
        module.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, curve = state["epoch"], state["curve"]
        guard.loss0 = curve[0]["loss"] if curve else None
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    for epoch in range(start_epoch, cfg.epochs):
        set_seed(seed * 1000 + epoch)  # dropout masks independent of whether we resumed
        bar = tqdm(batches(n, batch_size, seed, epoch), desc=f"{tag} epoch {epoch + 1}/{cfg.epochs}")
        for step, idx in enumerate(bar):
            with timing.section("optimizer"):
                opt.zero_grad(set_to_none=True)
            total = 0.0
            for rows in idx.split(cfg.micro_batch_size):
                batch = {k: v.to(dev) for k, v in trim({k: t[rows] for k, t in data.items()}).items()}
                with timing.section("loss"):  # a method's loss_fn names its forward parts inside
                    loss = loss_fn(rows, batch)
                check_finite(loss, f"{tag} epoch {epoch + 1} step {step}")
                with timing.section("backward"):
                    (loss * len(rows) / len(idx)).backward()
                total += loss.item() * len(rows) / len(idx)
            with timing.section("optimizer"):
                opt.step()
                sched.step()
            guard.observe(total, f"{tag} epoch {epoch + 1} step {step}")
            curve.append({"epoch": epoch + 1, "step": step, "loss": total})
            bar.set_postfix(loss=f"{total:.4f}")
        weights = {k: v for k, v in module.state_dict().items() if k in trainable}
        with timing.section("checkpoint"):
            atomic_torch_save({"epoch": epoch + 1, "model": weights, "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "curve": curve}, ckpt)
    write_csv(Path(out_dir) / "loss_curve.csv", curve, ["epoch", "step", "loss"])
    return curve
