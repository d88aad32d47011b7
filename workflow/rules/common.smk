# Config (loaded and checked by semalign.suite.config) and every input function. Rules only name what they need;
# methods say what they read (Method.needs), so nothing here looks inside a method's config.
import os
import re
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from semalign.attribution import METHODS as ATTRIBUTION_METHODS
from semalign.method import AlignedMap, Pairing
from semalign.pairing import STRATEGIES
from semalign.suite import config as configuration
from semalign.suite.ids import PairingName, SplitId, Variant
from semalign.suite.evaluation import gen_cap
from semalign.suite.sources import SPLITS, data_dir, source_files
from semalign.suite.registry import Artifact, Preparation, TeacherCache, method_class

configuration.load(config)  # coerced, validated (defaults filled in) and cross-checked before any job is built

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
    return configuration.method_params(config, name, task)


def method_config(name: str | Variant, task: str | None = None):
    return configuration.method_config(config, name, task)


def needs(name: str | Variant, task: str | None = None) -> list[Artifact]:
    """The artifacts a transfer of method (or variant) ``name`` on ``task`` reads, as its method declares them."""
    cls = method_cls(name)
    return [] if cls.reference else cls.needs(method_config(name, task))


VARIANTS = configuration.ablation_variants(config)


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


def local_model_files(name: str) -> list[str]:
    """The files of a model (and tokenizer) whose source is a local path (a user's own checkpoint, the carved student
    of benchmarks/carved_student.py): inputs of its preparation, so replacing them prepares it again instead of
    reusing the stale copy. Hub ids and pkg: sources are names, not files: their spec (revision) is the param."""
    spec = config["models"][name]
    files = []
    for source in (spec.get("source"), spec.get("tokenizer", {}).get("source")):
        path = Path(source).expanduser() if source and not source.startswith("pkg:") else None
        if path is not None and path.exists():
            files += [str(p) for p in ([path] if path.is_file() else sorted(path.rglob("*"))) if p.is_file()]
    return files


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


def preparation_params(wc) -> dict:
    """The method_params of a prepare_transfer job: those of any method or variant on the task whose preparation
    this is (variants that share the file agree on every setting the preparation reads)."""
    for name in methods_on(wc.task):
        if Preparation(Variant.parse(name).method, wc.digest) in needs(name, wc.task):
            return method_params(name, wc.task)
    raise ValueError(f"no method or variant on {wc.task} has the {wc.method} preparation {wc.digest}")


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


def ablation_figures() -> list[str]:
    return [f"{R}/figures/{axis['stem']}.png" for axis in ablation_axes()]


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
    """Every table and figure, each named: Snakemake reruns a job for its missing outputs only when they are
    requested, so a table left out here (a new ablation axis) would silently never be written."""
    return [
        *(f"{R}/tables/{name}.md" for name in ("main", "models", "cost", "hparams", "significance", "contamination")),
        *ablation_tables(),
        *finetuned_tables(),
        f"{R}/figures/main.png",
        f"{R}/figures/cost_gain.png",
        *ablation_figures(),
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
    """method -> its transfer inputs on the benchmark's (pair, task), less its preparation: the benchmark times
    each method whole, so a method computes its seed-independent part in the same process (the DAG shares it)."""
    pair, task = bench_target()
    return {m: {k: f for k, f in transfer_inputs(SimpleNamespace(pair=pair, task=task, method=m)).items()
                if k != Preparation.key} for m in trained_methods()}


def bench_params() -> dict[str, dict]:
    """method -> its parameters on the benchmark's task (per-task settings resolved)."""
    return {m: method_params(m, bench_target()[1]) for m in trained_methods()}
