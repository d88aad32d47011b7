# PKT protocol splits per task: extract / align / train from the transfer pool, test from the benchmark.


rule splits:
    output:
        manifest=f"{R}/splits/{{task}}/manifest.json",
    params:
        sizes=lambda wc: config["data"]["sizes"][wc.task],
        seed=config["data"]["seed"],
    log:
        f"{LOGS}/splits/{{task}}.log",
    conda:
        "../envs/semalign.yaml"
    message:
        "Writing deterministic splits for {wildcards.task}"
    script:
        "../scripts/splits.py"
