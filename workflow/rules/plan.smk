# The memory and compute plan (semalign.suite.plan): every job's predicted peak memory, disk, FLOPs and runtime,
# from the model configs alone. `snakemake --cores 1 results/<profile>/plan.md`. The same per-job plan sets the
# resources (mem_mb, runtime, gpu) of the heavy rules, so a cluster profile asks for what the plan predicts.
from dataclasses import asdict as _asdict

from semalign.suite.plan import Setting, plan_job, slurm_resources, write_plan


def job_plan(rule: str, wc):
    """The plan of one job; the transfer rule's method config and whether the teacher cache stores layers
    come from the same input functions the DAG uses."""
    wc = SimpleNamespace(**(wc if isinstance(wc, dict) else dict(wc.items())))
    extra = {}
    if rule == "transfer":
        extra["method_cfg"] = method_config(wc.method)
    if rule == "prepare_transfer":
        extra["method_cfg"] = method_class(wc.method).config(preparation_params(wc))
    if rule in ("transfer", "cache_teacher"):
        extra["cache_layers"] = bool(cache_layer_specs(wc))
    if rule == "semantic_bases":
        extra["n_records"] = config["analysis"]["examples_per_task"] * len(TASKS)
    if rule == "evaluate":
        extra["n_models"] = len(eval_seeds(wc))
    return plan_job(config, rule, vars(wc), Path(R), **extra)


def planned(rule: str) -> dict:
    """`resources:` of ``rule`` from its jobs' plans (evaluated per job, when the DAG is built)."""
    return {key: (lambda wc, key=key: slurm_resources(job_plan(rule, wc), config)[key])
            for key in ("mem_mb", "runtime", "gpu")}


def planned_jobs() -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job the plan covers: the model, analysis, cache, preparation, transfer and
    evaluate jobs."""
    pairs, jobs = list(config["pairs"]), []
    jobs += [("prepare_model", {"model": m}) for m in manifests()]
    if uses_pairings():
        jobs += [("semantic_bases", {"model": m}) for m in manifests()]
        jobs += [("attribution", {"pair": p, "task": t, "attribution": a}) for p in pairs for t in TASKS
                 for a in config["analysis"]["attribution_methods"]]
    if any(a.key == "aligned_map" for t in TASKS for m in methods_on(t) for a in needs(m)):
        jobs += [("aligned_map", {"pair": p}) for p in pairs]
    for p in pairs:
        for t in TASKS:
            if cache_readers(SimpleNamespace(pair=p, task=t)):
                jobs.append(("cache_teacher", {"pair": p, "task": t}))
            jobs += [("prepare_transfer", {"pair": p, "task": t, "method": a.method, "digest": a.digest})
                     for a in sorted({a for m in methods_on(t) for a in needs(m, t) if isinstance(a, Preparation)},
                                     key=str)]
            for m in methods_on(t):
                seeds = seeds_for(m) if m in METHODS else ABLATION_SEEDS
                if not method_cls(m).reference:
                    jobs += [("transfer", {"pair": p, "task": t, "method": m, "seed": str(s)}) for s in seeds]
                if m in trained_methods():  # rule evaluate: every seed in one job
                    jobs.append(("evaluate", {"pair": p, "task": t, "method": m}))
                else:
                    jobs += [("evaluate", {"pair": p, "task": t, "method": m, "seed": str(s)}) for s in seeds]
    return jobs


rule plan:
    output:
        md=f"{R}/plan.md",
        csv=f"{R}/plan.csv",
        json=f"{R}/plan.json",
    log:
        f"{LOGS}/plan.log",
    message:
        "Memory and compute plan of every job of profile {config[profile]}"
    run:
        plans = [job_plan(r, wc) for r, wc in planned_jobs()]
        write_plan(plans, Setting.of(config), Path(output.md), Path(output.csv), Path(output.json))
