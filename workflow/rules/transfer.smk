# Teacher activations and each method's seed-independent preparation once per (pair, task); then one generic
# transfer rule over the methods registry.


rule cache_teacher:
    input:
        teacher=pair_model("teacher"),
        student=pair_model("student"),
        splits=f"{R}/splits/{{task}}/manifest.json",
        pairings=cache_pairings,
    output:
        f"{R}/cache/{{pair}}/{{task}}/teacher.pt",
    params:
        layer_specs=cache_layer_specs,
        max_len=config["data"]["max_len"],
        batch_size=config["cache"]["batch_size"],
        device=config["device"],
        train_on_inputs=lambda wc: wc.task in config["data"]["train_on_inputs"],
    log:
        f"{LOGS}/cache_teacher/{{pair}}/{{task}}.log",
    benchmark:
        f"{BENCH}/cache_teacher/{{pair}}/{{task}}.tsv"
    threads: THREADS
    resources:
        **planned("cache_teacher"),
    conda:
        "../envs/semalign.yaml"
    message:
        "Caching teacher activations: {wildcards.pair} / {wildcards.task}"
    script:
        "../scripts/cache_teacher.py"


rule prepare_transfer:
    input:
        teacher=pair_model("teacher"),
        student=pair_model("student"),
        splits=f"{R}/splits/{{task}}/manifest.json",
    output:
        Preparation.pattern(R),
    params:
        method_params=preparation_params,
        device=config["device"],
        max_len=config["data"]["max_len"],
        train_on_inputs=lambda wc: wc.task in config["data"]["train_on_inputs"],
    wildcard_constraints:
        digest=Preparation.DIGEST,
    log:
        f"{LOGS}/prepare_transfer/{{pair}}/{{task}}/{{method}}/{{digest}}.log",
    benchmark:
        f"{BENCH}/prepare_transfer/{{pair}}/{{task}}/{{method}}/{{digest}}.tsv"
    threads: THREADS
    resources:
        **planned("prepare_transfer"),
    conda:
        "../envs/semalign.yaml"
    message:
        "Preparing {wildcards.method} for every seed: {wildcards.pair} / {wildcards.task}"
    script:
        "../scripts/prepare_transfer.py"


rule transfer:
    input:
        unpack(transfer_inputs),
    output:
        transfer_record("{pair}", "{task}", "{method}", "{seed}"),
    params:
        method=lambda wc: Variant.parse(wc.method).method,
        method_params=lambda wc: method_params(wc.method, wc.task),
        device=config["device"],
        max_len=config["data"]["max_len"],
        train_on_inputs=lambda wc: wc.task in config["data"]["train_on_inputs"],
    log:
        f"{LOGS}/transfer/{{pair}}/{{task}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/transfer/{{pair}}/{{task}}/{{method}}/seed{{seed}}.tsv"
    threads: THREADS
    resources:
        **planned("transfer"),
    conda:
        "../envs/semalign.yaml"
    message:
        "Transfer {wildcards.method}: {wildcards.pair} / {wildcards.task} / seed {wildcards.seed}"
    script:
        "../scripts/transfer.py"
