# Config validation and every input function. Rules only name what they need; methods say what they read
# (Method.needs), so nothing here looks inside a method's config.
import os
import re
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import yaml
from snakemake.utils import validate

from semalign.attribution import METHODS as ATTRIBUTION_METHODS
from semalign.method import AlignedMap, Pairing
from semalign.pairing import STRATEGIES
from semalign.suite.ids import PairingName, SplitId, Variant
from semalign.suite.evaluation import CODE_TASKS, gen_cap
from semalign.suite.models import check_pair_vocab, check_spec
from semalign.suite.sources import SPLITS, data_dir, source_files
from semalign.suite.fairness import violations
from semalign.suite.registry import Artifact, TeacherCache, available_methods, method_class, task_params

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_SCHEMA = yaml.safe_load(Path(workflow.basedir, "workflow", "schemas", "config.schema.yaml").read_text())


def _numbers(node, schema: dict, loose: bool = True):
    """Strings that are numbers, coerced before validation: YAML 1.1 (PyYAML, so Snakemake) reads `lr: 1e-3` as a
    string, and `--config seeds=[0]` gives strings inside lists. A string becomes a number where the schema asks for
    one, and in scientific notation anywhere (method parameters are not all in the schema) but in model specs,
    whose revisions may look alike."""
    if "$ref" in schema:
        schema = _SCHEMA["definitions"][schema["$ref"].rsplit("/", 1)[-1]]
    if isinstance(node, dict):
        extra = schema.get("additionalProperties")
        return {k: _numbers(v, schema.get("properties", {}).get(k, extra if isinstance(extra, dict) else {}),
                            loose and k != "models") for k, v in node.items()}
    if isinstance(node, list):
        return [_numbers(v, schema.get("items", {}), loose) for v in node]
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


config.update(_numbers(config, _SCHEMA))
validate(config, schema="../schemas/config.schema.yaml")

# Rule scripts import the semalign package: make the checkout importable also inside per-rule conda envs.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [workflow.basedir, os.environ.get("PYTHONPATH")]))
# The command that started this run, for the results manifest (jobs inherit it; a re-parse in a job keeps it).
os.environ.setdefault("SEMALIGN_COMMAND", shlex.join(["snakemake", *sys.argv[1:]]))
# Methods living outside the repository (config `plugins:`) are imported by every job through this variable.
os.environ["SEMALIGN_PLUGINS"] = ",".join(config["plugins"])

R = f"results/{config['profile']}"
LOGS = f"logs/{config['profile']}"
BENCH = f"{R}/benchmarks"
PAPER_REPORTED = str(Path(workflow.basedir, "semalign", "suite", "paper_reported.yaml"))  # an input: edits rerun it
SEEDS = config["seeds"]
ABLATION_SEEDS = config["ablations"].get("seeds", SEEDS)
ABLATION_TASKS = config["ablations"].get("tasks", config["tasks"])
TASKS = config["tasks"]
METHODS = config["methods"]
THREADS = config["threads"]  # Snakemake scales it down to --cores; no workflow.cores here, --report has none


def _data_dir() -> Path | None:
    """`data.dir`, else $SEMALIGN_DATA_DIR or ../shared/data (semalign.suite.sources.data_dir); None = the hub."""
    if not config["data"]["dir"]:
        return data_dir()
    path = Path(config["data"]["dir"]).expanduser()
    if not path.is_dir():
        raise ValueError(f"config: data.dir = {config['data']['dir']!r} is not a directory")
    return path.resolve()


DATA_DIR = _data_dir()


def _alternatives(names) -> str:
    return "|".join(map(re.escape, names))


wildcard_constraints:
    seed=r"\d+",
    method=Variant.PATTERN,


# ------------------------------------------------------------------------------------------------------ methods
def method_cls(name: str | Variant):
    variant = Variant.parse(name) if isinstance(name, str) else name
    return method_class(variant.method)


def method_params(name: str | Variant, task: str | None = None) -> dict:
    """A method's parameters on ``task``: variant key over `method_params.<method>.tasks.<task>` over
    `method_params.<method>` (over the config dataclass's defaults); ``task=None``: the method-level ones."""
    variant = Variant.parse(name) if isinstance(name, str) else name
    params = task_params(config["method_params"].get(variant.method, {}), task)
    if variant.is_variant:
        params[variant.key] = variant.value
    return params


def method_config(name: str | Variant, task: str | None = None):
    return method_cls(name).config(method_params(name, task))


def needs(name: str | Variant, task: str | None = None) -> list[Artifact]:
    """The artifacts a transfer of method (or variant) ``name`` on ``task`` reads, as its method declares them."""
    cls = method_cls(name)
    return [] if cls.reference else cls.needs(method_config(name, task))


def ablation_variants() -> list[Variant]:
    """Every ablation value that differs from its method's configured one (that one is the reference row, already
    run as the method itself); each is validated by the method's config now, not hours into the run."""
    variants = []
    for method, axes in config["ablations"]["methods"].items():
        base = asdict(method_config(method)) if method_cls(method).config_cls else {}
        for key, values in axes.items():
            if key not in base:
                raise ValueError(f"config: ablations.methods.{method}.{key} is not a parameter of {method}")
            for value in values:
                if value != base[key]:
                    variant = Variant(method, key, value)
                    method_config(variant)
                    variants.append(variant)
    return variants


def check_config() -> None:
    """Cross-key checks the schema cannot express; fail at DAG start with one line naming the key."""
    known = available_methods()
    for m in METHODS + list(config["method_params"]):
        if m not in known:
            raise ValueError(f"config: unknown method {m!r} (methods/method_params); available: {', '.join(known)}")
        for task in [None, *TASKS]:
            method_config(m, task)  # hyperparameters checked now, not hours into the run
    for task in TASKS:
        configs = {m: method_config(m, task) for m in METHODS if method_cls(m).config_cls}
        for line in violations(configs):
            raise ValueError(f"config: fairness protocol on {task}: {line} (method_params; README 'Fairness protocol')")
    for m, axes in config["ablations"]["methods"].items():
        if m not in METHODS:
            raise ValueError(f"config: ablations.methods.{m}: {m!r} is not in methods")
        per_task = config["method_params"].get(m, {}).get("tasks", {})
        for task in set(per_task) & set(ABLATION_TASKS):
            if clash := sorted(set(axes) & set(per_task[task])):
                raise ValueError(f"config: ablations.methods.{m} varies {clash}, which method_params.{m}.tasks.{task} "
                                 "also sets: the reference row would not be the configured value on that task")
    if extra := sorted(set(ABLATION_SEEDS) - set(SEEDS)):
        raise ValueError(f"config: ablations.seeds {extra} not in seeds {SEEDS}: the reference row runs at `seeds`")
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
    if (code := [t for t in TASKS if t in CODE_TASKS]) and not config["evaluation"]["allow_code_execution"]:
        raise ValueError(f"config: evaluation.allow_code_execution is false but tasks include {', '.join(code)}, "
                         "which execute model-written code: set it to true to consent, or drop those tasks")
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


check_config()
VARIANTS = ablation_variants()


HOST_RULES = {"plan", "splits", "contamination", "pairing", "aggregate", "figures", "loss_curves", "cka_figure",
              "run_manifest", "all"}  # never load a model on `device`


def _runs_on_the_device() -> bool:
    """Whether a job left to run here loads a model on `device` (a plan or a table does not: a login node may
    write them)."""
    return any(job.rule.name not in HOST_RULES for job in workflow.dag.needrun_jobs())


onstart:
    # Only when jobs actually run here (not a dry run, not on a cluster whose nodes carry the GPUs) and one of them
    # needs the GPU: before any job.
    if config["device"] == "cuda" and workflow.executor_plugin.common_settings.local_exec and _runs_on_the_device():
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("config: device = cuda but no CUDA GPU is visible here; set device: cpu or auto")


def trained_methods() -> list[str]:
    return [m for m in METHODS if not method_cls(m).reference]


def seeds_for(method: str) -> list[int]:
    """Reference rows do not depend on the seed: evaluate them once."""
    return [SEEDS[0]] if method_cls(method).reference else SEEDS


def methods_on(task: str) -> list[str]:
    """Every configured method and, on the ablation tasks, every variant."""
    return METHODS + ([str(v) for v in VARIANTS] if task in ABLATION_TASKS else [])


# ------------------------------------------------------------------------------------------------- models, data
def model_spec(name: str) -> dict:
    """What prepare_model resolves for model ``name``: its spec without the bootstrap section, with the top-level
    `dtype` (when set) replacing the spec's own, so every later rule loads the weights in that dtype."""
    spec = {k: v for k, v in config["models"][name].items() if k != "bootstrap"}
    if config["dtype"]:
        spec["dtype"] = config["dtype"]
    return spec


def model_manifest(name: str) -> str:
    """Manifest of the usable model (its dir is the parent): bootstrapped if the spec asks for it, else as prepared."""
    stage = "bootstrapped" if "bootstrap" in config["models"][name] else "prepared"
    return f"{R}/models/{name}/{stage}/manifest.json"


def pair_model(role: str):
    return lambda wc: model_manifest(config["pairs"][wc.pair][role])


def manifests() -> dict[str, str]:
    names = {n for p in config["pairs"].values() for n in (p["teacher"], p["student"])}
    return {n: model_manifest(n) for n in sorted(names)}


def splits_manifest(task: str) -> str:
    return f"{R}/splits/{task}/manifest.json"


def split_file(split: SplitId) -> str:
    """A split's jsonl, beside the manifest that marks the task's splits complete."""
    return f"{R}/splits/{split.task}/{split.split}.jsonl"


# ---------------------------------------------------------------------------------------------------- transfer
def transfer_inputs(wc) -> dict:
    inputs = {"teacher": pair_model("teacher")(wc), "student": pair_model("student")(wc),
              "splits": splits_manifest(wc.task)}
    for artifact in needs(wc.method, wc.task):
        if isinstance(artifact, TeacherCache) and artifact.pairing and artifact not in cache_readers(wc):
            raise ValueError(f"target {wc.method} on {wc.task}: not in `methods` (nor an ablation variant there), so the "
                             f"shared teacher cache of {wc.pair}/{wc.task} does not keep the teacher layers it reads; "
                             f"add {Variant.parse(wc.method).method} to `methods`")
        inputs[artifact.key] = artifact.path(R, wc.pair, wc.task)
    return inputs


def cache_readers(wc) -> list[TeacherCache]:
    """What every method and variant on this pair/task wants from the shared teacher cache."""
    return sorted({a for m in methods_on(wc.task) for a in needs(m, wc.task) if isinstance(a, TeacherCache)}, key=str)


def cache_pairings(wc) -> list[str]:
    return sorted({pairing_path(a.pairing, wc.pair, wc.task) for a in cache_readers(wc) if a.pairing})


def cache_layer_specs(wc) -> list[list[str]]:
    """[pairing file, states] per reader with teacher layers: the cache keeps the union of their layers."""
    return [[pairing_path(a.pairing, wc.pair, wc.task), a.states] for a in cache_readers(wc) if a.pairing]


def pairing_path(name: PairingName, pair: str, task: str) -> str:
    return Pairing(name).path(R, pair, task)


def pairing_inputs(wc) -> dict:
    name = PairingName.parse(wc.name)
    inputs = {"teacher": pair_model("teacher")(wc), "student": pair_model("student")(wc)}
    if name.attribution:
        inputs["scores"] = f"{R}/attribution/{wc.pair}/{wc.task}/{name.attribution}.csv"
    if name.strategy == "cka":
        inputs["cka"] = f"{R}/cka/{wc.pair}/{wc.task}/none.csv"  # untouched student: no cycle through transfer
    return inputs


def transfer_record(pair: str, task: str, method: str, seed: int) -> str:
    return f"{R}/transfer/{pair}/{task}/{method}/seed{seed}/transfer.json"


def transfer_records() -> list[str]:
    return [transfer_record(pair, task, method, seed)
            for pair in config["pairs"] for task in TASKS for method in trained_methods() for seed in SEEDS]


def evaluated_model(wc) -> str:
    """What `evaluate` reads: a reference row's model manifest directly, else the transfer record."""
    role = method_cls(wc.method).reference
    if role:
        return pair_model(role)(wc)
    return transfer_record(wc.pair, wc.task, wc.method, wc.seed)


def eval_seeds(wc) -> list[int]:
    """The seeds one evaluate job scores: every seed of a main-table method (one job, rule `evaluate`), else the
    one seed in its file name (reference rows and ablation variants, rule `evaluate_one`)."""
    return [int(wc.seed)] if hasattr(wc, "seed") else SEEDS


def evaluated_models(wc) -> list[str]:
    """What one evaluate job reads, in the order of `eval_seeds`."""
    return [evaluated_model(SimpleNamespace(pair=wc.pair, task=wc.task, method=wc.method, seed=s))
            for s in eval_seeds(wc)]


def cka_student(wc) -> str:
    """The student `cka` compares: the untouched one (``none``), or what `evaluate` reads for the first seed."""
    return evaluated_model(SimpleNamespace(pair=wc.pair, task=wc.task, method=wc.method, seed=SEEDS[0]))


# ------------------------------------------------------------------------------------------------------ report
def eval_record(pair: str, task: str, method: str, seed: int) -> str:
    return f"{R}/eval/{pair}/{task}/{method}/seed{seed}.json"


def eval_records() -> list[str]:
    main = [eval_record(pair, task, m, seed)
            for pair in config["pairs"] for task in TASKS for m in METHODS for seed in seeds_for(m)]
    variants = [eval_record(pair, task, str(v), seed)
                for pair in config["pairs"] for task in ABLATION_TASKS for v in VARIANTS for seed in ABLATION_SEEDS]
    return main + variants


def ablation_axes() -> list[dict]:
    """One entry per ablation table: its method, key and rows [label, method or variant name], reference first."""
    axes = []
    for method, keys in config["ablations"]["methods"].items():
        base = asdict(method_config(method))
        for key, values in keys.items():
            rows = [[f"{base[key]} (as configured)", method]] + [
                [str(v), str(Variant(method, key, v))] for v in values if v != base[key]]
            axes.append({"method": method, "key": key, "rows": rows, "stem": f"ablation_{method}__{key}"})
    return axes


def ablation_tables() -> list[str]:
    return [f"{R}/tables/{axis['stem']}.md" for axis in ablation_axes()]


def run_facts_inputs() -> dict:
    """Per (pair, task), what the cost table divides by: train split, model manifests and, when a trained method
    reads it, the teacher cache (whose meta says how many teacher forwards it cost)."""
    uses_cache = {task: any(method_cls(m).uses_teacher_cache(method_config(m, task)) for m in trained_methods())
                  for task in TASKS}
    return {pair: {task: {"train": split_file(SplitId(task, "train")),
                          "teacher": model_manifest(p["teacher"]), "student": model_manifest(p["student"]),
                          "cache": f"{R}/cache/{pair}/{task}/teacher.pt" if uses_cache[task] else None}
                   for task in TASKS}
            for pair, p in config["pairs"].items()}


def run_facts_files() -> list[str]:
    return sorted({f for tasks in run_facts_inputs().values() for facts in tasks.values() for f in facts.values() if f}
                  | {splits_manifest(t) for t in TASKS})


def method_configs() -> dict:
    """method -> task -> the resolved config a transfer on that task runs with (the hparams table's columns)."""
    return {m: {task: asdict(method_config(m, task)) for task in TASKS}
            for m in trained_methods() if method_cls(m).config_cls}


def finetuned_tables() -> list[str]:
    """The paper's Table 2 analogue, when the config names its pairs."""
    return [f"{R}/tables/finetuned_teachers.md"] if config["report"]["finetuned_teachers"] else []


def pair_sources() -> dict[str, list[str]]:
    """pair -> [teacher, student] hub ids ("" for a random model): what the paper's numbers are matched on."""
    return {pair: [config["models"][p[role]].get("source", "") for role in ("teacher", "student")]
            for pair, p in config["pairs"].items()}


def cka_tasks() -> list[str]:
    """`analysis.cka_tasks` that this profile runs (the default, HumanEval, may not be among them)."""
    return [t for t in config["analysis"]["cka_tasks"] if t in TASKS]


def cka_figures() -> list[str]:
    """Paper Figs. 4-5 per pair x CKA task, when `analysis.cka_method` is among the trained methods."""
    if config["analysis"]["cka_method"] not in trained_methods():
        return []
    return [f"{R}/figures/cka_{pair}_{task}.png" for pair in config["pairs"] for task in cka_tasks()]


def uses_pairings() -> bool:
    return any(a.key == "pairing" for m in METHODS for task in TASKS for a in needs(m, task))


def analysis_outputs() -> list[str]:
    """Fig. 2 per model and the attribution profile per teacher x task, when a method pairs layers; the CKA
    figures when their method is configured."""
    outputs = cka_figures()
    if uses_pairings():
        outputs += [f"{R}/bases/{m}/decomposition.png" for m in manifests()] + [
            f"{R}/attribution/{pair}/{task}/{a}.png"
            for pair in config["pairs"] for task in TASKS for a in config["analysis"]["attribution_methods"]
        ]
    return outputs


def loss_curve_figures() -> list[str]:
    if not trained_methods():
        return []
    return [f"{R}/figures/loss_curves/{pair}/{task}.png" for pair in config["pairs"] for task in TASKS]


def result_files() -> list[str]:
    return [
        f"{R}/tables/main.md",
        f"{R}/tables/models.md",
        f"{R}/tables/contamination.md",
        *finetuned_tables(),
        f"{R}/figures/main.png",
        *loss_curve_figures(),
        *analysis_outputs(),
    ]


def run_manifest() -> str:
    return f"{R}/manifest.json"


def final_outputs() -> list[str]:
    """The results and, written after them, the manifest of what produced them (commit, versions, machine)."""
    return [*result_files(), run_manifest()]


# ------------------------------------------------------------------------------------------------- benchmarks
def bench_target() -> tuple[str, str]:
    """The (pair, task) of the transfer-cost benchmark: the first pair, on GSM8K when it is configured."""
    return next(iter(config["pairs"])), "gsm8k" if "gsm8k" in TASKS else TASKS[0]


def bench_inputs() -> dict[str, dict[str, str]]:
    """method -> its transfer inputs on the benchmark's (pair, task)."""
    pair, task = bench_target()
    return {m: transfer_inputs(SimpleNamespace(pair=pair, task=task, method=m)) for m in trained_methods()}


def bench_params() -> dict[str, dict]:
    """method -> its parameters on the benchmark's task (per-task settings resolved)."""
    return {m: method_params(m, bench_target()[1]) for m in trained_methods()}
