"""The workflow's configuration, checked at DAG start: numbers coerced, the schema applied (its defaults filled in),
then the cross-key checks the schema cannot express, each failing with one line that names the key.

The Snakefile calls :func:`load` before it builds a single job; the tests call it in-process on every bad config
they plant (a Snakemake process per case would cost seconds each for the same check).
"""
from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from semalign.suite.evaluation import CODE_TASKS
from semalign.suite.fairness import violations
from semalign.suite.ids import Variant
from semalign.suite.models import check_pair_vocab, check_spec
from semalign.suite.registry import available_methods, method_class, task_params

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def coerce_numbers(node: Any, schema: dict, definitions: dict, loose: bool = True) -> Any:
    """Strings that are numbers, coerced before validation: YAML 1.1 (PyYAML, so Snakemake) reads `lr: 1e-3` as a
    string, and `--config seeds=[0]` gives strings inside lists. A string becomes a number where the schema asks for
    one, and in scientific notation anywhere (method parameters are not all in the schema) but in model specs,
    whose revisions may look alike."""
    if "$ref" in schema:
        schema = definitions[schema["$ref"].rsplit("/", 1)[-1]]
    if isinstance(node, dict):
        extra = schema.get("additionalProperties")
        return {k: coerce_numbers(v, schema.get("properties", {}).get(k, extra if isinstance(extra, dict) else {}),
                                  definitions, loose and k != "models") for k, v in node.items()}
    if isinstance(node, list):
        return [coerce_numbers(v, schema.get("items", {}), definitions, loose) for v in node]
    if not isinstance(node, str):
        return node
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    text = node.strip()
    if "integer" in types and re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if "number" in types or (loose and _SCIENTIFIC.fullmatch(text)):
        try:
            return float(text)
        except ValueError:
            return node
    return node


def method_params(config: dict, name: str | Variant, task: str | None = None) -> dict:
    """A method's parameters on ``task``: variant key over `method_params.<method>.tasks.<task>` over
    `method_params.<method>` (over the config dataclass's defaults); ``task=None``: the method-level ones."""
    variant = Variant.parse(name) if isinstance(name, str) else name
    params = task_params(config["method_params"].get(variant.method, {}), task)
    if variant.is_variant:
        params[variant.key] = variant.value
    return params


def method_config(config: dict, name: str | Variant, task: str | None = None) -> Any:
    variant = Variant.parse(name) if isinstance(name, str) else name
    return method_class(variant.method).config(method_params(config, variant, task))


def ablation_variants(config: dict) -> list[Variant]:
    """Every ablation value that differs from its method's configured one (that one is the reference row, already
    run as the method itself); each is validated by the method's config now, not hours into the run."""
    variants = []
    for method, axes in config["ablations"]["methods"].items():
        base = asdict(method_config(config, method)) if method_class(method).config_cls else {}
        for key, values in axes.items():
            if key not in base:
                raise ValueError(f"config: ablations.methods.{method}.{key} is not a parameter of {method}")
            for value in values:
                if value != base[key]:
                    variant = Variant(method, key, value)
                    method_config(config, variant)
                    variants.append(variant)
    return variants


def check(config: dict) -> None:
    """Cross-key checks the schema cannot express; fail at DAG start with one line naming the key."""
    known = available_methods()
    methods, tasks, seeds = config["methods"], config["tasks"], config["seeds"]
    for m in methods + list(config["method_params"]):
        if m not in known:
            raise ValueError(f"config: unknown method {m!r} (methods/method_params); available: {', '.join(known)}")
        for task in [None, *tasks]:
            method_config(config, m, task)  # hyperparameters checked now, not hours into the run
    for task in tasks:
        configs = {m: method_config(config, m, task) for m in methods if method_class(m).config_cls}
        for line in violations(configs):
            raise ValueError(f"config: fairness protocol on {task}: {line} (method_params; README 'Fairness protocol')")
    ablation_tasks = config["ablations"].get("tasks", tasks)
    for m, axes in config["ablations"]["methods"].items():
        if m not in methods:
            raise ValueError(f"config: ablations.methods.{m}: {m!r} is not in methods")
        per_task = config["method_params"].get(m, {}).get("tasks", {})
        for task in set(per_task) & set(ablation_tasks):
            if clash := sorted(set(axes) & set(per_task[task])):
                raise ValueError(f"config: ablations.methods.{m} varies {clash}, which method_params.{m}.tasks.{task} "
                                 "also sets: the reference row would not be the configured value on that task")
    if extra := sorted(set(config["ablations"].get("seeds", seeds)) - set(seeds)):
        raise ValueError(f"config: ablations.seeds {extra} not in seeds {seeds}: the reference row runs at `seeds`")
    for name, spec in config["models"].items():  # paths exist, hub ids well formed, pkg: installed; no download
        try:
            check_spec({k: v for k, v in spec.items() if k != "bootstrap"})
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"config: models.{name}: {e}") from None
    for pair, p in config["pairs"].items():
        for role in ("teacher", "student"):
            if p[role] not in config["models"]:
                raise ValueError(f"config: pairs.{pair}.{role} = {p[role]!r} is not a key of models")
        try:
            check_pair_vocab(config["models"][p["teacher"]], config["models"][p["student"]])
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"config: pairs.{pair} ({p['teacher']} -> {p['student']}): {e}") from None
    if (code := [t for t in tasks if t in CODE_TASKS]) and not config["evaluation"]["allow_code_execution"]:
        raise ValueError(f"config: evaluation.allow_code_execution is false but tasks include {', '.join(code)}, "
                         "which execute model-written code: set it to true to consent, or drop those tasks")
    for task in tasks:
        if task not in config["data"]["sizes"]:
            raise ValueError(f"config: data.sizes.{task} missing (tasks lists {task})")
    table2 = config["report"]["finetuned_teachers"]
    for pair in table2:
        if pair not in config["pairs"]:
            raise ValueError(f"config: report.finetuned_teachers names {pair!r}, not a key of pairs "
                             f"({', '.join(config['pairs'])})")
    if len({config["pairs"][pair]["student"] for pair in table2}) > 1:
        raise ValueError("config: report.finetuned_teachers: the pairs must share one student (it is shown once)")
    cka_method = config["analysis"]["cka_method"]
    if cka_method not in known or method_class(cka_method).reference:
        raise ValueError(f"config: analysis.cka_method = {cka_method!r} is not a trained method; choose one of "
                         f"{', '.join(m for m in known if not method_class(m).reference)}")
    ablation_variants(config)


def load(config: dict) -> dict:
    """``config`` (as Snakemake merged it) made usable, in place: numbers coerced, validated against the schema
    with its defaults filled in, cross-checked (the ablation variants' configs included)."""
    from snakemake.utils import validate

    schema = yaml.safe_load(SCHEMA.read_text())
    config.update(coerce_numbers(config, schema, schema.get("definitions", {})))
    validate(config, schema=str(SCHEMA))
    check(config)
    return config
