"""The shallow-to-deep frontier schedule (v2 / ACL abstracts): stage k trains student layer k alone.

Stage k, for each student layer k listed in the pairing (increasing):
1. the frozen prefix output h_{k-1} of *all* training rows is brought up to date ONCE (running only the layers
   between the last stored state and k-1; layers < k are never re-run per step, and nothing runs after the
   last stage or over stages a resumed run reloads);
2. only layer k is trainable (all its weights, or LoRA r=16 on its up/down/v/o projections, merged at the end
   of the stage); per step the layer runs on the stored h_{k-1}, its loss compares it with the aligned teacher
   target of the stage (:func:`stage_span`) from the cache, and, every stage or only at the last one, the frozen suffix
   k+1..L_S + final norm + head runs so the output term (KL to the cached teacher logits) reaches layer k;
3. layer k's weights are checkpointed atomically to ``ckpt/<config hash>/stage_{k}.pt``; a re-run resumes after the last
   complete stage (recomputing the prefix from the embeddings once) and ends bit-identical to an uninterrupted
   run on CPU: all randomness of stage k is seeded by (seed, k).

Budget (:func:`stage_batches`): by default (``budget: kd_steps``) the whole schedule takes KD's optimizer steps,
epochs x ceil(N / batch_size), on KD's batches in KD's order, cut into consecutive runs, one per stage (the first
``steps % stages`` stages take one step more); ``budget: epochs_per_stage`` (the paper's reading, a variant row)
gives every stage ``epochs`` full passes, about L_S times KD's steps.

Choices where the paper is silent (documented in :class:`SemAlignConfig`): the budget, fresh AdamW per stage, layer losses over all real tokens (the teacher saw the same tokens), the output term over answer tokens,
and the teacher target mapped linearly (M x); eq. 1's per-token 1/||h_T|| is immaterial for v1 (cosine) and
ACL (read out through RMSNorm), and would distort v2's centring, so we do not apply it.

The target of stage k (``target``, :func:`stage_span`). Student layer k takes the place of the whole teacher block
t(k-1)+1..t(k) between the teacher layer paired with the previous student layer and its own (t(0) = embeddings):
by default (``block``) its residual contribution Δ_k = h_k - h_{k-1} is matched with the block's contribution
h_{t(k)} - h_{t(k-1)}, so the student layers' contributions sum to the teacher's; ``layer`` (ablation) matches it
with the paired teacher layer's own contribution h_{t(k)} - h_{t(k)-1}, which ignores the rest of the block. At
the output interface both read the state h_{t(k)} (a block ends where its last layer does). t(·) of a weighted
pair is its weighted sum; a student layer the pairing does not list (``last_only``, critical-only pairings) stands
for its depth-ratio layer. A student deeper than its teacher has layers sharing a teacher layer: the block of all
but the first is empty, its target zero (the layer should add nothing the teacher adds).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.masking_utils import create_causal_mask

from semalign.attribution import DEFAULT_METHOD as DEFAULT_ATTRIBUTION
from semalign.attribution import METHODS as ATTRIBUTION_METHODS
from semalign.bases import align
from semalign.losses import LOSSES, Objective, get_loss
from semalign.pairing import STRATEGIES, depth_ratio_layer, validate_pairing
from semalign.suite import timing
from semalign.suite.cache import TeacherCache
from semalign.suite.io import atomic_torch_save, write_csv
from semalign.suite.lora import apply_lora, full_precision
from semalign.suite.models import backbone, decoder_layers, embed_tokens, final_norm, lm_head
from semalign.suite.objectives import shift_mask
from semalign.suite.train import (
    DivergenceGuard,
    batches,
    check_finite,
    checkpoint_dir,
    length_chunks,
    load_checkpoint,
    set_seed,
    trim,
)

CURVE_FIELDS = ["stage", "step", "layer_loss", "kl", "total"]
BUDGETS = ("kd_steps", "epochs_per_stage")


@dataclass
class SemAlignConfig:
    """Every SemAlign hyperparameter, with the paper's value where one is known (v1 App. A.2)."""

    loss: str = "v2"  # v1 | v2 | acl | hidden_mse | kl_only  (v2 = the v2 abstract's objective)
    pairing: str = "attributed"  # semalign.pairing strategy; the workflow builds the pairing file it names
    attribution: str = DEFAULT_ATTRIBUTION  # feeds the attributed pairings (paper: Layer Grad x Act, see attribution)
    interface: str | None = None  # "residual" (h_k - h_{k-1}) | "output" (h_k); None = the loss's default
    target: str = "block"  # residual target: "block" h_{t(k)} - h_{t(k-1)} | "layer" h_{t(k)} - h_{t(k)-1} (ours)
    recompose: str = "semantic"  # "semantic" = fixed VDS map M | "projector" = learned linear map (ablation)
    fold_final_norm: bool = True  # bases of W_head diag(γ), the lens the model reads through (semalign.bases)
    trainable: str = "lora"  # "lora" (paper: r=16 on up/down/v/o) | "full" (all of layer k)
    budget: str = "kd_steps"  # "kd_steps": epochs x ceil(N/batch) steps in all, over the stages | "epochs_per_stage"
    epochs: int = 5  # paper: 5 (HumanEval 3); whole schedule (kd_steps) or per frontier stage (epochs_per_stage)
    lr: float = 3e-4  # paper: 3e-4 (HumanEval 3e-5)
    batch_size: int = 64  # paper: 64; capped at the number of training rows
    micro_batch_size: int = 8  # gradient accumulation: memory only, same result
    weight_decay: float = 0.0  # ours (paper silent)
    lambda_layer: float = 1.0  # ours: v1's sum is unweighted, so 1 / 1
    lambda_kl: float = 1.0
    kl_every_stage: bool = True  # output term at every stage (True) or only at the last stage; kl_only: always
    temperature: float = 1.0  # KL temperature (paper silent)
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["up_proj", "down_proj", "v_proj", "o_proj"])
    prefix_chunk: int = 16  # rows per no-grad prefix forward
    stop_after_stage: int | None = None  # testing: stop (as if killed) after this stage's checkpoint
    divergence_factor: float = 100.0  # a stage stops when its loss or layer-weight norm exceeds this x its start

    def __post_init__(self) -> None:
        checks = {"loss": (self.loss, tuple(LOSSES)),
                  "interface": (self.interface, lambda: (None, *get_loss(self.loss).interfaces)),
                  "recompose": (self.recompose, ("semantic", "projector")),
                  "trainable": (self.trainable, ("lora", "full")),
                  "budget": (self.budget, BUDGETS),
                  "target": (self.target, ("block", "layer")),
                  "pairing": (self.pairing, STRATEGIES),
                  "attribution": (self.attribution, ATTRIBUTION_METHODS)}
        for key, (value, allowed) in checks.items():
            allowed = allowed() if callable(allowed) else allowed  # the interfaces depend on a valid loss
            if value not in allowed:
                raise ValueError(f"semalign.{key} must be one of {allowed}, got {value!r}")

    @property
    def objective(self) -> Objective:
        return get_loss(self.loss)

    @property
    def resolved_interface(self) -> str:
        return self.interface or self.objective.interface

    @property
    def states(self) -> str:
        """The teacher states the target reads (:data:`STATES`): "end" at the output interface, else the target."""
        if self.resolved_interface == "output":
            return "end"
        return "block" if self.target == "block" else "residual"

    def fingerprint(self) -> dict:
        """What a checkpoint must agree on to be resumed (the stopping rules may differ)."""
        return {k: v for k, v in asdict(self).items() if k not in ("stop_after_stage", "divergence_factor")}


def stage_batches(n: int, cfg: SemAlignConfig, n_stages: int, seed: int) -> list[list[torch.Tensor]]:
    """The index batches of each stage, a function of (n, cfg, seed) alone, so a resumed run sees the same ones.

    ``kd_steps``: KD's stream (``batches(n, bs, seed, epoch)`` for epoch 0..epochs-1, as :func:`fit` draws it) cut
    into ``n_stages`` consecutive runs whose lengths differ by at most one, the first ``steps % n_stages`` stages
    taking the extra step: every example is seen ``epochs`` times in all, as in KD. With fewer steps than stages the
    last stages get none (a warning says so). ``epochs_per_stage``: stage i takes epochs i*epochs..(i+1)*epochs-1."""
    bs = min(cfg.batch_size, n)
    if cfg.budget == "epochs_per_stage":
        return [[b for e in range(i * cfg.epochs, (i + 1) * cfg.epochs) for b in batches(n, bs, seed, e)]
                for i in range(n_stages)]
    stream = [b for e in range(cfg.epochs) for b in batches(n, bs, seed, e)]
    base, extra = divmod(len(stream), n_stages)
    if base == 0:
        warnings.warn(f"semalign budget kd_steps: {len(stream)} optimizer steps for {n_stages} stages; the last "
                      f"{n_stages - extra} stages train no step", stacklevel=2)
    bounds = [0]
    for i in range(n_stages):
        bounds.append(bounds[-1] + base + (i < extra))
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


class StageLimitReached(RuntimeError):
    """Raised after ``stop_after_stage``'s checkpoint: a deliberate stop, resumable by re-running."""


def stage_trainable_params(model: torch.nn.Module, cfg: SemAlignConfig) -> int:
    """Parameters trainable in one stage: all of a layer, or LoRA's r (in + out) per targeted projection."""
    layer = decoder_layers(model)[0]
    if cfg.trainable == "full":
        return sum(p.numel() for p in layer.parameters())
    return sum(cfg.lora_r * (mod.in_features + mod.out_features) for name, mod in layer.named_modules()
               if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in cfg.lora_targets)


def run_layers(
    model: torch.nn.Module, h: torch.Tensor, start: int, end: int, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Residual stream after layer ``end`` given the stream ``h`` after layer ``start - 1`` (1-based, inclusive),
    calling the decoder layers exactly as ``LlamaModel.forward`` does (transformers 5.x): positions 0..T-1,
    ``create_causal_mask`` from the padding mask, rotary ``position_embeddings``. start > end returns h."""
    if start > end:
        return h
    inner = backbone(model)
    position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
    mask = create_causal_mask(config=inner.config, inputs_embeds=h, attention_mask=attention_mask, cache=None,
                              position_ids=position_ids)
    position_embeddings = inner.rotary_emb(h, position_ids=position_ids)
    for layer in decoder_layers(model)[start - 1 : end]:
        out = layer(h, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids)
        h = out[0] if isinstance(out, tuple) else out
    return h


@torch.no_grad()
def prefix_forward(
    model: torch.nn.Module, h: torch.Tensor, start: int, end: int, attention_mask: torch.Tensor, chunk: int
) -> torch.Tensor:
    """:func:`run_layers` over all rows, eval mode (no dropout); stored on h's device/dtype.

    Rows are chunked in order of length and each chunk is cut to its longest row: with right padding the real
    tokens never attend to the padding, so this is the same stream for the real tokens at about half the cost
    (mean length is ~half of ``max_len`` on every mini task). Padding positions keep their previous values:
    every loss masks them out."""
    if start > end:
        return h
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = h.clone()
    for rows, T in length_chunks(attention_mask, chunk):
        out[rows, :T] = run_layers(model, h[rows, :T].to(dev), start, end, attention_mask[rows, :T].to(dev)).to(h.device)
    model.train(was_training)
    return out


STATES = ("end", "residual", "block")  # what a stage's target reads: h_{t(k)}, minus h_{t(k)-1}, minus h_{t(k-1)}


def stage_span(pairing: dict, k: int, states: str) -> tuple[list, list | None]:
    """(end, start) teacher terms [[l, w], ...] of stage k's target Σ_end w h_l - Σ_start w h_l (start None: the
    state itself): "end" = h_{t(k)}, "residual" = h_{t(k)} - h_{t(k)-1}, "block" = h_{t(k)} - h_{t(k-1)} with
    t(k-1) the terms of student layer k-1 (its depth-ratio layer if the pairing does not list it; 0 for k = 1)."""
    if states not in STATES:
        raise ValueError(f"states must be one of {STATES}, got {states!r}")
    pair_of = {p["student"]: p["teacher"] for p in pairing["pairs"]}
    end = pair_of[k]
    if states == "end":
        return end, None
    if states == "residual":
        return end, [[l - 1, w] for l, w in end]
    prev = k - 1
    start = pair_of.get(prev, [[depth_ratio_layer(pairing["teacher_layers"], pairing["student_layers"], prev), 1.0]]
                        if prev else [[0, 1.0]])
    depth = [sum(l * w for l, w in terms) for terms in (start, end)]
    if depth[0] > depth[1]:
        raise ValueError(f"stage {k}: block target needs teacher layers in depth order, but student layer {prev} "
                         f"pairs with {start} and layer {k} with {end}")
    return end, start


def teacher_layers_for(pairing: dict, states: str) -> list[int]:
    """Teacher layers (0 = embeddings) a cache must hold for every stage's target (:func:`stage_span`)."""
    spans = [stage_span(pairing, p["student"], states) for p in pairing["pairs"]]
    return sorted({l for end, start in spans for l, _ in end + (start or [])})


def teacher_target(cache: TeacherCache, span: tuple[list, list | None], idx: torch.Tensor, T: int, dev) -> torch.Tensor:
    """The teacher quantity of a :func:`stage_span` for rows ``idx``, [b, T, d_T], differenced in fp32."""
    end, start = span
    x = cache.state(end, idx, T, dev)
    return x if start is None else x - cache.state(start, idx, T, dev)


def _with_output(cfg: SemAlignConfig, last_stage: bool) -> bool:
    """Whether a stage trains the output KL. KL-only has no other term, so it trains it at every stage whatever
    ``kl_every_stage`` says: the ablation then differs from its reference in the layer supervision alone."""
    return cfg.kl_every_stage or last_stage or cfg.objective.output_every_stage


def _read_out(model: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Logits of states ``h`` through the student's final norm and head, in fp32 whatever the model's dtype: the
    losses compare two read-outs (or a read-out with the teacher's fp32 logits), which bf16 logits would round."""
    return torch.nn.functional.linear(final_norm(model)(h.float()), lm_head(model).weight.float())


def train_frontier(
    model: torch.nn.Module,
    cache: TeacherCache,
    pairing: dict,
    cfg: SemAlignConfig,
    out_dir: Path,
    seed: int,
    m: torch.Tensor | None = None,
    fingerprint: dict | None = None,
) -> torch.nn.Module:
    """Run (or resume) all frontier stages on ``model`` in place and return it (LoRA merged).

    ``m``: the aligned map [d_S, d_T] (required for recompose="semantic"). Raises StageLimitReached after
    ``cfg.stop_after_stage``, FloatingPointError on a non-finite loss (the last complete stage's checkpoint
    stays; the failing stage writes nothing), DivergenceError when a stage's loss or layer norm explodes.
    ``fingerprint``: what else the checkpoints depend on (the run's inputs, TransferContext.fingerprint)."""
    out_dir = Path(out_dir)
    layers = decoder_layers(model)
    L_S = len(layers)
    validate_pairing(pairing, L_S=L_S)
    interface = cfg.resolved_interface
    needed = teacher_layers_for(pairing, cfg.states)
    missing = sorted(set(needed) - set(cache.layers)) if cfg.objective.uses_layer_target else []
    if missing:
        raise ValueError(f"teacher cache lacks layers {missing} needed by this pairing; rebuild it with "
                         f"layers={needed} (semalign.frontier.teacher_layers_for)")
    if cfg.recompose == "semantic" and m is None and cfg.objective.uses_layer_target:
        raise ValueError("recompose=semantic needs the aligned map M (semalign.bases.aligned_map)")
    if cfg.trainable == "full":
        model = full_precision(model)  # a whole layer trains: its AdamW steps accumulate in fp32
    dev = next(model.parameters()).device
    head_t = cache.head_weight.to(dev, torch.float32)  # moved once, not per step
    m = m.to(dev) if m is not None else None
    model.requires_grad_(False)
    n = len(cache)
    data = {"input_ids": cache.input_ids, "attention_mask": cache.attention_mask, "loss_mask": cache.loss_mask}
    stages = [p["student"] for p in pairing["pairs"]]
    ckpt = checkpoint_dir(out_dir, {"config": cfg.fingerprint(), "pairing": pairing, "seed": seed, **(fingerprint or {})})

    # Resume: reload every complete stage (contiguous from the first); the first stage left rebuilds the prefix.
    curve: list[dict] = []
    done: list[int] = []
    for k in stages:
        state = load_checkpoint(ckpt / f"stage_{k}.pt", map_location=dev)
        if state is None:
            break
        layers[k - 1].load_state_dict(state["layer"])
        curve += state["curve"]
        done.append(k)
    with torch.no_grad():
        h_prev = torch.cat([embed_tokens(model)(data["input_ids"][i : i + cfg.prefix_chunk].to(dev)).cpu()
                            for i in range(0, n, cfg.prefix_chunk)])
    cur = 0  # h_prev is the residual stream after layer `cur`; each stage brings it up to date lazily

    schedule = stage_batches(n, cfg, len(stages), seed)
    for i, k in enumerate(stages):
        if k in done:
            continue
        set_seed(seed * 1000 + k)  # LoRA init, projector init, dropout: independent of resumption
        with timing.section("prefix refresh"):
            h_prev = prefix_forward(model, h_prev, cur + 1, k - 1, data["attention_mask"], cfg.prefix_chunk)
        cur = k - 1
        peft_model = None
        with timing.section("stage setup"):
            if cfg.trainable == "lora":
                peft_model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                                        layers=[k])
            else:
                layers[k - 1].requires_grad_(True)
        params = [p for p in layers[k - 1].parameters() if p.requires_grad]
        projector = None
        if cfg.recompose == "projector" and cfg.objective.uses_layer_target:
            d_t = cache.head_weight.shape[-1]  # the teacher's width
            projector = torch.nn.Linear(d_t, h_prev.shape[-1], bias=False, device=dev)
            params += list(projector.parameters())
        stage = _Stage(model, cache, head_t, stage_span(pairing, k, cfg.states), k, L_S, m, projector,
                       with_output=_with_output(cfg, k == stages[-1]), cfg=cfg, interface=interface)
        if cfg.objective.calibrated and projector is None:
            stage.calibrate(h_prev, data["attention_mask"])
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        guard = DivergenceGuard(cfg.divergence_factor, params)
        model.train()
        stage_rows: list[dict] = []
        bar = tqdm(schedule[i], desc=f"semalign stage {k}/{L_S} ({len(schedule[i])} steps)", leave=False)
        for step, idx in enumerate(bar):
            with timing.section("optimizer"):
                opt.zero_grad(set_to_none=True)
            logged = {"layer_loss": 0.0, "kl": 0.0, "total": 0.0}
            for micro in idx.split(cfg.micro_batch_size):
                b = {key: v.to(dev) for key, v in trim({key: t[micro] for key, t in data.items()}).items()}
                T = b["input_ids"].shape[1]
                x = h_prev[micro, :T].to(dev)
                with timing.section("layer forward"):
                    h = run_layers(model, x, k, k, b["attention_mask"])
                with timing.section("loss"):  # the targets, suffix and logits inside are timed on their own
                    terms = stage.loss(micro, b, x, h)
                    total = cfg.lambda_layer * terms.layer + cfg.lambda_kl * terms.output
                check_finite(total, f"semalign stage {k} step {step}")
                with timing.section("backward"):
                    (total * len(micro) / len(idx)).backward()
                for key, v in zip(("layer_loss", "kl", "total"), (terms.layer, terms.output, total)):
                    logged[key] += v.item() * len(micro) / len(idx)
            with timing.section("optimizer"):
                opt.step()
            guard.observe(logged["total"], f"semalign stage {k} step {step}")
            stage_rows.append({"stage": k, "step": step, **logged})
            bar.set_postfix(loss=f"{logged['total']:.4f}")
        with timing.section("stage setup"):
            if peft_model is not None:
                model = peft_model.merge_and_unload()
            model.requires_grad_(False)
        curve += stage_rows
        layer_state = {key: v.detach().clone() for key, v in layers[k - 1].state_dict().items()}
        with timing.section("checkpoint"):
            atomic_torch_save({"stage": k, "layer": layer_state, "curve": stage_rows}, ckpt / f"stage_{k}.pt")
        write_csv(out_dir / "loss_curve.csv", curve, CURVE_FIELDS)
        if cfg.stop_after_stage == k and k != stages[-1]:
            raise StageLimitReached(f"stopped after stage {k} (stop_after_stage); re-run to resume from it")
    write_csv(out_dir / "loss_curve.csv", curve, CURVE_FIELDS)
    return model


@dataclass
class _Stage:
    """What one frontier stage's loss needs: the model, the teacher side and the stage's fixed settings."""

    model: torch.nn.Module
    cache: TeacherCache
    head_t: torch.Tensor  # teacher LM head on the training device
    span: tuple[list, list | None]  # the stage's teacher terms (stage_span)
    k: int
    L_S: int
    m: torch.Tensor | None
    projector: torch.nn.Module | None
    with_output: bool
    cfg: SemAlignConfig
    interface: str
    scale: float = 1.0  # a calibrated objective's target scale (Objective.calibrated)

    def target(self, idx: torch.Tensor, T: int) -> torch.Tensor:
        """Aligned teacher quantity [b, T, d_S]: M x (linear, see module doc) or the learned projector."""
        dev = self.head_t.device
        with timing.section("aligned targets"):
            x = teacher_target(self.cache, self.span, idx, T, dev)
            return self.projector(x) if self.projector is not None else align(x, self.m, normalize=False)

    def loss(self, micro: torch.Tensor, b: dict[str, torch.Tensor], x: torch.Tensor, h: torch.Tensor):
        """The variant's two terms for one micro-batch (x = h_{k-1}, h = h_k). The output term reads logits out
        only at scored (answer) positions, as [1, n, V]: same token mean, V-dim work only where the loss looks."""
        model, cfg = self.model, self.cfg
        dev, T = h.device, h.shape[1]
        student_logits = teacher_logits = labels = None
        out_mask = shift_mask(b["loss_mask"]).bool()
        if self.with_output:
            with timing.section("suffix + head"):
                h_final = run_layers(model, h, self.k + 1, self.L_S, b["attention_mask"])
                student_logits = _read_out(model, h_final[out_mask]).unsqueeze(0)
            teacher_logits = self.cache.answer_logits(micro, out_mask, self.head_t).unsqueeze(0)
            labels = torch.nn.functional.pad(b["input_ids"][:, 1:], (0, 1))[out_mask].unsqueeze(0)
        objective = cfg.objective
        student, target = h, h
        if objective.uses_layer_target:
            target = self.scale * self.target(micro, T)
            student = h - x if self.interface == "residual" else h
            if objective.reads_out:
                student, target = _read_out(model, student), _read_out(model, target)
        ones = torch.ones(1, int(out_mask.sum()), device=dev)
        return objective.terms(student.float(), target.float(), b["attention_mask"], student_logits, teacher_logits,
                               labels, ones, cfg.temperature)

    @torch.no_grad()
    def calibrate(self, h_prev: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Calibrated objectives: one scalar per stage matching the mean norm of the aligned targets to that of the
        student's initial layer-k quantity over real tokens, since eq. 2 leaves the target's magnitude arbitrary."""
        chunk = self.cfg.prefix_chunk
        h_k = prefix_forward(self.model, h_prev, self.k, self.k, attention_mask, chunk)
        student = h_k - h_prev if self.interface == "residual" else h_k
        norm_s = norm_t = 0.0
        for i in range(0, len(self.cache), chunk):
            rows = torch.arange(i, min(i + chunk, len(self.cache)))
            real = attention_mask[rows].bool()
            norm_s += student[rows][real].float().norm(dim=-1).sum().item()
            norm_t += self.target(rows, real.shape[1]).cpu()[real].norm(dim=-1).sum().item()
        self.scale = norm_s / max(norm_t, 1e-12)
