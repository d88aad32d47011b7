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

R = f"results/{config['profile']}"
LOGS = f"logs/{config['profile']}"
BENCH = f"{R}/benchmarks"
SEEDS = config["seeds"]
TASKS = config["tasks"]
METHODS = config["methods"]


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


def model_dir(name: str) -> str:
    """Where the usable model lives: bootstrapped if the spec asks for it, else as prepared."""
    stage = "bootstrapped" if "bootstrap" in config["models"][name] else "prepared"
    return f"{R}/models/{name}/{stage}"


def pair_model(role: str):
    return lambda wc: model_dir(config["pairs"][wc.pair][role]) + "/manifest.json"


def method_cls(name: str):
    from semalign.registry import get_method

    return type(get_method(name))


def seeds_for(method: str) -> list[int]:
    """Reference rows do not depend on the seed: run them once."""
    return SEEDS if method_cls(method).seeded else [SEEDS[0]]


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
    return {n: model_dir(n) + "/manifest.json" for n in sorted(names)}


def final_outputs() -> list[str]:
    return [
        f"{R}/tables/main.md",
        f"{R}/tables/models.md",
        f"{R}/figures/main.png",
    ]
