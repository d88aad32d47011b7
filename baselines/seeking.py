"""Seeking Neural Nuggets (ParaKnowTransfer, Zhong et al., ICLR 2024): the paper's PostPKT baseline. Teacher
parameters chosen by sensitivity initialise a LoRA on the student, which is then fine-tuned on the train split.

1. Sensitivity on the seed split: S_i = Σ_examples |θ_i · ∂L/∂θ_i|, one example at a time, L the mean answer CE.
2. Layers: a teacher layer's score is the sum of S over all its parameters; the top-k (k = student depth), in
   their original order, pair with student layers 1..k.
3. Per targeted matrix (q/k/v/o, gate/up/down, embed_tokens, lm_head): the contiguous student-shaped block of the
   paired teacher matrix with the largest summed S, reduced to rank r by SVD: B @ A.
4. The LoRA starts at (A, B) and the base weight becomes W - s·BA, so training starts from the student's exact
   function (PiSSA-like: the teacher sets the adapter's starting point); save() merges the trained LoRA back.

Where this differs from the upstream code (maszhongming/ParaKnowTransfer), on purpose:
- |θ·g| is added into fp32 accumulators as soon as each parameter's gradient is ready and the gradient dropped,
  so a pass costs the parameters + one accumulator set, not ~4 model copies (>200 GB host RAM for a 13B teacher).
  The accumulators live on the host by default (``sensitivity_device: cpu``) and the teacher keeps its own dtype,
  so a 13B teacher's pass fits one 80 GB GPU (:func:`sensitivity_memory`).
- The subtraction of s·BA is done on the base weights in place; upstream merges a LoRA with A negated (same math).
- Factors stay fp32 (upstream casts to fp16); the SVD is thin (``full_matrices=False``); the block search is a
  vectorised summed-area table with upstream's first-maximum tie rule.
- Seed and train examples are tokenised like every other method here (chat template or Tulu format).
- A student with tied input/output embeddings is untied when either is a target: a LoRA delta on a shared matrix
  cannot be subtracted from the base once and still start both uses at the student (peft's
  ``ensure_weight_tying`` merges the shared delta twice). Both get their own LoRA, as in upstream's untied
  Llama-2; the saved model therefore has a separate output head (V·d more parameters). LoRA-SFT, its control,
  does the same (:func:`semalign.suite.lora.untie_targeted_embeddings`).
- Steps 1-3 do not depend on the seed: the workflow runs them once per (pair, task) (:meth:`Seeking.prepare`,
  rule prepare_transfer) and every seed's transfer, a resumed one included, starts from the same factors.
"""
from __future__ import annotations

import gc
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from baselines.lora_sft import LoRASFTConfig
from semalign.suite.io import write_csv
from semalign.suite.lora import apply_lora, trainable_parameters, untie_targeted_embeddings
from semalign.suite.models import decoder_layers, load_model, model_skeleton
from semalign.suite.objectives import sft_loss
from semalign.suite.registry import Method, TransferContext, register_method
from semalign.suite.train import fit, fit_budget, trim

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # decoder layer index in a parameter / module name
SPLITS = ("extract", "align", "train")


@dataclass
class SeekingConfig(LoRASFTConfig):
    """Upstream train.sh / extract_lora.sh: the SFT settings are LoRA-SFT's (its control row, :mod:`lora_sft`).
    ``lora_r`` is also the SVD rank of the extracted factors."""

    seed_split: str = "extract"  # the sensitivity ("seed") examples
    # where the fp32 sums live: "cpu" (default: a 13B teacher's 52 GB of sums stay off an 80 GB GPU) or None =
    # beside each parameter (fastest when they fit); the sums are equal either way
    sensitivity_device: str | None = "cpu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trainable != "lora":
            raise ValueError(f"SeekingConfig.trainable must be 'lora' (the method is a LoRA init), got {self.trainable!r}")
        if self.lora_r < 1 or not self.lora_targets:
            raise ValueError("SeekingConfig: lora_r must be >= 1 and lora_targets non-empty")
        if self.seed_split not in SPLITS:
            raise ValueError(f"SeekingConfig.seed_split must be one of {SPLITS}, got {self.seed_split!r}")
        if self.sensitivity_device is not None:
            torch.device(self.sensitivity_device)  # raises on a malformed device string

    def fingerprint(self) -> dict[str, Any]:
        cfg = super().fingerprint()
        cfg.pop("sensitivity_device")  # where the sums live does not change them
        return cfg


def seed_loss(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The answer cross-entropy of one seed example, its padding columns dropped."""
    return sft_loss(model, trim(b))


def sensitivity_memory(n_params: float, param_bytes: int, largest_param: float, n_layers: int, hidden: int,
                       intermediate: int, vocab: int, seq_len: int, sums_on_device: bool) -> dict[str, float]:
    """Peak bytes of the sensitivity pass (one example per backward): {"device", "host"}.

    device = params (n_params · param_bytes) + [sums (n_params · 4) if on device] + activations + per-parameter
    transients; activations = n_layers · seq_len · (36·hidden + 8·intermediate) · param_bytes / 2 (per token and
    layer, in bf16: the two RMSNorms' fp32 inputs and bf16 outputs ~20·d B, q/k/v and their rotated copies 10·d,
    the attention output 2·d, o_proj's input 2·d, residual 2·d; gate/up outputs, SiLU and the product 8·f),
    + the answer logits (seq_len · vocab · 10 B: bf16 logits, fp32 copy and log-softmax); transients = the largest
    parameter's gradient (param_bytes) and |θ·g| in fp32 in each of two staging slots (2 · 4 B).
    host = the sums (n_params · 4) when off device.

    Llama-2-13B teacher (13.0e9 params, largest 32000·5120 = 1.64e8, 40 layers, d 5120, f 13824, V 32000) at
    seq_len 768 (data.max_len): activations 40·768·(36·5120 + 8·13824)·1 B = 9.1e9 B in bf16.
    As written before (teacher loaded in fp32, sums beside the parameters): 52.1 + 52.1 + 18.1 (fp32
    activations) + 0.2 + 2.0 = 124 GB: no 80 GB GPU. Teacher in bf16, sums on device: 26.0 + 52.1 + 9.1 + 0.2 +
    1.6 = 89 GB: still not. Teacher in bf16, sums on the host: device 26.0 + 9.1 + 0.2 + 1.6 = 37 GB, host 52 GB.
    """
    activations = n_layers * seq_len * (36 * hidden + 8 * intermediate) * param_bytes / 2 + seq_len * vocab * 10
    transients = largest_param * (param_bytes + 2 * 4)
    sums = n_params * 4
    device = n_params * param_bytes + activations + transients + (sums if sums_on_device else 0)
    return {"device": device, "host": 0.0 if sums_on_device else sums}


class _Sums:
    """fp32 sums of |θ·g| per parameter on ``device`` (None = each parameter's own). When the parameters are on a
    GPU and the sums on the host, each product is copied without blocking into one of two pinned staging buffers
    and added once its copy is done (when the slot comes round again, or at :meth:`flush`), so the copy of one
    parameter's product overlaps the backward of the next. Each add is the same fp32 add on either side, so the
    sums are equal wherever they live."""

    def __init__(self, params: dict[str, torch.Tensor], device: str | torch.device | None) -> None:
        self.acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=device or p.device) for n, p in params.items()}
        self.slots: list[torch.Tensor] = []
        self.pending: list[tuple[str, torch.Tensor, Any]] = []  # (name, staged product, copy-done event), oldest first

    def add(self, name: str, prod: torch.Tensor) -> None:
        acc = self.acc[name]
        if prod.device == acc.device:
            acc.add_(prod)
            return
        if prod.device.type != "cuda" or acc.device.type != "cpu":
            acc.add_(prod.to(acc.device))
            return
        if not self.slots:
            size = max(a.numel() for a in self.acc.values())
            self.slots = [torch.empty(size, dtype=torch.float32, pin_memory=True) for _ in range(2)]
        if len(self.pending) == len(self.slots):
            self._drain()
        busy = {id(buf) for _, buf, _ in self.pending}
        buf = next(s for s in self.slots if id(s) not in busy)
        staged = buf[: prod.numel()]
        staged.copy_(prod.flatten(), non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(prod.device))
        self.pending.append((name, buf, done))

    def _drain(self) -> None:
        name, buf, done = self.pending.pop(0)
        done.synchronize()
        acc = self.acc[name]
        acc.add_(buf[: acc.numel()].view(acc.shape))

    def flush(self) -> dict[str, torch.Tensor]:
        while self.pending:
            self._drain()
        return self.acc


def sensitivity(
    model: nn.Module,
    data: dict[str, torch.Tensor],
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] = seed_loss,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """S = Σ_examples |θ · ∂L/∂θ| (fp32) for every parameter that requires grad, one example per backward.

    ``data``: row-aligned tensors, one example per row. Each parameter's |θ·g| (in fp32, on the parameter's
    device) is added to its accumulator (on ``device``, default the parameter's; see :class:`_Sums`) by a
    post-accumulate-grad hook and its gradient freed at once, so no full gradient copy ever exists. Tied
    parameters appear once, under their first name.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = _Sums(params, device)

    def hook(name: str) -> Callable[[torch.Tensor], None]:
        def add(p: torch.Tensor) -> None:
            sums.add(name, (p.detach().float() * p.grad.float()).abs_())
            p.grad = None

        return add

    for p in params.values():
        p.grad = None
    handles = [p.register_post_accumulate_grad_hook(hook(n)) for n, p in params.items()]
    dev = next(model.parameters()).device
    try:
        for i in tqdm(range(len(next(iter(data.values())))), desc="seeking sensitivity"):
            loss = loss_fn(model, {k: v[i : i + 1].to(dev) for k, v in data.items()})
            if not torch.isfinite(loss):
                raise FloatingPointError(f"seeking sensitivity: non-finite loss on example {i}")
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    return sums.flush()


def layer_scores(sens: dict[str, torch.Tensor], n_layers: int) -> torch.Tensor:
    """Per decoder layer (0-based), the summed sensitivity of all its parameters, as float64 [n_layers]."""
    scores = torch.zeros(n_layers, dtype=torch.float64)
    for name, s in sens.items():
        m = LAYER.search(name)
        if m is not None:
            if int(m.group(1)) >= n_layers:
                raise ValueError(f"layer_scores: {name} is beyond n_layers={n_layers}")
            scores[int(m.group(1))] += s.double().sum().item()
    return scores


def select_layers(scores: torch.Tensor, k: int) -> list[int]:
    """The k highest-scoring layers (ties: lower index first), in their original order (0-based)."""
    if k < 1:
        raise ValueError(f"select_layers: k must be >= 1, got {k}")
    if k > len(scores):
        raise ValueError(f"seeking: the teacher has fewer layers ({len(scores)}) than the student ({k}); "
                         "each student layer needs its own teacher layer")
    ranked = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(ranked[:k])


def best_subblock(S: torch.Tensor, h: int, w: int) -> tuple[int, int]:
    """Top-left (row, col) of the contiguous h×w block of ``S`` with the largest sum; the first maximum in
    row-major order wins. A zero-padded summed-area table in float64 gives every block's sum at once."""
    n, m = S.shape
    if not (1 <= h <= n and 1 <= w <= m):
        raise ValueError(f"best_subblock: a {h}x{w} block does not fit in a {n}x{m} matrix")
    P = torch.zeros(n + 1, m + 1, dtype=torch.float64, device=S.device)
    P[1:, 1:] = S.double().cumsum(0).cumsum(1)
    W = P[h:, w:] - P[:-h, w:] - P[h:, :-w] + P[:-h, :-w]
    row, col = divmod(int(W.argmax()), W.shape[1])
    return row, col


def lora_factors(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation M ≈ B @ A by thin SVD: A = Vh_r [r, in], B = U_r diag(S_r) [out, r] (fp32)."""
    if not 1 <= r <= min(M.shape):
        raise ValueError(f"lora_factors: rank {r} impossible for a {tuple(M.shape)} matrix")
    U, S, Vh = torch.linalg.svd(M.float(), full_matrices=False)
    return Vh[:r].contiguous(), (U[:, :r] * S[:r]).contiguous()


def is_target(name: str, targets: list[str]) -> bool:
    """peft's target_modules rule for plain names: the module name is a target or ends with '.' + target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def paired_modules(
    teacher: nn.Module, student: nn.Module, selected: list[int], targets: list[str]
) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, student module, teacher module) per targeted student module; student layer j reads teacher layer
    ``selected[j]`` (0-based), modules outside the layers (embed_tokens, lm_head) read the same-named one."""
    if len(selected) != len(decoder_layers(student)):
        raise ValueError(f"seeking: {len(selected)} selected teacher layers for "
                         f"{len(decoder_layers(student))} student layers")
    t_modules = dict(teacher.named_modules())
    pairs = []
    for name, module in student.named_modules():
        if not is_target(name, targets) or not hasattr(module, "weight"):
            continue
        m = LAYER.search(name)
        t_name = name if m is None else f"{name[:m.start(1)]}{selected[int(m.group(1))]}{name[m.end(1):]}"
        if t_name not in t_modules:
            raise ValueError(f"seeking: student module {name} has no teacher counterpart {t_name}")
        t_shape, s_shape = tuple(t_modules[t_name].weight.shape), tuple(module.weight.shape)
        if t_shape[0] < s_shape[0] or t_shape[1] < s_shape[1]:
            raise ValueError(f"seeking: teacher {t_name} {t_shape} is smaller than student {name} {s_shape}; "
                             "a sub-matrix can only reduce dimensions")
        pairs.append((name, module, t_modules[t_name]))
    if not pairs:
        raise ValueError(f"seeking: no student module matches lora_targets {targets}")
    return pairs


def extract_factors(
    teacher: nn.Module, student: nn.Module, sens: dict[str, torch.Tensor], selected: list[int],
    targets: list[str], r: int,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per targeted student module: the LoRA (A, B) of its paired teacher matrix's best student-shaped block,
    in peft's layout (Linear: A [r, in], B [out, r]; Embedding: A [r, V], B [d, r], delta = (B @ A).T)."""
    sens_of = {id(p): sens[n] for n, p in teacher.named_parameters() if n in sens}
    factors = {}
    for name, module, t_module in paired_modules(teacher, student, selected, targets):
        h, w = module.weight.shape
        i, j = best_subblock(sens_of[id(t_module.weight)], h, w)
        block = t_module.weight.detach()[i : i + h, j : j + w]
        A, B = lora_factors(block.T if isinstance(module, nn.Embedding) else block, r)
        factors[name] = (A.cpu(), B.cpu())
    return factors


def inject(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], cfg: SeekingConfig) -> nn.Module:
    """Wrap ``model`` with LoRA on ``cfg.lora_targets``, start every adapter at its extracted (A, B) and subtract
    its delta from the base weight, so the wrapped model computes the same function as ``model``."""
    from peft.tuners.lora import Embedding, LoraLayer

    untie_targeted_embeddings(model, cfg.lora_targets)
    model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    wrapped = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    if set(wrapped) != set(factors):
        raise ValueError(f"seeking: LoRA modules and extracted factors differ: {sorted(set(wrapped) ^ set(factors))}")
    with torch.no_grad():
        for name, layer in wrapped.items():
            A, B = factors[name]
            (adapter,) = layer.active_adapters
            if isinstance(layer, Embedding):
                layer.lora_embedding_A[adapter].copy_(A)
                layer.lora_embedding_B[adapter].copy_(B)
            else:
                layer.lora_A[adapter].weight.copy_(A)
                layer.lora_B[adapter].weight.copy_(B)
            base = layer.get_base_layer().weight
            base.copy_(base.float() - layer.get_delta_weight(adapter).float())
    return model


@register_method("seeking")
class Seeking(Method):
    config_cls = SeekingConfig

    @classmethod
    def preparation_settings(cls, cfg: SeekingConfig) -> dict[str, Any]:
        return {"seed_split": cfg.seed_split, "lora_r": cfg.lora_r, "lora_targets": list(cfg.lora_targets)}

    def prepare(self, ctx: TransferContext, cfg: SeekingConfig) -> dict[str, Any]:
        """Teacher sensitivity on the seed split, layer selection and factor extraction, the same for every seed
        (the teacher is freed on return): {"scores", "selected", "n_seed", "factors"}."""
        student = model_skeleton(ctx.student)  # its shapes only
        teacher, t_tok = load_model(ctx.teacher, device=ctx.device)  # its own dtype; sums and SVD in fp32
        n_s = len(decoder_layers(student))
        # fail before the sensitivity pass: too shallow (select_layers) or too narrow (paired_modules)
        paired_modules(teacher, student, select_layers(torch.zeros(len(decoder_layers(teacher))), n_s),
                       cfg.lora_targets)
        teacher.requires_grad_(True)
        seed = self.split(ctx, t_tok, cfg.seed_split)
        sens = sensitivity(teacher, seed, device=cfg.sensitivity_device)
        scores = layer_scores(sens, len(decoder_layers(teacher)))
        selected = select_layers(scores, n_s)
        factors = extract_factors(teacher, student, sens, selected, cfg.lora_targets, cfg.lora_r)
        return {"scores": scores.tolist(), "selected": selected, "n_seed": len(seed["input_ids"]), "factors": factors}

    def run(self, ctx: TransferContext) -> Path:
        cfg, _, model, tokenizer = self.begin(ctx)
        ext = self.prepared(ctx, cfg)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

        selected = ext["selected"]
        rows = [{"teacher_layer": l + 1, "score": score, "student_layer": selected.index(l) + 1 if l in selected else ""}
                for l, score in enumerate(ext["scores"])]
        write_csv(ctx.out_dir / "layer_sensitivity.csv", rows, ["teacher_layer", "score", "student_layer"])

        model = inject(model, ext["factors"], cfg)

        def loss_fn(rows: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
            return sft_loss(model, b)

        train = self.split(ctx, tokenizer, "train")
        curve = fit(model, train, loss_fn, cfg, ctx.out_dir, ctx.seed, "seeking", fingerprint=ctx.fingerprint())
        stats = {
            "trainable_params": trainable_parameters(model),
            "budget": fit_budget(train, cfg, curve),
            "config": asdict(cfg),
            "teacher_forwards": ext["n_seed"],  # one forward + backward per seed example
            "selected_layers": [l + 1 for l in selected],  # 1-based teacher layers; the j-th feeds student layer j
            "selected_scores": [ext["scores"][l] for l in selected],
        }
        return self.save(ctx, model, tokenizer, stats)
