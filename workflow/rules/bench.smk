# The transfer-cost benchmark (not part of `all`: it re-trains every method once more, one process each).
#   snakemake --cores all results/<profile>/bench/transfer_cost.md


rule transfer_cost:
    input:
        transfers=sorted({f for inputs in bench_inputs().values() for f in inputs.values()}),
        facts=[run_facts_inputs()[bench_target()[0]][bench_target()[1]][k] for k in ("train", "teacher", "student")],
        cache=f"{R}/cache/{bench_target()[0]}/{bench_target()[1]}/teacher.pt",
        cache_benchmark=f"{BENCH}/cache_teacher/{bench_target()[0]}/{bench_target()[1]}.tsv",
    output:
        json=f"{R}/bench/transfer_cost.json",
        md=report(f"{R}/bench/transfer_cost.md", caption="../report/transfer_cost.rst", category="Cost"),
        breakdown=f"{R}/bench/transfer_cost_breakdown.md",
    params:
        pair=bench_target()[0],
        task=bench_target()[1],
        inputs=bench_inputs(),
        method_params=bench_params(),
        seed=SEEDS[0],
        device=config["device"],
        max_len=config["data"]["max_len"],
        train_on_inputs=bench_target()[1] in config["data"]["train_on_inputs"],
    log:
        f"{LOGS}/transfer_cost.log",
    threads: THREADS
    resources:
        gpu=config["gpus_per_job"],
    conda:
        "../envs/semalign.yaml"
    script:
        "../../benchmarks/transfer_cost.py"
