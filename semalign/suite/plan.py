"""Memory and compute plan of every job of a profile, predicted before any weight exists.

Shapes come from each model's config built on the meta device (no weights are read or downloaded; hub models
use the config files shipped in ``semalign/suite/model_configs``), the batch and sequence shapes from the profile
(``data.max_len``, each method's ``micro_batch_size``) and each method's trainable set from its config class. What
a job holds at its peak is modelled from what the code does (see each ``_job`` function): weights in the model's
dtype, AdamW moments in the trainable parameters' dtype (torch keeps them in the parameter's dtype; peft LoRA
adapters are fp32 even on a bf16 base), activations saved for backward per token and layer
(:func:`saved_activation_bytes`), and the [tokens, vocab] logits of the loss. Sequences are taken at
``data.max_len``: batches are trimmed to their longest row, so the plan is an upper bound on padded length.

Runtime is FLOPs at an assumed sustained throughput (``plan.peak_tflops`` x ``plan.mfu`` on an accelerator,
``plan.cpu_tflops`` on CPU) plus reading the weights at ``plan.read_gbps``; SLURM jobs get it times
``plan.safety`` (:func:`slurm_resources`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from semalign.suite.cache import FINAL_DTYPE, LAYER_DTYPE
from semalign.suite.evaluation import gen_cap

GB = 1e9
CONFIG_DIR = Path(__file__).with_name("model_configs")
HOST_BASE = 1.5 * GB  # python + torch + transformers + tokenizer, measured ~1.0-1.4 GB RSS on the mini models
DEVICE_BASE = 1.0 * GB  # CUDA context and allocator slack
FULL_TEST = {"mmlu": 14042, "gsm8k": 1319, "humaneval": 164, "mbpp": 500}  # `test: null`: the full test sets
LAYER_BYTES = LAYER_DTYPE.itemsize  # the teacher cache's paired layers (fp32: they are differenced)
FINAL_BYTES = FINAL_DTYPE.itemsize  # its post-norm final state
LOGIT_BUDGET = 2**24  # logits at once in LaTen's neuron scoring (baselines.laten.LOGIT_BUDGET)


# ---------------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: sizes from its config, parameter counts from a meta-device instance."""

    layers: int
    d: int
    ffn: int
    heads: int
    kv_dim: int  # width of k (and v): kv heads x head dim
    q_dim: int  # width of q: heads x head dim
    vocab: int
    tied: bool
    params: int  # every distinct parameter
    layer_params: int  # one decoder layer
    embed_params: int
    dtype_bytes: int

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes


def packaged_config(source: str, gguf_file: str | None = None) -> dict | None:
    """The shipped config of a hub id, or of a GGUF file named after one (``SmolLM2-135M-Instruct.Q4_1.gguf``)."""
    exact = CONFIG_DIR / f"{source.replace('/', '--')}.json"
    if exact.is_file():
        return json.loads(exact.read_text())
    if gguf_file:
        stem = Path(gguf_file).name.split(".")[0]
        for f in sorted(CONFIG_DIR.glob("*.json")):
            if f.stem.split("--")[-1] == stem:
                return json.loads(f.read_text())
    return None


def model_config(spec: dict, prepared_dir: Path | None = None) -> tuple[Any, int]:
    """(transformers config, bytes per weight) of a model spec, without weights: the prepared dir's config.json
    when it exists, else a random spec's LlamaConfig (vocabulary from its tokenizer's model), a shipped config,
    or the source's own config (a local dir or GGUF header; a hub download of config.json only)."""
    from transformers import AutoConfig, LlamaConfig

    from semalign.suite.models import DTYPES, resolve_source

    dtype = spec.get("dtype")
    if prepared_dir is not None and (prepared_dir / "config.json").is_file():
        config = AutoConfig.from_pretrained(prepared_dir)
    elif "random" in spec:
        vocab = model_config(spec["tokenizer"])[0].vocab_size
        config = LlamaConfig(**{"tie_word_embeddings": True, **spec["random"], "vocab_size": vocab})
        dtype = dtype or "float32"
    else:
        found = packaged_config(spec["source"], spec.get("gguf_file"))
        if found is not None:
            config = AutoConfig.for_model(**found)
        else:
            kw = {"gguf_file": spec["gguf_file"]} if spec.get("gguf_file") else {}
            config = AutoConfig.from_pretrained(resolve_source(spec["source"]), **kw)
        if spec.get("vocab_size"):
            config.vocab_size = spec["vocab_size"]
        dtype = dtype or ("float32" if spec.get("gguf_file") else str(getattr(config, "torch_dtype", None)
                                                                        or "float32").removeprefix("torch."))
    return config, DTYPES[dtype or "float32"].itemsize


@lru_cache(maxsize=64)
def _shape(config_json: str, dtype_bytes: int) -> ModelShape:
    from transformers import AutoConfig

    from semalign.suite.models import decoder_layers, embed_tokens, model_skeleton

    config = AutoConfig.for_model(**json.loads(config_json))
    model = model_skeleton(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return ModelShape(
        layers=config.num_hidden_layers, d=config.hidden_size, ffn=config.intermediate_size,
        heads=config.num_attention_heads, kv_dim=kv_heads * head_dim, q_dim=config.num_attention_heads * head_dim,
        vocab=config.vocab_size, tied=model.get_output_embeddings().weight is embed_tokens(model).weight,
        params=sum(p.numel() for p in model.parameters()),
        layer_params=sum(p.numel() for p in decoder_layers(model)[0].parameters()),
        embed_params=embed_tokens(model).weight.numel(), dtype_bytes=dtype_bytes)


def model_shape(spec: dict, prepared_dir: Path | None = None) -> ModelShape:
    """The shape of a spec, once per spec and prepared config (the DAG asks for it for every job)."""
    prepared = prepared_dir / "config.json" if prepared_dir is not None else None
    if prepared is not None and not prepared.is_file():
        prepared = None
    return _spec_shape(json.dumps(spec, sort_keys=True), prepared)


@lru_cache(maxsize=64)
def _spec_shape(spec_json: str, prepared_config: Path | None) -> ModelShape:
    config, dtype_bytes = model_config(json.loads(spec_json), prepared_config.parent if prepared_config else None)
    return shape_of(config, dtype_bytes)


def shape_of(config: Any, dtype_bytes: int) -> ModelShape:
    """The shape of a transformers config with weights of ``dtype_bytes`` each."""
    return _shape(config.to_json_string(use_diff=False), dtype_bytes)


# ----------------------------------------------------------------------------------------------- cost terms
def saved_activation_bytes(m: ModelShape, p: int) -> float:
    """Bytes one decoder layer saves for backward per token, activations in ``p`` bytes (HF Llama, SDPA):
    two RMSNorms (fp32 input + rsqrt + normed output in p, and the p copy the projections read), q/k/v after
    rotary + the attention output, its contiguous copy for o_proj, and the SwiGLU's gate, silu(gate), up and
    product; 4 bytes per head for the attention's logsumexp."""
    norms = 2 * (4 * m.d + 2 * p * m.d) if p < 4 else 2 * 3 * 4 * m.d
    attention = p * (m.q_dim + 2 * m.kv_dim) + 2 * p * m.q_dim + 4 * m.heads
    mlp = 4 * p * m.ffn
    return norms + attention + mlp


def logits_bytes(tokens: int, vocab: int, p: int, distill: bool) -> float:
    """The loss's [tokens, vocab] tensors at their peak: the logits in p, their fp32 copy, log-softmax and its
    gradient; KL also holds the teacher's fp32 logits, its log-softmax and the pointwise product."""
    return tokens * vocab * (p + (24 if distill else 12))


def train_state_bytes(cfg: Any, n: int, p: int) -> float:
    """Trainable parameters' gradient and AdamW's two moments, all in the parameter's dtype (torch AdamW), and the
    parameters themselves when they are adapters beside the model (LoRA) rather than its own weights."""
    return (4 if cfg.trainable == "lora" else 3) * n * p


def lora_params(m: ModelShape, r: int, targets: list[str], layers: int) -> int:
    """LoRA's r (in + out) per targeted projection of ``layers`` decoder layers; embed_tokens / lm_head too."""
    dims = {"q_proj": (m.d, m.q_dim), "k_proj": (m.d, m.kv_dim), "v_proj": (m.d, m.kv_dim),
            "o_proj": (m.q_dim, m.d), "gate_proj": (m.d, m.ffn), "up_proj": (m.d, m.ffn), "down_proj": (m.ffn, m.d)}
    n = layers * sum(r * sum(dims[t]) for t in targets if t in dims)
    return n + sum(r * (m.vocab + m.d) for t in targets if t in ("embed_tokens", "lm_head"))


def trainable(m: ModelShape, cfg: Any, layers: int | None = None) -> tuple[int, int]:
    """(trainable parameters, their bytes each) for a TrainConfig-like ``cfg``: LoRA adapters (fp32) or every
    weight of ``layers`` decoder layers (all of the model when None) in the model's dtype."""
    if cfg.trainable == "lora":
        return lora_params(m, cfg.lora_r, list(cfg.lora_targets), m.layers if layers is None else layers), 4
    return (m.params if layers is None else layers * m.layer_params), m.dtype_bytes


# ---------------------------------------------------------------------------------------------------- plans
@dataclass
class JobPlan:
    """One job's predicted peak memory (accelerator and host), disk written, FLOPs and runtime bound."""

    rule: str
    job: str  # wildcards, as "pair/task/method/seed"
    device_gb: float  # accelerator peak (0 for CPU-only rules; on a CPU profile it is part of host_gb)
    host_gb: float
    disk_gb: float
    tflop: float
    runtime_min: float
    fits: bool
    note: str = ""

    def row(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Setting:
    """The profile-wide facts every job plan reads."""

    accelerator: bool
    memory_gb: float
    tflops: float  # sustained
    read_gbps: float
    max_len: int
    cache_batch: int
    eval_batch: int
    max_gen_toks: int | dict[str, int]  # evaluation.max_gen_toks: one cap, or one per task
    decode_step_ms: float

    @classmethod
    def of(cls, config: dict) -> Setting:
        plan = config.get("plan", {})
        accelerator = config.get("device", "cpu") not in ("cpu",) and config.get("gpus_per_job", 0) > 0
        tflops = plan.get("peak_tflops", 989.0) * plan.get("mfu", 0.3) if accelerator else plan.get("cpu_tflops", 0.2)
        return cls(accelerator, plan.get("memory_gb", 80.0), tflops, plan.get("read_gbps", 1.0),
                   config["data"]["max_len"], config.get("cache", {}).get("batch_size", 8),
                   config.get("evaluation", {}).get("batch_size", 8), config.get("evaluation", {}).get("max_gen_toks", 512),
                   plan.get("decode_step_ms", 30.0))


def _finish(s: Setting, rule: str, job: str, device: float, host: float, disk: float, flop: float,
            read: float, note: str = "", on_device: bool = True, latency_s: float = 0.0) -> JobPlan:
    """Bytes and FLOPs to a JobPlan: on a CPU profile (or a CPU-only rule) the device part lives in host memory.
    ``latency_s``: time no FLOP rate bounds (one generation step after another)."""
    if s.accelerator and on_device:
        device_gb, host_gb = (device + DEVICE_BASE) / GB, (host + HOST_BASE) / GB
    else:
        device_gb, host_gb = 0.0, (device + host + HOST_BASE) / GB
    runtime = (flop / (s.tflops * 1e12) + read / (s.read_gbps * GB) + latency_s) / 60
    fits = device_gb <= s.memory_gb if device_gb else True
    if not fits:
        note = f"needs {device_gb:.1f} GB > {s.memory_gb:.0f} GB: {note}"
    return JobPlan(rule, job, device_gb, host_gb, disk / GB, flop / 1e12, runtime, fits, note)


def forward_flop(m: ModelShape, tokens: float, head: bool = True) -> float:
    """2 FLOPs per weight and token (the embedding lookup is free), attention scores ignored at these lengths."""
    return 2 * tokens * (m.params - m.embed_params - (0 if head or m.tied else m.embed_params)
                         + (m.embed_params if m.tied and head else 0))


def prepare_model_job(s: Setting, name: str, m: ModelShape) -> JobPlan:
    """Load (or build) once in the target dtype and write safetensors: weights in host RAM twice at most (the
    save serialises a copy)."""
    w = m.weight_bytes
    return _finish(s, "prepare_model", name, 0, 2 * w, w, 0, w, "hub download time not included", on_device=False)


def semantic_bases_job(s: Setting, name: str, m: ModelShape, n_records: int) -> JobPlan:
    """Fig. 2 on CPU: the model in fp32-or-own dtype, the pinv of the head in float64 (V x d, thin SVD: U, Vh, the
    bases) and every layer's states of the records."""
    svd = 3 * m.vocab * m.d * 8
    states = n_records * s.max_len * m.d * (m.layers + 1) * 4
    flop = forward_flop(m, n_records * s.max_len) + 4 * m.vocab * m.d**2 + 2 * n_records * s.max_len * m.d * m.vocab
    return _finish(s, "semantic_bases", name, 0, m.weight_bytes + svd + states, 0, flop, m.weight_bytes,
                   on_device=False)


def aligned_map_job(s: Setting, pair: str, t: ModelShape, st: ModelShape) -> JobPlan:
    """On CPU: both models loaded whole (only the heads are used), each head's float64 thin SVD, M [d_S, d_T]."""
    host = t.weight_bytes + st.weight_bytes + 3 * t.vocab * (t.d + st.d) * 8
    flop = 4 * t.vocab * (t.d**2 + st.d**2) + 2 * t.vocab * st.d * t.d
    return _finish(s, "aligned_map", pair, 0, host, st.d * t.d * 4, flop, t.weight_bytes + st.weight_bytes,
                   on_device=False)


def attribution_job(s: Setting, job: str, t: ModelShape, n_extract: int) -> JobPlan:
    """Layer Grad x Act on the teacher (captum): forward with graph over every layer and backward to the layer
    outputs, ``cache.batch_size`` rows at a time; the weights require grad, so every layer saves activations."""
    b = min(s.cache_batch, n_extract)
    tokens = b * s.max_len
    p = t.dtype_bytes
    device = t.weight_bytes + tokens * (t.layers * (saved_activation_bytes(t, p) + t.d * p)
                                        + logits_bytes(1, t.vocab, p, False))
    flop = 3 * forward_flop(t, n_extract * s.max_len)
    note = f"{b} rows x {s.max_len} tokens with graph through {t.layers} layers (cache.batch_size rows at a time)"
    return _finish(s, "attribution", job, device, 0, 0, flop, t.weight_bytes, note)


def cache_layers(t: ModelShape, with_layers: bool) -> int:
    """States the cache stores besides the final one: when a reader pairs layers, every teacher layer (plus the
    embeddings, the residual interface's h_0) as the bound; which ones depends on the pairing, made later."""
    return t.layers + 1 if with_layers else 0


def cache_teacher_job(s: Setting, job: str, t: ModelShape, n_train: int, with_layers: bool) -> JobPlan:
    """One teacher forward per train example. Each batch's hooked states leave the device as soon as the batch is
    done (semalign.suite.cache.build_teacher_cache), so the device holds the weights and one batch; the host holds
    the stored states twice while they are concatenated for the save."""
    states = cache_layers(t, with_layers) + 1
    per_row = s.max_len * t.d * (cache_layers(t, with_layers) * LAYER_BYTES + FINAL_BYTES)
    stored = n_train * per_row
    device = (t.weight_bytes + s.cache_batch * s.max_len * t.d * states * t.dtype_bytes
              + s.cache_batch * s.max_len * (4 * t.d + 2 * t.ffn) * 4)
    host = 2 * stored
    disk = stored + t.vocab * t.d * 4
    note = f"{states} stored states x {n_train} rows x {s.max_len} tokens x {t.d}"
    return _finish(s, "cache_teacher", job, device, host, disk, forward_flop(t, n_train * s.max_len, head=False),
                   t.weight_bytes, note)


def _train_step(st: ModelShape, cfg: Any, T: int, grad_layers: int, distill: bool) -> float:
    """Activations and logits of one micro-batch of ``T`` tokens per row through ``grad_layers`` layers with
    graph (bytes)."""
    tokens = cfg.micro_batch_size * T
    return tokens * (grad_layers * saved_activation_bytes(st, st.dtype_bytes)
                     + st.d * st.dtype_bytes) + logits_bytes(tokens, st.vocab, st.dtype_bytes, distill)


def transfer_job(s: Setting, job: str, method: str, cfg: Any, t: ModelShape, st: ModelShape,
                 sizes: dict[str, int], cache_file_bytes: float) -> JobPlan:
    """A transfer job by method: the student (and what it trains) on the device; the cache mmap'd on the host."""
    n, L, p = sizes["train"], st.layers, st.dtype_bytes
    T = s.max_len
    head_t = t.vocab * t.d * 4  # the teacher head, fp32, on the device
    read = st.weight_bytes
    note = ""
    if method in ("kd", "lora_sft", "layerwise_kd"):
        n_tr, b = trainable(st, cfg)
        device = st.weight_bytes + train_state_bytes(cfg, n_tr, b) + _train_step(st, cfg, T, L, method != "lora_sft")
        if method != "lora_sft":
            device += head_t
            read += cache_file_bytes
        if method == "layerwise_kd":
            proj = L * (st.d * t.d + t.d)  # bound: every student layer paired
            device += 4 * proj * 4 + cfg.micro_batch_size * T * L * t.d * 4 * 2  # fp32 projectors + their targets
        weight_grads = 2 if cfg.trainable == "full" else 0  # activation grads always; weight grads if full
        flop = cfg.epochs * n * T * (2 + 2 + weight_grads) * (st.params - st.embed_params * (not st.tied))
        return _finish(s, "transfer", job, device, 0, st.weight_bytes, flop, read, note)
    if method == "semalign":
        n_tr, b = trainable(st, cfg, layers=1)
        suffix = L - 1 if cfg.kl_every_stage or cfg.loss == "kl_only" else 0
        h_prev = n * T * st.d * p  # the frozen prefix output of every row, on the host, cloned once per stage
        device = (st.weight_bytes + train_state_bytes(cfg, n_tr, b) + head_t + st.d * t.d * 4
                  + _train_step(st, cfg, T, 1 + suffix, True)
                  + cfg.micro_batch_size * T * t.d * 4 * 3)  # fp32 teacher target: two states summed + mapped
        host = 2 * h_prev
        layer_tok = 2 * st.layer_params
        head_tok = 2 * st.vocab * st.d
        per_stage_suffix = sum(L - k for k in range(1, L + 1)) if suffix else 0
        flop = n * T * (L * layer_tok  # the prefix, once per stage, one layer further each time
                        + cfg.epochs * (3 * L * layer_tok + (2 * per_stage_suffix * layer_tok
                                                             + 2 * L * head_tok if suffix else 2 * head_tok)))
        note = f"{L} stages" + (", output KL through the suffix at every stage" if suffix else "")
        return _finish(s, "transfer", job, device, host, st.weight_bytes, flop, read + cache_file_bytes, note)
    if method == "seeking":  # the LoRA SFT from the prepared factors (prepare_job: the sensitivity pass)
        targets = list(cfg.lora_targets)
        n_tr, b = trainable(st, cfg)
        untie = st.embed_params * p if st.tied and {"embed_tokens", "lm_head"} & set(targets) else 0
        device = st.weight_bytes + untie + train_state_bytes(cfg, n_tr, b) + _train_step(st, cfg, T, L, False)
        flop = cfg.epochs * n * T * 4 * (st.params - st.embed_params * (not st.tied))
        return _finish(s, "transfer", job, device, 0, st.weight_bytes, flop, read + n_tr * 4, note)
    if method == "laten":  # the align steps from the prepared locations, then one more locate for inference
        modules = tuple(cfg.modules)
        widths = {"up_proj": st.ffn, "down_proj": st.ffn, "v_proj": st.d, "o_proj": st.d}
        dense = L * sum(st.d * widths[m] for m in modules) * 4  # the fp32 dense deltas, kept in the graph
        translator = len(modules) * (t.d * t.d + t.d * st.d)
        device = (t.weight_bytes + st.weight_bytes + 4 * translator * 4 + 2 * dense
                  + T * (L * saved_activation_bytes(st, p) + logits_bytes(1, st.vocab, p, False)) + LOGIT_BUDGET * 4)
        steps = laten_steps(cfg, sizes)
        flop = laten_locate_flop(t, st, modules, T) + steps * cfg.samples_per_step * 4 * forward_flop(st, T)
        note = f"{steps} steps from the prepared locations; one more locate for inference"
        return _finish(s, "transfer", job, device, 0, st.weight_bytes, flop, read + t.weight_bytes, note)
    # A method without a cost model here (a new baseline): bounded by training the whole student with the teacher
    # resident and run on every training token, so a cluster profile still gets a request it fits in.
    from baselines.kd import KDConfig

    bound = KDConfig(trainable="full", epochs=getattr(cfg, "epochs", 1),
                     micro_batch_size=getattr(cfg, "micro_batch_size", KDConfig.micro_batch_size))
    n_tr, b = trainable(st, bound)
    device = (st.weight_bytes + t.weight_bytes + head_t + train_state_bytes(bound, n_tr, b)
              + _train_step(st, bound, T, L, True))
    flop = bound.epochs * n * T * 6 * (st.params - st.embed_params * (not st.tied)) + forward_flop(t, bound.epochs * n * T)
    note = f"no cost model for {method!r}: bounded by full fine-tuning of the student with the teacher resident"
    return _finish(s, "transfer", job, device, 0, st.weight_bytes, flop, read + t.weight_bytes, note)


def laten_steps(cfg: Any, sizes: dict[str, int]) -> int:
    return min(cfg.steps or sizes["extract"], sizes["extract"])


def laten_locate_flop(t: ModelShape, st: ModelShape, modules: tuple[str, ...], T: int) -> float:
    """One LaTen locate in both models: a forward each, then a logit-lens projection per scored neuron of as many
    layers as the student has."""
    neurons_t = {"up_proj": t.ffn, "down_proj": t.ffn, "v_proj": t.kv_dim, "o_proj": t.q_dim}
    neurons_s = {"up_proj": st.ffn, "down_proj": st.ffn, "v_proj": st.kv_dim, "o_proj": st.q_dim}
    scored = {"up_proj": "ffn", "down_proj": "ffn", "v_proj": "v", "o_proj": "o"}
    kinds = {scored[m]: m for m in modules}.values()
    lens = st.layers * sum(2 * (t.d + 1) * t.vocab * neurons_t[m] for m in kinds) + \
        st.layers * sum(2 * (st.d + 1) * st.vocab * neurons_s[m] for m in kinds)
    return lens + forward_flop(t, T) + forward_flop(st, T)


def prepare_job(s: Setting, job: str, method: str, cfg: Any, t: ModelShape, st: ModelShape,
                sizes: dict[str, int]) -> JobPlan:
    """A prepare_transfer job (a method's seed-independent part, once per pair and task): Seeking's sensitivity
    pass and factor extraction, LaTen's locating of its extract examples."""
    T = s.max_len
    if method == "seeking":
        pt = t.dtype_bytes  # the teacher is loaded in its own dtype for the sensitivity pass
        acc_on_device = cfg.sensitivity_device in (None, "cuda") or str(cfg.sensitivity_device).startswith("cuda")
        device = t.params * pt + (t.params * 4 if acc_on_device else 0) + t.layer_params * 4 * 2 + \
            T * (t.layers * saved_activation_bytes(t, pt) + logits_bytes(1, t.vocab, pt, False))
        host = 0 if acc_on_device else t.params * 4  # the student is a meta-device skeleton: shapes, no weights
        factors = trainable(st, cfg)[0] * 4
        note = f"sensitivity: {t.params / 1e9:.1f}B teacher params in {t.dtype_bytes * 8}-bit + fp32 sums " + \
            ("on the device" if acc_on_device else "on the host")
        return _finish(s, "prepare_transfer", job, device, host, factors, 3 * forward_flop(t, sizes["extract"] * T),
                       t.params * pt, note)
    if method == "laten":
        p = st.dtype_bytes
        device = (t.weight_bytes + st.weight_bytes + T * (st.layers * saved_activation_bytes(st, p)
                                                          + logits_bytes(1, st.vocab, p, False)) + LOGIT_BUDGET * 4)
        steps = laten_steps(cfg, sizes)
        return _finish(s, "prepare_transfer", job, device, 0, 0, steps * laten_locate_flop(t, st, tuple(cfg.modules), T),
                       t.weight_bytes + st.weight_bytes, f"{steps} extract examples located in both models")
    # A new method's preparation: bounded by both models resident and a teacher forward + backward per extract token
    return _finish(s, "prepare_transfer", job, t.weight_bytes + st.weight_bytes, 0, 0,
                   3 * forward_flop(t, sizes["extract"] * T), t.weight_bytes + st.weight_bytes,
                   f"no cost model for {method!r}'s preparation: bounded by both models and a teacher backward")


def evaluate_job(s: Setting, job: str, m: ModelShape, n_test: int, task: str, n_models: int = 1) -> JobPlan:
    """lm-eval with the model on the device: a batch of prompts plus generations in the KV cache (MMLU scores
    log-likelihoods, no generation) and the batch's logits (bounded by every position's: the head is read out from
    the batch's earliest scored position on, :func:`semalign.suite.evaluation.hf_model`). Generation is one step
    after another: each costs at least ``plan.decode_step_ms`` (HF generate's per-token overhead), whatever the FLOPs. A job scoring
    ``n_models`` models (a method's seeds) holds one at a time and takes ``n_models`` times as long."""
    gen = 0 if task == "mmlu" else gen_cap(s.max_gen_toks, task)
    tokens = s.eval_batch * (s.max_len + gen)
    p = m.dtype_bytes
    device = m.weight_bytes + tokens * m.layers * 2 * m.kv_dim * p + s.eval_batch * s.max_len * m.vocab * (p + 4)
    steps = math.ceil(n_test / s.eval_batch) * gen * n_models
    return _finish(s, "evaluate", job, device, 0, 0, forward_flop(m, n_test * (s.max_len + gen)) * n_models,
                   m.weight_bytes * n_models, (f"{steps} generation steps" if gen else "log-likelihoods")
                   + (f", {n_models} models" if n_models > 1 else ""), latency_s=steps * s.decode_step_ms / 1e3)


def slurm_resources(plan: JobPlan, config: dict) -> dict[str, int]:
    """A job's SLURM request from its plan: host memory and runtime times ``plan.safety``, one GPU per job that
    runs on the accelerator (the suite never shards a model across GPUs)."""
    safety = config.get("plan", {}).get("safety", 1.5)
    return {"mem_mb": int(math.ceil(plan.host_gb * safety * 1000 / 1000) * 1000),
            "runtime": max(10, int(math.ceil(plan.runtime_min * safety))),
            "gpu": config.get("gpus_per_job", 0) if plan.device_gb else 0}


def split_sizes(config: dict, task: str) -> dict[str, int]:
    sizes = dict(config["data"]["sizes"][task])
    sizes["test"] = sizes.get("test") or FULL_TEST[task]
    return sizes


def plan_job(config: dict, rule: str, wc: dict[str, str], root: Path | None = None, method_cfg: Any = None,
             cache_layers: bool = True, n_records: int = 0, n_models: int = 1) -> JobPlan:
    """The plan of one job of ``rule`` with wildcards ``wc``. ``root``: results/<profile>, where prepared
    models' config.json (exact, once they exist) are read; ``method_cfg``: a transfer's resolved method config;
    ``cache_layers``: whether the pair/task's teacher cache stores paired layers (a reader pairs layers);
    ``n_models``: how many models an evaluate job scores."""
    s = Setting.of(config)

    def shape(name: str) -> ModelShape:
        prepared = root / "models" / name / "prepared" if root is not None else None
        return model_shape(config["models"][name], prepared)

    pair = config["pairs"].get(wc.get("pair", ""), {})
    t = shape(pair["teacher"]) if pair else None
    st = shape(pair["student"]) if pair else None
    job = "/".join(wc[k] for k in ("pair", "model", "task", "attribution", "method", "seed") if k in wc)
    sizes = split_sizes(config, wc["task"]) if "task" in wc else {}
    if rule == "prepare_model":
        return prepare_model_job(s, wc["model"], shape(wc["model"]))
    if rule == "semantic_bases":
        return semantic_bases_job(s, wc["model"], shape(wc["model"]), n_records)
    if rule == "aligned_map":
        return aligned_map_job(s, job, t, st)
    if rule == "attribution":
        return attribution_job(s, job, t, sizes["extract"])
    if rule == "cache_teacher":
        return cache_teacher_job(s, job, t, sizes["train"], cache_layers)
    if rule == "transfer":
        cache = cache_teacher_job(s, job, t, sizes["train"], cache_layers).disk_gb * GB
        return transfer_job(s, job, wc["method"].split("@")[0], method_cfg, t, st, sizes, cache)
    if rule == "prepare_transfer":
        return prepare_job(s, job, wc["method"], method_cfg, t, st, sizes)
    if rule == "evaluate":
        return evaluate_job(s, job, t if wc["method"] == "teacher" else st, sizes["test"], wc["task"], n_models)
    raise ValueError(f"plan: no cost model for rule {rule!r}")


# --------------------------------------------------------------------------------------------------- report
COLUMNS = ["rule", "job", "device_gb", "host_gb", "disk_gb", "tflop", "runtime_min", "fits", "note"]


def summary(plans: list[JobPlan]) -> str:
    """One markdown row per rule (and method, for transfer): job count, the largest peaks, disk and FLOPs per job,
    the longest runtime bound, and whether every job fits."""
    groups: dict[str, list[JobPlan]] = {}
    for p in plans:
        method = p.job.split("/")[2] if p.rule == "transfer" else ""
        groups.setdefault(f"{p.rule} {method}".strip(), []).append(p)
    lines = ["| job | n | device GB (max) | host GB (max) | disk GB (max) | TFLOP (max) | runtime min (max) | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for name, ps in groups.items():
        fits = sum(p.fits for p in ps)
        lines.append(f"| {name} | {len(ps)} | {max(p.device_gb for p in ps):.1f} | {max(p.host_gb for p in ps):.1f} | "
                     f"{max(p.disk_gb for p in ps):.1f} | {max(p.tflop for p in ps):.0f} | "
                     f"{max(p.runtime_min for p in ps):.0f} | {'all' if fits == len(ps) else f'{fits}/{len(ps)}'} |")
    return "\n".join(lines)


def write_plan(plans: list[JobPlan], setting: Setting, out_md: Path, out_csv: Path, out_json: Path) -> None:
    """plan.md (one row per job, then totals), plan.csv and plan.json (rows + the assumptions)."""
    from semalign.suite.io import atomic_path, write_csv

    rows = [p.row() for p in plans]
    write_csv(out_csv, rows, COLUMNS)
    with atomic_path(out_json) as tmp:
        Path(tmp).write_text(json.dumps({"assumptions": asdict(setting), "jobs": rows}, indent=1))
    lines = [f"# Memory and compute plan ({len(plans)} jobs)", "",
             f"Assumed: {'accelerator' if setting.accelerator else 'CPU'} at {setting.tflops:.1f} TFLOP/s sustained, "
             f"{setting.memory_gb:.0f} GB per accelerator, weights read at {setting.read_gbps:.1f} GB/s, sequences "
             f"at max_len = {setting.max_len}. Peaks are upper bounds (rows trimmed to their longest are shorter). "
             "Host memory excludes the teacher cache, read through mmap (reclaimable page cache).",
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines[4:4] = ["## By rule and method", "", summary(plans), "", "## Every job", ""]
    misfits = [p for p in plans if not p.fits]
    lines += ["", f"Total: {sum(p.tflop for p in plans) / 1e3:.1f} PFLOP, {sum(p.disk_gb for p in plans):.0f} GB "
              f"written, {sum(p.runtime_min for p in plans) / 60:.1f} job-hours.", ""]
    lines += ([f"Jobs that do not fit one {setting.memory_gb:.0f} GB accelerator: {len(misfits)}:"]
              + [f"- {p.rule} {p.job}: {p.note}" for p in misfits]) if misfits else \
        [f"Every job fits one {setting.memory_gb:.0f} GB accelerator."]
    with atomic_path(out_md) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
