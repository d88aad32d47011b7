"""One registry of transfer methods: the single extension point of the suite.

A method is a class with a ``name``, a few capability flags and ``run(ctx) -> Path``. It is registered with
``@register_method("name")`` in its own module; :data:`METHOD_MODULES` lists the built-in modules and the
``plugins:`` config key (env ``SEMALIGN_PLUGINS``) adds outside ones, so the workflow, the tests and the scripts
see the same set (the lm-eval registry pattern: declare, don't edit the core).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# Modules that register methods when imported. Adding a method = one module + one line here.
METHOD_MODULES: tuple[str, ...] = (
    "semalign.methods.reference",
    "semalign.methods.kd",
    "semalign.methods.semalign",
    "baselines.lora_sft",
    "baselines.layerwise_kd",
    "baselines.seeking",
    "baselines.laten",
)


@dataclass
class TransferContext:
    """Everything a method may read or write for one (pair, task, seed) transfer."""

    teacher: Path  # prepared teacher model dir (HF format, see semalign.models.prepare_model)
    student: Path  # prepared student model dir
    splits: Path  # dir with extract/align/train/test .jsonl for the task (semalign.data.make_splits)
    task: str
    out_dir: Path  # the method writes its model to out_dir / "model" and checkpoints under out_dir / "ckpt"
    params: dict[str, Any] = field(default_factory=dict)  # the method's resolved config section
    seed: int = 0
    device: str = "cpu"
    teacher_cache: Path | None = None  # cache_teacher output, for methods with uses_teacher_cache
    max_len: int = 512  # token cutoff and loss masking of the split records (config data.max_len/train_on_inputs),
    train_on_inputs: bool = False  # the same as the teacher cache's, so every method trains on identical tokens
    extras: dict[str, Path] = field(default_factory=dict)  # further rule inputs (e.g. "pairing": path)


class Method:
    """Interface every transfer method implements.

    ``run`` returns the directory of the model to evaluate: a fresh ``ctx.out_dir / "model"`` for methods that
    train, or an existing prepared model dir for reference rows (``none``, ``teacher``).
    """

    name: ClassVar[str] = ""
    uses_teacher_cache: ClassVar[bool] = False  # the DAG adds cache_teacher as input
    # "teacher" | "student" for reference rows: the DAG evaluates that model directly, once, with no transfer job
    reference: ClassVar[str | None] = None
    # dataclass of the method's hyperparameters (defaults in one visible place); validated at DAG start
    config_cls: ClassVar[type | None] = None

    @classmethod
    def config(cls, params: dict[str, Any]) -> Any:
        """The method's config from its ``method_params`` section; unknown keys are errors, not ignored."""
        if cls.config_cls is None:
            if params:
                raise ValueError(f"method {cls.name!r} takes no parameters, got {sorted(params)}")
            return None
        known = {f.name for f in dataclasses.fields(cls.config_cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"method_params.{cls.name}: unknown parameter(s) {unknown}; known: {sorted(known)}")
        return cls.config_cls(**params)

    def run(self, ctx: TransferContext) -> Path:  # pragma: no cover - interface
        raise NotImplementedError(f"method {self.name!r} has no run(): reference rows are evaluated directly")

    def begin(self, ctx: TransferContext) -> tuple[Any, Any, Any, Any]:
        """The common start of a training method: (config, teacher cache or None, student, tokenizer), after
        seeding and checking that teacher and student share a vocabulary token for token."""
        from semalign.cache import TeacherCache
        from semalign.models import check_same_vocab, load_model
        from semalign.training import set_seed

        cfg = self.config(ctx.params)
        set_seed(ctx.seed)
        check_same_vocab(ctx.teacher, ctx.student)
        if self.uses_teacher_cache and ctx.teacher_cache is None:
            raise ValueError(f"method {self.name!r} needs the teacher cache (uses_teacher_cache)")
        cache = TeacherCache.load(ctx.teacher_cache) if self.uses_teacher_cache else None
        model, tokenizer = load_model(ctx.student, device=ctx.device, trainable=True)
        return cfg, cache, model, tokenizer

    def records(self, ctx: TransferContext, name: str) -> list[dict]:
        """The raw records of split ``name`` (extract/align/train); a missing or empty file names itself."""
        from semalign.data import read_jsonl

        path = ctx.splits / f"{name}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"method {self.name!r}: split file {path} missing (run the splits rule)")
        records = read_jsonl(path)
        if not records:
            raise ValueError(f"method {self.name!r}: split file {path} is empty")
        return records

    def split(self, ctx: TransferContext, tokenizer: Any, name: str) -> dict[str, Any]:
        """Split ``name`` tokenised exactly as the teacher cache tokenises train."""
        from semalign.training import tokenize_records

        return tokenize_records(tokenizer, self.records(ctx, name), ctx.max_len, ctx.train_on_inputs)

    def save(self, ctx: TransferContext, model: Any, tokenizer: Any, stats: dict[str, Any]) -> Path:
        """The common end of a training method: its stats for the cost table, the model as a prepared dir
        (LoRA merged) whose manifest says where it came from."""
        from semalign.data import atomic_write_text
        from semalign.models import load_manifest
        from semalign.training import save_model

        atomic_write_text(ctx.out_dir / "train_stats.json", json.dumps(stats, indent=2))
        manifest = {**load_manifest(ctx.student), "derived_from": str(ctx.student), "method": self.name}
        return save_model(model, tokenizer, ctx.out_dir / "model", manifest=manifest)


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make ``cls`` available as ``name`` in configs and rules."""

    def wrap(cls: type[Method]) -> type[Method]:
        if not issubclass(cls, Method):
            raise TypeError(f"{cls.__name__} must subclass semalign.registry.Method")
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__name__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


PLUGINS_ENV = "SEMALIGN_PLUGINS"  # comma-separated extra modules; the workflow sets it from config `plugins:`


def _load_all() -> None:
    plugins = [m for m in os.environ.get(PLUGINS_ENV, "").split(",") if m]
    for module in (*METHOD_MODULES, *plugins):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"cannot import method module {module!r} ({e}); is it on PYTHONPATH?") from e


def available_methods() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """Instantiate the method registered as ``name``; unknown names list the known ones."""
    _load_all()
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]()
