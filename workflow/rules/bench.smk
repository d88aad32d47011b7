# The transfer-cost benchmark (not part of `all`: it re-trains every method once more, one process each).
#   snakemake --cores all results/<profile>/bench/transfer_cost.md


rule transfer_cost:
    input:
        unpack(cost_inputs),
    output:
        json=f"{R}/bench/transfer_cost.json",
        md=report(f"{R}/bench/transfer_cost.md", caption="../report/transfer_cost.rst", category="Cost"),
    params:
        pair=bench_target()[0],
        task=bench_target()[1],
        methods=trained_methods(),
        method_params=config["method_params"],
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
