"""One registry of transfer methods: the single extension point of the suite.

A method is a class with a ``name``, its config dataclass, the artifacts it reads (:meth:`Method.needs`) and
``run(ctx) -> Path``; it is registered with ``@register_method("name")`` in its own module. The built-in methods
are SemAlign (:mod:`semalign.method`) and every module of the :mod:`baselines` package (importing the package
imports them all); the ``plugins:`` config key (env ``SEMALIGN_PLUGINS``) adds modules from outside the
repository. The workflow, the tests and the scripts all see the same set (the lm-eval registry pattern: declare,
don't edit the core).

An :class:`Artifact` is a file a transfer reads beyond the shared inputs (the two models and the task's splits),
made by its own rule: the method declares it, the workflow asks :meth:`Artifact.path` where it lives and hands the
path to the method as ``ctx.artifacts[artifact.key]``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from semalign.suite.ids import PairingName


@dataclass(frozen=True)
class Artifact:
    """A rule-made input of a transfer. Subclasses set ``key`` (the name under which the method finds its path in
    ``ctx.artifacts``) and ``PATTERN`` (the rule's output path below the profile's results dir, with the
    ``{pair}``/``{task}`` wildcards and any of the subclass's own fields)."""

    key: ClassVar[str] = ""
    PATTERN: ClassVar[str] = ""

    @classmethod
    def pattern(cls, root: str) -> str:
        """The producing rule's output, wildcards left open (``root`` = ``results/<profile>``)."""
        return f"{root}/{cls.PATTERN}"

    def fields(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def path(self, root: str, pair: str, task: str) -> str:
        return self.pattern(root).format(pair=pair, task=task, **self.fields())


@dataclass(frozen=True)
class TeacherCache(Artifact):
    """The teacher's activations on the train split (:mod:`semalign.suite.cache`), one file per (pair, task) shared
    by every method that reads it. ``pairing`` names the pairing whose teacher layers this reader needs (None: the
    final state only, e.g. KD), ``states`` which of them (:func:`semalign.frontier.teacher_layers_for`)."""

    key: ClassVar[str] = "cache"
    PATTERN: ClassVar[str] = "cache/{pair}/{task}/teacher.pt"
    pairing: PairingName | None = None
    states: str = "end"


@dataclass(frozen=True)
class Preparation(Artifact):
    """What a method computes once per (pair, task) before any seed trains (:meth:`Method.prepare`: Seeking's
    teacher factors, LaTen's located neurons), read by the transfer of every seed. ``digest`` hashes the settings
    it depends on (:meth:`Method.preparation_settings`), so a variant that changes them gets its own file and one
    that does not shares it."""

    key: ClassVar[str] = "preparation"
    PATTERN: ClassVar[str] = "prepare/{pair}/{task}/{method}/{digest}.pt"
    DIGEST: ClassVar[str] = "[0-9a-f]{12}"
    method: str
    digest: str

    @classmethod
    def of(cls, method: str, settings: dict[str, Any]) -> Preparation:
        blob = json.dumps(settings, sort_keys=True, default=str).encode()
        return cls(method, hashlib.sha256(blob).hexdigest()[:12])


@dataclass
class TransferContext:
    """Everything a method may read or write for one (pair, task, seed) transfer."""

    teacher: Path  # prepared teacher model dir (HF format, see semalign.suite.models.prepare_model)
    student: Path  # prepared student model dir
    splits: Path  # dir with extract/align/train/test .jsonl for the task (semalign.suite.splits.make_splits)
    task: str
    out_dir: Path  # the method writes its model to out_dir / "model" and checkpoints under out_dir / "ckpt"
    params: dict[str, Any] = field(default_factory=dict)  # the method's resolved config section
    seed: int = 0
    device: str = "cpu"
    max_len: int = 512  # token cutoff and loss masking of the split records (config data.max_len/train_on_inputs),
    train_on_inputs: bool = False  # the same as the teacher cache's, so every method trains on identical tokens
    artifacts: dict[str, Path] = field(default_factory=dict)  # Artifact.key -> path, as declared by Method.needs

    @functools.cached_property
    def input_hashes(self) -> dict[str, str]:
        """Content hash of every file the run reads: both models (manifest and weights), the transfer splits and
        each artifact (teacher cache, pairing, aligned map). Computed once per run (large files once at all, see
        :func:`semalign.suite.io.content_hash`); named by role so a changed input can be reported by name."""
        from semalign.suite.io import content_hash

        files = {}
        for role, root in (("teacher", self.teacher), ("student", self.student)):
            for f in sorted(Path(root).glob("*")):
                if f.is_file() and (f.name == "manifest.json" or f.suffix == ".safetensors"):
                    files[f"{role}/{f.name}"] = f
        for f in sorted(Path(self.splits).glob("*")):  # the test split is for evaluation; no transfer reads it
            if f.is_file() and not f.name.startswith(".") and f.name != "test.jsonl":
                files[f"splits/{f.name}"] = f
        files.update({key: Path(path) for key, path in sorted(self.artifacts.items())})
        return {name: content_hash(f) for name, f in files.items()}

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint of this run depends on besides the method's config and seed (which the training loop
        adds): the inputs' content and how the records are tokenised. Resuming needs all of it to agree."""
        return {"inputs": self.input_hashes, "max_len": self.max_len, "train_on_inputs": self.train_on_inputs}

    def artifact(self, key: str, method: str) -> Path:
        if key not in self.artifacts:
            raise ValueError(f"method {method!r} needs its {key!r} artifact, which the context lacks "
                             f"(given: {sorted(self.artifacts) or 'none'}); the workflow passes what Method.needs declares")
        return Path(self.artifacts[key])


class Method:
    """Interface every transfer method implements.

    ``run`` returns the directory of the model to evaluate: a fresh ``ctx.out_dir / "model"`` for methods that
    train, or an existing prepared model dir for reference rows (``none``, ``teacher``).
    """

    name: ClassVar[str] = ""
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
        fields = {f.name: f for f in dataclasses.fields(cls.config_cls)}
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise ValueError(f"method_params.{cls.name}: unknown parameter(s) {unknown}; known: {sorted(fields)}")
        for key, value in params.items():  # a string lr ("1e-3") would pass the dataclass and crash in the optimizer
            default = fields[key].default
            if _is_number(default) and not (_is_number(value) and (isinstance(default, float) or isinstance(value, int))):
                kind = "a number" if isinstance(default, float) else "an integer"
                raise ValueError(f"method_params.{cls.name}.{key}: expected {kind}, got {value!r}")
        return cls.config_cls(**params)

    @classmethod
    def needs(cls, cfg: Any) -> list[Artifact]:
        """The artifacts a run with config ``cfg`` reads; the workflow adds their rules' outputs as inputs. By
        default the method's :class:`Preparation`, if it has one."""
        settings = cls.preparation_settings(cfg)
        return [] if settings is None else [Preparation.of(cls.name, settings)]

    @classmethod
    def preparation_settings(cls, cfg: Any) -> dict[str, Any] | None:
        """What of ``cfg`` :meth:`prepare` reads (None: the method prepares nothing). The context's inputs, max_len
        and train_on_inputs are the same for every seed of a (pair, task), so the settings alone tell variants apart."""
        return None

    def prepare(self, ctx: TransferContext, cfg: Any) -> dict[str, Any]:
        """The seed-independent part of a run (it must not read ``ctx.seed`` nor draw random numbers): made once
        per (pair, task) by the workflow's prepare_transfer rule and shared by every seed. Tensors and plain
        containers only (saved with torch.save, loaded with weights_only)."""
        raise NotImplementedError(f"method {self.name!r} declares preparation settings but no prepare()")

    def prepared(self, ctx: TransferContext, cfg: Any) -> dict[str, Any]:
        """The preparation the workflow made, else computed here: a direct call of ``run`` (tests, the cost
        benchmark, which so charges it to the method) gets the very same result, only not shared."""
        import torch

        path = ctx.artifacts.get(Preparation.key)
        return self.prepare(ctx, cfg) if path is None else torch.load(path, map_location="cpu", weights_only=True)

    @classmethod
    def uses_teacher_cache(cls, cfg: Any) -> bool:
        return any(isinstance(a, TeacherCache) for a in cls.needs(cfg))

    def run(self, ctx: TransferContext) -> Path:  # pragma: no cover - interface
        raise NotImplementedError(f"method {self.name!r} has no run(): reference rows are evaluated directly")

    def begin(self, ctx: TransferContext) -> tuple[Any, Any, Any, Any]:
        """The common start of a training method: (config, teacher cache or None, student, tokenizer), after
        seeding and checking that teacher and student share a vocabulary token for token."""
        from semalign.suite.cache import TeacherCache as Cache
        from semalign.suite.models import check_same_vocab, load_model
        from semalign.suite.train import set_seed

        cfg = self.config(ctx.params)
        set_seed(ctx.seed)
        check_same_vocab(ctx.teacher, ctx.student)
        cache = Cache.load(ctx.artifact("cache", self.name)) if self.uses_teacher_cache(cfg) else None
        model, tokenizer = load_model(ctx.student, device=ctx.device, trainable=True)
        return cfg, cache, model, tokenizer

    def records(self, ctx: TransferContext, name: str) -> list[dict]:
        """The raw records of split ``name`` (extract/align/train); a missing or empty file names itself."""
        from semalign.suite.io import read_jsonl

        path = ctx.splits / f"{name}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"method {self.name!r}: split file {path} missing (run the splits rule)")
        records = read_jsonl(path)
        if not records:
            raise ValueError(f"method {self.name!r}: split file {path} is empty")
        return records

    def split(self, ctx: TransferContext, tokenizer: Any, name: str) -> dict[str, Any]:
        """Split ``name`` tokenised exactly as the teacher cache tokenises train."""
        from semalign.suite.chat import tokenize_records

        return tokenize_records(tokenizer, self.records(ctx, name), ctx.max_len, ctx.train_on_inputs)

    def save(self, ctx: TransferContext, model: Any, tokenizer: Any, stats: dict[str, Any]) -> Path:
        """The common end of a training method: its stats for the cost table, the model as a prepared dir
        (LoRA merged) whose manifest says where it came from."""
        from semalign.suite.io import atomic_write_text, load_manifest
        from semalign.suite.models import save_model

        atomic_write_text(ctx.out_dir / "train_stats.json", json.dumps(stats, indent=2))
        manifest = {**load_manifest(ctx.student), "derived_from": str(ctx.student), "method": self.name}
        return save_model(model, tokenizer, ctx.out_dir / "model", manifest=manifest)


def task_params(section: dict[str, Any], task: str | None) -> dict[str, Any]:
    """A method's ``method_params`` section resolved for one task: ``tasks.<task>``'s keys over the method's own
    (the config dataclass fills in the defaults under both); ``task=None`` gives the method-level settings."""
    params = {k: v for k, v in section.items() if k != "tasks"}
    if task is not None:
        params.update(section.get("tasks", {}).get(task, {}))
    return params


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make ``cls`` available as ``name`` in configs and rules."""

    def wrap(cls: type[Method]) -> type[Method]:
        if not issubclass(cls, Method):
            raise TypeError(f"{cls.__name__} must subclass semalign.suite.registry.Method")
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__name__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


PLUGINS_ENV = "SEMALIGN_PLUGINS"  # comma-separated extra modules; the workflow sets it from config `plugins:`


def _load_all() -> None:
    import baselines  # noqa: F401  every compared method registers on import
    import semalign.method  # noqa: F401

    for module in (m for m in os.environ.get(PLUGINS_ENV, "").split(",") if m):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"cannot import method plugin {module!r} ({e}); is it on PYTHONPATH?") from e


def available_methods() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; unknown names list the known ones."""
    _load_all()
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def get_method(name: str) -> Method:
    return method_class(name)()
