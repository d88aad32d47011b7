# SemAlign's analysis stages: semantic-basis validation (paper Fig. 2), layer attribution, layer pairing.


rule semantic_bases:
    input:
        model=lambda wc: model_manifest(wc.model),
        splits=expand(f"{R}/splits/{{task}}/manifest.json", task=TASKS),
    output:
        csv=f"{R}/bases/{{model}}/decomposition.csv",
        png=report(f"{R}/bases/{{model}}/decomposition.png", caption="../report/decomposition.rst", category="Semantic bases"),
    params:
        per_task=config["analysis"]["examples_per_task"],
        max_len=config["data"]["max_len"],
        seed=config["data"]["seed"],
    log:
        f"{LOGS}/semantic_bases/{{model}}.log",
    benchmark:
        f"{BENCH}/semantic_bases/{{model}}.tsv"
    threads: THREADS
    conda:
        "../envs/semalign.yaml"
    script:
        "../scripts/semantic_bases.py"


rule aligned_map:
    input:
        teacher=pair_model("teacher"),
        student=pair_model("student"),
    output:
        f"{R}/bases/{{pair}}/aligned_map.pt",
    log:
        f"{LOGS}/aligned_map/{{pair}}.log",
    benchmark:
        f"{BENCH}/aligned_map/{{pair}}.tsv"
    threads: THREADS
    conda:
        "../envs/semalign.yaml"
    message:
        "Aligned semantic map M = S_S S_T^T for {wildcards.pair}"
    script:
        "../scripts/aligned_map.py"


rule attribution:
    input:
        teacher=pair_model("teacher"),
        splits=f"{R}/splits/{{task}}/manifest.json",
    output:
        csv=f"{R}/attribution/{{pair}}/{{task}}/{{attribution}}.csv",
        png=report(f"{R}/attribution/{{pair}}/{{task}}/{{attribution}}.png", caption="../report/attribution.rst", category="Attribution"),
    params:
        max_len=config["data"]["max_len"],
        batch_size=config["cache"]["batch_size"],
        seed=config["data"]["seed"],
        device=config["device"],
    log:
        f"{LOGS}/attribution/{{pair}}/{{task}}/{{attribution}}.log",
    benchmark:
        f"{BENCH}/attribution/{{pair}}/{{task}}/{{attribution}}.tsv"
    threads: THREADS
    resources:
        gpu=config["gpus_per_job"],
    conda:
        "../envs/semalign.yaml"
    message:
        "Layer attribution ({wildcards.attribution}) of the teacher: {wildcards.pair} / {wildcards.task}"
    script:
        "../scripts/attribution.py"


rule pairing:
    input:
        unpack(pairing_inputs),
    output:
        f"{R}/pairing/{{pair}}/{{task}}/{{pairing}}.json",
    params:
        seed=config["data"]["seed"],
    log:
        f"{LOGS}/pairing/{{pair}}/{{task}}/{{pairing}}.log",
    conda:
        "../envs/semalign.yaml"
    script:
        "../scripts/pairing.py"
