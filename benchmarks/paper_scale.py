"""Paper-scale steps on models of the paper's real widths: the shared code of the CPU rehearsal
(``benchmarks/rehearsal.py``) and the GPU check (``benchmarks/gpu_check.py``).

Two Llama models with Llama-2-13B's and Llama-2-7B's widths, heads, intermediate sizes and 32000-token vocabulary
but only a few layers (random weights, built directly in the run dtype), and per method the steps the suite runs
at paper scale, through the methods' own functions (semalign.frontier, baselines.*): one SemAlign frontier stage
(with its aligned map), a KD step, Seeking's sensitivity pass, sub-matrix extraction and injection, and a LaTen
step. Each step reports wall time, peak memory (CUDA allocator peak, or the process's peak RSS on CPU, reset per
step through /proc/self/clear_refs), tokens per second, the FLOPs torch counts in it (torch.utils.flop_counter, on
request: counting costs a second run) and whether every output is finite.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from baselines import laten, seeking
from semalign.bases import aligned_map
from semalign.frontier import SemAlignConfig, train_frontier
from semalign.suite.cache import TeacherCache, teacher_states
from semalign.suite.lora import prepare_trainable
from semalign.suite.models import lm_head
from semalign.suite.objectives import answer_logits, output_kl, sft_loss
from semalign.suite.train import TrainConfig, fit

VOCAB = 32000
SHAPES = {  # Llama-2-13B / 7B (config.json of meta-llama/Llama-2-{13b,7b}-chat-hf)
    "teacher": {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40, "num_key_value_heads": 40},
    "student": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32},
}
TINY = {  # the same code path in a second: narrow models, small vocabulary
    "teacher": {"hidden_size": 80, "intermediate_size": 160, "num_attention_heads": 5, "num_key_value_heads": 5},
    "student": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4},
}
TINY_VOCAB = 512
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # bf16 dense, SXM (NVIDIA datasheets); PCIe H100: 756


@dataclass
class Step:
    """One timed step."""

    method: str
    phase: str
    wall_s: float
    peak_gb: float
    tokens: int
    finite: bool
    tflop: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def build(role: str, layers: int, tiny: bool, dtype: torch.dtype, device: str, seed: int) -> LlamaForCausalLM:
    """A random Llama of ``role``'s real shape (or the tiny one) with ``layers`` decoder layers, made in ``dtype``
    on ``device`` (no fp32 copy of a large model ever exists)."""
    config = LlamaConfig(**(TINY if tiny else SHAPES)[role], num_hidden_layers=layers,
                         vocab_size=TINY_VOCAB if tiny else VOCAB, tie_word_embeddings=False,
                         max_position_embeddings=4096, pad_token_id=0)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def batch(n: int, T: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """n random rows of T tokens, all real, the second half scored (the answer)."""
    g = torch.Generator().manual_seed(seed)
    loss_mask = torch.zeros(n, T, dtype=torch.long)
    loss_mask[:, T // 2 :] = 1
    return {"input_ids": torch.randint(3, vocab, (n, T), generator=g),
            "attention_mask": torch.ones(n, T, dtype=torch.long), "loss_mask": loss_mask}


class Bench:
    """Times steps on one device and collects them; ``count_flops`` runs each step once more under torch's
    FLOP counter first (that run also warms the kernels up)."""

    def __init__(self, device: str, count_flops: bool = False) -> None:
        self.device = device
        self.count_flops = count_flops
        self.steps: list[Step] = []

    def _reset_peak(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS

    def _peak_gb(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 1e9
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) * 1024 / 1e9

    def run(self, method: str, phase: str, tokens: int, fn: Callable[[], object], count: bool = True) -> object:
        """Run ``fn`` (timed), record its step and return its output; every tensor in the output must be finite.
        ``count=False``: a step that must run once (it changes its input) or whose work the counter cannot see."""
        tflop = None
        if self.count_flops and count:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                fn()
            tflop = counter.get_total_flops() / 1e12
        self._reset_peak()
        start = time.perf_counter()
        out = fn()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        step = Step(method, phase, wall, self._peak_gb(), tokens, all_finite(out), tflop)
        self.steps.append(step)
        print(f"{method:9s} {phase:12s} {wall:8.2f} s  peak {step.peak_gb:6.2f} GB  finite {step.finite}", flush=True)
        return out


def all_finite(out: object) -> bool:
    """Every tensor (or float) inside ``out`` (nested dicts, lists, tuples, modules' parameters) is finite."""
    if isinstance(out, torch.nn.Module):
        return all(bool(torch.isfinite(p).all()) for p in out.parameters())
    if isinstance(out, torch.Tensor):
        return bool(torch.isfinite(out.float()).all()) if out.is_floating_point() else True
    if isinstance(out, float):
        return math.isfinite(out)
    if isinstance(out, dict):
        return all(all_finite(v) for v in out.values())
    if isinstance(out, list | tuple):
        return all(all_finite(v) for v in out)
    return True


def loss_of(model: torch.nn.Module, data: dict[str, torch.Tensor], dev: str) -> float:
    with torch.no_grad():
        return sft_loss(model, {k: v.to(dev) for k, v in data.items()}).item()


def run_all(layers: int, tiny: bool, n: int, T: int, device: str, dtype: torch.dtype, count_flops: bool,
            methods: tuple[str, ...] = ("semalign", "kd", "seeking", "laten"), map_rows: int | None = None) -> Bench:
    """Build the pair, then run each method's steps on ``n`` rows of ``T`` tokens; a fresh student per method.
    ``map_rows``: compute the aligned map from the heads' first rows only (its float64 SVDs of two 32000-row heads
    take minutes on a few CPU cores; M has the same shape either way)."""
    bench = Bench(device, count_flops)
    vocab = TINY_VOCAB if tiny else VOCAB
    data = batch(n, T, vocab, seed=0)
    tokens = n * T
    teacher = bench.run("build", "teacher", 0, lambda: build("teacher", layers, tiny, dtype, device, seed=1),
                        count=False)
    teacher.requires_grad_(False)
    cache = bench.run("cache", "teacher fwd", tokens, lambda: TeacherCache(**teacher_states(teacher, data, list(range(layers + 1)), len(data["input_ids"]))))
    work = Path(tempfile.mkdtemp(prefix="paper_scale_"))

    def fresh() -> Path:  # training resumes from a checkpoint it finds: every (counted) run gets its own dir
        return Path(tempfile.mkdtemp(dir=work))

    def student() -> LlamaForCausalLM:
        return build("student", layers, tiny, dtype, device, seed=2)

    if "semalign" in methods:
        model = student()
        rows = slice(0, map_rows)  # None: the whole vocabulary, as the aligned_map rule does
        m = bench.run("semalign", "aligned map" if map_rows is None else f"aligned map ({map_rows} rows)", 0,
                      lambda: aligned_map(lm_head(model).weight.detach()[rows], cache.head_weight[rows].to(device)),
                      count=False)
        pairing = {"strategy": "depth_ratio", "teacher_layers": layers, "student_layers": layers,
                   "pairs": [{"student": 1, "teacher": [[1, 1.0]]}]}  # one stage, output KL through the rest
        cfg = SemAlignConfig(epochs=1, batch_size=n, micro_batch_size=n)
        bench.run("semalign", "stage 1", tokens,
                  lambda: train_frontier(model, cache, pairing, cfg, fresh(), seed=0, m=m))
        del model, m
    if "kd" in methods:
        model = prepare_trainable(student(), TrainConfig(trainable="lora"))
        head_t = cache.head_weight.to(device)

        def kd_loss(rows: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:  # baselines.kd's loss
            logits, labels, mask = answer_logits(model, b)
            return output_kl(logits, cache.answer_logits(rows, mask, head_t), torch.ones(len(labels), device=device))

        cfg = TrainConfig(trainable="lora", epochs=1, batch_size=n, micro_batch_size=n)
        bench.run("kd", "step", tokens, lambda: fit(model, cache.tokens(), kd_loss, cfg, fresh(), 0, "kd"))
        del model, head_t
    if "seeking" in methods:
        model = student()
        cfg = seeking.SeekingConfig(epochs=1, batch_size=n, micro_batch_size=n)
        teacher.requires_grad_(True)
        sens = bench.run("seeking", "sensitivity", tokens, lambda: seeking.sensitivity(
            teacher, data, device=cfg.sensitivity_device))
        teacher.requires_grad_(False)
        selected = seeking.select_layers(seeking.layer_scores(sens, layers), layers)
        factors = bench.run("seeking", "submatrix", 0, lambda: seeking.extract_factors(
            teacher, model, sens, selected, cfg.lora_targets, cfg.lora_r), count=False)
        del sens
        before = loss_of(model, data, device)
        model = bench.run("seeking", "injection", 0, lambda: seeking.inject(model, factors, cfg), count=False)
        after = loss_of(model, data, device)  # injection keeps the student's function: same loss
        bench.steps[-1].finite &= math.isfinite(after) and abs(after - before) <= 0.05 * abs(before)
        del model, factors
    if "laten" in methods:
        model = student()
        model.requires_grad_(False)
        cfg = laten.LaTenConfig(samples_per_step=n)
        counts = laten.transfer_counts(teacher, model, cfg.transfer_rate, cfg.modules)
        translator = laten.KnowledgeTranslator(cfg.modules, teacher.config.hidden_size, model.config.hidden_size,
                                               cfg.init_std).to(device)
        opt = torch.optim.AdamW(translator.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        ids, target = data["input_ids"][:1, :-1], int(data["input_ids"][0, -1])

        def laten_step() -> list[float]:  # one optimizer step of LaTen.run: locate, translate, inject, backward
            opt.zero_grad(set_to_none=True)
            where_t = laten.locate(teacher, ids, target, layers, counts)
            where_s = laten.locate(model, ids, target, layers, counts)
            translated = translator({k: laten.extract_vectors(teacher, where_t, k).to(device) for k in cfg.modules})
            deltas = laten.build_deltas(model, where_s, translated)
            mse = sum(t.pow(2).mean() for t in translated.values())
            losses = []
            with laten.applied(model, deltas):
                for i in range(n):
                    loss = sft_loss(model, {k: v[i : i + 1].to(device) for k, v in data.items()}) + cfg.mse_weight * mse
                    loss.backward(retain_graph=True)
                    losses.append(loss.item())
            opt.step()
            return losses

        bench.run("laten", "step", tokens, laten_step)
        del model, translator, opt
    shutil.rmtree(work, ignore_errors=True)
    return bench


def mfu(step: Step, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: counted FLOPs per second over the card's bf16 dense peak."""
    if step.tflop is None or not peak_tflops or not step.wall_s:
        return None
    return step.tflop / step.wall_s / peak_tflops


def card_peak(device: str) -> tuple[str, float | None]:
    """(device name, its bf16 dense peak TFLOP/s when known)."""
    if not device.startswith("cuda"):
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def write_json(bench: Bench, path: Path, meta: dict) -> dict:
    name, peak = card_peak(bench.device)
    rows = [{**asdict(s), "tokens_per_s": s.tokens_per_s, "mfu": mfu(s, peak)} for s in bench.steps]
    result = {"device": name, "peak_tflops": peak, **meta, "steps": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def table(bench: Bench) -> str:
    """The steps as a markdown table (the README's rehearsal figures)."""
    lines = ["| method | phase | wall (s) | peak memory (GB) | tokens/s | finite |", "|---|---|---|---|---|---|"]
    lines += [f"| {s.method} | {s.phase} | {s.wall_s:.1f} | {s.peak_gb:.1f} | "
              f"{s.tokens_per_s:.0f} | {'yes' if s.finite else 'NO'} |" for s in bench.steps]
    return "\n".join(lines)
