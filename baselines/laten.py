"""LaTen (Tan et al., ACL 2025, "Neural Incompatibility"): the paper's PrePKT baseline. A hypernetwork (the
"knowledge translator") maps the teacher's most task-relevant neuron weight vectors into the student's most
task-relevant neuron slots; the translated vectors are added to the student's weights, with no further training.

Per extract example (one optimizer step each): locate layers and neurons in teacher and student on the example's
last answer token with a logit lens, translate the teacher's selected vectors (rows of up/v_proj, columns of
down/o_proj), add them to the student's selected slots as a delta, and train the translator on the student's LM
loss with the delta applied (+ an MSE pull of the translated vectors towards 0) over the example and 15 align
examples. Inference locates once more on one train example and adds the translated delta to the student.
Locating the extract examples does not depend on the seed (the student is untouched between steps): the workflow
does it once per (pair, task) (:meth:`LaTen.prepare`, rule prepare_transfer) for every seed's transfer.

Where this differs from the upstream code (Trae1ounG/Neural_Incompatibility), on purpose:
- The saved model contains the delta (``weight += delta`` before saving); upstream saved the unmodified student.
- The logit lens is the model's real final norm + LM head; upstream divides by sqrt(std) of the last layer's
  output, which only changes the softmax temperature but changes the neuron ranking.
- An attention neuron's value is the full head output Σ_k attn_w·V (the o_proj input), not only the last key's
  term: then the neurons' contributions sum exactly to the attention block's output, the same quantity the layer
  score measures, and no eager attention weights are needed. Scores are not rounded to 4 decimals.
- GQA: a v_proj row (KV head g, dim j) feeds o_proj column h·hd+j of every query head h of group g; its score is
  the gain of that summed contribution (it equals the o-column score without GQA).
- Precision: whatever the models' dtype, the captured activations, the neuron directions (activation × weight
  column), the logit lens and the log-prob gains are computed in fp32, and the translated delta is added to the
  weights in fp32 and rounded once (:func:`commit_deltas`). In bf16 the gains (differences of log-probs ~1e-3)
  are below the lens's rounding: bf16 scoring agreed with fp32 on about half of the top-10% neurons and scored
  12-22% of neurons exactly 0, and a bf16 add dropped 32-68% of the delta's small entries.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from semalign.suite.chat import render_chat
from semalign.suite.io import atomic_torch_save, write_csv
from semalign.suite.models import decoder_layers, final_norm, lm_head, load_model, model_device
from semalign.suite.objectives import sft_loss
from semalign.suite.registry import Method, TransferContext, register_method
from semalign.suite.train import DivergenceGuard, check_finite, spent, trim

MODULES = ("up_proj", "down_proj", "v_proj", "o_proj")
FAMILY = {"up_proj": "ffn", "down_proj": "ffn", "v_proj": "attn", "o_proj": "attn"}  # layers ranked per family
SCORE = {"up_proj": "ffn", "down_proj": "ffn", "v_proj": "v", "o_proj": "o"}  # up row i and down column i: one neuron
PARENT = {"up_proj": "mlp", "down_proj": "mlp", "v_proj": "self_attn", "o_proj": "self_attn"}
ROWS = {"up_proj", "v_proj"}  # a neuron is a weight row here, a column in down/o_proj
ANSWER_TAIL = '. ")\n,]'  # stripped from the answer so the target is its last content token (upstream)
LOGIT_BUDGET = 2**24  # logits computed at once in neuron scoring (64 MiB fp32), whatever the vocabulary


@dataclass
class LaTenConfig:
    """Upstream train_LaTen.py defaults (lr = OneCycle's max lr)."""

    lr: float = 3e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    transfer_rate: float = 0.1  # fraction of the student's neurons per layer and module that receive a vector
    samples_per_step: int = 16  # the extract example + samples_per_step - 1 align examples per optimizer step
    mse_weight: float = 1000.0
    init_std: float = 1e-5
    modules: tuple[str, ...] = MODULES
    pct_start: float = 0.1
    # optimizer steps = the first `steps` extract examples; None = all of them (upstream). SemAlign v1 Table 4
    # ran the LaTen protocol with 2/4/3/8 steps (MMLU/GSM8K/HumanEval/MBPP)
    steps: int | None = None
    # a step whose total loss exceeds this multiple of the first step's stops the run (semalign.suite.train)
    divergence_factor: float = 100.0

    def __post_init__(self) -> None:
        self.betas, self.modules = tuple(self.betas), tuple(self.modules)
        if self.lr <= 0 or self.weight_decay < 0 or self.mse_weight < 0 or self.init_std <= 0:
            raise ValueError("LaTenConfig: lr and init_std must be > 0, weight_decay and mse_weight >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"LaTenConfig.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0.0 < self.transfer_rate <= 1.0 or not 0.0 < self.pct_start < 1.0:
            raise ValueError("LaTenConfig: transfer_rate must be in (0, 1] and pct_start in (0, 1)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"LaTenConfig.steps must be >= 1 or null, got {self.steps}")
        if self.samples_per_step < 1:
            raise ValueError(f"LaTenConfig.samples_per_step must be >= 1, got {self.samples_per_step}")
        if not self.modules or len(set(self.modules)) != len(self.modules) or not set(self.modules) <= set(MODULES):
            raise ValueError(f"LaTenConfig.modules must be distinct names from {MODULES}, got {self.modules}")


# ------------------------------------------------------------------------------------------------- attribution
def attribution_input(tokenizer: Any, record: dict, max_len: int) -> tuple[torch.Tensor, int]:
    """(input_ids [1, T], target): the chat-rendered prompt + answer (trailing punctuation stripped) without its
    last token, which is the target. Rendered like the training data, so both see the same format; only the last
    ``max_len`` input tokens are kept (the prediction position must stay the last)."""
    prompt, _ = render_chat(tokenizer, record["messages"])
    answer = record["messages"][-1]["content"].rstrip(ANSWER_TAIL)
    if not answer:
        raise ValueError(f"record {record.get('id')}: the answer is empty after stripping {ANSWER_TAIL!r}")
    ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"][-(max_len + 1):]
    return torch.tensor([ids[:-1]]), ids[-1]


@dataclass
class Capture:
    """One forward's internals at the last position, per layer (0-based)."""

    x: torch.Tensor  # [L, d] layer input (residual stream)
    attn: torch.Tensor  # [L, d] attention block output
    o_in: torch.Tensor  # [L, n_heads·hd] o_proj input: per head Σ_k attn_w·V
    c: torch.Tensor  # [L, ffn] FFN coefficients act(gate(x))·up(x) (down_proj input)
    mlp: torch.Tensor  # [L, d] FFN block output

    @property
    def mid(self) -> torch.Tensor:
        """Residual stream between attention and FFN."""
        return self.x + self.attn


@torch.no_grad()
def capture(model: nn.Module, input_ids: torch.Tensor) -> Capture:
    """One forward pass of the decoder stack with hooks keeping only the last position."""
    store: dict[str, list[torch.Tensor]] = {k: [] for k in ("x", "attn", "o_in", "c", "mlp")}
    handles = []
    for layer in decoder_layers(model):
        handles += [
            layer.register_forward_pre_hook(
                lambda _m, a, kw: store["x"].append((a[0] if a else kw["hidden_states"])[0, -1]), with_kwargs=True),
            layer.self_attn.register_forward_hook(lambda _m, _a, out: store["attn"].append(out[0][0, -1])),
            layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: store["o_in"].append(a[0][0, -1])),
            layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: store["c"].append(a[0][0, -1])),
            layer.mlp.register_forward_hook(lambda _m, _a, out: store["mlp"].append(out[0, -1])),
        ]
    try:
        model.model(input_ids=input_ids.to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return Capture(**{k: torch.stack(v).float() for k, v in store.items()})  # fp32: scores are differences


def target_logprob(model: nn.Module, v: torch.Tensor, target: int) -> torch.Tensor:
    """Logit lens: log p(target | v) = log softmax(lm_head(final_norm(v)))[target], for v [N, d] -> [N], in fp32
    whatever the model's dtype (the norm's bf16 weight times an fp32 input is fp32; the head is upcast)."""
    head = lm_head(model).weight
    return torch.log_softmax(F.linear(final_norm(model)(v.float()), head.float()), dim=-1)[:, target]


def _gain(model: nn.Module, base: torch.Tensor, directions: torch.Tensor, target: int) -> torch.Tensor:
    """Log-prob increase of the target from adding each row of ``directions`` [n, d] to ``base`` [d], in chunks
    that bound the [chunk, vocab] logits."""
    rows = max(1, LOGIT_BUDGET // lm_head(model).weight.shape[0])
    lp = torch.cat([target_logprob(model, base + chunk, target) for chunk in directions.split(rows)])
    return lp - target_logprob(model, base[None], target)


@torch.no_grad()
def block_scores(model: nn.Module, cap: Capture, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(attn [L], ffn [L]): log-prob gain of each attention / FFN block on the residual stream it writes to."""
    return (target_logprob(model, cap.mid, target) - target_logprob(model, cap.x, target),
            target_logprob(model, cap.mid + cap.mlp, target) - target_logprob(model, cap.mid, target))


@torch.no_grad()
def neuron_scores(model: nn.Module, cap: Capture, target: int, kind: str, layer: int) -> torch.Tensor:
    """Gain of every neuron of one layer, vectorised: ``kind`` "ffn" (c_i·W_down[:, i] on the mid stream), "o"
    (value·W_o[:, h·hd+j] on the layer input) or "v" (a KV row's summed contribution over its query heads)."""
    block = decoder_layers(model)[layer]
    if kind == "ffn":
        return _gain(model, cap.mid[layer], cap.c[layer, :, None] * block.mlp.down_proj.weight.float().T, target)
    attn = block.self_attn
    directions = cap.o_in[layer, :, None] * attn.o_proj.weight.float().T  # [n_heads·hd, d], fp32
    if kind == "v":
        n_kv = attn.v_proj.out_features // attn.head_dim  # query head h reads KV head h // (n_heads / n_kv)
        directions = directions.view(n_kv, -1, attn.head_dim, directions.shape[-1]).sum(1).flatten(0, 1)
    elif kind != "o":
        raise ValueError(f"unknown neuron kind {kind!r}; use 'ffn', 'o' or 'v'")
    return _gain(model, cap.x[layer], directions, target)


@dataclass
class Located:
    """Selected layers (ascending, 0-based) per family and, per module, the neuron indices of each selected layer
    in descending score order ([n_layers, count]): rank r of the teacher goes to rank r of the student."""

    layers: dict[str, torch.Tensor]
    neurons: dict[str, torch.Tensor]


def locate(model: nn.Module, input_ids: torch.Tensor, target: int, n_layers: int, counts: dict[str, int]) -> Located:
    """Top ``n_layers`` layers per family by block score, then the top ``counts[module]`` neurons of each; neuron
    scores are computed for the selected layers only (the expensive part: one vocabulary projection per neuron)."""
    cap = capture(model, input_ids)
    attn, ffn = block_scores(model, cap, target)
    if n_layers > len(attn):
        raise ValueError(f"cannot select {n_layers} layers from a model with {len(attn)}")
    layers = {fam: s.topk(n_layers).indices.sort().values
              for fam, s in (("attn", attn), ("ffn", ffn)) if fam in {FAMILY[m] for m in counts}}
    scores: dict[tuple[str, int], torch.Tensor] = {}
    neurons = {}
    for m, k in counts.items():
        top = []
        for l in layers[FAMILY[m]].tolist():
            if (SCORE[m], l) not in scores:
                scores[SCORE[m], l] = neuron_scores(model, cap, target, SCORE[m], l)
            top.append(scores[SCORE[m], l].topk(k).indices)
        neurons[m] = torch.stack(top)
    return Located(layers, neurons)


def locate_pair(teacher: nn.Module, student: nn.Module, tokenizer: Any, record: dict, max_len: int,
                counts: dict[str, int]) -> tuple[Located, Located]:
    """Where ``record``'s last answer token is decided, in the teacher and in the student (as many layers each as
    the student has)."""
    input_ids, target = attribution_input(tokenizer, record, max_len)
    n_layers = len(decoder_layers(student))
    return locate(teacher, input_ids, target, n_layers, counts), locate(student, input_ids, target, n_layers, counts)


def _module(model: nn.Module, layer: int, name: str) -> nn.Linear:
    return getattr(getattr(decoder_layers(model)[layer], PARENT[name]), name)


def n_neurons(model: nn.Module, name: str) -> int:
    """Neurons per layer of a module: rows of up/v_proj, columns of down/o_proj."""
    return _module(model, 0, name).weight.shape[0 if name in ROWS else 1]


def transfer_counts(teacher: nn.Module, student: nn.Module, rate: float, modules: tuple[str, ...]) -> dict[str, int]:
    """Neurons moved per layer and module: int(rate × the student's count), upstream's FFN_CNT / ATTN_CNT
    generalised to GQA (v_proj has n_kv·hd rows, o_proj n_heads·hd columns)."""
    counts = {m: int(rate * n_neurons(student, m)) for m in modules}
    for m, k in counts.items():
        if k < 1:
            raise ValueError(f"transfer_rate {rate} moves no {m} neuron ({n_neurons(student, m)} per layer)")
        if k > n_neurons(teacher, m):
            raise ValueError(f"{m}: the teacher has {n_neurons(teacher, m)} neurons per layer, fewer than {k}")
    return counts


def extract_vectors(model: nn.Module, located: Located, name: str) -> torch.Tensor:
    """The selected neurons' weight vectors [n_layers, count, d_model] (fp32, detached)."""
    vecs = []
    for j, layer in enumerate(located.layers[FAMILY[name]].tolist()):
        w = _module(model, layer, name).weight.detach()
        idx = located.neurons[name][j].to(w.device)
        vecs.append(w[idx] if name in ROWS else w[:, idx].T)
    return torch.stack(vecs).float()


# ------------------------------------------------------------------------------------------------- translation
class KnowledgeTranslator(nn.Module):
    """One MLP per module type, Linear(d_T->d_T) -> ReLU -> Linear(d_T->d_S), no biases, fp32, shared by all
    layers and neurons of that type; each neuron vector is mapped on its own: [L, n, d_T] -> [L, n, d_S].
    N(0, init_std) weights make the initial output ~0, so training starts from the unmodified student."""

    def __init__(self, modules: tuple[str, ...], d_teacher: int, d_student: int, init_std: float) -> None:
        super().__init__()
        self.mlps = nn.ModuleDict({m: nn.Sequential(nn.Linear(d_teacher, d_teacher, bias=False), nn.ReLU(),
                                                    nn.Linear(d_teacher, d_student, bias=False)) for m in modules})
        for p in self.parameters():
            nn.init.normal_(p, 0.0, init_std)

    def forward(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.mlps[m](v.float()) for m, v in vectors.items()}


def build_deltas(model: nn.Module, located: Located, translated: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{weight name: dense delta of the weight's shape}: the j-th translated layer is written into the j-th
    selected layer's neuron slots (rows of up/v, columns of down/o), zero elsewhere; differentiable in
    ``translated`` (index_copy)."""
    names = {id(mod): name for name, mod in model.named_modules()}
    deltas = {}
    for m, vecs in translated.items():
        layers = located.layers[FAMILY[m]].tolist()
        if len(layers) != vecs.shape[0]:
            raise ValueError(f"{m}: {vecs.shape[0]} translated layers for {len(layers)} selected layers")
        for j, layer in enumerate(layers):
            mod = _module(model, layer, m)
            idx = located.neurons[m][j].to(vecs.device)
            zeros = vecs.new_zeros(mod.weight.shape)
            delta = zeros.index_copy(0, idx, vecs[j]) if m in ROWS else zeros.index_copy(1, idx, vecs[j].T)
            deltas[f"{names[id(mod)]}.weight"] = delta
    return deltas


@contextmanager
def applied(model: nn.Module, deltas: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside: every delta'd Linear computes x·(W + delta)ᵀ, as F.linear(x, delta) added to its output, so the
    gradient reaches the deltas (and what made them) while W stays untouched."""

    def adder(delta: torch.Tensor):  # the delta's product in fp32, one rounding into the output's dtype
        return lambda _m, args, out: (out.float() + F.linear(args[0].float(), delta.float())).to(out.dtype)

    handles = [model.get_submodule(name.removesuffix(".weight")).register_forward_hook(adder(d))
               for name, d in deltas.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def commit_deltas(model: nn.Module, deltas: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Add the deltas to the weights in place (upstream's saved model lacked them): w + delta summed in fp32 and
    rounded once to the weights' dtype, so each new weight is within half an ulp of the exact sum (adding a
    delta cast to bf16 first rounds twice and drops entries below the weight's ulp). Returns what the rounding
    cost: {weight_dtype, delta_nonzero, delta_lost (nonzero entries that left the weight unchanged),
    max_rounding_error (max |new - (old + delta)|)}."""
    nonzero = lost = 0
    worst = 0.0
    dtypes = set()
    for name, d in deltas.items():
        w = model.get_parameter(name)
        exact = w.float() + d.detach().to(w.device, torch.float32)
        new = exact.to(w.dtype)
        moved = d.detach().to(w.device) != 0
        nonzero += int(moved.sum())
        lost += int((moved & (new == w)).sum())
        worst = max(worst, float((new.float() - exact).abs().max()))
        dtypes.add(str(w.dtype).removeprefix("torch."))
        w.copy_(new)
    return {"weight_dtype": ",".join(sorted(dtypes)), "delta_nonzero": nonzero, "delta_lost": lost,
            "max_rounding_error": worst}


# ------------------------------------------------------------------------------------------------------ method
def _row(data: dict[str, torch.Tensor], i: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in trim({k: t[i : i + 1] for k, t in data.items()}).items()}


def _example_backward(student: nn.Module, batch: dict[str, torch.Tensor], mse: torch.Tensor, mse_weight: float,
                      where: str) -> float:
    """CE of one example with the deltas applied + the MSE term, backward (the translator graph is kept for
    the step's other examples); in a function so each example's activations are freed on return."""
    ce = sft_loss(student, batch)
    loss = ce + mse_weight * mse
    check_finite(loss, where)
    loss.backward(retain_graph=True)
    return ce.item()


@register_method("laten")
class LaTen(Method):
    config_cls = LaTenConfig

    @classmethod
    def preparation_settings(cls, cfg: LaTenConfig) -> dict[str, Any]:
        return {"steps": cfg.steps, "transfer_rate": cfg.transfer_rate, "modules": list(cfg.modules)}

    @staticmethod
    def frozen_teacher(ctx: TransferContext, student: nn.Module) -> nn.Module:
        """The teacher, and ``student`` with it, frozen in eval mode: LaTen edits weights, it never trains them."""
        teacher, _ = load_model(ctx.teacher, device=ctx.device)
        for model in (teacher, student):
            model.requires_grad_(False)
            model.eval()
        if len(decoder_layers(teacher)) < len(decoder_layers(student)):
            raise ValueError(f"laten: the teacher has {len(decoder_layers(teacher))} layers, fewer than the "
                             f"student's {len(decoder_layers(student))}; each student layer needs a teacher layer")
        return teacher

    def prepare(self, ctx: TransferContext, cfg: LaTenConfig) -> dict[str, Any]:
        """Where each optimizer step's extract example puts its knowledge, in teacher and student (the untouched
        student: the translated delta is only applied inside a step): the same for every seed, and most of a run's
        time (one vocabulary projection per scored neuron). {"teacher": [...], "student": [...]}, one
        :class:`Located` (as a dict) per step."""
        student, tokenizer = load_model(ctx.student, device=ctx.device, trainable=True)  # as run() has it
        teacher = self.frozen_teacher(ctx, student)
        counts = transfer_counts(teacher, student, cfg.transfer_rate, cfg.modules)
        records = self.records(ctx, "extract")
        located: dict[str, list[dict]] = {"teacher": [], "student": []}
        for record in tqdm(records[: min(cfg.steps or len(records), len(records))], desc="laten locate"):
            for role, where in zip(("teacher", "student"), locate_pair(teacher, student, tokenizer, record,
                                                                         ctx.max_len, counts)):
                located[role].append(asdict(where))
        return located

    def run(self, ctx: TransferContext) -> Path:
        cfg, _, student, tokenizer = self.begin(ctx)
        prep = self.prepared(ctx, cfg)  # before this run's teacher: computed here, it loads and frees its own
        teacher = self.frozen_teacher(ctx, student)
        dev = model_device(student)
        counts = transfer_counts(teacher, student, cfg.transfer_rate, cfg.modules)
        steps_located = [(Located(**t), Located(**s)) for t, s in zip(prep["teacher"], prep["student"])]
        extract, align = self.split(ctx, tokenizer, "extract"), self.split(ctx, tokenizer, "align")
        n_align = len(align["input_ids"])
        if n_align < cfg.samples_per_step - 1:
            raise ValueError(f"laten: samples_per_step={cfg.samples_per_step} needs {cfg.samples_per_step - 1} "
                             f"align examples, the align split has {n_align}")

        translator = KnowledgeTranslator(cfg.modules, teacher.config.hidden_size, student.config.hidden_size,
                                         cfg.init_std).to(dev)
        steps = len(steps_located)
        opt = torch.optim.AdamW(translator.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        # upstream's schedule, including OneCycleLR's default momentum cycling (beta1 between 0.85 and 0.95)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=cfg.pct_start,
                                                    anneal_strategy="cos", final_div_factor=1)

        def translate(where_t: Located, where_s: Located) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
            translated = translator({m: extract_vectors(teacher, where_t, m).to(dev) for m in cfg.modules})
            return translated, build_deltas(student, where_s, translated)

        curve, seen = [], set()  # seen: the align rows the steps drew (the budget's distinct examples)
        # the loss alone: the translator starts at ~0 (init_std), so a healthy run grows its weights by orders of
        # magnitude and their norm relative to the start says nothing
        guard = DivergenceGuard(cfg.divergence_factor, [])
        for idx in tqdm(range(steps), desc="laten align"):
            opt.zero_grad(set_to_none=True)
            translated, deltas = translate(*steps_located[idx])
            mse = sum(t.pow(2).mean() for t in translated.values())
            g = torch.Generator().manual_seed(ctx.seed * 100_003 + idx)
            rows = torch.randperm(n_align, generator=g)[: cfg.samples_per_step - 1].tolist()
            seen.update(rows)
            batches = [_row(align, i, dev) for i in rows] + [_row(extract, idx, dev)]
            with applied(student, deltas):
                ce = [_example_backward(student, b, mse, cfg.mse_weight, f"laten step {idx}") for b in batches]
            opt.step()
            sched.step()
            lm = sum(ce) / len(ce)
            curve.append({"step": idx, "lm_loss": lm, "mse": mse.item(), "total": lm + cfg.mse_weight * mse.item()})
            guard.observe(curve[-1]["total"], f"laten step {idx}")
        write_csv(ctx.out_dir / "loss_curve.csv", curve, ["step", "lm_loss", "mse", "total"])
        atomic_torch_save(translator.state_dict(), ctx.out_dir / "translator.pt")

        train = self.records(ctx, "train")
        pick = int(torch.randint(len(train), (1,), generator=torch.Generator().manual_seed(ctx.seed)))
        where_t, where_s = locate_pair(teacher, student, tokenizer, train[pick], ctx.max_len, counts)
        with torch.no_grad():
            _, deltas = translate(where_t, where_s)
        committed = commit_deltas(student, deltas)
        atomic_torch_save({k: v.detach().to("cpu", torch.float32) for k, v in deltas.items()}, ctx.out_dir / "delta.pt")
        stats = {
            "trainable_params": sum(p.numel() for p in translator.parameters()),
            # extract examples (one per step) + the align rows drawn; each step reads samples_per_step examples
            "budget": spent(steps + len(seen), steps * cfg.samples_per_step, steps),
            "config": asdict(cfg),
            "teacher_forwards": steps + 1,  # attribution forwards: one per extract example + the inference one
            "teacher_layers": {fam: (l + 1).tolist() for fam, l in where_t.layers.items()},  # 1-based, injected
            "transfer_counts": counts,
            "inference_example": train[pick].get("id", pick),
            **committed,
        }
        return self.save(ctx, student, tokenizer, stats)
