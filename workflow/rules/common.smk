# Config loading, validation and every input function. Rules only name what they need.
import os
import re
from pathlib import Path
from dataclasses import asdict
from types import SimpleNamespace

import yaml
from snakemake.utils import validate

# The default profile is mini. Loaded here rather than with `configfile:` so that `--configfile` replaces
# the profile instead of being merged into it (a merge would leak mini's models into other profiles).
if not config:
    config.update(yaml.safe_load(Path(workflow.basedir, "config", "mini.yaml").read_text()))
validate(config, schema="../schemas/config.schema.yaml")

# Rule scripts import the semalign package: make the checkout importable also inside per-rule conda envs.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [workflow.basedir, os.environ.get("PYTHONPATH")]))
# Methods living outside the package (config `plugins:`) are imported by every job through this variable.
os.environ["SEMALIGN_PLUGINS"] = ",".join(config["plugins"])

R = f"results/{config['profile']}"
PAPER_REPORTED = str(Path(workflow.basedir, "semalign", "paper_reported.yaml"))  # an input: edits rerun aggregate
LOGS = f"logs/{config['profile']}"
BENCH = f"{R}/benchmarks"
SEEDS = config["seeds"]
ABLATION_SEEDS = config["ablations"].get("seeds", SEEDS)
TASKS = config["tasks"]
METHODS = config["methods"]
THREADS = config["threads"]  # Snakemake scales it down to --cores; no workflow.cores here, --report has none
ATTRIBUTIONS = "grad_x_act|logit_lens|random"


wildcard_constraints:
    attribution=ATTRIBUTIONS,
    pairing=rf"(attributed-({ATTRIBUTIONS})|depth_ratio|interpolated|last_only|cka|random)",
    seed=r"\d+",
    method=r"[A-Za-z0-9_]+(@[A-Za-z0-9_]+=[^/]+)?",


def ablation_variants() -> dict[str, tuple[str, str, object]]:
    """``<method>@<key>=<value>`` -> (method, key, value) for every ablation value that differs from the method's
    configured one (that one is the reference row, already run as the method itself)."""
    variants = {}
    for method, axes in config["ablations"]["methods"].items():
        base = {**asdict(method_config(method))} if method_cls(method).config_cls else {}
        for key, values in axes.items():
            if key not in base:
                raise ValueError(f"config: ablations.methods.{method}.{key} is not a parameter of {method}")
            for value in values:
                if value != base[key]:
                    variants[f"{method}@{key}={value}"] = (method, key, value)
                    method_cls(method).config({**config["method_params"].get(method, {}), key: value})  # valid?
    return variants


def check_config() -> None:
    """Cross-key checks the schema cannot express; fail at DAG start with one line naming the key."""
    from semalign.registry import available_methods

    known = available_methods()
    for m in METHODS + list(config["method_params"]):
        if m not in known:
            raise ValueError(f"config: unknown method {m!r} (methods/method_params); available: {', '.join(known)}")
        method_config(m)  # hyperparameters checked now, not hours into the run
    for m in list(config["ablations"]["methods"]):
        if m not in METHODS:
            raise ValueError(f"config: ablations.methods.{m}: {m!r} is not in methods")
    if extra := sorted(set(ABLATION_SEEDS) - set(SEEDS)):
        raise ValueError(f"config: ablations.seeds {extra} not in seeds {SEEDS}: the reference row runs at `seeds`")
    for pair, p in config["pairs"].items():
        for role in ("teacher", "student"):
            if p[role] not in config["models"]:
                raise ValueError(f"config: pairs.{pair}.{role} = {p[role]!r} is not a key of models")
    for task in TASKS:
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
    if cka_method not in known or method_cls(cka_method).reference:
        raise ValueError(f"config: analysis.cka_method = {cka_method!r} is not a trained method; choose one of "
                         f"{', '.join(m for m in known if not method_cls(m).reference)}")


def model_manifest(name: str) -> str:
    """Manifest of the usable model (its dir is the parent): bootstrapped if the spec asks for it, else as prepared."""
    stage = "bootstrapped" if "bootstrap" in config["models"][name] else "prepared"
    return f"{R}/models/{name}/{stage}/manifest.json"


def pair_model(role: str):
    return lambda wc: model_manifest(config["pairs"][wc.pair][role])


def base_method(name: str) -> str:
    """The registry name of a method or of an ablation variant of it."""
    return name.split("@", 1)[0]


def method_cls(name: str):
    from semalign.registry import get_method

    return type(get_method(base_method(name)))


def method_params(name: str) -> dict:
    """A method's configured parameters; a variant's are its method's with the one ablated key replaced."""
    params = dict(config["method_params"].get(base_method(name), {}))
    if "@" in name:
        _, key, value = ABLATIONS[name]
        params[key] = value
    return params


def method_config(name: str):
    return method_cls(name).config(method_params(name))


def seeds_for(method: str) -> list[int]:
    """Reference rows do not depend on the seed: evaluate them once."""
    return [SEEDS[0]] if method_cls(method).reference else SEEDS


def evaluated_model(wc) -> str:
    """What `evaluate` reads: a reference row's model manifest directly, else the transfer record."""
    role = method_cls(wc.method).reference
    if role:
        return pair_model(role)(wc)
    return f"{R}/transfer/{wc.pair}/{wc.task}/{wc.method}/seed{wc.seed}/transfer.json"


def cka_student(wc) -> str:
    """The student `cka` compares: the untouched one (``none``), or what `evaluate` reads for the first seed."""
    return evaluated_model(SimpleNamespace(pair=wc.pair, task=wc.task, method=wc.method, seed=SEEDS[0]))


def pairing_file(method: str, pair: str, task: str) -> str | None:
    """The layer pairing a method trains with (None for methods without one). Attributed pairings are named
    after their attribution method, so ablations over either never collide."""
    cfg = method_config(method)
    strategy = getattr(cfg, "pairing", None)
    if strategy is None:
        return None
    name = f"attributed-{cfg.attribution}" if strategy == "attributed" else strategy
    return f"{R}/pairing/{pair}/{task}/{name}.json"


def pairing_inputs(wc) -> dict:
    inputs = {"teacher": pair_model("teacher")(wc), "student": pair_model("student")(wc)}
    if wc.pairing.startswith("attributed-"):
        inputs["scores"] = f"{R}/attribution/{wc.pair}/{wc.task}/{wc.pairing.removeprefix('attributed-')}.csv"
    if wc.pairing == "cka":
        inputs["cka"] = f"{R}/cka/{wc.pair}/{wc.task}/none.csv"  # untouched student: no cycle through transfer
    return inputs


def cache_pairings(wc) -> list[str]:
    """Pairings of every configured method and variant on this pair/task: the cache holds the union of their
    teacher layers."""
    variants = list(ABLATIONS) if wc.task in config["ablations"].get("tasks", TASKS) else []
    return sorted({f for m in METHODS + variants if (f := pairing_file(m, wc.pair, wc.task))})


def transfer_inputs(wc) -> dict:
    inputs = {
        "teacher": pair_model("teacher")(wc),
        "student": pair_model("student")(wc),
        "splits": f"{R}/splits/{wc.task}/manifest.json",
    }
    if method_cls(wc.method).uses_teacher_cache:
        inputs["cache"] = f"{R}/cache/{wc.pair}/{wc.task}/teacher.pt"
    if pairing := pairing_file(wc.method, wc.pair, wc.task):
        inputs["pairing"] = pairing
    if getattr(method_config(wc.method), "recompose", None) == "semantic":
        inputs["aligned_map"] = f"{R}/bases/{wc.pair}/aligned_map.pt"
    return inputs


def trained_methods() -> list[str]:
    return [m for m in METHODS if not method_cls(m).reference]


def bench_target() -> tuple[str, str]:
    """The (pair, task) of the transfer-cost benchmark: the first pair, on GSM8K when it is configured."""
    return next(iter(config["pairs"])), "gsm8k" if "gsm8k" in TASKS else TASKS[0]


def cost_inputs(_wc) -> dict:
    """Every trained method's transfer inputs on the benchmark's (pair, task), keyed ``<method>__<input>``."""
    pair, task = bench_target()
    inputs = {"cache": f"{R}/cache/{pair}/{task}/teacher.pt",
              "cache_benchmark": f"{BENCH}/cache_teacher/{pair}/{task}.tsv"}
    for m in trained_methods():
        wc = SimpleNamespace(pair=pair, task=task, method=m)
        inputs.update({f"{m}__{k}": v for k, v in transfer_inputs(wc).items()})
    return inputs


def transfer_records() -> list[str]:
    return [
        f"{R}/transfer/{pair}/{task}/{method}/seed{seed}/transfer.json"
        for pair in config["pairs"]
        for task in TASKS
        for method in trained_methods()
        for seed in SEEDS
    ]


def cost_inputs_all() -> dict:
    """What the cost table divides by: each (pair, task)'s train split, model manifests and teacher cache."""
    uses_cache = any(method_cls(m).uses_teacher_cache for m in trained_methods())
    inputs = {}
    for pair, p in config["pairs"].items():
        for task in TASKS:
            inputs[f"{pair}__{task}__splits"] = f"{R}/splits/{task}/manifest.json"
            inputs[f"{pair}__{task}__teacher"] = model_manifest(p["teacher"])
            inputs[f"{pair}__{task}__student"] = model_manifest(p["student"])
            if uses_cache:
                inputs[f"{pair}__{task}__cache"] = f"{R}/cache/{pair}/{task}/teacher.pt"
    return inputs


def method_configs() -> dict:
    return {m: asdict(method_config(m)) for m in trained_methods() if method_cls(m).config_cls}


def eval_records() -> list[str]:
    return [
        f"{R}/eval/{pair}/{task}/{method}/seed{seed}.json"
        for pair in config["pairs"]
        for task in TASKS
        for method in METHODS
        for seed in seeds_for(method)
    ] + ablation_records()


def ablation_rows() -> dict[str, list[list[str]]]:
    """Per ablation table ``<method>__<key>``: its rows as [label, method or variant name], reference first."""
    rows = {}
    for method, axes in config["ablations"]["methods"].items():
        base = asdict(method_config(method))
        for key, values in axes.items():
            rows[f"{method}__{key}"] = [[f"{base[key]} (as configured)", method]] + [
                [str(v), f"{method}@{key}={v}"] for v in values if v != base[key]
            ]
    return rows


def ablation_tables() -> list[str]:
    return [f"{R}/tables/ablation_{name}.md" for name in ablation_rows()]


def ablation_records() -> list[str]:
    tasks = config["ablations"].get("tasks", TASKS)
    return [
        f"{R}/eval/{pair}/{task}/{variant}/seed{seed}.json"
        for pair in config["pairs"]
        for task in tasks
        for variant in ABLATIONS
        for seed in ABLATION_SEEDS
    ]


def finetuned_tables() -> list[str]:
    """The paper's Table 2 analogue, when the config names its pairs."""
    return [f"{R}/tables/finetuned_teachers.md"] if config["report"]["finetuned_teachers"] else []


def pair_sources() -> dict[str, list[str]]:
    """pair -> [teacher, student] hub ids ("" for a random model): what the paper's numbers are matched on."""
    return {pair: [config["models"][p[role]].get("source", "") for role in ("teacher", "student")]
            for pair, p in config["pairs"].items()}


def manifests() -> dict[str, str]:
    names = {n for p in config["pairs"].values() for n in (p["teacher"], p["student"])}
    return {n: model_manifest(n) for n in sorted(names)}


def cka_tasks() -> list[str]:
    """`analysis.cka_tasks` that this profile runs (the default, HumanEval, may not be among them)."""
    return [t for t in config["analysis"]["cka_tasks"] if t in TASKS]


def cka_figures() -> list[str]:
    """Paper Figs. 4-5 per pair x CKA task, when `analysis.cka_method` is among the trained methods."""
    if config["analysis"]["cka_method"] not in trained_methods():
        return []
    return [f"{R}/figures/cka_{pair}_{task}.png" for pair in config["pairs"] for task in cka_tasks()]


def analysis_outputs() -> list[str]:
    """Fig. 2 per model and the attribution profile per teacher x task, when SemAlign is configured; the CKA
    figures when their method is."""
    outputs = cka_figures()
    if any(pairing_file(m, p, t) for m in METHODS for p in config["pairs"] for t in TASKS):
        outputs += [f"{R}/bases/{m}/decomposition.png" for m in manifests()] + [
            f"{R}/attribution/{pair}/{task}/{a}.png"
            for pair in config["pairs"]
            for task in TASKS
            for a in config["analysis"]["attribution_methods"]
        ]
    return outputs


def loss_curve_figures() -> list[str]:
    if not trained_methods():
        return []
    return [f"{R}/figures/loss_curves/{pair}/{task}.png" for pair in config["pairs"] for task in TASKS]


def final_outputs() -> list[str]:
    return [
        f"{R}/tables/main.md",
        f"{R}/tables/models.md",
        *finetuned_tables(),
        f"{R}/figures/main.png",
        *loss_curve_figures(),
        *analysis_outputs(),
    ]


check_config()
ABLATIONS = ablation_variants()
