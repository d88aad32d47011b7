# Config loading, validation and every input function. Rules only name what they need.
import os
from pathlib import Path

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
LOGS = f"logs/{config['profile']}"
BENCH = f"{R}/benchmarks"
SEEDS = config["seeds"]
TASKS = config["tasks"]
METHODS = config["methods"]
THREADS = min(config["threads"], workflow.cores)


def check_config() -> None:
    """Cross-key checks the schema cannot express; fail at DAG start with one line naming the key."""
    from semalign.registry import available_methods

    known = available_methods()
    for m in METHODS + list(config["method_params"]):
        if m not in known:
            raise ValueError(f"config: unknown method {m!r} (methods/method_params); available: {', '.join(known)}")
    for pair, p in config["pairs"].items():
        for role in ("teacher", "student"):
            if p[role] not in config["models"]:
                raise ValueError(f"config: pairs.{pair}.{role} = {p[role]!r} is not a key of models")
    for task in TASKS:
        if task not in config["data"]["sizes"]:
            raise ValueError(f"config: data.sizes.{task} missing (tasks lists {task})")


check_config()


def model_manifest(name: str) -> str:
    """Manifest of the usable model (its dir is the parent): bootstrapped if the spec asks for it, else as prepared."""
    stage = "bootstrapped" if "bootstrap" in config["models"][name] else "prepared"
    return f"{R}/models/{name}/{stage}/manifest.json"


def pair_model(role: str):
    return lambda wc: model_manifest(config["pairs"][wc.pair][role])


def method_cls(name: str):
    from semalign.registry import get_method

    return type(get_method(name))


def seeds_for(method: str) -> list[int]:
    """Reference rows do not depend on the seed: evaluate them once."""
    return [SEEDS[0]] if method_cls(method).reference else SEEDS


def evaluated_model(wc) -> str:
    """What `evaluate` reads: a reference row's model manifest directly, else the transfer record."""
    role = method_cls(wc.method).reference
    if role:
        return pair_model(role)(wc)
    return f"{R}/transfer/{wc.pair}/{wc.task}/{wc.method}/seed{wc.seed}/transfer.json"


def transfer_inputs(wc) -> dict:
    inputs = {
        "teacher": pair_model("teacher")(wc),
        "student": pair_model("student")(wc),
        "splits": f"{R}/splits/{wc.task}/manifest.json",
    }
    if method_cls(wc.method).uses_teacher_cache:
        inputs["cache"] = f"{R}/cache/{wc.pair}/{wc.task}/teacher.pt"
    return inputs


def eval_records() -> list[str]:
    return [
        f"{R}/eval/{pair}/{task}/{method}/seed{seed}.json"
        for pair in config["pairs"]
        for task in TASKS
        for method in METHODS
        for seed in seeds_for(method)
    ]


def manifests() -> dict[str, str]:
    names = {n for p in config["pairs"].values() for n in (p["teacher"], p["student"])}
    return {n: model_manifest(n) for n in sorted(names)}


def final_outputs() -> list[str]:
    return [
        f"{R}/tables/main.md",
        f"{R}/tables/models.md",
        f"{R}/figures/main.png",
    ]
