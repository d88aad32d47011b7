# PKT protocol splits per task: extract / align / train from the transfer pool, test from the benchmark. The
# benchmark files it reads are declared inputs: another data dir, or an edited file, reruns what depends on them.
# Items a transfer split shares with the test set are dropped (data.keep_contaminated) and reported in a table.


rule splits:
    input:
        lambda wc: [str(f) for f in source_files(wc.task, DATA_DIR)],
    output:
        manifest=splits_manifest("{task}"),
        files=[split_file(SplitId("{task}", s)) for s in SPLITS],
    params:
        sizes=lambda wc: config["data"]["sizes"][wc.task],
        seed=config["data"]["seed"],
        keep_contaminated=config["data"]["keep_contaminated"],
        data_dir=str(DATA_DIR) if DATA_DIR else None,
    log:
        f"{LOGS}/splits/{{task}}.log",
    conda:
        "../envs/semalign.yaml"
    message:
        "Writing deterministic splits for {wildcards.task}"
    script:
        "../scripts/splits.py"


rule contamination:
    input:
        manifests=[splits_manifest(task) for task in TASKS],
    output:
        csv=f"{R}/tables/contamination.csv",
        counts=f"{R}/tables/contamination_counts.csv",
        md=report(f"{R}/tables/contamination.md", caption="../report/contamination.rst", category="Tables"),
    log:
        f"{LOGS}/contamination.log",
    conda:
        "../envs/semalign.yaml"
    message:
        "Tabulating the transfer/test leaks found and dropped by the splits"
    script:
        "../scripts/contamination.py"
