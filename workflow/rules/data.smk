# PKT protocol splits per task: extract / align / train from the transfer pool, test from the benchmark. The
# benchmark files it reads are declared inputs: another data dir, or an edited file, reruns what depends on them.


rule splits:
    input:
        lambda wc: [str(f) for f in source_files(wc.task, DATA_DIR)],
    output:
        manifest=splits_manifest("{task}"),
        files=[split_file(SplitId("{task}", s)) for s in SPLITS],
    params:
        sizes=lambda wc: config["data"]["sizes"][wc.task],
        seed=config["data"]["seed"],
        data_dir=str(DATA_DIR) if DATA_DIR else None,
    log:
        f"{LOGS}/splits/{{task}}.log",
    conda:
        "../envs/semalign.yaml"
    message:
        "Writing deterministic splits for {wildcards.task}"
    script:
        "../scripts/splits.py"
